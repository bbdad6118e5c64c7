//! `lora-studio config import`: a kohya_ss GUI config (JSON) or an sd-scripts config (TOML) as a lora-studio
//! training config, with the list of what was not applied.

use crate::train::config::TrainConfig;
use crate::train::kohya::{self, Skipped};
use crate::train::presets;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Turn a kohya_ss GUI config (.json) or an sd-scripts --config_file (.toml) into a lora-studio config.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The kohya_ss or sd-scripts config file.
    file: PathBuf,
    /// The preset under the imported settings (sd15-6gb, sd15-8gb, sd15-12gb, cpu-demo, or one of yours): it
    /// decides what the kohya file does not set.
    #[arg(long)]
    preset: Option<String>,
    /// Where to write the lora-studio config.
    #[arg(long, default_value = "train.toml")]
    out: PathBuf,
    /// Replace the --out file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: ConfigCommand) -> Result<ExitCode, String> {
    match cmd {
        ConfigCommand::Import(args) => import(&args),
    }
}

fn import(args: &ImportArgs) -> Result<ExitCode, String> {
    if args.out.exists() && !args.force {
        return Err(format!(
            "{} exists: choose another --out or pass --force to replace it",
            args.out.display()
        ));
    }
    let preset = args.preset.as_deref().map(presets::find).transpose();
    let preset = preset.map_err(|e| e.0)?;
    let imported = kohya::read(&args.file).map_err(|e| e.0)?;
    let mut layers = Vec::new();
    if let Some(p) = &preset {
        layers.push((format!("preset {}", p.name), p.layer.clone()));
    }
    layers.push((args.file.display().to_string(), imported.layer_text()));
    let refs: Vec<(&str, &str)> = layers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let config = TrainConfig::build(&refs, &[]).map_err(|e| {
        format!(
            "{}: the imported settings are not valid: {}",
            args.file.display(),
            e.0
        )
    })?;
    let source = match &preset {
        Some(p) => format!("{} over the preset {}", args.file.display(), p.name),
        None => format!("{} over the defaults", args.file.display()),
    };
    let text = format!(
        "# Imported by `lora-studio config import` from {source}.\n{}",
        config.to_toml()
    );
    crate::fsutil::write_atomic(&args.out, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "Wrote {} ({}) from {source}.",
        args.out.display(),
        imported.format.describe()
    );
    print!("{}", not_applied(&imported.skipped));
    println!(
        "Train with: lora-studio train --config {}",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// "Not applied (N):" and one line per setting, or a line saying everything applied.
pub fn not_applied(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return "Every setting that changes a run was applied.\n".into();
    }
    let mut out = format!(
        "Not applied ({}; the preset's or the default value stays):\n",
        skipped.len()
    );
    for s in skipped {
        out.push_str(&format!("  {}\n", s.line()));
    }
    out
}
