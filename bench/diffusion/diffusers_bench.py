#!/usr/bin/env python3
"""The diffusers side of the diffusion benchmarks, on the same model folder.

  diffusers_bench.py pipeline DIR --device cuda --dtype f16 --size 512 --steps 20 --batch 1,8 --runs 2
  diffusers_bench.py unet DIR --size 256 --runs 5

Prints one JSON line per measurement, like hallmark-diffusion-bench.
"""
import argparse
import json
import time

import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["pipeline", "unet"])
    p.add_argument("model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", default="1")
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    dtype = DTYPES[a.dtype]
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, torch_dtype=dtype).to(a.device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = {"engine": "diffusers", "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads()}

    if a.mode == "unet":
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        with torch.no_grad():
            ids = pipe.tokenizer(["", "a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            ctx = pipe.text_encoder(ids.to(a.device))[0]
            x = torch.randn(2, pipe.unet.config.in_channels, a.size // f, a.size // f, dtype=dtype, device=a.device)
            pipe.unet(x, 500, encoder_hidden_states=ctx)
            times = []
            for _ in range(a.runs):
                sync(a.device)
                t0 = time.perf_counter()
                pipe.unet(x, 500, encoder_hidden_states=ctx)
                sync(a.device)
                times.append(time.perf_counter() - t0)
        times.sort()
        print(json.dumps({**common, "bench": "unet_step", "size": a.size, "batch": 2,
                          "median_s": times[len(times) // 2], "min_s": times[0]}), flush=True)
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
