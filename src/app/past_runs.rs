//! Past runs for the Samples workspace: the runs found in the output folders the app has used, read by the
//! engine's `record::summarize` on a worker thread (with their sample images decoded there too), so that after a
//! restart a run's samples, LoRA files and loss curve can be shown as they were while it ran.

use super::run_view::{SampleImage, texture};
use super::workers::Workers;
use crate::train::record::{RunSummary, SampleRecord, summarize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A run read back from its folder, ready to draw.
pub struct PastRun {
    pub summary: RunSummary,
    pub samples: BTreeMap<(u64, usize), SampleImage>,
    pub baseline: BTreeMap<usize, SampleImage>,
    /// (step, loss) and (step, lr).
    pub losses: Vec<[f64; 2]>,
    pub lrs: Vec<[f64; 2]>,
}

impl PastRun {
    /// `NAME in DIR`, to pick it from a list.
    pub fn label(&self) -> String {
        format!("{} in {}", self.summary.name, self.summary.dir.display())
    }
}

enum Loaded {
    Run {
        generation: u64,
        summary: Box<RunSummary>,
        images: Vec<(SampleRecord, image::RgbImage)>,
    },
    Problem {
        generation: u64,
        message: String,
    },
    Done {
        generation: u64,
    },
}

pub struct PastRuns {
    workers: Workers<Loaded>,
    generation: u64,
    /// The folders the list was read from (read again when they change or on Refresh).
    read_from: Option<Vec<PathBuf>>,
    pub runs: Vec<PastRun>,
    /// Folders that could not be read, and images that could not be decoded.
    pub problems: Vec<String>,
    pub loading: bool,
}

impl PastRuns {
    pub fn new(ctx: &egui::Context) -> Self {
        PastRuns {
            workers: Workers::new(ctx),
            generation: 0,
            read_from: None,
            runs: Vec::new(),
            problems: Vec::new(),
            loading: false,
        }
    }

    /// Reads the runs of `dirs` unless they are the ones read last (`again`: read them anyway).
    pub fn refresh(&mut self, dirs: Vec<PathBuf>, again: bool) {
        if !again && self.read_from.as_ref() == Some(&dirs) {
            return;
        }
        self.read_from = Some(dirs.clone());
        self.generation += 1;
        self.loading = true;
        self.runs.clear();
        self.problems.clear();
        let generation = self.generation;
        self.workers.spawn("past-runs", move |report| {
            for dir in dirs {
                let runs = match summarize(&dir) {
                    Ok(runs) => runs,
                    Err(message) => {
                        report.send(Loaded::Problem {
                            generation,
                            message,
                        });
                        continue;
                    }
                };
                for summary in runs {
                    let mut images = Vec::new();
                    for r in summary.samples.iter().chain(&summary.baseline) {
                        match image::open(&r.path) {
                            Ok(i) => images.push((r.clone(), i.into_rgb8())),
                            Err(e) => report.send(Loaded::Problem {
                                generation,
                                message: format!(
                                    "Cannot read the sample {}: {e}",
                                    r.path.display()
                                ),
                            }),
                        }
                    }
                    report.send(Loaded::Run {
                        generation,
                        summary: Box::new(summary),
                        images,
                    });
                }
            }
            report.send(Loaded::Done { generation });
        });
    }

    /// Takes what the worker read since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        let events: Vec<Loaded> = self.workers.events().collect();
        for e in events {
            match e {
                Loaded::Run {
                    generation,
                    summary,
                    images,
                } if generation == self.generation => {
                    self.runs.push(past_run(ctx, *summary, images))
                }
                Loaded::Problem {
                    generation,
                    message,
                } if generation == self.generation => self.problems.push(message),
                Loaded::Done { generation } if generation == self.generation => {
                    self.loading = false;
                }
                _ => {}
            }
        }
    }
}

fn past_run(
    ctx: &egui::Context,
    summary: RunSummary,
    images: Vec<(SampleRecord, image::RgbImage)>,
) -> PastRun {
    let mut samples = BTreeMap::new();
    let mut baseline = BTreeMap::new();
    for (r, image) in images {
        let sample = SampleImage {
            texture: texture(ctx, format!("past-{}", r.path.display()), &image),
            info: r.info,
            path: r.path,
        };
        if r.baseline {
            baseline.insert(r.prompt_index, sample);
        } else {
            samples.insert((r.step, r.prompt_index), sample);
        }
    }
    let losses = summary
        .losses
        .iter()
        .map(|p| [p.step as f64, p.loss])
        .collect();
    let lrs = summary
        .losses
        .iter()
        .map(|p| [p.step as f64, p.lr])
        .collect();
    PastRun {
        summary,
        samples,
        baseline,
        losses,
        lrs,
    }
}
