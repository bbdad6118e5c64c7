#!/usr/bin/env python3
"""Build tiny random-weight Stable Diffusion fixtures and reference outputs.

Writes, for the families ``sd1`` (SD 1.x shaped, epsilon prediction) and ``sd2v``
(SD 2.x-768-v shaped, v-prediction), under ``tests/fixtures/sd_tiny/<family>/``:

  diffusers/               a diffusers pipeline folder (unet, vae, text_encoder,
                           tokenizer, scheduler, model_index.json), fp32 safetensors
  single.safetensors       the same weights as one LDM/CompVis-layout checkpoint
  single-fp16.safetensors  (sd1 only) the same file cast to fp16
  reference.safetensors    inputs and reference outputs computed with diffusers /
                           transformers on CPU in fp32
  lora_kohya.safetensors   a rank-4 LoRA in kohya layout (lora_unet_*)
  lora_peft.safetensors    the same LoRA in diffusers/PEFT layout (unet.*.lora_A/B)
  fixture.json             every config value, shape and convention the tests need

and, when ``<family>/lora_ours.safetensors`` exists (a LoRA file written by *our* ``save_kohya``, by the
ignored Rust test ``write_lora_ours_fixture`` in tests/lora_roundtrip.rs; it is kept, not rewritten), loads it
with diffusers' ``load_lora_weights``, checks that every module of the file got an adapter with the file's
tensors and scale and nothing was left over, and records ``ours.*`` references with it loaded. The sd1 engine
LoRA fixture (``lora_engine.safetensors``, ``engine_reference.safetensors``, ``engine_check.json``: made after
this script by tests/engine_lora_diffusers.rs and tools/check_engine_lora.py) is kept as well.

plus ``tests/fixtures/sd_tiny/README.md`` describing all of it.

Run from the repository root (CPU only, deterministic):

    cargo test --test lora_roundtrip -- --ignored write_lora_ours_fixture   # only if lora_ours changed
    .venv-ref/bin/python tools/make_sd_reference.py

Pinned versions: tools/requirements-reference.txt.  Nothing is downloaded: the
tokenizer vocabulary is a tiny hand-made CLIP BPE vocabulary built here.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import tiny_clip_tokenizer  # noqa: E402  (tools/, the script's own folder)

transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "sd_tiny"
SIZE_LIMIT_BYTES = 6_000_000  # the fixtures are committed: keep the whole folder under 6 MB

SEED = 20240611
MAX_LEN = 77
LATENT = 16  # latent height/width used for the UNet references
IMAGE = 32  # VAE input height/width (tiny VAE downsamples 2x)
CFG = 3.0
STEPS = 4
LORA_RANK = 4
OURS_FILE = "lora_ours.safetensors"  # written by our Rust save_kohya (tests/lora_roundtrip.rs), read here
# sd1 only, made after this script (tests/engine_lora_diffusers.rs, then tools/check_engine_lora.py), not by it
ENGINE_FILES = ("lora_engine.safetensors", "engine_reference.safetensors", "engine_check.json")
OURS_ADAPTER = "ours"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# Prompts tokenized with the tiny vocabulary.  Row 0 of te.input_ids is PROMPT,
# row 1 is the empty (unconditional) prompt.
PROMPT = "a photo of sks person, oil painting"
EXTRA_WORDS = [
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "portrait",
    "person", "sks", "oil", "cat", "dog", "woman", "man", "style", "high", "quality",
    "red", "blue", "forest", "city", "night", "canvas", "sitting", "beach",
]

FAMILIES = {
    "sd1": dict(
        description="SD 1.x shaped: CLIP ViT-L style text encoder (quick_gelu), 1x1 conv proj_in/proj_out, "
        "attention_head_dim = number of heads (int), epsilon prediction, PNDMScheduler config as SD 1.5 ships",
        prediction_type="epsilon",
        te_hidden_act="quick_gelu",
        pad_token="<|endoftext|>",
        use_linear_projection=False,
        attention_head_dim=2,  # SD1 semantics: 2 heads in every block (head dim = channels / 2)
        upcast_attention=False,
        scheduler_class="PNDMScheduler",
        single_fp16=True,
        base_model_version="sd_v1",
        seed_offset=0,
    ),
    "sd2v": dict(
        description="SD 2.x-v shaped: OpenCLIP ViT-H style text encoder (gelu, open_clip layout in the single "
        "file), linear proj_in/proj_out, attention_head_dim = per-block list of head counts giving a constant "
        "head dim (as SD2 configs do), v-prediction, DDIMScheduler config as SD 2.1-v ships",
        prediction_type="v_prediction",
        te_hidden_act="gelu",
        pad_token="!",
        use_linear_projection=True,
        attention_head_dim=[2, 3],  # heads per block: 16ch/2 = 8, 24ch/3 = 8 -> head dim 8 everywhere
        upcast_attention=True,
        scheduler_class="DDIMScheduler",
        single_fp16=False,
        base_model_version="sd_v2_v",
        seed_offset=1000,
    ),
}

UNET_BLOCK_OUT = (16, 24)  # 24, not 32: keeps the files small and catches "channels double" assumptions
UNET_GROUPS = 8
VAE_BLOCK_OUT = (8, 16)
VAE_GROUPS = 4
VAE_SCALING = 0.18215
TE_HIDDEN = 32
TE_LAYERS = 2
TE_HEADS = 4
TE_INTERMEDIATE = 37

LORA_TARGETS = [
    # (diffusers module path, alpha)
    ("down_blocks.0.attentions.0.proj_in", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 2.0),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_q", 2.0),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 2.0),
    ("up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2", 8.0),  # scale 2.0: per-module alpha
    ("up_blocks.1.attentions.1.proj_out", 2.0),
]


# --------------------------------------------------------------------------------------
# Tokenizer: a tiny CLIP BPE vocabulary
# --------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, pad_token: str) -> None:
    tiny_clip_tokenizer.write_tokenizer(folder, EXTRA_WORDS + PROMPT.replace(",", " ").split(), pad_token, MAX_LEN)


# --------------------------------------------------------------------------------------
# Random initialisation: every parameter non-trivial (no all-ones norms / zero biases),
# so that parity tests catch swapped or missing affine terms and biases.
# --------------------------------------------------------------------------------------


def randomize_(model: nn.Module, gen: torch.Generator, emb_std: float = 0.5) -> None:
    touched = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(fan_in))
                touched.add(f"{mname}.weight")
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
                    touched.add(f"{mname}.bias")
            elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
                touched.update({f"{mname}.weight", f"{mname}.bias"})
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * emb_std)
                touched.add(f"{mname}.weight")
    missing = [n for n, _ in model.named_parameters() if n not in touched]
    if missing:
        raise RuntimeError(f"parameters not randomized: {missing}")


# --------------------------------------------------------------------------------------
# diffusers -> LDM/CompVis key conversion (and its inverse for verification)
# --------------------------------------------------------------------------------------

UNET_RESNET_RENAMES = [  # (diffusers, ldm) inside a ResnetBlock2D
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]

VAE_ATTN_RENAMES = [  # (diffusers, ldm) inside the VAE mid-block attention
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def unet_prefix_map(cfg) -> list[tuple[str, str, str]]:
    """(diffusers prefix, ldm prefix, kind) for every sub-module of the UNet.

    kind is 'resnet' (inner names renamed), 'plain' (inner names kept)."""
    lpb = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    m = [
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("conv_in", "input_blocks.0.0", "plain"),
        ("conv_norm_out", "out.0", "plain"),
        ("conv_out", "out.2", "plain"),
    ]
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            m.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if "CrossAttn" in cfg["down_block_types"][i]:
                m.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "plain"))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op", "plain"))
    m.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
    m.append(("mid_block.attentions.0", "middle_block.1", "plain"))
    m.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
    for i in range(n):
        has_attn = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            m.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if has_attn:
                m.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "plain"))
        if i < n - 1:
            up_idx = i * (lpb + 1) + lpb
            m.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{up_idx}.{2 if has_attn else 1}.conv", "plain"))
    return m


def _rename(key: str, prefixes: list[tuple[str, str, str]], inner: dict[str, list[tuple[str, str]]], reverse: bool):
    best = None
    for d, l, kind in prefixes:
        src, dst = (l, d) if reverse else (d, l)
        if key == src or key.startswith(src + "."):
            if best is None or len(src) > len(best[0]):
                best = (src, dst, kind)
    if best is None:
        raise KeyError(f"no mapping for key {key!r}")
    src, dst, kind = best
    rest = key[len(src):]
    if kind in inner:
        for a, b in inner[kind]:
            s, t = (b, a) if reverse else (a, b)
            if rest.startswith("." + s + "."):
                rest = "." + t + rest[len(s) + 1:]
                break
    return dst + rest


def unet_to_ldm(sd: dict, cfg) -> dict:
    pm = unet_prefix_map(cfg)
    out = {}
    for k, v in sd.items():
        out["model.diffusion_model." + _rename(k, pm, {"resnet": UNET_RESNET_RENAMES}, False)] = v
    return out


def unet_from_ldm(sd: dict, cfg) -> dict:
    pm = unet_prefix_map(cfg)
    p = "model.diffusion_model."
    return {_rename(k[len(p):], pm, {"resnet": UNET_RESNET_RENAMES}, True): v for k, v in sd.items() if k.startswith(p)}


def vae_prefix_map(cfg) -> list[tuple[str, str, str]]:
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    m = [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.conv_in", f"{part}.conv_in", "plain"),
            (f"{part}.conv_out", f"{part}.conv_out", "plain"),
            (f"{part}.conv_norm_out", f"{part}.norm_out", "plain"),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "resnet"),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "resnet"),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "attn"),
        ]
    for i in range(n):
        for j in range(lpb):
            m.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < n - 1:
            m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", "plain"))
        for j in range(lpb + 1):
            m.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", "resnet"))
        if i < n - 1:
            m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", "plain"))
    return m


VAE_INNER = {"resnet": [("conv_shortcut", "nin_shortcut")], "attn": VAE_ATTN_RENAMES}


def vae_to_ldm(sd: dict, cfg) -> dict:
    pm = vae_prefix_map(cfg)
    out = {}
    for k, v in sd.items():
        nk = _rename(k, pm, VAE_INNER, False)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # Linear [C,C] -> 1x1 Conv2d [C,C,1,1]
        out["first_stage_model." + nk] = v
    return out


def vae_from_ldm(sd: dict, cfg) -> dict:
    pm = vae_prefix_map(cfg)
    p = "first_stage_model."
    out = {}
    for k, v in sd.items():
        if not k.startswith(p):
            continue
        if ".mid.attn_1." in k and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[_rename(k[len(p):], pm, VAE_INNER, True)] = v
    return out


def te_keys_with_text_model(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel flattened; published SD repos use `text_model.`."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm_sd1(sd: dict) -> dict:
    out = {"cond_stage_model.transformer." + k: v for k, v in te_keys_with_text_model(sd).items()}
    # SD 1.x checkpoints carry the (int64) position_ids buffer of old transformers versions.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(MAX_LEN, dtype=torch.int64)[None]
    return out


OPENCLIP_LAYER_RENAMES = [  # (diffusers inside text_model.encoder.layers.N, open_clip inside resblocks.N)
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def clip_to_ldm_sd2(sd: dict, extra_layer: dict, text_projection: torch.Tensor, logit_scale: torch.Tensor) -> dict:
    sd = te_keys_with_text_model(sd)
    p = "cond_stage_model.model."
    out = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out[p + "token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out[p + "positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out[p + "ln_final." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("text_model.encoder.layers."):
            rest = k[len("text_model.encoder.layers."):]
            idx, name = rest.split(".", 1)
            layers.setdefault(int(idx), {})[name] = v
        else:
            raise KeyError(k)
    extra_idx = max(layers) + 1
    layers[extra_idx] = extra_layer
    for idx, t in sorted(layers.items()):
        lp = f"{p}transformer.resblocks.{idx}."
        for suf in ("weight", "bias"):
            out[lp + f"attn.in_proj_{suf}"] = torch.cat(
                [t[f"self_attn.q_proj.{suf}"], t[f"self_attn.k_proj.{suf}"], t[f"self_attn.v_proj.{suf}"]], 0
            )
        for name, v in t.items():
            if name.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                continue
            mod, suf = name.rsplit(".", 1)
            for a, b in OPENCLIP_LAYER_RENAMES:
                if mod == a:
                    mod = b
                    break
            else:
                raise KeyError(name)
            out[lp + f"{mod}.{suf}"] = v
    out[p + "text_projection"] = text_projection
    out[p + "logit_scale"] = logit_scale
    return out


def clip_from_ldm_sd1(sd: dict) -> dict:
    p = "cond_stage_model.transformer."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and not k.endswith("position_ids")}


def clip_from_ldm_sd2(sd: dict, num_layers: int, hidden: int) -> dict:
    p = "cond_stage_model.model."
    out = {}
    for k, v in sd.items():
        if not k.startswith(p):
            continue
        r = k[len(p):]
        if r == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif r == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif r.startswith("ln_final."):
            out["text_model.final_layer_norm." + r.rsplit(".", 1)[1]] = v
        elif r.startswith("transformer.resblocks."):
            idx, name = r[len("transformer.resblocks."):].split(".", 1)
            if int(idx) >= num_layers:
                continue  # the last open_clip block is unused by SD2 (penultimate layer)
            lp = f"text_model.encoder.layers.{idx}."
            if name.startswith("attn.in_proj_"):
                suf = name[len("attn.in_proj_"):]
                q, kk, vv = v.split(hidden, 0)
                out[lp + f"self_attn.q_proj.{suf}"] = q
                out[lp + f"self_attn.k_proj.{suf}"] = kk
                out[lp + f"self_attn.v_proj.{suf}"] = vv
            else:
                mod, suf = name.rsplit(".", 1)
                for a, b in OPENCLIP_LAYER_RENAMES:
                    if mod == b:
                        mod = a
                        break
                else:
                    raise KeyError(name)
                out[lp + f"{mod}.{suf}"] = v
    return out


def ldm_schedule_buffers(betas64: torch.Tensor) -> dict:
    """The DDPM buffers LatentDiffusion registers (they ship in SD1/SD2 .ckpt/.safetensors files)."""
    alphas = 1.0 - betas64
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas64 * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas64,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas64 * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.to(torch.float32).contiguous() for k, v in bufs.items()}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def contig(d: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in d.items()}


def assert_same_tensors(a: dict, b: dict, what: str, atol: float = 0.0) -> None:
    ka, kb = set(a), set(b)
    if ka != kb:
        raise AssertionError(f"{what}: key mismatch; only left: {sorted(ka - kb)[:10]} only right: {sorted(kb - ka)[:10]}")
    for k in sorted(ka):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{what}: {k} shape/dtype {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
        if atol == 0.0:
            if not torch.equal(x, y):
                raise AssertionError(f"{what}: {k} differs")
        elif not torch.allclose(x, y, atol=atol, rtol=0):
            raise AssertionError(f"{what}: {k} differs by {(x - y).abs().max()}")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def jsonable(cfg) -> dict:
    d = dict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if not k.startswith("_")}


def stats(t: torch.Tensor) -> str:
    t = t.float()
    return f"mean {t.mean():+.4f} std {t.std():.4f} absmax {t.abs().max():.4f}"


def check_sane(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t.float()).all():
        raise AssertionError(f"{name} has non-finite values")
    if t.is_floating_point() and t.numel() > 1 and float(t.float().std()) < 1e-3:
        raise AssertionError(f"{name} is near-constant: {stats(t)}")


def save_st(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """save_file, then rewrite the header with sorted metadata keys (safetensors writes the metadata map in
    hash order, which would make the bytes differ between runs)."""
    save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# building one family
# --------------------------------------------------------------------------------------


def build_models(fam: dict, tokenizer_vocab_size: int, seed: int):
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_BLOCK_OUT,
        layers_per_block=1,
        norm_num_groups=UNET_GROUPS,
        cross_attention_dim=TE_HIDDEN,
        attention_head_dim=fam["attention_head_dim"],
        use_linear_projection=fam["use_linear_projection"],
        upcast_attention=fam["upcast_attention"],
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        norm_eps=1e-5,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT),
        block_out_channels=VAE_BLOCK_OUT,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=VAE_GROUPS,
        sample_size=IMAGE,
        scaling_factor=VAE_SCALING,
    )
    te_cfg = CLIPTextConfig(
        vocab_size=tokenizer_vocab_size,
        hidden_size=TE_HIDDEN,
        intermediate_size=TE_INTERMEDIATE,
        num_hidden_layers=TE_LAYERS,
        num_attention_heads=TE_HEADS,
        max_position_embeddings=MAX_LEN,
        hidden_act=fam["te_hidden_act"],
        layer_norm_eps=1e-5,
        projection_dim=TE_HIDDEN,
        # the (legacy) ids that the published SD1/SD2 text_encoder configs carry; with eos_token_id == 2
        # transformers pools at argmax(input_ids), i.e. at the first <|endoftext|> (the highest id).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    te = CLIPTextModel(te_cfg)
    randomize_(unet, torch.Generator().manual_seed(seed + 1))
    randomize_(vae, torch.Generator().manual_seed(seed + 2))
    randomize_(te, torch.Generator().manual_seed(seed + 3))
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return unet, vae, te


def make_scheduler(fam: dict):
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=fam["prediction_type"],
        timestep_spacing="leading",
    )
    if fam["scheduler_class"] == "PNDMScheduler":
        return PNDMScheduler(skip_prk_steps=True, **common)
    return DDIMScheduler(clip_sample=False, **common)


def unet_forward(unet, x, t, ehs):
    return unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]


def sample_ddim(unet, sched_cfg, latents_in, cond, uncond):
    s = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
    s.set_timesteps(STEPS)
    lat = latents_in * s.init_noise_sigma
    ctx = torch.cat([uncond, cond])
    traj, model_out = [], []
    for t in s.timesteps:
        inp = s.scale_model_input(torch.cat([lat, lat]), t)
        out_u, out_c = unet_forward(unet, inp, t, ctx).chunk(2)
        guided = out_u + CFG * (out_c - out_u)
        lat = s.step(guided, t, lat, eta=0.0, return_dict=False)[0]
        traj.append(lat)
        model_out.append(guided)
    return s, lat, torch.stack(traj), torch.stack(model_out)


def sample_euler(unet, sched_cfg, latents_in, cond, uncond):
    s = EulerDiscreteScheduler.from_config(sched_cfg)
    s.set_timesteps(STEPS)
    lat = latents_in * s.init_noise_sigma
    ctx = torch.cat([uncond, cond])
    traj, model_out = [], []
    for t in s.timesteps:
        inp = s.scale_model_input(torch.cat([lat, lat]), t)
        out_u, out_c = unet_forward(unet, inp, t, ctx).chunk(2)
        guided = out_u + CFG * (out_c - out_u)
        lat = s.step(guided, t, lat, return_dict=False)[0]
        traj.append(lat)
        model_out.append(guided)
    return s, lat, torch.stack(traj), torch.stack(model_out)


def kohya_name(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def build_lora(unet, gen: torch.Generator):
    """Returns {module: (down, up, alpha)} with kohya shapes (conv: [r,in,1,1] / [out,r,1,1])."""
    modules = dict(unet.named_modules())
    lora = {}
    for path, alpha in LORA_TARGETS:
        mod = modules[path]
        w = mod.weight
        out_f, in_f = w.shape[0], w.shape[1]
        down = torch.randn((LORA_RANK, in_f), generator=gen) / math.sqrt(in_f)
        up = torch.randn((out_f, LORA_RANK), generator=gen) * (0.5 / math.sqrt(LORA_RANK))
        if isinstance(mod, nn.Conv2d):
            assert mod.kernel_size == (1, 1), path
            down = down[:, :, None, None]
            up = up[:, :, None, None]
        lora[path] = (down.contiguous(), up.contiguous(), float(alpha))
    return lora


def merge_lora(unet, lora, multiplier: float = 1.0):
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for path, (down, up, alpha) in lora.items():
            w = modules[path].weight
            delta = (up.flatten(1) @ down.flatten(1)) * (alpha / LORA_RANK) * multiplier
            w.add_(delta.reshape(w.shape))
    return merged


def tensor_table(d: dict) -> list[dict]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in d.items()]


def build_family(name: str, fam: dict, out_root: Path, log) -> dict:
    seed = SEED + fam["seed_offset"]
    torch.manual_seed(seed)
    fdir = out_root / name
    # lora_ours.safetensors is an input (written by our Rust code), not an output: keep it across the rewrite.
    # So are the engine LoRA fixture files (ENGINE_FILES), which are made from this script's models and
    # references afterwards. With --out elsewhere they are taken from the committed fixtures.
    kept = {}
    for fname in (OURS_FILE, *ENGINE_FILES):
        for cand in (fdir / fname, DEFAULT_OUT / name / fname):
            if cand.is_file():
                kept[fname] = cand.read_bytes()
                log(f"[{name}] using {cand}")
                break
    ours_bytes = kept.get(OURS_FILE)
    if fdir.exists():
        shutil.rmtree(fdir)
    ddir = fdir / "diffusers"
    ddir.mkdir(parents=True)
    for fname, data in kept.items():
        (fdir / fname).write_bytes(data)

    # ---- tokenizer
    tok_dir = ddir / "tokenizer"
    write_tokenizer(tok_dir, fam["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    bos_id, eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    pad_id = vocab[fam["pad_token"]]
    assert tokenizer.pad_token_id == pad_id and tokenizer.eos_token_id == eos_id and tokenizer.bos_token_id == bos_id
    ids = tokenizer([PROMPT, ""], padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
    prompt_tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    n_prompt = int((ids[0] == eos_id).nonzero()[0]) + 1
    log(f"[{name}] tokenizer: vocab {len(vocab)} bos {bos_id} eos {eos_id} pad {pad_id}; prompt tokens "
        f"{prompt_tokens[:n_prompt]}")
    assert ids[0, 0] == bos_id and ids[1, 0] == bos_id and ids[1, 1] == eos_id
    assert int(ids.argmax(-1)[0]) == n_prompt - 1, "eos must be the highest id for argmax pooling"
    for w in EXTRA_WORDS:
        assert len(tokenizer.tokenize(w)) == 1, f"word {w!r} is not a single token: {tokenizer.tokenize(w)}"

    # ---- models
    unet, vae, te = build_models(fam, len(vocab), seed)
    sched = make_scheduler(fam)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(ddir), safe_serialization=True)
    # published SD repos: text_encoder keys carry `text_model.`; tokenizer folder = vocab/merges/configs only
    te_file = ddir / "text_encoder" / "model.safetensors"
    save_file(te_keys_with_text_model(contig(te.state_dict())), str(te_file), metadata={"format": "pt"})
    shutil.rmtree(tok_dir)
    write_tokenizer(tok_dir, fam["pad_token"])
    # SD 1.5's PNDM scheduler_config.json also says clip_sample false (read by DDIM when swapped in)
    sched_path = ddir / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_path.read_text())
    sched_cfg["clip_sample"] = False
    sched_path.write_text(json.dumps(dict(sorted(sched_cfg.items())), indent=2) + "\n")

    unet_sd, vae_sd, te_sd = contig(unet.state_dict()), contig(vae.state_dict()), contig(te.state_dict())

    # verify the folder loads back bit-exactly with diffusers/transformers
    re = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)
    assert_same_tensors(contig(re.unet.state_dict()), unet_sd, f"{name} diffusers unet reload")
    assert_same_tensors(contig(re.vae.state_dict()), vae_sd, f"{name} diffusers vae reload")
    assert_same_tensors(contig(re.text_encoder.state_dict()), te_sd, f"{name} diffusers text_encoder reload")
    assert re.tokenizer([PROMPT, ""], padding="max_length", max_length=MAX_LEN, truncation=True,
                        return_tensors="pt").input_ids.equal(ids)
    del re

    # ---- single-file LDM checkpoint
    ucfg, vcfg = dict(unet.config), dict(vae.config)
    betas64 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    single = {}
    single.update(ldm_schedule_buffers(betas64))
    single.update(unet_to_ldm(unet_sd, ucfg))
    single.update(vae_to_ldm(vae_sd, vcfg))
    if name == "sd1":
        single.update(clip_to_ldm_sd1(te_sd))
    else:
        # the real open_clip ViT-H has one more block than diffusers' text encoder (SD2 uses the penultimate
        # layer); it is in every SD2 checkpoint and unused.  Add a random one, plus text_projection/logit_scale.
        g = torch.Generator().manual_seed(seed + 4)
        extra = {}
        for k, v in te_sd.items():
            if k.startswith("encoder.layers.0."):
                extra[k[len("encoder.layers.0."):]] = torch.randn(v.shape, generator=g) * 0.1
        text_proj = torch.randn((TE_HIDDEN, TE_HIDDEN), generator=g) / math.sqrt(TE_HIDDEN)
        single.update(clip_to_ldm_sd2(te_sd, extra, text_proj, torch.tensor(math.log(1 / 0.07))))
    single = contig(single)
    single_path = fdir / "single.safetensors"
    save_file(single, str(single_path), metadata={"format": "pt"})

    # verify 1: our inverse mapping gives back every diffusers tensor exactly
    loaded = load_file(str(single_path))
    assert_same_tensors(unet_from_ldm(loaded, ucfg), unet_sd, f"{name} single-file unet (own inverse)")
    assert_same_tensors(vae_from_ldm(loaded, vcfg), vae_sd, f"{name} single-file vae (own inverse)")
    if name == "sd1":
        te_back = clip_from_ldm_sd1(loaded)
    else:
        te_back = clip_from_ldm_sd2(loaded, TE_LAYERS, TE_HIDDEN)
    assert_same_tensors(te_back, te_keys_with_text_model(te_sd), f"{name} single-file text encoder (own inverse)")
    n_used = len(unet_sd) + len(vae_sd) + len(te_sd)
    log(f"[{name}] single.safetensors: {len(loaded)} tensors ({n_used} model tensors + extras), own inverse: exact")

    # verify 2: diffusers' own single-file loader (configs from our diffusers folder, offline)
    verify_with_diffusers_single_file(name, single_path, ddir, unet_sd, vae_sd, te_sd, log)

    files = {"diffusers": "diffusers/", "single": "single.safetensors"}
    if fam["single_fp16"]:
        half = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in single.items()}
        save_file(contig(half), str(fdir / "single-fp16.safetensors"), metadata={"format": "pt"})
        assert_same_tensors(load_file(str(fdir / "single-fp16.safetensors")), half, f"{name} single-fp16")
        files["single_fp16"] = "single-fp16.safetensors"

    # ---- references
    ref = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 10)
        x = torch.randn((2, 4, LATENT, LATENT), generator=g)
        t = torch.tensor([10, 700], dtype=torch.int64)
        ehs = torch.randn((2, MAX_LEN, TE_HIDDEN), generator=g)
        ref["unet.sample_in"], ref["unet.timesteps"], ref["unet.encoder_hidden_states"] = x, t, ehs
        ref["unet.out"] = unet_forward(unet, x, t, ehs)

        img = torch.rand((1, 3, IMAGE, IMAGE), generator=g) * 2 - 1
        post = vae.encode(img).latent_dist
        ref["vae.image_in"] = img
        ref["vae.latent_mean"] = post.mean
        ref["vae.latent_logvar"] = post.logvar
        ref["vae.decoded"] = vae.decode(post.mean).sample

        te_out = te(ids, output_hidden_states=True)
        final_ln = getattr(te, "text_model", te).final_layer_norm
        ref["te.input_ids"] = ids.to(torch.int64)
        ref["te.last_hidden_state"] = te_out.last_hidden_state
        ref["te.penultimate_hidden_state"] = final_ln(te_out.hidden_states[-2])
        ref["te.pooled"] = te_out.pooler_output
        # pooled == last_hidden_state at the first eos
        for b in range(ids.shape[0]):
            e = int((ids[b] == eos_id).nonzero()[0])
            assert torch.equal(te_out.pooler_output[b], te_out.last_hidden_state[b, e])

        ref["sched.alphas_cumprod"] = sched.alphas_cumprod.clone()
        lat0 = torch.randn((1, 4, LATENT, LATENT), generator=g)
        cond, uncond = te_out.last_hidden_state[0:1], te_out.last_hidden_state[1:2]
        ref["sample.latents_in"], ref["sample.cond"], ref["sample.uncond"] = lat0, cond, uncond
        ddim, ddim_out, ddim_traj, ddim_model_out = sample_ddim(unet, sched_cfg, lat0, cond, uncond)
        euler, euler_out, euler_traj, euler_model_out = sample_euler(unet, sched_cfg, lat0, cond, uncond)
        ref["sched.ddim_timesteps"] = ddim.timesteps.to(torch.int64)
        ref["sched.euler_timesteps"] = euler.timesteps.to(torch.float32)
        ref["sched.euler_sigmas"] = euler.sigmas.to(torch.float32)
        ref["sample.ddim_out"], ref["sample.ddim_trajectory"] = ddim_out, ddim_traj
        ref["sample.euler_out"], ref["sample.euler_trajectory"] = euler_out, euler_traj
        # The guided model output fed to each step, so a sampler can be checked without running a UNet.
        ref["sample.ddim_model_out"], ref["sample.euler_model_out"] = ddim_model_out, euler_model_out
        ref["sample.ddim_image"] = decode_to_image(vae, ddim_out)

        # ---- LoRA
        lora = build_lora(unet, torch.Generator().manual_seed(seed + 20))
        merged = merge_lora(unet, lora, 1.0)
        ref["lora.unet_out"] = unet_forward(merged, x, t, ehs)

    # diffusers' own StableDiffusionPipeline call gives the same image as the hand-written DDIM loop + decode
    with torch.random.fork_rng(devices=[]):
        check_pipeline_call(name, ddir, None, sched_cfg, lat0, ref["sample.ddim_image"], log)
    ours_check = None
    if ours_bytes is not None:
        with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
            ours_ref, ours_check = reference_with_lora_ours(
                name, ddir, fdir / OURS_FILE, sched_cfg, x, t, ehs, ids, lat0, ref, log)
        ref.update(ours_ref)

    for k, v in ref.items():
        check_sane(k, v)
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
    ref = contig(ref)
    save_file(ref, str(fdir / "reference.safetensors"), metadata={"family": name})
    lora_rel = max_abs_diff(ref["lora.unet_out"], ref["unet.out"]) / float(ref["unet.out"].abs().max())
    for k in ("unet.out", "vae.latent_mean", "vae.decoded", "te.last_hidden_state", "te.pooled",
              "sample.ddim_out", "sample.euler_out", "lora.unet_out"):
        log(f"[{name}] {k:24s} {stats(ref[k])}")
    log(f"[{name}] LoRA changes unet.out by up to {lora_rel:.1%} of its absmax")

    kohya = {}
    peft = {}
    for path, (down, up, alpha) in lora.items():
        kn = kohya_name(path)
        kohya[f"{kn}.lora_down.weight"] = down
        kohya[f"{kn}.lora_up.weight"] = up
        kohya[f"{kn}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        peft[f"unet.{path}.lora_A.weight"] = down
        peft[f"unet.{path}.lora_B.weight"] = up * (alpha / LORA_RANK)  # scale baked in: load with lora_alpha == r
    kohya_meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(LORA_RANK),
        "ss_network_alpha": "2.0",
        "ss_network_args": "{}",
        "ss_base_model_version": fam["base_model_version"],
        "ss_v2": "True" if name != "sd1" else "False",
    }
    save_st(contig(kohya), fdir / "lora_kohya.safetensors", metadata=kohya_meta)
    save_file(contig(peft), str(fdir / "lora_peft.safetensors"), metadata={"format": "pt"})
    files.update({"reference": "reference.safetensors", "lora_kohya": "lora_kohya.safetensors",
                  "lora_peft": "lora_peft.safetensors"})

    verify_lora_with_diffusers(name, ddir, fdir, x, t, ehs, ref["lora.unet_out"], log)
    if ours_check is not None:
        files["lora_ours"] = OURS_FILE

    # ---- fixture.json
    heads, head_dims = [], []
    ahd = fam["attention_head_dim"]
    for i, ch in enumerate(UNET_BLOCK_OUT):
        h = ahd[i] if isinstance(ahd, list) else ahd
        heads.append(h)
        head_dims.append(ch // h)
    mid_heads = ahd[-1] if isinstance(ahd, list) else ahd
    fixture = {
        "family": name,
        "description": fam["description"],
        "generated_by": "tools/make_sd_reference.py",
        "seed": seed,
        "versions": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "safetensors": safetensors.__version__},
        "files": files,
        "prediction_type": fam["prediction_type"],
        "unet": {
            "config": jsonable(unet.config),
            "derived": {
                "heads_per_block": heads,
                "head_dim_per_block": head_dims,
                "mid_block_heads": mid_heads,
                "mid_block_head_dim": UNET_BLOCK_OUT[-1] // mid_heads,
                "attention_head_dim_semantics": "number of heads (diffusers legacy naming, used as num_attention_heads)",
                "time_embed_dim": 4 * UNET_BLOCK_OUT[0],
                "proj_in_out": "Linear [C,C]" if fam["use_linear_projection"] else "Conv2d 1x1 [C,C,1,1]",
                "timestep_embedding": "sinusoidal, dim block_out_channels[0], flip_sin_to_cos=true, freq_shift=0",
                "ldm_prefix_map": [[d, l] for d, l, _ in unet_prefix_map(ucfg)],
                "ldm_resnet_renames": UNET_RESNET_RENAMES,
            },
        },
        "vae": {
            "config": jsonable(vae.config),
            "derived": {
                "downsample_factor": 2 ** (len(VAE_BLOCK_OUT) - 1),
                "scaling_factor": VAE_SCALING,
                "latent_mean_is_scaled": False,
                "mid_attention_heads": 1,
                "ldm_prefix_map": [[d, l] for d, l, _ in vae_prefix_map(vcfg)],
                "ldm_attention_renames": VAE_ATTN_RENAMES,
                "ldm_attention_weights": "1x1 Conv2d [C,C,1,1] in the single file, Linear [C,C] in diffusers",
            },
        },
        "text_encoder": {
            "config": {k: v for k, v in te.config.to_dict().items()
                       if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                                "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim")},
            "single_file_layout": "open_clip" if name != "sd1" else "hf_clip",
            "single_file_prefix": "cond_stage_model.model." if name != "sd1" else "cond_stage_model.transformer.",
            "single_file_resblocks": TE_LAYERS + 1 if name != "sd1" else None,
            "pooled": "last_hidden_state at argmax(input_ids) (= first <|endoftext|>, the highest id)",
            "penultimate": "final_layer_norm(hidden_states[-2]) (clip-skip 2 as diffusers clip_skip=1, A1111, kohya)",
        },
        "tokenizer": {
            "vocab_size": len(vocab),
            "bos_id": bos_id,
            "eos_id": eos_id,
            "pad_id": pad_id,
            "pad_token": fam["pad_token"],
            "max_length": MAX_LEN,
            "prompts": [PROMPT, ""],
            "prompt_tokens": prompt_tokens[:n_prompt],
        },
        "scheduler": {"class": fam["scheduler_class"], "config": jsonable(sched_cfg)},
        "sampling": {
            "steps": STEPS,
            "cfg": CFG,
            "batch_order": "[uncond, cond]; guided = out_uncond + cfg * (out_cond - out_uncond)",
            "ddim": {"eta": 0.0, "clip_sample": False, "timesteps": ddim.timesteps.tolist(), "init_noise_sigma": float(ddim.init_noise_sigma),
                     "final_alpha_cumprod": float(ddim.final_alpha_cumprod)},
            "euler": {"timesteps": euler.timesteps.tolist(), "sigmas": euler.sigmas.tolist(),
                      "init_noise_sigma": float(euler.init_noise_sigma), "s_churn": 0.0,
                      "timestep_spacing": euler.config.timestep_spacing,
                      "interpolation_type": euler.config.interpolation_type},
        },
        "lora": {
            "rank": LORA_RANK,
            "multiplier": 1.0,
            "modules": [{"module": p, "kohya": kohya_name(p), "alpha": a, "scale": a / LORA_RANK,
                         "down_shape": list(lora[p][0].shape), "up_shape": list(lora[p][1].shape)}
                        for p, a in LORA_TARGETS],
            "kohya_metadata": kohya_meta,
            "peft_note": "lora_peft.safetensors has lora_B = lora_up * alpha/rank (scale baked in), no alpha keys",
        },
        **({"lora_ours": ours_check} if ours_check is not None else {}),
        "reference_tensors": tensor_table(ref),
        "single_file_tensors": len(single),
    }
    (fdir / "fixture.json").write_text(json.dumps(fixture, indent=2) + "\n")
    return fixture


def verify_with_diffusers_single_file(name, single_path, ddir, unet_sd, vae_sd, te_sd, log):
    """Load single.safetensors with diffusers' from_single_file (configs from our folder, offline).

    The config folder is a copy of the diffusers folder *without weight files*, so every weight must come from
    the single file (nothing can silently fall back to the folder's safetensors)."""
    path = single_path
    tmp = None
    cfg_dir = Path(tempfile.mkdtemp(prefix="sd_tiny_cfg_"))
    shutil.copytree(ddir, cfg_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    ddir = cfg_dir
    try:
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(ddir), local_files_only=True, safety_checker=None)
            how = "as written"
        except Exception as e:  # noqa: BLE001
            if name == "sd1":
                raise
            # diffusers ignores open_clip block 23 by its literal name (real SD2); our tiny model's unused last
            # block has another index, so drop it for this check only.
            log(f"[{name}] from_single_file on the file as written failed ({type(e).__name__}: {str(e)[:120]})")
            sd = load_file(str(path))
            sd = {k: v for k, v in sd.items() if f"resblocks.{TE_LAYERS}." not in k}
            tmp = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
            tmp.close()
            save_file(sd, tmp.name)
            pipe = StableDiffusionPipeline.from_single_file(
                tmp.name, config=str(ddir), local_files_only=True, safety_checker=None)
            how = f"without the unused resblocks.{TE_LAYERS}"
        assert_same_tensors(contig(pipe.unet.state_dict()), unet_sd, f"{name} from_single_file unet")
        assert_same_tensors(contig(pipe.vae.state_dict()), vae_sd, f"{name} from_single_file vae")
        assert_same_tensors(contig(pipe.text_encoder.state_dict()), te_sd, f"{name} from_single_file text_encoder")
        log(f"[{name}] diffusers from_single_file ({how}): unet, vae, text_encoder bit-exact")
    finally:
        shutil.rmtree(cfg_dir)
        if tmp is not None:
            os.unlink(tmp.name)


def decode_to_image(vae, latents):
    """What StableDiffusionPipeline returns with output_type="pt": decode(latents / scaling_factor) mapped from
    [-1, 1] to [0, 1] and clipped ([B, 3, H, W] float)."""
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (images * 0.5 + 0.5).clamp(0, 1)


def ddim_pipeline(pipe, sched_cfg):
    pipe.scheduler = DDIMScheduler.from_config(sched_cfg, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline_call(name, ddir, lora_path, sched_cfg, lat0, expected_image, log, pipe=None):
    """Runs diffusers' StableDiffusionPipeline itself (prompt, empty negative, DDIM 4 steps, cfg 3, latents_in)
    and checks its image against the reference made by the hand-written loop + decode."""
    if pipe is None:
        pipe = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)
    ddim_pipeline(pipe, sched_cfg)
    with torch.no_grad():
        img = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                   latents=lat0.clone(), height=IMAGE, width=IMAGE, output_type="pt").images
    d = max_abs_diff(img, expected_image)
    what = "without a LoRA" if lora_path is None else f"with {lora_path.name}"
    log(f"[{name}] StableDiffusionPipeline(...) {what} vs the DDIM loop + decode: image max abs diff {d:.2e}")
    if d > 1e-5:
        raise AssertionError(f"{name}: the pipeline call {what} differs from the reference image by {d}")


def te_module_path(module_name: str) -> str:
    """transformers >= 5.6 names CLIPTextModel's modules without `text_model.`; LoRA files and our app use it."""
    return module_name if module_name.startswith("text_model.") else "text_model." + module_name


def kohya_modules(file_sd: dict, what: str) -> dict:
    """{kohya module name: {suffix: tensor}} of a kohya file; every key must be a down/up/alpha tensor."""
    by_module: dict[str, dict] = {}
    for k, v in file_sd.items():
        for suf in KOHYA_SUFFIXES:
            if k.endswith(suf):
                by_module.setdefault(k[: -len(suf)], {})[suf] = v
                break
        else:
            raise AssertionError(f"{what}: key {k!r} is not a kohya LoRA tensor")
    for m, parts in by_module.items():
        if set(parts) != set(KOHYA_SUFFIXES):
            raise AssertionError(f"{what}: module {m} has only {sorted(parts)}")
    return by_module


COMPONENTS = (("unet", "lora_unet_", lambda n: n), ("text_encoder", "lora_te_", te_module_path))


def load_lora_checked(name, ddir, path: Path, log):
    """A fresh pipeline with `path` loaded by diffusers' `load_lora_weights`, and the proof that it loaded all of
    it and as written: the set of modules that received an adapter equals the file's modules (nothing left over,
    nothing missing), every adapter holds the file's down/up tensors bit-exactly and applies the file's
    alpha/rank, and diffusers/transformers/peft logged no warning (no "unexpected keys", no "No LoRA keys
    associated", no ignored `alpha_pattern` entries)."""
    import logging
    import warnings

    from peft.tuners.tuners_utils import BaseTunerLayer

    by_module = kohya_modules(load_file(str(path)), f"{name}/{path.name}")
    pipe = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    diffusers.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=OURS_ADAPTER)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        diffusers.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()
    messages = records + [f"{w.category.__name__}: {w.message}" for w in caught]
    if messages:
        raise AssertionError(f"{name}: load_lora_weights({path.name}) warned: " + "\n".join(messages))

    adapted: dict[str, tuple[str, nn.Module]] = {}
    counts = {}
    for comp, prefix, path_of in COMPONENTS:
        counts[comp] = 0
        for mname, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, BaseTunerLayer) and OURS_ADAPTER in getattr(mod, "lora_A", {}):
                adapted[prefix + path_of(mname).replace(".", "_")] = (f"{comp}.{path_of(mname)}", mod)
                counts[comp] += 1
    left_over = sorted(set(by_module) - set(adapted))
    extra = sorted(set(adapted) - set(by_module))
    if left_over or extra:
        raise AssertionError(f"{name}: {path.name} modules without an adapter in diffusers: {left_over}; "
                             f"adapters diffusers made that the file does not name: {extra}")
    for kn, (mpath, mod) in sorted(adapted.items()):
        parts = by_module[kn]
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        a, b = mod.lora_A[OURS_ADAPTER].weight, mod.lora_B[OURS_ADAPTER].weight
        if not (torch.equal(a, down) and torch.equal(b, up)):
            raise AssertionError(f"{name}: diffusers' adapter on {mpath} does not hold the file's tensors")
        scale = float(parts[".alpha"]) / down.shape[0]
        if mod.scaling[OURS_ADAPTER] != scale:
            raise AssertionError(f"{name}: diffusers scales {mpath} by {mod.scaling[OURS_ADAPTER]}, the file says "
                                 f"alpha/rank = {scale}")
    check = {
        "file_modules": len(by_module),
        "file_tensors": 3 * len(by_module),
        "diffusers_adapted": counts,
        "left_over_modules": left_over,
        "diffusers_warnings": messages,
        "alphas": sorted({float(p[".alpha"]) for p in by_module.values()}),
    }
    log(f"[{name}] load_lora_weights({path.name}): {len(by_module)} modules in the file, adapters on "
        f"{counts['unet']} UNet + {counts['text_encoder']} text-encoder modules, each with the file's tensors "
        f"and alpha/rank; nothing left over, no warnings")
    return pipe, by_module, check


def merge_kohya(model: nn.Module, by_module: dict, prefix: str, path_of) -> nn.Module:
    """A copy of `model` with a kohya LoRA merged by hand: W += alpha/rank * up @ down (convs flattened)."""
    merged = copy.deepcopy(model)
    names = {prefix + path_of(n).replace(".", "_"): m for n, m in merged.named_modules()}
    with torch.no_grad():
        for kn, parts in by_module.items():
            if not kn.startswith(prefix):
                continue
            down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
            w = names[kn].weight
            delta = (up.flatten(1) @ down.flatten(1)) * (float(parts[".alpha"]) / down.shape[0])
            w.add_(delta.reshape(w.shape))
    return merged


def reference_with_lora_ours(name, ddir, path, sched_cfg, x, t, ehs, ids, lat0, ref, log):
    """`ours.*` references with our own LoRA file loaded by diffusers' `load_lora_weights`, cross-checked
    against the same file merged by hand (our application's arithmetic)."""
    pipe, by_module, check = load_lora_checked(name, ddir, path, log)
    out = {}
    with torch.no_grad():
        out["ours.unet_out"] = unet_forward(pipe.unet, x, t, ehs)
        out["ours.te_last"] = pipe.text_encoder(ids).last_hidden_state
        cond, uncond = out["ours.te_last"][0:1], out["ours.te_last"][1:2]
        _, out["ours.ddim_out"], _, _ = sample_ddim(pipe.unet, sched_cfg, lat0, cond, uncond)
        out["ours.ddim_image"] = decode_to_image(pipe.vae, out["ours.ddim_out"])

        base = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)
        unet_m = merge_kohya(base.unet, by_module, "lora_unet_", COMPONENTS[0][2])
        te_m = merge_kohya(base.text_encoder, by_module, "lora_te_", COMPONENTS[1][2])
        hand = {"ours.unet_out": unet_forward(unet_m, x, t, ehs), "ours.te_last": te_m(ids).last_hidden_state}
    for k, v in hand.items():
        d = max_abs_diff(out[k], v)
        log(f"[{name}] {k}: diffusers' load_lora_weights vs merged by hand: max abs diff {d:.2e}")
        if d > 1e-4 * max(1.0, float(v.abs().max())):
            raise AssertionError(f"{name}: {k} from load_lora_weights differs from the hand-merged LoRA by {d}")
    check_pipeline_call(name, ddir, path, sched_cfg, lat0, out["ours.ddim_image"], log, pipe=pipe)
    changes = {
        "unet_out": max_abs_diff(out["ours.unet_out"], ref["unet.out"]),
        "te_last": max_abs_diff(out["ours.te_last"], ref["te.last_hidden_state"]),
        "ddim_out": max_abs_diff(out["ours.ddim_out"], ref["sample.ddim_out"]),
        "ddim_image_mean_abs": float((out["ours.ddim_image"] - ref["sample.ddim_image"]).abs().mean()),
    }
    log(f"[{name}] lora_ours changes (max abs): unet.out {changes['unet_out']:.3f}, te.last_hidden_state "
        f"{changes['te_last']:.3f}, ddim latents {changes['ddim_out']:.3f}; the image by "
        f"{changes['ddim_image_mean_abs'] * 255:.1f}/255 on average")
    check["changes"] = changes
    return out, check


def verify_lora_with_diffusers(name, ddir, fdir, x, t, ehs, expected, log):
    """Cross-check: diffusers' own LoRA loader (needs peft) on both files must match our merged reference."""
    try:
        import peft  # noqa: F401
    except ImportError:
        log(f"[{name}] peft not installed: skipping the diffusers LoRA loader cross-check")
        return
    for fname in ("lora_kohya.safetensors", "lora_peft.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)
        pipe.load_lora_weights(str(fdir), weight_name=fname, adapter_name="fixture")
        with torch.no_grad():
            got = unet_forward(pipe.unet, x, t, ehs)
        d = max_abs_diff(got, expected)
        log(f"[{name}] diffusers load_lora_weights({fname}) vs merged reference: max abs diff {d:.2e}")
        if d > 1e-4:
            raise AssertionError(f"{name}: diffusers' LoRA loader disagrees with the merged reference on {fname}: {d}")


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------

README_HEAD = """# Tiny Stable Diffusion fixtures (`tests/fixtures/sd_tiny/`)

Generated by `tools/make_sd_reference.py` (do not edit by hand). Random weights, fixed seeds, CPU, fp32,
diffusers {diffusers} / transformers {transformers} / torch {torch}. Regenerate from the repository root:

```
python3.11 -m venv .venv-ref
.venv-ref/bin/pip install -r tools/requirements-reference.txt
cargo test --test lora_roundtrip -- --ignored write_lora_ours_fixture   # 1. our LoRA files (Rust)
.venv-ref/bin/python tools/make_sd_reference.py                          # 2. everything else
```

(see tools/README.md, "Reference fixtures"). Order matters: `lora_ours.safetensors` is written by our Rust
`save_kohya` from the shapes of the diffusers weights here, and the script then loads it into diffusers and
records what it does (`ours.*`); the script keeps that file when it rewrites the folders. Step 1 is only
needed when the writer changes (its test checks the committed file is byte-identical to what it writes). The
script checks every file it writes (see "Checks" below) and exits non-zero if the folder reaches 6 MB.

## Families

| dir | what it mimics |
| --- | --- |
| `sd1/` | {sd1_desc} |
| `sd2v/` | {sd2v_desc} |

Both: UNet `block_out_channels` {unet_ch}, `layers_per_block` 1, `norm_num_groups` {unet_groups},
down blocks `CrossAttnDownBlock2D, DownBlock2D`, up blocks `UpBlock2D, CrossAttnUpBlock2D`, mid block
`UNetMidBlock2DCrossAttn`, `cross_attention_dim` {te_hidden}, latent {latent}x{latent}; VAE `block_out_channels`
{vae_ch}, `layers_per_block` 1, `norm_num_groups` {vae_groups}, 4 latent channels, **downsample factor 2** (not 8),
`scaling_factor` {scaling}; text encoder `CLIPTextModel` hidden {te_hidden}, {te_layers} layers, {te_heads} heads,
intermediate {te_inter}, 77 positions, vocabulary of {vocab} tokens. Every parameter is random and non-trivial
(norm weights 1+0.1·N, biases 0.1·N), so a swapped or missing bias/affine term shows up in parity tests.
Everything numeric the tests need is in `<family>/fixture.json` (configs, derived head counts, LDM prefix maps,
scheduler timesteps/sigmas, LoRA module list, tensor shapes).

## Files (per family)

| file | contents |
| --- | --- |
| `diffusers/` | `model_index.json`, `unet/`, `vae/` (`diffusion_pytorch_model.safetensors` + `config.json`), `text_encoder/` (`model.safetensors` with `text_model.` keys as published SD repos have, + `config.json`), `tokenizer/` (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`), `scheduler/scheduler_config.json`. fp32. |
| `single.safetensors` | the same weights as one LDM/CompVis checkpoint (keys below), fp32 |
| `single-fp16.safetensors` | sd1 only: `single.safetensors` with every float tensor cast to fp16 (`position_ids` stays int64) |
| `reference.safetensors` | inputs + outputs below (float tensors fp32, ids/timesteps int64) |
| `lora_kohya.safetensors` | rank-4 LoRA, kohya keys `lora_unet_<module with . -> _>.{{lora_down.weight,lora_up.weight,alpha}}`, `ss_*` metadata |
| `lora_peft.safetensors` | the same LoRA as diffusers/PEFT keys `unet.<module>.lora_A.weight` / `lora_B.weight`; **`lora_B` has alpha/rank baked in** (load with scale 1, no alpha keys) |
| `lora_ours.safetensors` | **written by our Rust `save_kohya`** (f32, `ss_*`/`modelspec.*` metadata, `sshs_*` hashes), not by this script: rank 4, seeded `down` and `up` ~U(-0.1, 0.1), on UNet and text encoder (see "Our LoRA file" below) |
| `lora_engine.safetensors`, `engine_reference.safetensors`, `engine_check.json` | sd1 only, **not written by this script** (kept when it rewrites the folder): the final LoRA file of a 6-step run of **our training engine** on this model (`network.targets = "all"`: attention, feed-forward and proj_in/proj_out of every transformer and every layer of the resnets and resamplers, the 3x3 convs as LoCon with rank 2 alpha 4, everything else rank 4 alpha 2; text encoder trained; 91 modules, f32, the engine's `ss_*`/`modelspec.*` metadata), written by `write_lora_engine_fixture` in tests/engine_lora_diffusers.rs; then tools/check_engine_lora.py loads it with `load_lora_weights` (same checks as `lora_ours`) and writes `engine.unet_out` [2, 4, 16, 16] / `engine.te_last` [2, 77, 32] (UNet on the `unet.*` inputs, text encoder on `te.input_ids`, LoRA at scale 1) and the load check (adapters per network, warnings, metadata keys, the file's SHA-256) |
| `fixture.json` | all configs and conventions (machine-readable) |

### Tokenizer
No network: the real CLIP vocabulary (49408 tokens) cannot be fetched, so the tokenizer folder holds a tiny
self-consistent CLIP BPE vocabulary made by the script: ids 0-255 the byte-level characters in CLIP order (so
`!` is id 0), 256-511 the same with `</w>`, then merges building the prompt words, then `<|startoftext|>`,
`<|endoftext|>` as the two highest ids (like CLIP's 49406/49407). sd1 pads with `<|endoftext|>`, sd2v pads with
`!` (id 0) as the SD2 tokenizer does. The app ships/uses the real vocabulary; these fixtures only need the tiny
one, and the text-encoder parity tests feed `te.input_ids` directly. Prompt: `{prompt}` -> {prompt_tokens}.

## Conventions the Rust side must follow
- **UNet timesteps** are per sample (`unet.timesteps` = `[10, 700]`).
- **VAE**: `vae.latent_mean` / `vae.latent_logvar` are the raw posterior (output of `quant_conv`, logvar clamped to
  [-30, 20]), *not* multiplied by `scaling_factor`; `vae.decoded` = `decode(latent_mean)` (again unscaled: the
  trainer multiplies by {scaling} after encoding and divides before decoding). The encoder's downsample conv
  (stride 2, padding 0) pads the input by (0,1,0,1) (right/bottom) first, as LDM and diffusers do.
- **Text encoder**: `te.input_ids` row 0 is the prompt, row 1 the empty prompt. `te.pooled` is
  `last_hidden_state` at `argmax(input_ids)` (the first `<|endoftext|>`). `te.penultimate_hidden_state` is
  `final_layer_norm(hidden_states[-2])`, i.e. clip-skip 2 the way diffusers (`clip_skip=1`), A1111 and kohya do it:
  the output of the second-to-last layer **with** the final layer norm. For sd2v the diffusers text encoder
  already stops one block early (SD2 conditions on open_clip's penultimate block), so the UNet context is
  `last_hidden_state` of the diffusers model; the single file carries one extra, unused open_clip block.
  The text encoder `config.json` says `bos_token_id` 0 / `eos_token_id` 2 / `pad_token_id` 1: those are the
  legacy values every published SD1/SD2 text encoder config carries and do **not** match the vocabulary; take
  the special ids from the tokenizer (`fixture.json` -> `tokenizer`) and pool at `argmax(input_ids)`.
- **Attention heads**: `attention_head_dim` in the UNet config is the number of heads per block for both
  families (diffusers' legacy naming): sd1 2 heads everywhere (head dim 8 then 12), sd2v `[2, 3]` (head dim 8
  everywhere). The mid block uses the last entry. Block channels are 16 then 24 (not doubling).
- **Sampling references**: cfg {cfg}, batch `[uncond, cond]`, `guided = u + cfg*(c - u)`. DDIM: eta 0,
  timesteps `sched.ddim_timesteps`, leading spacing with `steps_offset` 1, the last step uses
  `final_alpha_cumprod = alphas_cumprod[0]` (`set_alpha_to_one` false). Euler: diffusers `EulerDiscreteScheduler`
  built from the same config (leading spacing), sigmas `sched.euler_sigmas` (last 0), latents start at
  `latents_in * init_noise_sigma` where `init_noise_sigma = sqrt(sigma_max^2 + 1)`, inputs scaled by
  `1/sqrt(sigma^2+1)`, s_churn 0. sd1 predicts epsilon, sd2v predicts v. DDIM timesteps are {ddim_ts}, Euler
  timesteps {euler_ts} with sigmas (sd1) {euler_sigmas}. DDIM (eta 0) and Euler are the same ODE step except
  for the last step, so `sample.ddim_out` and `sample.euler_out` are close but not equal; compare each to its own
  reference. The UNet is called with the scalar step timestep broadcast over the batch of 2.
  `sample.ddim_model_out[i]` / `sample.euler_model_out[i]` is the guided output given to step i, so a sampler can
  be checked on its own by replaying them (no UNet needed).
- **LoRA**: `W' = W + multiplier * (alpha/rank) * up @ down` (1x1 convs: flatten to matrices). Per-module alpha
  differs on one module (`ff.net.2`, alpha 8 -> scale 2; all others alpha 2 -> scale 0.5). sd1 `proj_in` /
  `proj_out` LoRAs are 1x1 convs (`[r,C,1,1]` / `[C,r,1,1]`), sd2v's are linear.
- **Our LoRA file** (`lora_ours.safetensors`, made by `write_lora_ours_fixture` in tests/lora_roundtrip.rs):
  {ours_modules} modules per family: `to_q`/`to_k`/`to_v`/`to_out.0` of `attn1` and `attn2`, `ff.net.0.proj`,
  `ff.net.2`, `proj_in` and `proj_out` of all 4 transformers of the UNet; LoCon on 3 resnet 3x3 convs
  (`down_blocks.0.resnets.0.conv1`, `mid_block.resnets.1.conv2`, `up_blocks.1.resnets.1.conv1`: down
  `[r,in,3,3]`, up `[out,r,1,1]`); `q_proj`/`k_proj`/`v_proj`/`out_proj`/`mlp.fc1`/`mlp.fc2` of both text-encoder
  layers (`lora_te_text_model_encoder_layers_N_…`). Alphas: 3x3 convs 8, text encoder 8, UNet attention
  projections 2, UNet proj_in/proj_out/ff alternately 2 and 8. The attention projections and the text encoder
  keep one alpha each on purpose: diffusers {diffusers} turns differing kohya alphas into a PEFT `alpha_pattern`
  whose keys for attention layers (`…attn1.processor.to_q_lora.down.weight`) and text-encoder layers
  (`text_model.encoder.layers.0.self_attn`) match no module, so those layers would silently get their network's
  most common alpha (peft only warns that the `alpha_pattern` keys matched nothing). The `ours.*` references
  are diffusers with this file loaded by `pipe.load_lora_weights` at scale 1: `ours.unet_out` (UNet on the
  `unet.*` inputs), `ours.te_last` (text encoder on `te.input_ids`), `ours.ddim_out` / `ours.ddim_image` (the
  DDIM run of `sample.ddim_out` with both networks adapted). `fixture.json` -> `lora_ours` records the load check
  (modules in the file, adapters diffusers made per network, modules left over, warnings) and how much the LoRA
  changes each output.
- **Images**: `sample.ddim_image` / `ours.ddim_image` are what `StableDiffusionPipeline` returns with
  `output_type="pt"`: `decode(latents / scaling_factor)` mapped from [-1, 1] to [0, 1] (`x*0.5+0.5`) and clipped,
  float `[1, 3, H, W]`, not rounded to 8 bits.

## Single-file key layout (LDM/CompVis)
Prefixes: UNet `model.diffusion_model.`, VAE `first_stage_model.`, text encoder
`cond_stage_model.transformer.text_model.` (sd1, HF CLIP names + int64 `embeddings.position_ids` [1,77]) or
`cond_stage_model.model.` (sd2v, open_clip names). Both also carry the 12 LatentDiffusion schedule buffers at top
level (`betas`, `alphas_cumprod`, `alphas_cumprod_prev`, `sqrt_alphas_cumprod`, `sqrt_one_minus_alphas_cumprod`,
`log_one_minus_alphas_cumprod`, `sqrt_recip_alphas_cumprod`, `sqrt_recipm1_alphas_cumprod`, `posterior_variance`,
`posterior_log_variance_clipped`, `posterior_mean_coef1`, `posterior_mean_coef2`, each [1000]) as real SD
checkpoints do; a loader should ignore them.

UNet (diffusers -> LDM, this config; general rule: input block index `1 + i*(layers_per_block+1) + j`,
downsampler `(i+1)*(layers_per_block+1)`, output block `i*(layers_per_block+1) + j`, upsampler at sub-index 2
after an attention block, else 1):

| diffusers | LDM |
| --- | --- |
{unet_map}

Inside resnets: `norm1`->`in_layers.0`, `conv1`->`in_layers.2`, `time_emb_proj`->`emb_layers.1`,
`norm2`->`out_layers.0`, `conv2`->`out_layers.3`, `conv_shortcut`->`skip_connection`. Inside attention blocks
(Transformer2DModel / SpatialTransformer) names are the same in both layouts (`norm`, `proj_in`,
`transformer_blocks.0.{{norm1,attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,norm2,attn2.*,norm3,ff.net.0.proj,ff.net.2}}`, `proj_out`).
Example: `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`.

VAE (diffusers -> LDM):

| diffusers | LDM |
| --- | --- |
{vae_map}

Inside VAE resnets `conv_shortcut`->`nin_shortcut`; mid attention `group_norm`->`norm`, `to_q/to_k/to_v`->`q/k/v`,
`to_out.0`->`proj_out`, and those four weights are 1x1 conv `[C,C,1,1]` in LDM vs linear `[C,C]` in diffusers.

Text encoder, sd2v (open_clip, `cond_stage_model.model.`): `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.N.{{ln_1,ln_2}}.{{weight,bias}}`, `transformer.resblocks.N.attn.in_proj_weight` [3H,H] /
`in_proj_bias` [3H] (= cat(q, k, v) along dim 0), `transformer.resblocks.N.attn.out_proj.*`,
`transformer.resblocks.N.mlp.c_fc.*` (= fc1), `mlp.c_proj.*` (= fc2), `ln_final.*` (= final_layer_norm),
`text_projection` [H,H] and `logit_scale` [] (unused by SD). The UNet of sd2v has linear `proj_in`/`proj_out`
([C,C]) in both layouts; sd1's are 1x1 convs ([C,C,1,1]) in both. `resblocks.{te_layers}` is the extra, unused block
(the real SD2's `resblocks.23`; a loader takes `num_layers = number of resblocks - 1`).

## reference.safetensors
| name | shape | dtype | what |
| --- | --- | --- | --- |
{ref_table}

## Checks the script runs
{checks}
"""

REF_DESC = {
    "unet.sample_in": "UNet input latents (N(0,1))",
    "unet.timesteps": "one timestep per sample",
    "unet.encoder_hidden_states": "UNet context (N(0,1))",
    "unet.out": "UNet output (epsilon for sd1, v for sd2v)",
    "vae.image_in": "image in [-1, 1]",
    "vae.latent_mean": "posterior mean (unscaled)",
    "vae.latent_logvar": "posterior log-variance (clamped)",
    "vae.decoded": "decode(latent_mean)",
    "te.input_ids": "row 0: prompt, row 1: empty prompt",
    "te.last_hidden_state": "after final_layer_norm",
    "te.penultimate_hidden_state": "final_layer_norm(hidden_states[-2])",
    "te.pooled": "last_hidden_state at argmax(input_ids)",
    "sched.alphas_cumprod": "scaled_linear betas 0.00085..0.012",
    "sched.ddim_timesteps": "DDIM, 4 steps",
    "sched.euler_timesteps": "Euler, 4 steps",
    "sched.euler_sigmas": "Euler sigmas, last = 0",
    "sample.latents_in": "initial noise (multiplied by init_noise_sigma)",
    "sample.cond": "= te.last_hidden_state[0:1]",
    "sample.uncond": "= te.last_hidden_state[1:2]",
    "sample.ddim_out": "DDIM result latents",
    "sample.ddim_trajectory": "latents after each DDIM step",
    "sample.euler_out": "Euler result latents",
    "sample.euler_trajectory": "latents after each Euler step",
    "sample.ddim_model_out": "guided model output (eps for sd1, v for sd2v) given to each DDIM step",
    "sample.euler_model_out": "guided model output (eps for sd1, v for sd2v) given to each Euler step",
    "lora.unet_out": "UNet output on unet.* inputs with lora_kohya merged at 1.0",
    "sample.ddim_image": "decoded sample.ddim_out in [0, 1] (what StableDiffusionPipeline returns, output_type pt)",
    "ours.unet_out": "UNet output on unet.* inputs with lora_ours loaded by load_lora_weights (scale 1)",
    "ours.te_last": "text encoder last_hidden_state for te.input_ids with lora_ours loaded",
    "ours.ddim_out": "DDIM result latents as sample.ddim_out, with lora_ours loaded (UNet and text encoder)",
    "ours.ddim_image": "decoded ours.ddim_out in [0, 1]",
}


def write_readme(out_root: Path, fixtures: dict, checks: list[str]) -> None:
    f1 = fixtures["sd1"]
    unet_map = "\n".join(f"| `{d}` | `{l}` |" for d, l in f1["unet"]["derived"]["ldm_prefix_map"])
    vae_map = "\n".join(f"| `{d}` | `{l}` |" for d, l in f1["vae"]["derived"]["ldm_prefix_map"])
    rows = []
    shapes = {fam: {r["name"]: r for r in fx["reference_tensors"]} for fam, fx in fixtures.items()}
    for r in f1["reference_tensors"]:
        s1 = r["shape"]
        s2 = shapes["sd2v"][r["name"]]["shape"]
        shape = f"{s1}" if s1 == s2 else f"sd1 {s1}, sd2v {s2}"
        rows.append(f"| `{r['name']}` | {shape} | {r['dtype']} | {REF_DESC.get(r['name'], '')} |")
    text = README_HEAD.format(
        diffusers=f1["versions"]["diffusers"], transformers=f1["versions"]["transformers"],
        torch=f1["versions"]["torch"],
        sd1_desc=FAMILIES["sd1"]["description"], sd2v_desc=FAMILIES["sd2v"]["description"],
        unet_ch=list(UNET_BLOCK_OUT), unet_groups=UNET_GROUPS, te_hidden=TE_HIDDEN, latent=LATENT,
        vae_ch=list(VAE_BLOCK_OUT), vae_groups=VAE_GROUPS, scaling=VAE_SCALING, te_layers=TE_LAYERS,
        te_heads=TE_HEADS, te_inter=TE_INTERMEDIATE, vocab=f1["tokenizer"]["vocab_size"], prompt=PROMPT,
        prompt_tokens="`" + " ".join(f1["tokenizer"]["prompt_tokens"]) + "`",
        cfg=CFG, ddim_ts=f1["sampling"]["ddim"]["timesteps"], euler_ts=f1["sampling"]["euler"]["timesteps"],
        euler_sigmas="[" + ", ".join(f"{x:.4f}" for x in f1["sampling"]["euler"]["sigmas"]) + "]",
        unet_map=unet_map, vae_map=vae_map, ref_table="\n".join(rows),
        ours_modules=f1.get("lora_ours", {}).get("file_modules", "(no lora_ours.safetensors)"),
        checks="\n".join(f"- {c}" for c in checks),
    )
    (out_root / "README.md").write_text(text)


CHECKS = [
    "the diffusers folder reloads with `StableDiffusionPipeline.from_pretrained` bit-exactly (all tensors) and "
    "its tokenizer reproduces `te.input_ids`;",
    "`single.safetensors` converts back to the diffusers state dicts exactly with the script's inverse mapping, "
    "and loads with diffusers' own `StableDiffusionPipeline.from_single_file(..., config=<diffusers dir>)` "
    "bit-exactly (for sd2v diffusers leaves the extra, unused open_clip block out of the 2-layer text encoder);",
    "`lora.unet_out` (merged by hand) agrees with diffusers' `load_lora_weights` on both `lora_kohya` and "
    "`lora_peft` (max abs diff < 1e-4; needs `peft`);",
    "`StableDiffusionPipeline(prompt, negative_prompt=\"\", DDIM, 4 steps, cfg 3, latents=latents_in, "
    "output_type=\"pt\")` gives `sample.ddim_image` (and, with `lora_ours` loaded, `ours.ddim_image`) within 1e-5;",
    "`lora_ours` (our file) loaded with `load_lora_weights`: diffusers, transformers and peft log no warning "
    "(no unexpected/missing keys, no \"No LoRA keys associated\", no ignored `alpha_pattern` entries); the modules "
    "that received an adapter are exactly the file's modules (nothing left over, nothing missing; counts in "
    "`fixture.json` -> `lora_ours`); each adapter holds the file's down/up tensors bit-exactly and scales by the "
    "file's alpha/rank; `ours.unet_out` and `ours.te_last` agree with the file merged by hand (max abs diff < 1e-4);",
    "every reference tensor is finite and not constant; `single-fp16` equals `single` cast to fp16; the folder "
    "is < 6 MB; rerunning gives byte-identical files (same pinned versions, 1 CPU thread).",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, deterministic)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out_root: Path = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    fixtures = {}
    for name, fam in FAMILIES.items():
        fixtures[name] = build_family(name, fam, out_root, log)
    write_readme(out_root, fixtures, CHECKS)

    total = 0
    for p in sorted(out_root.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:9d}  {sha256(p)[:16]}  {p.relative_to(out_root)}")
    log(f"total size of {out_root}: {total} bytes ({total / 2**20:.2f} MiB)")
    if total > SIZE_LIMIT_BYTES:
        log("ERROR: fixtures exceed 6 MB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
