#!/usr/bin/env python3
"""Load the LoRA file our *training engine* wrote into diffusers and record what it does there.

Reads ``tests/fixtures/sd_tiny/sd1/lora_engine.safetensors`` (the final file of a short engine run on the tiny
SD1 fixture model, copied there by the ignored Rust test ``write_lora_engine_fixture`` in
tests/engine_lora_diffusers.rs) and, with the helpers of tools/make_sd_reference.py:

  - loads it with diffusers' ``load_lora_weights`` (``load_lora_checked``): every module of the file must get an
    adapter holding the file's tensors bit-exactly and scaling by the file's alpha/rank, no adapter may appear
    that the file does not name, and diffusers/transformers/peft must log no warning;
  - runs the UNet on ``unet.sample_in`` / ``unet.timesteps`` / ``unet.encoder_hidden_states`` and the text
    encoder on ``te.input_ids`` of ``reference.safetensors`` with it loaded, and cross-checks both against the
    file merged into the weights by hand (``merge_kohya``, max abs diff < 1e-4);

and writes, next to it,

  engine_reference.safetensors  ``engine.unet_out`` [2, 4, 16, 16], ``engine.te_last`` [2, 77, 32] (fp32)
  engine_check.json             the load check (modules in the file, adapters per network, left-over modules,
                                warnings, alphas), the hand-merge differences, how much the LoRA changes each
                                output, the file's metadata keys and its SHA-256

It rewrites nothing else (``reference.safetensors`` and the models are only read). Run from the repository root,
after the Rust test (CPU only, one torch thread, deterministic):

    cargo test --test engine_lora_diffusers -- --ignored write_lora_engine_fixture
    .venv-ref/bin/python tools/check_engine_lora.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Sets the offline environment and the library log levels before importing diffusers/transformers.
import make_sd_reference as ref  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FAMILY = "sd1"
ENGINE_FILE = "lora_engine.safetensors"
REFERENCE_OUT = "engine_reference.safetensors"
CHECK_OUT = "engine_check.json"
SIZE_LIMIT_BYTES = 200_000  # lora_engine + engine_reference + engine_check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=ref.DEFAULT_OUT / FAMILY,
                    help="the sd1 fixture folder (default: %(default)s)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ref.diffusers.utils.logging.disable_progress_bar()
    ref.transformers.utils.logging.disable_progress_bar()

    def log(msg: str) -> None:
        print(msg, flush=True)

    fdir: Path = args.fixtures.resolve()
    ddir = fdir / "diffusers"
    path = fdir / ENGINE_FILE
    if not path.is_file():
        log(f"ERROR: {path} does not exist; run `cargo test --release --test engine_lora_diffusers -- --ignored "
            "write_lora_engine_fixture` first")
        return 1
    r = load_file(str(fdir / "reference.safetensors"))
    x, t, ehs, ids = r["unet.sample_in"], r["unet.timesteps"], r["unet.encoder_hidden_states"], r["te.input_ids"]

    pipe, by_module, check = ref.load_lora_checked(FAMILY, ddir, path, log)
    with torch.no_grad():
        out = {
            "engine.unet_out": ref.unet_forward(pipe.unet, x, t, ehs),
            "engine.te_last": pipe.text_encoder(ids).last_hidden_state,
        }
        base = StableDiffusionPipeline.from_pretrained(str(ddir), local_files_only=True, safety_checker=None)
        # The base models must still give the committed references, or the comparison below means nothing.
        base_out = {
            "unet.out": ref.unet_forward(base.unet, x, t, ehs),
            "te.last_hidden_state": base.text_encoder(ids).last_hidden_state,
        }
        unet_m = ref.merge_kohya(base.unet, by_module, "lora_unet_", ref.COMPONENTS[0][2])
        te_m = ref.merge_kohya(base.text_encoder, by_module, "lora_te_", ref.COMPONENTS[1][2])
        hand = {"engine.unet_out": ref.unet_forward(unet_m, x, t, ehs), "engine.te_last": te_m(ids).last_hidden_state}
    for k, v in base_out.items():
        d = ref.max_abs_diff(v, r[k])
        log(f"[{FAMILY}] base model vs reference.safetensors {k}: max abs diff {d:.2e}")
        if d > 1e-5:
            raise AssertionError(f"{FAMILY}: the base model no longer gives {k} of reference.safetensors ({d})")
    hand_diffs = {}
    for k, v in hand.items():
        d = ref.max_abs_diff(out[k], v)
        hand_diffs[k] = d
        log(f"[{FAMILY}] {k}: diffusers' load_lora_weights vs merged by hand: max abs diff {d:.2e}")
        if d > 1e-4 * max(1.0, float(v.abs().max())):
            raise AssertionError(f"{FAMILY}: {k} from load_lora_weights differs from the hand-merged LoRA by {d}")
    for k, v in out.items():
        ref.check_sane(k, v)
    changes = {
        "unet_out": ref.max_abs_diff(out["engine.unet_out"], r["unet.out"]),
        "te_last": ref.max_abs_diff(out["engine.te_last"], r["te.last_hidden_state"]),
    }
    log(f"[{FAMILY}] {ENGINE_FILE} changes (max abs): unet.out {changes['unet_out']:.4f}, te.last_hidden_state "
        f"{changes['te_last']:.4f}")
    if min(changes.values()) <= 1e-2:
        raise AssertionError(f"{FAMILY}: the trained LoRA barely changes the outputs: {changes}")

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    check["hand_merge_max_abs_diff"] = hand_diffs
    check["changes"] = changes
    check["metadata_keys"] = sorted(metadata)
    check["file_sha256"] = ref.sha256(path)
    check["versions"] = {"diffusers": ref.diffusers.__version__, "transformers": ref.transformers.__version__,
                         "torch": torch.__version__.split("+")[0]}

    ref.save_st({k: v.contiguous() for k, v in out.items()}, fdir / REFERENCE_OUT)
    (fdir / CHECK_OUT).write_text(json.dumps(check, indent=2, sort_keys=True) + "\n")
    total = 0
    for name in (ENGINE_FILE, REFERENCE_OUT, CHECK_OUT):
        p = fdir / name
        total += p.stat().st_size
        shown = p.relative_to(ref.REPO_ROOT) if p.is_relative_to(ref.REPO_ROOT) else p
        log(f"  {p.stat().st_size:9d}  {ref.sha256(p)[:16]}  {shown}")
    log(f"total {total} bytes")
    if total > SIZE_LIMIT_BYTES:
        log(f"ERROR: the engine fixture is over {SIZE_LIMIT_BYTES} bytes")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
