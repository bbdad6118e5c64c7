//! `lora-studio sample`: one image from a checkpoint and LoRAs, headless.

use crate::sample::Sampler;
use crate::sample::pipeline::{ModelChoice, Request, draw};
use crate::schema;
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
    /// A LoRA file, optionally with its own weight: `my-lora.safetensors:0.8`. Repeat for several.
    #[arg(long = "lora", value_parser = parse_lora)]
    loras: Vec<(PathBuf, Option<f64>)>,
    /// The weight of each --lora given without its own `:WEIGHT`.
    #[arg(long, default_value_t = 1.0, value_parser = schema::flag::<f64>(&schema::LORA_WEIGHT))]
    lora_weight: f64,
    /// Also draw the image without the LoRAs (same seed and settings) into this file, to compare.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the unconditional side of the guidance).
    #[arg(long, default_value = "")]
    negative: String,
    /// Seeds the starting noise (and Euler a's noise): the same seed gives the same image.
    #[arg(long, default_value_t = 1, value_parser = schema::flag::<u64>(&schema::PROMPT_SEED))]
    seed: u64,
    /// Sampling steps.
    #[arg(long, default_value_t = 20, value_parser = schema::flag::<usize>(&schema::PROMPT_STEPS))]
    steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.0, value_parser = schema::flag::<f64>(&schema::PROMPT_CFG))]
    cfg: f64,
    /// ddim, euler or euler_a.
    #[arg(long, default_value = "euler_a")]
    sampler: Sampler,
    /// Width in pixels, a multiple of 8.
    #[arg(long, default_value_t = 512, value_parser = schema::flag::<usize>(&schema::PROMPT_WIDTH))]
    width: usize,
    /// Height in pixels, a multiple of 8.
    #[arg(long, default_value_t = 512, value_parser = schema::flag::<usize>(&schema::PROMPT_HEIGHT))]
    height: usize,
    /// What the model predicts, when the detection (shown on start) is wrong: epsilon or v.
    #[arg(long)]
    prediction: Option<crate::sample::Prediction>,
    /// 2 uses the text encoder's penultimate layer (common for anime models).
    #[arg(long, default_value_t = 1, value_parser = schema::flag::<usize>(&schema::CLIP_SKIP))]
    clip_skip: usize,
    /// Start from the tensor `latents` [1, 4, H/8, W/8] in this safetensors file instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
}

/// `FILE` or `FILE:WEIGHT` (the suffix counts as a weight only if it is a number, so `C:\\x` stays a path).
fn parse_lora(s: &str) -> Result<(PathBuf, Option<f64>), String> {
    if let Some((path, w)) = s.rsplit_once(':')
        && w.parse::<f64>().is_ok()
    {
        let weight = schema::LORA_WEIGHT
            .bound()
            .parse(w)
            .map_err(|e| format!("the weight after `:`: {e}"))?;
        return Ok((PathBuf::from(path), Some(weight)));
    }
    Ok((PathBuf::from(s), None))
}

pub fn run(a: &SampleArgs) -> Result<ExitCode, String> {
    crate::fsutil::admit::writable_target(&a.out)
        .map_err(|e| format!("cannot write {} (--out): {e}", a.out.display()))?;
    let (device, warning) = crate::device::best();
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let latents = match &a.latents {
        Some(path) => Some(crate::sample::pipeline::read_latents(path, &device)?),
        None => None,
    };
    let model = ModelChoice {
        checkpoint: a.model.clone(),
        vae: a.vae.clone(),
        clip_skip: a.clip_skip,
        prediction: a.prediction,
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
    let loras: Vec<(PathBuf, f64)> = a
        .loras
        .iter()
        .map(|(p, w)| (p.clone(), w.unwrap_or(a.lora_weight)))
        .collect();
    let mut jobs = vec![(loras, &a.out)];
    if let Some(base) = &a.baseline {
        jobs.push((Vec::new(), base));
    }
    for (i, (loras, out)) in jobs.iter().enumerate() {
        let drawn = draw(&model, loras, &req, &device, |done, total| {
            eprint!("\rstep {done}/{total}")
        })?;
        eprintln!();
        if i == 0 {
            eprintln!("model: {}", drawn.model);
        }
        for w in &drawn.warnings {
            eprintln!("warning: {w}");
        }
        write_png(out, &drawn.image)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_png(path: &std::path::Path, image: &image::RgbImage) -> Result<(), String> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    crate::fsutil::write_atomic(path, &png)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
