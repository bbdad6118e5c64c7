#!/usr/bin/env python3
"""A full-size Stable Diffusion 1.5 model with random weights, as a diffusers folder, for GPU runs of
`lora-studio train` where no real checkpoint may be downloaded (the GPU machines have no network).

Needs only torch and diffusers (the text encoder is written directly from the CLIP ViT-L/14 layout, so
transformers is not needed). Weights are fp16 safetensors; the tokenizer is left out (lora-studio then uses its
bundled CLIP tokenizer).

    python3 tools/make_random_sd15.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file


def text_encoder(out: Path, generator: torch.Generator) -> None:
    hidden, inter, layers, vocab, positions = 768, 3072, 12, 49408, 77
    t = {}

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).half()

    t["text_model.embeddings.token_embedding.weight"] = rand(vocab, hidden)
    t["text_model.embeddings.position_embedding.weight"] = rand(positions, hidden)
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = rand(hidden, hidden)
            t[p + f"self_attn.{proj}.bias"] = torch.zeros(hidden).half()
        for norm in ("layer_norm1", "layer_norm2"):
            t[p + f"{norm}.weight"] = torch.ones(hidden).half()
            t[p + f"{norm}.bias"] = torch.zeros(hidden).half()
        t[p + "mlp.fc1.weight"] = rand(inter, hidden)
        t[p + "mlp.fc1.bias"] = torch.zeros(inter).half()
        t[p + "mlp.fc2.weight"] = rand(hidden, inter)
        t[p + "mlp.fc2.bias"] = torch.zeros(hidden).half()
    t["text_model.final_layer_norm.weight"] = torch.ones(hidden).half()
    t["text_model.final_layer_norm.bias"] = torch.zeros(hidden).half()
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "text_encoder/model.safetensors"))
    config = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 12, "max_position_embeddings": positions, "vocab_size": vocab,
        "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    (out / "text_encoder/config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    unet.half().save_pretrained(out / "unet", safe_serialization=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.half().save_pretrained(out / "vae", safe_serialization=True)
    text_encoder(out, generator)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    }))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
