#!/usr/bin/env python3
"""Builds the demo project the app opens on its first start (``assets/demo/``).

* ``assets/demo/model/``     a tiny SD-1.x-architecture text-to-image model trained here from scratch on the CPU
                             (diffusers folder, fp16 safetensors: unet/, vae/, text_encoder/, tokenizer/,
                             scheduler/, model_index.json);
* ``assets/demo/base_samples.png``  what that model draws (diffusers StableDiffusionPipeline, DDIM, fixed seeds);
* ``assets/demo/dataset/``   the LoRA demo dataset: a concept the base model has never seen ("zkstar": a purple
                             five-pointed star), 64x64 PNGs with ``.txt`` captions starting with the trigger word.

Training data is synthetic: coloured shapes (circle, square, triangle, cross) in red/green/blue/yellow on a plain
light or dark background, 64x64 px, captioned "a red circle on a dark background" (sometimes without the
background part, 10 % empty for classifier-free guidance).  First the VAE (factor 4 -> 4x16x16 latents,
L1 + MSE + a small KL), then the text encoder and UNet together on the VAE latents (epsilon prediction, SD's
scaled-linear betas 0.00085-0.012, 1000 steps).  Seeded; two torch threads.

Run from the repository root with the reference venv (see tools/README.md):

    .venv-ref/bin/python tools/make_demo_model.py                 # everything (about 25-35 min on 2 cores)
    .venv-ref/bin/python tools/make_demo_model.py --dataset-only  # only assets/demo/dataset/ (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import tiny_clip_tokenizer  # noqa: E402  (tools/, the script's own folder)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "assets" / "demo"

SEED = 20261128
IMAGE = 64
LATENT = 16  # VAE downsamples 4x
MAX_LEN = 77
SIZE_LIMIT_BYTES = 6_300_000

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (0.86, 0.13, 0.12),
    "green": (0.13, 0.68, 0.22),
    "blue": (0.14, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.10),
}
BACKGROUNDS = {"light": (0.86, 0.96), "dark": (0.06, 0.18)}
# the LoRA concept: never in the base model's training captions or images
TRIGGER = "zkstar"
PURPLE = (0.56, 0.16, 0.78)
# every caption word is a single token of the tiny vocabulary; "purple", "star" and the trigger are in the
# vocabulary too but never trained (the base model does not know them)
WORDS = ["a", "an", "on", "background", "dark", "light"] + SHAPES + list(COLOURS) + ["purple", "star", TRIGGER]

VAE_BLOCK_OUT = (16, 32, 64)
VAE_GROUPS = 8
UNET_BLOCK_OUT = (32, 64)
UNET_GROUPS = 16
UNET_HEADS = 4  # attention_head_dim (SD1 semantics: number of heads)
TE_HIDDEN = 64
TE_LAYERS = 2
TE_HEADS = 4
TE_INTERMEDIATE = 128


# --------------------------------------------------------------------------------------
# Tokenizer: a tiny CLIP BPE vocabulary (tools/tiny_clip_tokenizer.py)
# --------------------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> None:
    tiny_clip_tokenizer.write_tokenizer(folder, WORDS, "<|endoftext|>", MAX_LEN)


# --------------------------------------------------------------------------------------
# Synthetic images (PIL, 4x supersampled, box-filtered down to 64x64)
# --------------------------------------------------------------------------------------

SS = 4


def star_points(cx, cy, r, rot, n=5, inner=0.45):
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * inner
        a = rot - math.pi / 2 + i * math.pi / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float = 0.0):
    s = SS
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = r * 0.34
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "star":
        d.polygon(star_points(cx, cy, r * 1.1, rot), fill=fill)
    elif shape == "ellipse":
        d.ellipse([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=fill)
    elif shape == "hexagon":
        d.polygon([(cx + r * math.cos(rot + k * math.pi / 3), cy + r * math.sin(rot + k * math.pi / 3)) for k in range(6)],
                  fill=fill)
    else:
        raise ValueError(shape)


def to255(rgb) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(max(c, 0.0), 1.0))) for c in rgb)


def render(rng: random.Random, shape: str, rgb, bg: str, r_range=(12.0, 20.0), jitter=6.0, rot=0.0) -> Image.Image:
    lo, hi = BACKGROUNDS[bg]
    g = rng.uniform(lo, hi)
    tint = [rng.uniform(-0.02, 0.02) for _ in range(3)]
    img = Image.new("RGB", (IMAGE * SS, IMAGE * SS), to255([g + t for t in tint]))
    d = ImageDraw.Draw(img)
    r = rng.uniform(*r_range)
    cx = IMAGE / 2 + rng.uniform(-jitter, jitter)
    cy = IMAGE / 2 + rng.uniform(-jitter, jitter)
    col = [c + rng.uniform(-0.05, 0.05) for c in rgb]
    draw_shape(d, shape, cx, cy, r, to255(col), rot)
    return img.resize((IMAGE, IMAGE), Image.BOX)


def caption_for(rng: random.Random, colour: str, shape: str, bg: str) -> str:
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.35:
        return f"a {colour} {shape}"
    return f"a {colour} {shape} on a {bg} background"


def base_pool(n: int, seed: int):
    """The UNet's training set: (image, colour, shape, background) tuples, balanced."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        bg = list(BACKGROUNDS)[(i // (len(SHAPES) * len(COLOURS))) % 2]
        out.append((render(rng, shape, COLOURS[colour], bg), colour, shape, bg))
    return out


def vae_extra_pool(n: int, seed: int):
    """Extra images for the VAE only (any colour, more shapes, the star too), so that it also encodes and decodes
    the LoRA dataset well; the UNet never sees these."""
    rng = random.Random(seed)
    shapes = SHAPES + ["star", "ellipse", "hexagon"]
    out = []
    for _ in range(n):
        rgb = (rng.random(), rng.random(), rng.random())
        if rng.random() < 0.2:
            rgb = PURPLE
        out.append(render(rng, rng.choice(shapes), rgb, rng.choice(list(BACKGROUNDS)), r_range=(9.0, 24.0),
                          jitter=10.0, rot=rng.uniform(0, 2 * math.pi)))
    return out


def make_dataset(out: Path, seed: int) -> list[str]:
    """The LoRA demo dataset: 14 purple stars (mostly on light backgrounds), trigger word first."""
    ds = out / "dataset"
    if ds.exists():
        shutil.rmtree(ds)
    ds.mkdir(parents=True)
    rng = random.Random(seed)
    captions = []
    for i in range(14):
        bg = "dark" if i % 4 == 3 else "light"
        img = render(rng, "star", PURPLE, bg, r_range=(15.0, 21.0), jitter=5.0, rot=rng.uniform(-0.25, 0.25))
        name = f"zkstar_{i + 1:02d}"
        img.save(ds / f"{name}.png", optimize=True)
        cap = f"{TRIGGER}, a purple star on a {bg} background"
        (ds / f"{name}.txt").write_text(cap + "\n")
        captions.append(cap)
    return captions


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dataset-only", action="store_true")
    ap.add_argument("--vae-steps", type=int, default=320)
    ap.add_argument("--vae-crop-steps", type=int, default=270, help="first VAE steps on 32x32 crops (4x cheaper)")
    ap.add_argument("--unet-steps", type=int, default=800)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-minutes", type=float, default=0.0,
                    help="a wall-clock budget for the UNet phase: its schedule ends at --unet-steps or at this "
                         "time, whichever comes first (0: steps only)")
    ap.add_argument("--pool", type=int, default=4096, help="base training images (UNet)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device to train on (cuda on a GPU machine)")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    caps = make_dataset(out, SEED + 7)
    log(f"dataset: {len(caps)} images in {out / 'dataset'}")
    if args.dataset_only:
        return 0

    import torch
    import torch.nn.functional as F
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    dev = torch.device(args.device)

    def to_tensor(imgs) -> torch.Tensor:
        a = np.stack([np.asarray(im, dtype=np.float32) for im in imgs]) / 127.5 - 1.0
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    # ---- data
    pool = base_pool(args.pool, SEED + 1)
    base_x = to_tensor([p[0] for p in pool])
    vae_x = torch.cat([base_x, to_tensor(vae_extra_pool(args.pool // 2, SEED + 2))])
    log(f"images: {len(pool)} base + {vae_x.shape[0] - len(pool)} VAE-only")

    # ---- tokenizer
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tok_dir = model_dir / "tokenizer"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    for w in WORDS:
        assert len(tokenizer.tokenize(w)) == 1, f"word {w!r} is not one token: {tokenizer.tokenize(w)}"

    # ---- models
    g = torch.Generator().manual_seed(SEED + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT),
        block_out_channels=VAE_BLOCK_OUT, layers_per_block=1, act_fn="silu", latent_channels=4,
        norm_num_groups=VAE_GROUPS, sample_size=IMAGE, scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_BLOCK_OUT, layers_per_block=1, norm_num_groups=UNET_GROUPS,
        cross_attention_dim=TE_HIDDEN, attention_head_dim=UNET_HEADS, use_linear_projection=False,
        upcast_attention=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5,
    )
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TE_HIDDEN, intermediate_size=TE_INTERMEDIATE,
        num_hidden_layers=TE_LAYERS, num_attention_heads=TE_HEADS, max_position_embeddings=MAX_LEN,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=TE_HIDDEN,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids SD1 text encoder configs carry
    ))
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("vae", vae), ("unet", unet), ("te", te))}
    log(f"parameters: {n_params} (fp16 ~{2 * sum(n_params.values()) / 1e6:.2f} MB)")
    vae.to(dev), unet.to(dev), te.to(dev)
    base_x, vae_x = base_x.to(dev), vae_x.to(dev)
    gd = torch.Generator(device=dev).manual_seed(SEED + 5)  # for draws made on the device

    # ---- 1. VAE
    with torch.no_grad():  # start with a small posterior std (log-variance half of the encoder's output conv)
        vae.encoder.conv_out.bias[4:].fill_(-4.0)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.vae_steps))))
    bs = 16
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, vae_x.shape[0], (bs,), generator=g)
        x = vae_x[idx]
        if step < args.vae_crop_steps:  # random 32x32 crops (a conv VAE; the last steps see whole images)
            oy, ox = torch.randint(0, IMAGE // 2 + 1, (2,), generator=g).tolist()
            x = x[:, :, oy:oy + IMAGE // 2, ox:ox + IMAGE // 2]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gd)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = l1 + mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 30 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:4d}/{args.vae_steps}  l1 {l1.item():.4f}  mse {mse.item():.5f}  kl {kl.item():.2f}  "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
    vae.eval().requires_grad_(False)
    vae_time = time.time() - t0

    # ---- encode the base pool; the scaling factor makes the latents unit-variance (as SD's 0.18215 does)
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, base_x.shape[0], 64):
            d = vae.encode(base_x[i:i + 64]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        lat_mean, lat_std = torch.cat(means), torch.cat(stds)
        rec = vae.decode(lat_mean[:64]).sample
        val_l1 = (rec - base_x[:64]).abs().mean().item()
        star_x = to_tensor([Image.open(p).convert("RGB") for p in sorted((out / "dataset").glob("*.png"))]).to(dev)
        star_l1 = (vae.decode(vae.encode(star_x).latent_dist.mean).sample - star_x).abs().mean().item()
    scaling = float(f"{1.0 / lat_mean.std().item():.5f}")
    vae.register_to_config(scaling_factor=scaling)
    log(f"VAE done: recon L1 base {val_l1:.4f}, LoRA dataset {star_l1:.4f}; latent std {lat_mean.std().item():.3f} "
        f"-> scaling_factor {scaling}; posterior std ~{lat_std.mean().item():.3f}")

    # ---- captions
    rng = random.Random(SEED + 4)
    cap_cache: dict[str, torch.Tensor] = {}

    def ids_for(caps: list[str]) -> torch.Tensor:
        missing = [c for c in set(caps) if c not in cap_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=MAX_LEN, truncation=True,
                            return_tensors="pt").input_ids
            for c, row in zip(missing, ids):
                cap_cache[c] = row
        return torch.stack([cap_cache[c] for c in caps])

    # ---- 2. text encoder + UNet
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1.0 - betas, 0).float().to(dev)
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    steps = args.unet_steps

    def progress(step: int) -> float:  # through the cosine schedule: by steps or by the time budget
        by_time = (time.time() - t0) / (60 * args.unet_minutes) if args.unet_minutes > 0 else 0.0
        return max(step / steps, by_time)

    def lr_at(step: int) -> float:
        return 1e-3 * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step))))
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
    bs = args.unet_batch
    t0 = time.time()
    avg = None
    step = 0
    while progress(step) < 1.0:
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, lat_mean.shape[0], (bs,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g).to(dev)) * scaling
        caps_b = [caption_for(rng, pool[i][1], pool[i][2], pool[i][3]) for i in idx.tolist()]
        t = torch.randint(0, 1000, (bs,), generator=g).to(dev)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ehs = te(ids_for(caps_b).to(dev)).last_hidden_state
        pred = unet(zt, t, ehs).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, ema in ((unet, ema_unet), (te, ema_te)):
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"unet step {step:4d}/{steps}  loss {loss.item():.4f}  avg {avg:.4f}  lr {lr:.2e}  "
                f"({(time.time() - t0) / (step + 1):.3f} s/step)")
        step += 1
    log(f"unet: {step} steps, loss avg {avg:.4f}")
    unet_time = time.time() - t0
    unet.load_state_dict(ema_unet)
    te.load_state_dict(ema_te)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    vae.cpu(), unet.cpu(), te.cpu()

    # ---- save (fp16, the layout make_sd_reference.py writes for tests/fixtures/sd_tiny/sd1/diffusers)
    sched_obj = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
        skip_prk_steps=True,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched_obj,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    te_sd = {k: v.contiguous() for k, v in te.state_dict().items()}
    te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te_sd.items()}
    save_file(te_sd, str(model_dir / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(tok_dir)
    write_tokenizer(tok_dir)
    sched_path = model_dir / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_path.read_text())
    sched_cfg["clip_sample"] = False
    sched_path.write_text(json.dumps(dict(sorted(sched_cfg.items())), indent=2) + "\n")
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    log(f"saved {model_dir} ({size / 1e6:.2f} MB)")

    # ---- base samples with diffusers itself, from the saved fp16 folder (computed in fp32)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    prompts = [[f"a {c} {s}" for s in SHAPES] for c in COLOURS]
    prompts.append([f"a {c} {s} on a {bg} background" for c, s, bg in
                    (("red", "circle", "light"), ("blue", "square", "dark"), ("green", "triangle", "light"),
                     ("yellow", "cross", "dark"))])
    for r, row in enumerate(prompts):
        gens = [torch.Generator().manual_seed(1000 + 10 * r + k) for k in range(len(row))]
        ims = pipe(row, num_inference_steps=20, guidance_scale=5.0, height=IMAGE, width=IMAGE,
                   generator=gens).images
        rows.append(ims)
    pad, cell = 4, IMAGE * 2
    grid = Image.new("RGB", (pad + len(SHAPES) * (cell + pad), pad + len(rows) * (cell + pad)), (128, 128, 128))
    for r, ims in enumerate(rows):
        for c, im in enumerate(ims):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (pad + c * (cell + pad), pad + r * (cell + pad)))
    grid.save(out / "base_samples.png", optimize=True)
    # the single prompt the README / the Rust check compare against
    im = pipe("a blue square", num_inference_steps=20, guidance_scale=5.0, height=IMAGE, width=IMAGE,
              generator=torch.Generator().manual_seed(1)).images[0]
    im.save(out / "base_blue_square_seed1.png")
    log(f"samples: {out / 'base_samples.png'} (rows: {[row[0] for row in prompts]} ... ; DDIM 20 steps, cfg 5)")
    log(f"done: VAE {vae_time / 60:.1f} min, UNet {unet_time / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} "
        f"min; model {size / 1e6:.2f} MB")
    if size > SIZE_LIMIT_BYTES:
        print(f"model folder is {size} bytes, over the {SIZE_LIMIT_BYTES} limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
