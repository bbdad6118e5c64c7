"""Reference trajectories for the optimizer parity test (tests/optimizer_parity.rs).

Runs each optimizer users pick in kohya_ss/OneTrainer from its reference implementation on the same parameters
and the same sequence of gradients, and writes tests/fixtures/optim/reference.safetensors:

  p.{i}                initial parameter i (one of them all zeros, as a fresh LoRA up-projection is)
  g.{k}.{i}            the gradient of parameter i at step k (0-based), with magnitudes varying by element so that
                       8-bit blocks see different ranges
  {opt}.{k}.{i}        parameter i after step k+1 of optimizer opt, for k in STEPS_KEPT

Optimizers (hyper-parameters in the file's metadata, as JSON):
  adamw       torch.optim.AdamW
  adamw_8bit  bitsandbytes.optim.AdamW8bit (block-wise 8-bit moments; parameters under 4096 elements keep f32 ones)
  adafactor   transformers.optimization.Adafactor(scale_parameter=False, relative_step=False, warmup_init=False)
  prodigy     prodigyopt.Prodigy (with and without bias correction / safeguard warmup)
  lion        lion_pytorch.Lion

CPU only. Setup: tools/README.md ("Optimizer references"). Run from the repository root:
  .venv-ref/bin/python tools/make_optim_reference.py
"""

import argparse
import json

import torch
from safetensors.torch import save_file

SHAPES = [(8, 320), (16, 512), (5000,), (64,)]
STEPS = 8
STEPS_KEPT = [0, STEPS - 1]
LR = {"adamw": 1e-2, "adamw_8bit": 1e-2, "adafactor": 1e-2, "prodigy": 1.0, "prodigy_bc": 1.0, "lion": 1e-3}


def make_optimizer(name, params):
    wd = 0.01
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR[name], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR[name], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=LR[name], scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=wd
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=LR[name], betas=(0.9, 0.999), weight_decay=wd, d_coef=1.0)
    if name == "prodigy_bc":
        from prodigyopt import Prodigy

        return Prodigy(
            params,
            lr=LR[name],
            betas=(0.9, 0.999),
            weight_decay=wd,
            d_coef=2.0,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=LR[name], betas=(0.9, 0.99), weight_decay=wd)
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/optim/reference.safetensors")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(20261203)
    init = []
    for i, shape in enumerate(SHAPES):
        p = torch.randn(shape, generator=gen) * 0.1
        if i == 1:
            p.zero_()
        init.append(p)
    grads = []
    for k in range(STEPS):
        step = []
        for shape in SHAPES:
            scale = torch.exp(torch.randn(shape, generator=gen) * 1.5) * 1e-2
            step.append(torch.randn(shape, generator=gen) * scale)
        grads.append(step)
    tensors = {f"p.{i}": p.clone() for i, p in enumerate(init)}
    for k, step in enumerate(grads):
        for i, g in enumerate(step):
            tensors[f"g.{k}.{i}"] = g.clone()
    for name in LR:
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make_optimizer(name, params)
        for k, step in enumerate(grads):
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
            if k in STEPS_KEPT:
                for i, p in enumerate(params):
                    tensors[f"{name}.{k}.{i}"] = p.detach().clone()
    meta = {
        "lr": json.dumps(LR),
        "steps": str(STEPS),
        "steps_kept": json.dumps(STEPS_KEPT),
        "torch": torch.__version__,
    }
    for mod in ["bitsandbytes", "transformers", "prodigyopt", "lion_pytorch"]:
        try:
            meta[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            from importlib.metadata import version

            meta[mod] = version(mod.replace("_", "-"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=meta)
    print(f"wrote {len(tensors)} tensors to {args.out}: {meta}")


if __name__ == "__main__":
    main()
