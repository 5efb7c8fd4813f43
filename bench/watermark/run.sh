#!/usr/bin/env bash
# Watermark robustness benchmark: Hallmark's codec and invisible-watermark's
# dwtDct / dwtDctSvd on the same images under the same attacks, in one run.
# Usage: bench/watermark/run.sh [IMAGES_DIR]   (default tests/data/images)
set -euo pipefail
cd "$(dirname "$0")/../.."
images="${1:-tests/data/images}"
venv="${HALLMARK_IW_VENV:-$HOME/.cache/hallmark/iw-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import cv2, pywt, importlib.util as u; assert u.find_spec('imwatermark')" 2>/dev/null; then
  echo "bench: installing invisible-watermark 0.2.0 (no torch) into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q numpy opencv-python-headless PyWavelets Pillow
  "$venv/bin/pip" install -q --no-deps invisible-watermark==0.2.0
fi
cargo build --release -q -p hallmark-e2e --bin hallmark-watermark-bench
exec target/release/hallmark-watermark-bench --images "$images" --python "$venv/bin/python" --baseline bench/watermark/baseline.py
