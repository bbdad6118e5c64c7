//! The headless front end: the same engine as the GUI, driven from a terminal or a script.

use crate::dataset::edit::{BulkOp, apply_bulk};
use crate::dataset::import::{hash_files, import};
use crate::dataset::validate::{all_threads, inspect_all};
use crate::dataset::{BucketConfig, Report, caption, scan};
use crate::schema;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

mod bench;
mod bench_kernels;
mod bench_train;
mod config;
mod sample;
mod train;

#[derive(Parser, Debug)]
#[command(name = "lora-studio", version, about = "Train LoRA adapters for image-generation models.", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open the window (the default when no command is given).
    Gui {
        /// Open this dataset folder instead of the last one.
        #[arg(long)]
        dataset: Option<PathBuf>,
    },
    /// Check and edit a dataset folder.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Train a LoRA (headless; the same engine as the GUI's Train button).
    Train(Box<train::TrainArgs>),
    /// Work with training configs (import a kohya_ss or sd-scripts config).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Generate an image from a checkpoint, optionally with LoRAs.
    Sample(sample::SampleArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Args, Debug, Clone)]
pub struct BucketArgs {
    /// Base training resolution (512, 768, 1024 …).
    #[arg(long, default_value_t = 512, value_parser = schema::flag::<u32>(&schema::RESOLUTION))]
    pub resolution: u32,
    /// Smallest bucket side [default: resolution / 2].
    #[arg(long, value_parser = schema::flag::<u32>(&schema::MIN_BUCKET_SIDE))]
    pub min_side: Option<u32>,
    /// Largest bucket side [default: resolution × 2].
    #[arg(long, value_parser = schema::flag::<u32>(&schema::MAX_BUCKET_SIDE))]
    pub max_side: Option<u32>,
    /// Bucket sides are multiples of this.
    #[arg(long, default_value_t = 64, value_parser = schema::flag::<u32>(&schema::BUCKET_STEP))]
    pub step: u32,
}

impl BucketArgs {
    pub fn config(&self) -> BucketConfig {
        let d = BucketConfig::for_resolution(self.resolution);
        BucketConfig {
            resolution: d.resolution,
            min_side: self.min_side.unwrap_or(d.min_side),
            max_side: self.max_side.unwrap_or(d.max_side),
            step: self.step,
        }
        .sanitized()
    }
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Validate a dataset: unreadable images, captions, duplicates, sizes, buckets and steps per epoch.
    /// Exits non-zero only when nothing can be trained.
    Check {
        dir: PathBuf,
        #[command(flatten)]
        buckets: BucketArgs,
        #[arg(long, default_value_t = 1, value_parser = schema::flag::<u32>(&schema::BATCH_SIZE))]
        batch_size: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the comma-separated tags of the captions with their counts.
    Tags {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Edit every caption of a dataset (each file written atomically).
    Caption {
        dir: PathBuf,
        /// Put this word first in every caption (once; captions that have it are unchanged).
        #[arg(long)]
        add_trigger: Option<String>,
        /// Text to find (plain text, with --replace-with).
        #[arg(long, requires = "replace_with")]
        find: Option<String>,
        #[arg(long, requires = "find")]
        replace_with: Option<String>,
        /// Remove this tag from every caption.
        #[arg(long)]
        remove_tag: Option<String>,
    },
    /// Copy images (and their captions) into a dataset, skipping exact duplicates, never overwriting.
    Import {
        dir: PathBuf,
        /// Image files or folders to copy.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Subfolder of the dataset to copy into.
        #[arg(long, default_value = "")]
        into: String,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        None => crate::app::run_gui(None).map(|()| ExitCode::SUCCESS),
        Some(Command::Gui { dataset }) => crate::app::run_gui(dataset).map(|()| ExitCode::SUCCESS),
        Some(Command::Dataset(cmd)) => dataset(cmd),
        Some(Command::Bench(cmd)) => bench::run(cmd),
        Some(Command::Config(cmd)) => config::run(cmd),
        Some(Command::Sample(args)) => sample::run(&args),
        Some(Command::Train(args)) => train::run(&args),
    }
}

fn dataset(cmd: DatasetCommand) -> Result<ExitCode, String> {
    match cmd {
        DatasetCommand::Check {
            dir,
            buckets,
            batch_size,
            json,
        } => {
            let report = check(&dir, &buckets.config(), batch_size)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", report.to_text());
            }
            Ok(if report.usable {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        DatasetCommand::Tags { dir, json } => {
            let s = scan(&dir, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
            let counts = caption::tag_counts(s.entries.iter().map(|e| e.caption.text.as_str()));
            if json {
                let map: serde_json::Map<String, serde_json::Value> =
                    counts.into_iter().map(|(t, n)| (t, n.into())).collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (tag, n) in counts {
                    println!("{n:>6}  {tag}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DatasetCommand::Caption {
            dir,
            add_trigger,
            find,
            replace_with,
            remove_tag,
        } => {
            let mut ops = Vec::new();
            ops.extend(add_trigger.map(BulkOp::AddTrigger));
            if let (Some(find), Some(replace)) = (find, replace_with) {
                ops.push(BulkOp::Replace { find, replace });
            }
            ops.extend(remove_tag.map(BulkOp::RemoveTag));
            if ops.is_empty() {
                return Err(
                    "say what to change: --add-trigger, --find/--replace-with or --remove-tag"
                        .into(),
                );
            }
            let mut s = scan(&dir, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
            let all: Vec<usize> = (0..s.entries.len()).collect();
            let mut failed = false;
            for op in &ops {
                let r = apply_bulk(&mut s, &all, op);
                println!("{}", r.describe());
                failed |= !r.failed.is_empty();
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        DatasetCommand::Import { dir, sources, into } => {
            let s = scan(&dir, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
            let mut known = hash_files(s.entries.iter().map(|e| e.path.as_path()));
            let summary = import(
                &sources,
                &dir.join(into),
                &s.project.caption_ext(),
                &mut known,
            );
            println!("{}", summary.describe());
            for (path, why) in &summary.failed {
                eprintln!("  {}: {why}", path.display());
            }
            Ok(if summary.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Scans and fully inspects a dataset, then builds its report.
pub fn check(dir: &Path, buckets: &BucketConfig, batch_size: u32) -> Result<Report, String> {
    let s = scan(dir, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
    let paths: Vec<PathBuf> = s.entries.iter().map(|e| e.path.clone()).collect();
    let results = Mutex::new(vec![None; paths.len()]);
    inspect_all(&paths, all_threads(), &AtomicBool::new(false), &|i, r| {
        results.lock().unwrap()[i] = Some(r);
    });
    Ok(Report::build(
        &s,
        &results.into_inner().unwrap(),
        buckets,
        batch_size,
    ))
}
