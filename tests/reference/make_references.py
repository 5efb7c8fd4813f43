#!/usr/bin/env python3
"""Reference tensors from Hugging Face diffusers for the tiny checkpoints.

Run through `tests/reference/run.sh`, which makes the virtual environment and
the tiny checkpoints (`hallmark models init-tiny`). For each model folder it
writes `<name>.safetensors` holding:

- `tokens.<i>`: CLIP token ids of the probe prompts (tokenizer parity);
- `text.cond`, `text.uncond`: text embeddings of the prompt and of "";
- `latents.init`: the initial latents drawn by Hallmark's noise recipe
  (`NoiseGenerator`, reimplemented below) from SEED;
- `unet.eps`: the UNet's prediction for [uncond, cond] at the first DDIM
  timestep from those latents;
- `final.<scheduler>.<cfg|nocfg>`: latents after STEPS steps of the real
  StableDiffusionPipeline (output_type="latent"), Euler ancestral drawing
  its per-step noise from the same recipe;
- `image.<scheduler>.<cfg|nocfg>`: the decoded image in [0, 1] (DDIM only).

SDXL-shaped folders (StableDiffusionXLPipeline) also get:

- `tokens2.<i>`: the second tokenizer's ids (it pads with `!`);
- `text.pooled`, `text.pooled_uncond`: the second encoder's projected pooled
  output; `text.uncond` and `text.pooled_uncond` are zeros (an empty negative
  prompt with `force_zeros_for_empty_prompt`);
- `text.neg`, `text.pooled_neg`: the embeddings of NEGATIVE as a prompt;
- `final.euler_a.cfg_neg`: a guided Euler ancestral run with NEGATIVE;
- `final.turbo`: SDXL-Turbo's way: Euler ancestral with trailing timestep
  spacing, one step, no guidance.

SDXL refiner folders (StableDiffusionXLImg2ImgPipeline with
`requires_aesthetics_score`, second text encoder only) get instead:

- `tokens2.<i>`, `text.cond`, `text.uncond` (the encoding of "": no
  zeros), `text.pooled`, `text.pooled_uncond`, `text.neg`, `text.pooled_neg`;
- `latents.init` and `unet.eps` as above, with the five aesthetic-score ids
  (2.5 for the unconditional half, 6.0 for the conditional);
- `image.init`: the picture refined (RGB, 0–255, height × width × 3);
- `final.refine.<scheduler>.<cfg|nocfg>`: latents after refining it at
  strength REFINE_STRENGTH over STEPS steps with the real
  StableDiffusionXLImg2ImgPipeline, the VAE's sample, the added noise and
  Euler ancestral's step noise all drawn from the same recipe;
  `final.refine.euler_a.cfg_neg` with NEGATIVE.

Inpainting folders (StableDiffusionInpaintPipeline or
StableDiffusionXLInpaintPipeline: a unet of 9 input channels) get, with the
real pipeline of their class and the
generator's draws in the Rust pipeline's order (the init image's latents
where used, the noise, the masked image's latents, Euler ancestral's step
noise):

- `image.init`: the picture inpainted (RGB, 0–255, height × width × 3);
- `image.mask`: the mask (0–255, height × width; white, and the 140-grey
  band, are repainted; the 110-grey band is kept);
- `final.inpaint.<scheduler>.<cfg|nocfg>.s<strength × 100>`: latents after
  STEPS steps at strength 1 (from pure noise) and INPAINT_STRENGTH;
- given a plain folder of the same shape as the third argument, `final.legacy.…` the same
  with that folder's 4-channel unet (diffusers resets the kept region to the
  init image, noised to each step's level).
"""
import json
import math
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import (
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as xl_inpaint_module
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from PIL import Image
from safetensors.torch import save_file

SEED = 1234
STEPS = 4
SIZE = 64
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
PROBES = [
    "a photo of a cat",
    "A PHOTO   of a Cat!!  ",
    "naïve café, 2 dogs & 13 cats… it's 4:30pm",
    " ".join(["word"] * 100),
]
M64 = (1 << 64) - 1


class NoiseGenerator:
    """Twin of hallmark_diffusion::rng::NoiseGenerator (SplitMix64 + Box-Muller)."""

    def __init__(self, seed):
        self.state = seed & M64
        self.spare = None

    def _u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def _unit(self):
        return ((self._u64() >> 11) + 0.5) / float(1 << 53)

    def normal(self):
        if self.spare is not None:
            s, self.spare = self.spare, None
            return s
        u1, u2 = self._unit(), self._unit()
        r = math.sqrt(-2.0 * math.log(u1))
        theta = 2.0 * math.pi * u2
        self.spare = r * math.sin(theta)
        return r * math.cos(theta)

    def normals(self, shape):
        n = int(np.prod(shape))
        return np.array([self.normal() for _ in range(n)], dtype=np.float64).astype(np.float32).reshape(shape)


SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
    "dpmpp_2m_karras": lambda c: DPMSolverMultistepScheduler.from_config(
        c, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    ),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


REFINE_STRENGTH = 0.5
INPAINT_STRENGTH = 0.75
INPAINT_SCHEDULERS = ("ddim", "euler_a", "dpmpp_2m")


def init_image():
    """The picture the refiner references refine: gradients and a disc."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    r = x * 255 // (SIZE - 1)
    g = y * 255 // (SIZE - 1)
    b = np.where((x - SIZE / 2) ** 2 + (y - SIZE / 2) ** 2 < (SIZE / 4) ** 2, 230, 40)
    return np.stack([r, g, b], -1).astype(np.uint8)


def inpaint_mask():
    """A rectangle to repaint, and two grey bands either side of the 50 %
    threshold (140 repaints, 110 keeps)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:40, 16:40] = 255
    mask[:, 48:56] = 140
    mask[:, 56:] = 110
    return mask


def metadata():
    return {
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": str(SEED),
        "steps": str(STEPS),
        "size": str(SIZE),
        "prompt": PROMPT,
        "negative": NEGATIVE,
        "probes": json.dumps(PROBES),
    }


def save(out, out_path, meta):
    save_file({k: v.contiguous().float() if v.dtype != torch.int64 else v for k, v in out.items()}, out_path, metadata=meta)
    print(f"wrote {out_path}: {len(out)} tensors")


def first_step(pipe, base_config):
    """The latents' shape, the initial latents from SEED, and DDIM's first
    timestep over STEPS."""
    c = pipe.unet.config.in_channels
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, c, SIZE // f, SIZE // f)
    ddim = DDIMScheduler.from_config(base_config)
    ddim.set_timesteps(STEPS)
    return shape, torch.from_numpy(NoiseGenerator(SEED).normals(shape)), ddim.timesteps[0]


def refiner_main(model_dir, out_path, save_dir=None):
    torch.manual_seed(0)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    out = {}
    for i, p in enumerate(PROBES):
        ids = pipe.tokenizer_2(p, padding="max_length", max_length=77, truncation=True).input_ids
        out[f"tokens2.{i}"] = torch.tensor(ids, dtype=torch.int64)
    shape, init, t0 = first_step(pipe, base_config)
    out["latents.init"] = init
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        neg, _, pooled_neg, _ = pipe.encode_prompt(
            NEGATIVE, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        ids = torch.tensor([[SIZE, SIZE, 0, 0, 2.5], [SIZE, SIZE, 0, 0, 6.0]], dtype=torch.float32)
        out["unet.eps"] = pipe.unet(
            torch.cat([init, init]),
            t0,
            encoder_hidden_states=torch.cat([uncond, cond]),
            added_cond_kwargs={"text_embeds": torch.cat([pooled_uncond, pooled]), "time_ids": ids},
        ).sample
    out["text.cond"], out["text.uncond"] = cond, uncond
    out["text.pooled"], out["text.pooled_uncond"] = pooled, pooled_uncond
    out["text.neg"], out["text.pooled_neg"] = neg, pooled_neg

    picture = init_image()
    out["image.init"] = torch.from_numpy(picture.astype(np.float32))

    def run(scheduler, guidance, negative=None):
        pipe.scheduler = scheduler
        # One generator per image, drawn in the Rust pipeline's order: the
        # VAE's sample, the noise added at the starting step, then Euler
        # ancestral's step noise.
        gen = NoiseGenerator(SEED)

        def draw(shape, generator=None, device=None, dtype=None, layout=None):
            return torch.from_numpy(gen.normals(tuple(shape))).to(dtype=dtype or torch.float32)

        vae_module.randn_tensor = draw
        img2img_module.randn_tensor = draw
        scheduling_euler_ancestral_discrete.randn_tensor = draw
        with torch.no_grad():
            return pipe(
                PROMPT,
                image=Image.fromarray(picture),
                strength=REFINE_STRENGTH,
                negative_prompt=negative,
                num_inference_steps=STEPS,
                guidance_scale=guidance,
                output_type="latent",
            ).images

    for name, make in SCHEDULERS.items():
        for guidance, tag in ((7.5, "cfg"), (1.0, "nocfg")):
            out[f"final.refine.{name}.{tag}"] = run(make(base_config), guidance)
    out["final.refine.euler_a.cfg_neg"] = run(SCHEDULERS["euler_a"](base_config), 7.5, negative=NEGATIVE)
    save(out, out_path, {**metadata(), "refine_strength": str(REFINE_STRENGTH)})
    if save_dir:
        pipe.save_pretrained(save_dir)
        pipe.to(torch.float16).save_pretrained(save_dir + "-fp16", variant="fp16")
        print(f"saved {save_dir} and {save_dir}-fp16 with save_pretrained")


def inpaint_main(model_dir, out_path, plain_dir=None):
    torch.manual_seed(0)
    picture, mask = init_image(), inpaint_mask()
    out = {
        "image.init": torch.from_numpy(picture.astype(np.float32)),
        "image.mask": torch.from_numpy(mask.astype(np.float32)),
    }

    with open(f"{model_dir}/model_index.json") as f:
        xl = json.load(f)["_class_name"] == "StableDiffusionXLInpaintPipeline"

    def runs(folder, prefix):
        if xl:
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        else:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base_config = pipe.scheduler.config
        for name in INPAINT_SCHEDULERS:
            for guidance, tag in ((7.5, "cfg"), (1.0, "nocfg")):
                for strength in (1.0, INPAINT_STRENGTH):
                    gen = NoiseGenerator(SEED)

                    def draw(shape, generator=None, device=None, dtype=None, layout=None):
                        return torch.from_numpy(gen.normals(tuple(shape))).to(dtype=dtype or torch.float32)

                    vae_module.randn_tensor = draw
                    inpaint_module.randn_tensor = draw
                    xl_inpaint_module.randn_tensor = draw
                    scheduling_euler_ancestral_discrete.randn_tensor = draw
                    pipe.scheduler = SCHEDULERS[name](base_config)
                    with torch.no_grad():
                        final = pipe(
                            PROMPT,
                            image=Image.fromarray(picture),
                            mask_image=Image.fromarray(mask),
                            strength=strength,
                            # SDXL: None conditions on zeros, as the Rust
                            # pipeline's empty negative does.
                            negative_prompt=None if xl else "",
                            height=SIZE,
                            width=SIZE,
                            num_inference_steps=STEPS,
                            guidance_scale=guidance,
                            output_type="latent",
                        ).images
                    out[f"final.{prefix}.{name}.{tag}.s{round(strength * 100)}"] = final

    runs(model_dir, "inpaint")
    if plain_dir:
        runs(plain_dir, "legacy")
    save(out, out_path, {**metadata(), "inpaint_strength": str(INPAINT_STRENGTH)})


def main(model_dir, out_path, save_dir=None):
    torch.manual_seed(0)
    with open(f"{model_dir}/model_index.json") as f:
        index = json.load(f)
    if index.get("requires_aesthetics_score"):
        return refiner_main(model_dir, out_path, save_dir)
    if index["_class_name"] in ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"):
        return inpaint_main(model_dir, out_path, save_dir)
    xl = index["_class_name"] == "StableDiffusionXLPipeline"
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    out = {}

    for i, p in enumerate(PROBES):
        ids = pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids
        out[f"tokens.{i}"] = torch.tensor(ids, dtype=torch.int64)
        if xl:
            ids = pipe.tokenizer_2(p, padding="max_length", max_length=77, truncation=True).input_ids
            out[f"tokens2.{i}"] = torch.tensor(ids, dtype=torch.int64)

    shape, init, t0 = first_step(pipe, base_config)
    out["latents.init"] = init
    x = torch.cat([init, init])

    if xl:
        with torch.no_grad():
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            neg, _, pooled_neg, _ = pipe.encode_prompt(
                NEGATIVE, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
            out["unet.eps"] = pipe.unet(
                x,
                t0,
                encoder_hidden_states=torch.cat([uncond, cond]),
                added_cond_kwargs={"text_embeds": torch.cat([pooled_uncond, pooled]), "time_ids": ids},
            ).sample
        out["text.pooled"], out["text.pooled_uncond"] = pooled, pooled_uncond
        out["text.neg"], out["text.pooled_neg"] = neg, pooled_neg
    else:

        def embed(text):
            ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            with torch.no_grad():
                return pipe.text_encoder(ids.input_ids)[0]

        cond, uncond = embed(PROMPT), embed("")
        with torch.no_grad():
            out["unet.eps"] = pipe.unet(x, t0, encoder_hidden_states=torch.cat([uncond, cond])).sample
    out["text.cond"], out["text.uncond"] = cond, uncond

    def run(scheduler, guidance, steps=STEPS, negative=None):
        pipe.scheduler = scheduler
        # One generator per image: initial latents first, then (Euler
        # ancestral) each step's noise, as the Rust pipeline draws them.
        gen = NoiseGenerator(SEED)
        latents = torch.from_numpy(gen.normals(shape))

        def step_noise(shape, generator=None, device=None, dtype=None, layout=None):
            return torch.from_numpy(gen.normals(tuple(shape))).to(dtype=dtype or torch.float32)

        scheduling_euler_ancestral_discrete.randn_tensor = step_noise
        # SD: "" is the empty negative; SDXL: None, which with
        # force_zeros_for_empty_prompt conditions on zeros.
        if negative is None and not xl:
            negative = ""
        with torch.no_grad():
            return pipe(
                PROMPT,
                negative_prompt=negative,
                height=SIZE,
                width=SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=latents.clone(),
                output_type="latent",
            ).images

    for name, make in SCHEDULERS.items():
        for guidance, tag in ((7.5, "cfg"), (1.0, "nocfg")):
            final = run(make(base_config), guidance)
            out[f"final.{name}.{tag}"] = final
            if name == "ddim":
                with torch.no_grad():
                    img = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
                out[f"image.{name}.{tag}"] = (img / 2 + 0.5).clamp(0, 1)
    if xl:
        out["final.euler_a.cfg_neg"] = run(SCHEDULERS["euler_a"](base_config), 7.5, negative=NEGATIVE)
        turbo = EulerAncestralDiscreteScheduler.from_config(base_config, timestep_spacing="trailing")
        out["final.turbo"] = run(turbo, 0.0, steps=1)

    save(out, out_path, metadata())
    if save_dir:
        # A folder written by diffusers itself (transformers 5 saves the
        # tokenizer as tokenizer.json), full precision and the fp16 variant.
        pipe.save_pretrained(save_dir)
        pipe.to(torch.float16).save_pretrained(save_dir + "-fp16", variant="fp16")
        print(f"saved {save_dir} and {save_dir}-fp16 with save_pretrained")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
