"""Reference for the inpainting mask's handling outside the sampler, from
diffusers' own VaeImageProcessor (PIL): the mask's blur (`blur`), the crop
around it that `padding_mask_crop` renders (`get_crop_region`), and the
overlay of the output on the init image (`apply_overlay`, whole and
cropped). Writes tests/reference/masks.safetensors (uint8 images, int64
crop boxes), which diffusion/tests/reference.rs compares against.

Usage: make_mask_reference.py PHOTO OUT
"""

import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import save_file

W, H = 96, 64
BLURS = [1, 4, 13]
# (render width, render height, padding) for get_crop_region.
CROPS = [(96, 64, 0), (96, 64, 8), (64, 64, 8), (32, 64, 16), (96, 64, 200)]


def mask_image():
    """An ellipse, a bar and a grey stroke: edges in every direction."""
    m = PIL.Image.new("L", (W, H), 0)
    d = PIL.ImageDraw.Draw(m)
    d.ellipse((50, 10, 80, 34), fill=255)
    d.rectangle((20, 40, 34, 44), fill=255)
    d.line((5, 5, 30, 20), fill=140, width=3)
    return m


def corner_mask():
    """One pixel near a corner: the crop must shift back inside."""
    m = PIL.Image.new("L", (W, H), 0)
    m.putpixel((W - 2, 1), 200)
    return m


def u8(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8).copy())


def main():
    photo, out = sys.argv[1], sys.argv[2]
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False)
    mask = mask_image()
    corner = corner_mask()
    init = PIL.Image.open(photo).convert("RGB").resize((W, H), PIL.Image.LANCZOS)
    # An "output" unlike the photo: a colour ramp.
    ramp = np.zeros((H, W, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    ramp[..., 1] = np.linspace(255, 0, H, dtype=np.uint8)[:, None]
    ramp[..., 2] = 90
    output = PIL.Image.fromarray(ramp)

    t = {"mask": u8(mask), "corner": u8(corner), "init": u8(init), "output": u8(output)}
    for b in BLURS:
        t[f"blur_{b}"] = u8(VaeImageProcessor.blur(mask, b))
    for name, m in [("mask", mask), ("corner", corner), ("blur_4", VaeImageProcessor.blur(mask, 4))]:
        for w, h, pad in CROPS:
            box = VaeImageProcessor.get_crop_region(m, w, h, pad=pad)
            t[f"crop_{name}_{w}x{h}_{pad}"] = torch.tensor(box, dtype=torch.int64)
    soft = VaeImageProcessor.blur(mask, 4)
    t["overlay_blur_4"] = u8(proc.apply_overlay(soft, init, output))
    # Cropped: the output rendered from the crop at the full size, laid back
    # (a mask of the ellipse alone, so the crop is a part of the image).
    spot = PIL.Image.new("L", (W, H), 0)
    PIL.ImageDraw.Draw(spot).ellipse((50, 10, 80, 34), fill=255)
    spot = VaeImageProcessor.blur(spot, 2)
    box = VaeImageProcessor.get_crop_region(spot, W, H, pad=4)
    t["spot_blur_2"] = u8(spot)
    t["overlay_crop_box"] = torch.tensor(box, dtype=torch.int64)
    t["overlay_crop"] = u8(proc.apply_overlay(spot, init, output, box))
    save_file({k: v.contiguous() for k, v in t.items()}, out)
    print(f"wrote {out}: {len(t)} tensors")


if __name__ == "__main__":
    main()
