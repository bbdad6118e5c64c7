//! Text to image end to end on the tiny fixtures: tokenizer → text encoder → UNet → sampler → VAE, against
//! diffusers' pipeline outputs, and the `sample` command.

mod common;

use common::sd_tiny::{fixture, max_abs, reference};

use candle_core::{DType, Device};
use lora_studio::sample::Sampler;
use lora_studio::sample::pipeline::{Pipeline, Request};
use std::collections::HashMap;

const PROMPT: &str = "a photo of sks person, oil painting";

#[test]
fn pipeline_latents_match_diffusers_ddim_and_euler() {
    for family in ["sd1", "sd2v"] {
        let r = reference(family);
        let p = Pipeline::load(
            &fixture(family).join("diffusers"),
            None,
            &[],
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        for (sampler, key) in [
            (Sampler::Ddim, "sample.ddim_out"),
            (Sampler::Euler, "sample.euler_out"),
        ] {
            let req = Request {
                prompt: PROMPT.into(),
                negative: String::new(),
                seed: 0,
                steps: 4,
                cfg: 3.0,
                sampler,
                width: 32,
                height: 32,
                latents: Some(r["sample.latents_in"].clone()),
            };
            let out = p.latents(&req, |_, _| {}).unwrap();
            let err = max_abs(&(&out - &r[key]).unwrap());
            let scale = max_abs(&r[key]);
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "{family} {sampler}: max abs error {err} (scale {scale})"
            );
        }
    }
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_lora-studio"))
}

#[test]
fn sample_command_writes_a_png_and_loras_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("latents.safetensors");
    let r = reference("sd1");
    candle_core::safetensors::save(
        &HashMap::from([("latents".to_owned(), r["sample.latents_in"].clone())]),
        &latents,
    )
    .unwrap();
    let model = fixture("sd1").join("diffusers");
    let run = |out: &str, lora: Option<String>| {
        let mut cmd = bin();
        cmd.args(["sample", "--model"])
            .arg(&model)
            .args(["--prompt", PROMPT, "--steps", "3", "--cfg", "3"]);
        cmd.args([
            "--sampler",
            "ddim",
            "--width",
            "32",
            "--height",
            "32",
            "--latents",
        ])
        .arg(&latents);
        if let Some(l) = lora {
            cmd.args(["--lora", &l]);
        }
        let o = cmd.arg("--out").arg(dir.path().join(out)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(dir.path().join(out)).unwrap().to_rgb8()
    };
    let plain = run("plain.png", None);
    assert_eq!(plain.dimensions(), (32, 32));
    let lora = fixture("sd1").join("lora_kohya.safetensors");
    let with_lora = run("lora.png", Some(format!("{}:1.0", lora.display())));
    assert_ne!(
        plain.as_raw(),
        with_lora.as_raw(),
        "the LoRA changes the image"
    );
    let again = run("plain2.png", None);
    assert_eq!(plain.as_raw(), again.as_raw(), "same inputs, same image");
}

#[test]
fn sample_command_explains_a_wrong_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["sample", "--model"])
        .arg(fixture("sd1").join("lora_kohya.safetensors"))
        .args(["--prompt", "x", "--out"])
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("LoRA"), "{err}");
}
