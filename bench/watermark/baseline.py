"""Baselines for the watermark benchmark: invisible-watermark's dwtDct and
dwtDctSvd (the methods the SDXL reference scripts use), driven by
hallmark-watermark-bench.

  baseline.py embed DIR    marks DIR/orig/*.png into DIR/<method>/*.png
  baseline.py decode DIR   decodes DIR/<method>/<attack>/*.png

Prints one JSON object per line.
"""
import json
import os
import sys
import time
import types

# The package imports torch for its RivaGAN method at import time; the two
# classical methods measured here do not use it, so a stand-in avoids a
# multi-gigabyte install.
sys.modules.setdefault("torch", types.ModuleType("torch"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from imwatermark import WatermarkDecoder, WatermarkEncoder  # noqa: E402

PAYLOAD = bytes.fromhex("0123456789abcdef")
METHODS = ["dwtDct", "dwtDctSvd"]


def embed(root):
    for method in METHODS:
        os.makedirs(os.path.join(root, method), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(root, "orig"))):
            bgr = cv2.imread(os.path.join(root, "orig", name))
            encoder = WatermarkEncoder()
            encoder.set_watermark("bytes", PAYLOAD)
            start = time.perf_counter()
            marked = encoder.encode(bgr, method)
            ms = (time.perf_counter() - start) * 1000
            cv2.imwrite(os.path.join(root, method, name), marked)
            print(json.dumps({"method": method, "image": name, "embed_ms": ms}), flush=True)


def decode(root):
    ref = np.unpackbits(np.frombuffer(PAYLOAD, dtype=np.uint8))
    for method in METHODS:
        base = os.path.join(root, method)
        for attack in sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))):
            for name in sorted(os.listdir(os.path.join(base, attack))):
                bgr = cv2.imread(os.path.join(base, attack, name))
                decoder = WatermarkDecoder("bytes", 64)
                start = time.perf_counter()
                try:
                    got = decoder.decode(bgr, method)
                    bits = np.unpackbits(np.frombuffer(bytes(got), dtype=np.uint8))
                    correct = int((bits[: len(ref)] == ref).sum())
                except Exception:  # too small for the method after the attack
                    correct = 32
                ms = (time.perf_counter() - start) * 1000
                print(json.dumps({"method": method, "attack": attack, "image": name, "bits": correct, "decode_ms": ms}), flush=True)


if __name__ == "__main__":
    {"embed": embed, "decode": decode}[sys.argv[1]](sys.argv[2])
