"""Real-ESRGAN's generator (RRDBNet, the architecture of xinntao's basicsr,
written out here) in PyTorch, sized by and loaded from a safetensors file
with the original parameter names: the model `hallmark` loads, for the
reference tensors (`make_esrgan_reference.py`) and the CPU/GPU benchmark
(`bench/diffusion/diffusers_bench.py esrgan`)."""
import glob
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


def pixel_unshuffle(x, r):
    """(b, c, h, w) -> (b, c·r², h/r, w/r), channel c·r² + i·r + j holding
    the pixels at offset (i, j) of each r×r block."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * r * r, h // r, w // r)


def load(path, device="cpu", dtype=torch.float32):
    """The network in the safetensors file `path` (or the one in the folder
    `path`): (net, scale, num_feat, num_block)."""
    if os.path.isdir(path):
        path = sorted(glob.glob(os.path.join(path, "*.safetensors")))[0]
    state = load_file(path)
    nf, in_ch = state["conv_first.weight"].shape[:2]
    gc = state["body.0.rdb1.conv1.weight"].shape[0]
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    scale = {3: 4, 12: 2, 48: 1}[in_ch]

    def conv(cin, cout):
        return nn.Conv2d(cin, cout, 3, 1, 1)

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            for k in range(5):
                setattr(self, f"conv{k + 1}", conv(nf + k * gc, nf if k == 4 else gc))

        def forward(self, x):
            feats = [x]
            for k in range(4):
                feats.append(F.leaky_relu(getattr(self, f"conv{k + 1}")(torch.cat(feats, 1)), 0.2))
            return self.conv5(torch.cat(feats, 1)) * 0.2 + x

    class Rrdb(nn.Module):
        def __init__(self):
            super().__init__()
            self.rdb1, self.rdb2, self.rdb3 = Dense(), Dense(), Dense()

        def forward(self, x):
            return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_first = conv(in_ch, nf)
            self.body = nn.Sequential(*[Rrdb() for _ in range(blocks)])
            self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr = (conv(nf, nf) for _ in range(4))
            self.conv_last = conv(nf, 3)

        def forward(self, x):
            if scale < 4:
                x = pixel_unshuffle(x, 4 // scale)
            feat = self.conv_first(x)
            feat = feat + self.conv_body(self.body(feat))
            feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))

    net = Net()
    net.load_state_dict(state)
    return net.to(device=device, dtype=dtype).eval(), scale, nf, blocks
