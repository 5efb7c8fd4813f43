#!/usr/bin/env bash
# Regenerate the committed diffusers reference tensors for the tiny
# checkpoints. Makes a Python virtual environment (pinned diffusers,
# transformers and a CPU-capable torch from PyPI) under
# ${HALLMARK_REF_VENV:-~/.cache/hallmark/refenv}, generates the tiny
# checkpoints with `hallmark models init-tiny`, and writes
# tests/reference/tiny-{sd1,sd2,sdxl}.safetensors; then checks
# that the folders diffusers itself saves (save_pretrained, fp32 and the fp16
# variant) load and render with `hallmark render --engine diffusion`.
# For the tiny Real-ESRGAN checkpoints (esrgan-x2, esrgan-x4) it writes
# tests/reference/tiny-esrgan-x{2,4}.safetensors from PyTorch's RRDBNet
# (rrdbnet.py) instead.
# The SDXL refiner (sdxl-refiner) refines tests/data/images/chelsea.png
# in that check, since it does not draw from noise.
# The inpainting architectures (sd1-inpaint, sd2-inpaint, sdxl-inpaint) write
# tests/reference/tiny-<arch>.safetensors from the real
# StableDiffusion(XL)InpaintPipeline, with their own 9-channel unet and with
# the plain tiny folder's (sd1, sd2, sdxl).
# `masks` writes tests/reference/masks.safetensors: an inpainting mask's
# blur, crop region and overlay by diffusers' VaeImageProcessor (PIL).
# Arguments: the architectures to regenerate (default: sd1 sd2 sdxl
# sdxl-refiner sd1-inpaint sd2-inpaint sdxl-inpaint esrgan-x2 esrgan-x4 masks).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${HALLMARK_REF_VENV:-$HOME/.cache/hallmark/refenv}"
if ! "$VENV/bin/python" -c "import diffusers, transformers, torch" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch diffusers==0.42.1 transformers==5.24.0 safetensors numpy
fi
cargo build -q -p hallmark-client --bin hallmark
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for arch in ${*:-sd1 sd2 sdxl sdxl-refiner sd1-inpaint sd2-inpaint sdxl-inpaint esrgan-x2 esrgan-x4 masks}; do
  if [ "$arch" = masks ]; then
    "$VENV/bin/python" tests/reference/make_mask_reference.py tests/data/images/chelsea.png tests/reference/masks.safetensors
    continue
  fi
  target/debug/hallmark models init-tiny "$WORK/$arch" --arch "$arch" --seed 1
  case "$arch" in
  esrgan-*)
    "$VENV/bin/python" tests/reference/make_esrgan_reference.py "$WORK/$arch" "tests/reference/tiny-$arch.safetensors"
    continue ;;
  *-inpaint)
    target/debug/hallmark models init-tiny "$WORK/$arch-plain" --arch "${arch%-inpaint}" --seed 1
    "$VENV/bin/python" tests/reference/make_references.py "$WORK/$arch" "tests/reference/tiny-$arch.safetensors" "$WORK/$arch-plain"
    continue ;;
  esac
  "$VENV/bin/python" tests/reference/make_references.py "$WORK/$arch" "tests/reference/tiny-$arch.safetensors" "$WORK/saved-$arch"
  # Folders saved by diffusers itself load and render here.
  INIT=()
  if [ "$arch" = sdxl-refiner ]; then INIT=(--init-image tests/data/images/chelsea.png --strength 0.5); fi
  target/debug/hallmark render --engine diffusion --model-path "$WORK/saved-$arch" --state-dir "$WORK/state" \
    -o "$WORK/out-$arch" --prompt "a red fox" --width 192 --height 192 --steps 4 --workers 1 "${INIT[@]}"
  target/debug/hallmark render --engine diffusion --model-path "$WORK/saved-$arch-fp16" --variant fp16 \
    --state-dir "$WORK/state" -o "$WORK/out-$arch-fp16" --prompt "a red fox" --width 192 --height 192 --steps 4 --workers 1 "${INIT[@]}"
done
