#!/usr/bin/env python3
"""Reference tensors from PyTorch for a tiny Real-ESRGAN checkpoint.

Run through `tests/reference/run.sh esrgan-x2 esrgan-x4`, which makes the
checkpoints with `hallmark models init-tiny`. Writes `<name>.safetensors`
holding `input`, two images (batch 2) of uniform noise in [0, 1] from
torch's generator seeded with SEED, and `output`, the RRDBNet of
`rrdbnet.py` (basicsr's architecture) applied to them in float32.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rrdbnet  # noqa: E402

SEED = 1234
SIZE = 24


def main(model_dir, out_path):
    net, scale, nf, blocks = rrdbnet.load(model_dir)
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        y = net(x)
    meta = {"torch": torch.__version__, "seed": str(SEED), "scale": str(scale), "num_feat": str(nf),
            "num_block": str(blocks)}
    save_file({"input": x.contiguous(), "output": y.contiguous()}, out_path, metadata=meta)
    print(f"wrote {out_path}: x{scale}, {tuple(x.shape)} -> {tuple(y.shape)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
