#!/usr/bin/env bash
# GPU benchmark, run ON the GPU machine (NVIDIA driver, python3 with PyTorch
# cu130, no Rust): this engine's CUDA build against diffusers (fp16, SDPA),
# on the same SD-1.5-architecture random weights, 512², 20 steps, Euler a,
# guidance 7.5, batch 1 and 8, in one run.
#
# The engine runs twice: with flash attention (a `flash-attn` build) and with
# matmul attention, then a per-section profile of one guided UNet call of
# each (where the time goes, for the next change).
#
# Prepared on the build machine (see README "GPU benchmark"):
#   .gpu/hallmark-diffusion-bench.gz  (cargo build --release --features flash-attn
#                                      (or cuda), stripped, gzipped)
#   .gpu/hallmark-diffusion-bench-cudnn.gz  (the same with --features cudnn; optional)
#   .gpu/run-on-gpu.sh             (../shared/gpu/run-on-gpu.sh)
#   .gpu/bpe_simple_vocab_16e6.txt.gz
#   .whl/diffusers-*.whl           (pip download, see README)
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
MODEL=/tmp/sd15
chmod +x .gpu/run-on-gpu.sh
for v in "" -cudnn; do
  [ -f ".gpu/hallmark-diffusion-bench$v.gz" ] || continue
  gunzip -c ".gpu/hallmark-diffusion-bench$v.gz" > "/tmp/hallmark-diffusion-bench$v"
  chmod +x "/tmp/hallmark-diffusion-bench$v"
done
run() { local v="$1"; shift; PYTHON=python3 .gpu/run-on-gpu.sh "/tmp/hallmark-diffusion-bench$v" "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run "" init "$MODEL" --arch sd15-full --clip-vocab .gpu/bpe_simple_vocab_16e6.txt.gz 2>&1
{
  for attention in flash matmul; do
    echo "# build: cuda, attention: $attention"
    run "" pipeline --model "$MODEL" --device cuda --dtype f16 --attention "$attention" --size 512 --steps 20 --batch 1,8 --runs 2
  done
  if [ -x /tmp/hallmark-diffusion-bench-cudnn ]; then
    echo "# build: cudnn"
    run -cudnn pipeline --model "$MODEL" --device cuda --dtype f16 --size 512 --steps 20 --batch 1 --runs 2
  fi
  python3 bench/diffusion/diffusers_bench.py pipeline "$MODEL" --device cuda --dtype f16 --size 512 --steps 20 --batch 1,8 --runs 2
  run "" pipeline --model "$MODEL" --device cuda --dtype bf16 --size 512 --steps 20 --batch 1 --runs 1
  for attention in flash matmul; do
    run "" profile --model "$MODEL" --device cuda --dtype f16 --attention "$attention" --size 512 --batch 2 --runs 3
  done
} 2>&1 | tee "$OUT/gpu-bench.jsonl"
