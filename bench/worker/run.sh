#!/usr/bin/env bash
# Worker throughput with a device-bound render: one hallmark-worker process
# (synthetic engine, --render-ms standing in for the GPU's time per batch,
# during which the CPU idles as it would beside a GPU) against a local
# coordinator (`hallmark up --workers 0`), rendering a job of N prompts at
# SIZE² (generate only: the synthetic upscale's own resize is CPU work that
# a GPU's would not be). Each configuration renders the
# same job from a fresh state; the first (one batch in hand, one stamping
# thread: render, stamp, upload, one after the other) is the baseline the
# others are quoted against, in the same run.
#
#   bench/worker/run.sh [PROMPTS] [RENDER_MS] [SIZE]   (defaults 64, 1000, 1024)
#
# Builds the binaries in the dev profile (PROFILE=release for release).
set -euo pipefail
cd "$(dirname "$0")/../.."
prompts="${1:-64}"
render_ms="${2:-1000}"
size="${3:-1024}"
profile="${PROFILE:-dev}"
cargo build -q --profile "$profile" -p hallmark-client --bin hallmark -p hallmark-worker --bin hallmark-worker
dir=target/debug
[ "$profile" = dev ] || dir="target/$profile"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for i in $(seq 1 "$prompts"); do echo "a harbour at night, study $i"; done > "$work/prompts.txt"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cores=$(nproc)

# "batches in hand, stamping threads" per configuration.
configs=("1 1" "1 $cores" "2 1" "2 $cores")
base=""
echo "worker throughput: $prompts prompts at ${size}², render $render_ms ms per batch of 8, $cores cores ($profile build)"
for c in "${configs[@]}"; do
  read -r in_hand threads <<<"$c"
  state="$work/state-$in_hand-$threads"
  p=$(port)
  "$dir/hallmark" up --workers 0 --listen "127.0.0.1:$p" --state-dir "$state" >"$work/up.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do [ -f "$state/ca/signer.pem" ] && grep -q "farm up at" "$work/up.log" && break; sleep 0.1; done

  HALLMARK_LOG=warn "$dir/hallmark-worker" --coordinator "http://127.0.0.1:$p" --engine synthetic \
    --render-ms "$render_ms" --max-batch 8 --batches-in-hand "$in_hand" --stamp-threads "$threads" \
    --cert-chain "$state/ca/signer.pem" --private-key "$state/ca/signer.key" \
    --trust-anchors "$state/ca/root.pem" >"$work/worker.log" 2>&1 &
  pids+=($!)
  start=$(date +%s.%N)
  HALLMARK_COORDINATOR="http://127.0.0.1:$p" "$dir/hallmark" submit "$work/prompts.txt" --width "$size" --height "$size" --watch >/dev/null 2>"$work/submit.log" ||
    { cat "$work/submit.log" "$work/worker.log" "$work/up.log"; exit 1; }
  end=$(date +%s.%N)
  for q in "${pids[@]}"; do kill "$q" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  secs=$(python3 -c "print(f'{$end - $start:.2f}')")
  ips=$(python3 -c "print(f'{$prompts / ($end - $start):.2f}')")
  [ -n "$base" ] || base=$secs
  ratio=$(python3 -c "print(f'{$base / $secs:.2f}')")
  printf '{"batches_in_hand": %s, "stamp_threads": %s, "seconds": %s, "items_per_s": %s, "speedup": %s}\n' \
    "$in_hand" "$threads" "$secs" "$ips" "$ratio"
done
