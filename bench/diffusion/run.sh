#!/usr/bin/env bash
# CPU benchmark of the diffusion engine beside diffusers, in one run on the
# same machine and the same weights:
#   1. one guided UNet step (batch 2) of the SD 1.5 architecture at 256²;
#   2. the tiny SD-1.x pipeline end to end (192², 20 steps, Euler a, guided);
#   3. Real-ESRGAN's ×4plus architecture on a 128² input, beside PyTorch's
#      RRDBNet (tests/reference/rrdbnet.py) on the same weights;
#   4. the SD-1.5 VAE decoding one 512² image (what a one-step Turbo render
#      spends beside its single UNet call);
#   5. the UNet's operations one by one at the 256², batch-2 shapes (ops).
# Hallmark runs 1 and 2 four times: as it is by default (its own CPU
# attention, Winograd for the 3×3 stride-1 convolutions, F(4×4, 3×3) on the
# large maps), with `--attention matmul` (the materialised scores), with
# `--conv-algo im2col` (every convolution by the im2col) and with
# HALLMARK_WINOGRAD=f2 (Winograd's F(2×2, 3×3) everywhere): the in-run
# baselines of those kernels. Real-ESRGAN runs as it is, composed of
# candle's operations (`--composed`) and with HALLMARK_WINOGRAD=f2.
# Prints JSON lines and the ratios (diffusers time / Hallmark time: > 1 means
# Hallmark is faster). Uses the reference venv of tests/reference/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${HALLMARK_REF_VENV:-$HOME/.cache/hallmark/refenv}"
VOCAB="${HALLMARK_CLIP_VOCAB:-tests/data/clip/bpe_simple_vocab_16e6.txt.gz}"
WORK="${HALLMARK_BENCH_DIR:-$HOME/.cache/hallmark/bench-models}"
[ -x "$VENV/bin/python" ] || tests/reference/run.sh
# PROFILE=dev reuses the test build (dependencies at opt-level 3) instead of a release build.
PROFILE="${PROFILE:-release}"
cargo build -q --profile "$PROFILE" -p hallmark-diffusion --bin hallmark-diffusion-bench
BIN="target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/hallmark-diffusion-bench"
mkdir -p "$WORK"
[ -d "$WORK/sd15" ] || "$BIN" init "$WORK/sd15" --arch sd15-full --clip-vocab "$VOCAB"
[ -d "$WORK/tiny-sd1" ] || "$BIN" init "$WORK/tiny-sd1" --arch sd1 --clip-vocab "$VOCAB"
[ -d "$WORK/esrgan-x4" ] || "$BIN" init "$WORK/esrgan-x4" --arch esrgan-x4-full
OUT="$(mktemp)"
VARIANTS=("" "--attention matmul" "--conv-algo im2col" "HALLMARK_WINOGRAD=f2")
# Runs the bench with a variant: flags, or an environment setting.
variant() {
  local v="$1"
  shift
  case "$v" in
    *=*) env "$v" "$BIN" "$@" ;;
    # shellcheck disable=SC2086 # the variant is two words or none
    *) "$BIN" "$@" $v ;;
  esac
}
{
  for v in "${VARIANTS[@]}"; do
    variant "$v" unet --model "$WORK/sd15" --size 256 --runs 5
  done
  "$VENV/bin/python" bench/diffusion/diffusers_bench.py unet "$WORK/sd15" --size 256 --runs 5
  for v in "${VARIANTS[@]}"; do
    variant "$v" pipeline --model "$WORK/tiny-sd1" --size 192 --steps 20 --batch 1,4 --runs 3
  done
  "$VENV/bin/python" bench/diffusion/diffusers_bench.py pipeline "$WORK/tiny-sd1" --size 192 --steps 20 --batch 1,4 --runs 3
  for v in "" "--composed" "HALLMARK_WINOGRAD=f2"; do
    variant "$v" esrgan --model "$WORK/esrgan-x4" --size 128 --runs 3
  done
  "$VENV/bin/python" bench/diffusion/diffusers_bench.py esrgan "$WORK/esrgan-x4" --size 128 --runs 3
  "$BIN" vae --model "$WORK/sd15" --size 512 --runs 2
  "$VENV/bin/python" bench/diffusion/diffusers_bench.py vae "$WORK/sd15" --size 512 --runs 2
  "$BIN" ops --size 256 --batch 2 --runs 5
  "$VENV/bin/python" bench/diffusion/diffusers_bench.py ops --size 256 --batch 2 --runs 5
} | tee "$OUT"
"$VENV/bin/python" bench/diffusion/diffusers_bench.py ops-table "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def pick(engine, bench, batch=None):
    return [r for r in rows if r["engine"] == engine and r["bench"] == bench
            and (batch is None or r["batch"] == batch)]
def variant(r):
    return f"{r.get('attention')} attention, {r.get('conv')} convolutions"
d = pick("diffusers", "unet_step")[0]
for h in pick("hallmark", "unet_step"):
    print(f"SD1.5 UNet step 256² (batch 2), {variant(h)}: hallmark {h['median_s']*1000:.0f} ms, diffusers {d['median_s']*1000:.0f} ms, ratio {d['median_s']/h['median_s']:.2f}")
for p in pick("pytorch", "esrgan"):
    for h in pick("hallmark", "esrgan"):
        how = "composed of candle's operations" if h.get("composed") else "own buffers"
        print(f"Real-ESRGAN x4plus 128², {how}, {h['conv']} convolutions: hallmark {h['median_s']:.2f} s, pytorch {p['median_s']:.2f} s, ratio {p['median_s']/h['median_s']:.2f}")
for b in sorted({r["batch"] for r in pick("hallmark", "pipeline")}):
    d = pick("diffusers", "pipeline", b)[0]
    for h in pick("hallmark", "pipeline", b):
        print(f"tiny pipeline 192² 20 steps batch {b}, {variant(h)}: hallmark {h['images_per_s']:.2f} img/s, diffusers {d['images_per_s']:.2f} img/s, ratio {h['images_per_s']/d['images_per_s']:.2f}")
PY
