#!/usr/bin/env bash
# GPU benchmark, run ON the GPU machine (NVIDIA driver, python3 with PyTorch
# cu130, no Rust): this engine's CUDA build against diffusers (fp16, SDPA),
# on the same SD-1.5-architecture random weights, 512², 20 steps, Euler a,
# guidance 7.5, batch 1 and 8, in one run.
#
# First the UNet's operations one by one (matmuls, convolutions, norms,
# activations, layout copies at the SD-1.5 UNet's batch-8 shapes) in this
# engine and in PyTorch, side by side: which kernel costs what. Then every
# build found in .gpu/ runs: with flash attention (a `flash-attn` build;
# other builds say by name that they cannot), with the engine's own fused
# attention kernel and with matmul attention; then
# a per-section profile of one guided UNet call at batch 1 and 8 (UNet batch
# 2 and 16): where the time goes, for the next change. The VAE decoding a
# batch of 8 runs in both engines too, with this engine's sections. The
# fused attention also runs with HALLMARK_FUSED_KERNELS=off (candle's norm, GEGLU and bias
# adds; batch 8 and its profile): the in-run baseline for the engine's own
# elementwise kernels; and at batch 1 with cudarc's per-allocation events
# kept (HALLMARK_CUDA_EVENTS=on), the baseline for turning them off; and
# with the UNet's calls replayed as a CUDA graph (HALLMARK_CUDA_GRAPHS=on, after a
# `check` run that compares the first replay with an eager call). A `cudnn` build (its
# file name says so) also runs its convolutions with the engine's own
# im2col (`--conv-algo im2col`, as a build without cuDNN does), and is
# profiled with Winograd, the fastest of the three fixed cuDNN algorithms in
# run 3, and with im2col (CONV_ALGOS="winograd-nonfused implicit-precomp-gemm
# implicit-gemm im2col" profiles all four).
#
# Prepared on the build machine (see README "Speed"):
#   .gpu/hallmark-diffusion-bench-<build>.gz  (cargo build --release --features
#                                  cuda | cudnn | flash-attn, stripped, gzipped)
#   .gpu/run-on-gpu.sh             (../shared/gpu/run-on-gpu.sh)
#   .gpu/bpe_simple_vocab_16e6.txt.gz
#   .whl/diffusers-*.whl           (pip download diffusers==0.42.1 --no-deps -d .whl)
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
MODEL=/tmp/sd15
chmod +x .gpu/run-on-gpu.sh
bins=()
for gz in .gpu/hallmark-diffusion-bench*.gz; do
  bin="/tmp/$(basename "$gz" .gz)"
  gunzip -c "$gz" > "$bin" && chmod +x "$bin" && bins+=("$bin")
done
[ ${#bins[@]} -gt 0 ] || { echo "no .gpu/hallmark-diffusion-bench*.gz" >&2; exit 1; }
run() { local bin="$1"; shift; PYTHON=python3 timeout 150 .gpu/run-on-gpu.sh "$bin" "$@"; }
stamp() { echo "# $(date +%T) $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run "${bins[0]}" init "$MODEL" --arch sd15-full --clip-vocab .gpu/bpe_simple_vocab_16e6.txt.gz 2>&1
common=(--model "$MODEL" --device cuda --size 512)
{
  stamp kernels
  for dtype in f16 bf16; do run "${bins[0]}" kernels --device cuda --dtype "$dtype"; done
  stamp ops
  for bin in "${bins[@]}"; do run "$bin" ops --device cuda --dtype f16 --size 512 --batch 16 --runs 5 > "$OUT/ops-$(basename "$bin").jsonl"; done
  python3 bench/diffusion/diffusers_bench.py ops --device cuda --dtype f16 --size 512 --batch 16 --runs 5 > "$OUT/ops-torch.jsonl"
  for f in "$OUT"/ops-hallmark*.jsonl; do
    echo "# $(basename "$f")"; cat "$f" "$OUT/ops-torch.jsonl" > "$OUT/ops-joined.jsonl"
    python3 bench/diffusion/diffusers_bench.py ops-table "$OUT/ops-joined.jsonl"
  done
  stamp diffusers
  python3 bench/diffusion/diffusers_bench.py pipeline "$MODEL" --device cuda --dtype f16 --size 512 --steps 20 --batch 1,8 --runs 2
  for bin in "${bins[@]}"; do
    for attention in ${ATTENTIONS:-flash fused matmul}; do
      stamp "$bin, attention: $attention"
      run "$bin" pipeline "${common[@]}" --dtype f16 --attention "$attention" --steps 20 --batch 1,8 --runs 2
    done
  done
  # The same engine with candle's chains for the group norm, GEGLU and the
  # bias adds (HALLMARK_FUSED_KERNELS=off; the attention kernel stays), at
  # batch 8: the baseline, in the same run, for what the fused elementwise
  # kernels are worth.
  for bin in "${bins[@]}"; do
    stamp "$bin, attention: fused, HALLMARK_FUSED_KERNELS=off"
    HALLMARK_FUSED_KERNELS=off run "$bin" pipeline "${common[@]}" --dtype f16 --attention fused --steps 20 --batch 8 --runs 2
  done
  # cudarc's per-allocation CUDA events kept (HALLMARK_CUDA_EVENTS=on; the
  # engine turns them off): the in-run baseline for that, at batch 1, where
  # host time per operation bounds the step.
  stamp "${bins[0]}, attention: fused, HALLMARK_CUDA_EVENTS=on"
  HALLMARK_CUDA_EVENTS=on run "${bins[0]}" pipeline "${common[@]}" --dtype f16 --attention fused --steps 20 --batch 1 --runs 2
  # The UNet's calls recorded once per render and replayed as a CUDA graph
  # (HALLMARK_CUDA_GRAPHS=on), against the eager fused-attention runs of the
  # same build above: first `check`, whose first replay is compared with an
  # eager call (a cuda_graph_check line on stderr: nodes, largest difference),
  # then the timings.
  for bin in "${bins[@]}"; do
    stamp "$bin, attention: fused, HALLMARK_CUDA_GRAPHS=check"
    HALLMARK_CUDA_GRAPHS=check run "$bin" pipeline "${common[@]}" --dtype f16 --attention fused --steps 4 --batch 1,8 --runs 0
    stamp "$bin, attention: fused, HALLMARK_CUDA_GRAPHS=on"
    HALLMARK_CUDA_GRAPHS=on run "$bin" pipeline "${common[@]}" --dtype f16 --attention fused --steps 20 --batch 1,8 --runs 2
  done
  # A `cudnn` build with the own im2col for every convolution (what a build
  # without cuDNN runs) instead of Winograd: which is faster where.
  for bin in "${bins[@]}"; do
    case "$bin" in *cudnn*) ;; *) continue ;; esac
    stamp "$bin, attention: fused, conv: im2col"
    run "$bin" pipeline "${common[@]}" --dtype f16 --attention fused --conv-algo im2col --steps 20 --batch 1,8 --runs 2
  done
  # The VAE decoding the batch-8 render's latents (what images/s spends
  # beside the UNet), with its sections per build.
  stamp vae
  python3 bench/diffusion/diffusers_bench.py vae "$MODEL" --device cuda --dtype f16 --size 512 --batch 8 --runs 3
  for bin in "${bins[@]}"; do
    run "$bin" vae "${common[@]}" --dtype f16 --batch 8 --runs 3 --profile
  done
  stamp bf16
  run "${bins[0]}" pipeline "${common[@]}" --dtype bf16 --steps 20 --batch 1 --runs 1
  for bin in "${bins[@]}"; do
    algos=default
    case "$bin" in *cudnn*) algos=${CONV_ALGOS:-winograd-nonfused im2col} ;; esac
    for algo in $algos; do
      for attention in ${ATTENTIONS:-flash fused matmul}; do
        for batch in 2 16; do
          stamp "profile $bin $algo $attention $batch"
          conv=(); [ "$algo" = default ] || conv=(--conv-algo "$algo")
          run "$bin" profile "${common[@]}" --dtype f16 --attention "$attention" "${conv[@]}" --batch "$batch" --runs 3
        done
        if [ "$attention" = fused ]; then
          stamp "profile $bin $algo fused 16, HALLMARK_FUSED_KERNELS=off"
          HALLMARK_FUSED_KERNELS=off run "$bin" profile "${common[@]}" --dtype f16 --attention fused "${conv[@]}" --batch 16 --runs 3
        fi
      done
    done
  done
  stamp done
} 2>&1 | tee "$OUT/gpu-bench.jsonl"
