//! `lora-studio sample`: one image from a checkpoint and LoRAs, headless.

use crate::sample::Sampler;
use crate::sample::pipeline::{Pipeline, Request};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The checkpoint: a single-file .safetensors or a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// A VAE file to use instead of the checkpoint's.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// A LoRA file, optionally with a weight: `my-lora.safetensors:0.8`. Repeat for several.
    #[arg(long = "lora", value_parser = parse_lora)]
    loras: Vec<(PathBuf, f64)>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    cfg: f64,
    #[arg(long, default_value = "euler_a")]
    sampler: Sampler,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// What the model predicts, when the detection (shown on start) is wrong: epsilon or v.
    #[arg(long)]
    prediction: Option<crate::sample::Prediction>,
    /// 2 uses the text encoder's penultimate layer (common for anime models).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// Start from the tensor `latents` [1, 4, H/8, W/8] in this safetensors file instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

/// `FILE` or `FILE:WEIGHT` (the suffix counts as a weight only if it is a number, so `C:\\x` stays a path).
fn parse_lora(s: &str) -> Result<(PathBuf, f64), String> {
    if let Some((path, w)) = s.rsplit_once(':')
        && let Ok(weight) = w.parse::<f64>()
    {
        return Ok((PathBuf::from(path), weight));
    }
    Ok((PathBuf::from(s), 1.0))
}

pub fn run(a: &SampleArgs) -> Result<ExitCode, String> {
    crate::fsutil::admit::writable_target(&a.out)
        .map_err(|e| format!("cannot write {} (--out): {e}", a.out.display()))?;
    let (device, warning) = crate::device::best();
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    // The CPU has no bf16 matmul; a GPU runs the UNet and text encoder in bf16.
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut p = Pipeline::load(&a.model, a.vae.as_deref(), &a.loras, &device, dtype)?;
    p.clip_skip = a.clip_skip;
    if let Some(pr) = a.prediction {
        p.model.prediction = pr;
    }
    eprintln!("model: {}", p.model.describe());
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let dropped = p.prompt_overflow(&a.prompt);
    if dropped > 0 {
        eprintln!(
            "warning: the prompt is {dropped} tokens longer than the {} encoded; those are ignored",
            crate::sample::pipeline::MAX_CHUNKS * 75
        );
    }
    let f = p.model.vae_config.downsample_factor();
    if !a.width.is_multiple_of(f) || !a.height.is_multiple_of(f) {
        return Err(format!(
            "--width and --height must be multiples of {f} for this model"
        ));
    }
    let latents = match &a.latents {
        Some(path) => Some(crate::sample::pipeline::read_latents(path, &device)?),
        None => None,
    };
    let req = Request {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        seed: a.seed,
        steps: a.steps,
        cfg: a.cfg,
        sampler: a.sampler,
        width: a.width,
        height: a.height,
        latents,
    };
    let image = p
        .generate(&req, |done, total| eprint!("\rstep {done}/{total}"))
        .map_err(|e| format!("sampling failed: {e}"))?;
    eprintln!();
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    crate::fsutil::write_atomic(&a.out, &png)
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
