#!/usr/bin/env python3
"""The diffusers side of the diffusion benchmarks, on the same model folder.

  diffusers_bench.py pipeline DIR --device cuda --dtype f16 --size 512 --steps 20 --batch 1,8 --runs 2
  diffusers_bench.py unet DIR --size 256 --runs 5
  diffusers_bench.py vae DIR --size 512 --batch 1 --runs 3   # the VAE decoding a batch
  diffusers_bench.py ops --device cuda --dtype f16 --size 512 --batch 16 --runs 5
  diffusers_bench.py ops-table FILE      # joins both engines' `ops` lines of FILE
  diffusers_bench.py esrgan FILE_OR_DIR --size 128 --runs 3   # Real-ESRGAN in PyTorch

`ops` times the UNet's operations one by one in PyTorch at the shapes
`hallmark-diffusion-bench ops` uses (see diffusion/src/opbench.rs), same names.

Prints one JSON line per measurement, like hallmark-diffusion-bench.
"""
import argparse
import json
import time

import os
import sys

import torch

# Real-ESRGAN's RRDBNet (`rrdbnet.py`) is shared with the reference tensors.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/reference"))

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(device, runs, f):
    """Median and least seconds of single calls of `f`: a warm-up, then `runs` calls (one at the least),
    each between synchronisations."""
    f()
    times = []
    for _ in range(max(runs, 1)):
        sync(device)
        t0 = time.perf_counter()
        f()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[0]


def timed(device, runs, f):
    """Median ms per call: a warm-up, then `runs` rounds of 4 calls between synchronisations."""
    f()
    sync(device)
    rounds = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        for _ in range(4):
            f()
        sync(device)
        rounds.append((time.perf_counter() - t0) * 1e3 / 4)
    rounds.sort()
    return rounds[len(rounds) // 2]


def ops(a, dtype, common):
    """The operations of diffusion/src/opbench.rs, at its shapes, in PyTorch."""
    import torch.nn.functional as F

    dev, b, l = a.device, a.batch_size, a.size // 8
    c, n, heads = 320, l * l, 8
    d = c // heads

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype)

    def emit(op, x, f):
        ms = timed(dev, a.runs, f)
        print(json.dumps({**common, "bench": "op", "op": op, "shape": list(x.shape), "ms": ms}), flush=True)

    with torch.no_grad():
        tokens = randn(b, n, c)
        w_in, b_in = randn(4 * c, c) * c ** -0.5, randn(4 * c)
        emit("linear", tokens, lambda: F.linear(tokens, w_in, b_in))
        pixels, w_shared = randn(b, c, n), randn(c, c)
        emit("shared_weight_matmul", pixels, lambda: torch.matmul(w_shared, pixels))
        hidden = randn(b, n, 4 * c)
        w_out, b_out = randn(c, 4 * c) * (4 * c) ** -0.5, randn(c)
        emit("linear_out", hidden, lambda: F.linear(hidden, w_out, b_out))
        q, k = randn(b * heads, n, d), randn(b * heads, n, d)
        kt = k.transpose(1, 2)
        emit("scores", q, lambda: torch.bmm(q, kt))
        probs = torch.softmax(torch.bmm(q, kt), -1)
        emit("weighted_sum", probs, lambda: torch.bmm(probs, k))
        emit("softmax", probs, lambda: torch.softmax(probs, -1))
        del probs
        qkv = randn(b, n, 3, heads, d)
        qh, kh, vh = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        emit("attention", qkv[:, :, 0], lambda: F.scaled_dot_product_attention(qh, kh, vh))
        for op, ch, side in [("conv3x3", c, l), ("conv3x3_deep", 4 * c, l // 4)]:
            w, bias = randn(ch, ch, 3, 3) * (9 * ch) ** -0.5, randn(ch)
            x = randn(b, ch, side, side)
            emit(op, x, lambda: F.conv2d(x, w, bias, padding=1))
        fmap = randn(b, c, l, l)
        gw, gb = randn(c), randn(c)
        emit("group_norm", fmap, lambda: F.group_norm(fmap, 32, gw, gb, 1e-5))
        emit("group_norm_silu", fmap, lambda: F.silu(F.group_norm(fmap, 32, gw, gb, 1e-5)))
        emit("silu", fmap, lambda: F.silu(fmap))
        cb = randn(1, c, 1, 1)
        emit("add_channel_bias", fmap, lambda: fmap + cb)
        other = randn(b, c, l, l)
        emit("add", fmap, lambda: fmap + other)
        lw, lb = randn(c), randn(c)
        emit("layer_norm", tokens, lambda: F.layer_norm(tokens, (c,), lw, lb, 1e-5))
        emit("gelu", hidden, lambda: F.gelu(hidden))
        gate = randn(b, n, 4 * c)
        emit("geglu", hidden, lambda: hidden * F.gelu(gate))
        emit("mul", hidden, lambda: hidden * hidden)
        split = tokens.reshape(b, n, heads, d)
        emit("transpose_heads", split, lambda: split.transpose(1, 2).contiguous())


def ops_table(path):
    """Both engines' `op` lines side by side: ms, the ratio (> 1: Hallmark faster), and
    Hallmark's achieved TFLOP/s (matmuls, convolutions) or GB/s (the rest)."""
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    rows = [r for r in rows if r.get("bench") == "op"]
    torch_ms = {r["op"]: r for r in rows if r["engine"] == "diffusers"}
    print(f"{'op':18} {'shape':22} {'hallmark ms':>12} {'torch ms':>10} {'ratio':>7}  hallmark rate")
    for h in (r for r in rows if r["engine"] == "hallmark"):
        t = torch_ms.get(h["op"])
        if t is None or t["shape"] != h["shape"]:
            print(f"{h['op']:18} no PyTorch figure at shape {h['shape']}")
            continue
        rate = f"{h['tflops']:.1f} TFLOP/s" if h["tflops"] > 0 else f"{h['gbps']:.0f} GB/s"
        print(f"{h['op']:18} {str(h['shape']):22} {h['ms']:12.3f} {t['ms']:10.3f} {t['ms'] / h['ms']:7.2f}  {rate}")


def main():
    if sys.argv[1:2] == ["ops-table"]:
        ops_table(sys.argv[2])
        return
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["pipeline", "unet", "vae", "ops", "esrgan"])
    p.add_argument("model", nargs="?")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", default="1")
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    dtype = DTYPES[a.dtype]
    common = {"engine": "diffusers", "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if a.mode == "ops":
        a.batch_size = int(a.batch)
        ops(a, dtype, common)
        return
    if a.mode == "esrgan":
        import rrdbnet

        net, scale, nf, blocks = rrdbnet.load(a.model, a.device, dtype)
        x = torch.rand(1, 3, a.size, a.size, device=a.device, dtype=dtype)
        with torch.no_grad():
            median, least = seconds(a.device, a.runs, lambda: net(x))
        print(json.dumps({**common, "engine": "pytorch", "bench": "esrgan", "scale": scale, "num_feat": nf,
                          "num_block": blocks, "size": a.size, "median_s": median, "min_s": least}), flush=True)
        return
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, torch_dtype=dtype).to(a.device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    # Latent side of a `size`² image.
    side = a.size // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    if a.mode == "unet":
        with torch.no_grad():
            ids = pipe.tokenizer(["", "a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            ctx = pipe.text_encoder(ids.to(a.device))[0]
            x = torch.randn(2, pipe.unet.config.in_channels, side, side, dtype=dtype, device=a.device)
            median, least = seconds(a.device, a.runs, lambda: pipe.unet(x, 500, encoder_hidden_states=ctx))
        print(json.dumps({**common, "bench": "unet_step", "size": a.size, "batch": 2,
                          "median_s": median, "min_s": least}), flush=True)
        return

    if a.mode == "vae":
        z = torch.randn(int(a.batch), pipe.vae.config.latent_channels, side, side, dtype=dtype, device=a.device)
        with torch.no_grad():
            median, least = seconds(a.device, a.runs, lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor))
        print(json.dumps({**common, "bench": "vae_decode", "size": a.size, "batch": int(a.batch),
                          "median_s": median, "min_s": least}), flush=True)
        return

    for b in [int(x) for x in a.batch.split(",")]:
        best = None
        for run in range(a.runs + 1):
            stamps = []

            def on_step(pipe_, i, t, kw):
                sync(a.device)
                stamps.append(time.perf_counter())
                return kw

            sync(a.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe(["a photograph of an astronaut riding a horse"] * b, height=a.size, width=a.size,
                     num_inference_steps=a.steps, guidance_scale=7.5, callback_on_step_end=on_step)
            sync(a.device)
            total = time.perf_counter() - t0
            its = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
            if run > 0 and (best is None or total < best[0]):
                best = (total, its)
        print(json.dumps({**common, "bench": "pipeline", "size": a.size, "steps": a.steps, "batch": b,
                          "seconds": best[0], "images_per_s": b / best[0], "unet_it_per_s": best[1]}), flush=True)


if __name__ == "__main__":
    main()
