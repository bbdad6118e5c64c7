//! `lora-studio bench …`: measured figures, printed as a table (or JSON).

use crate::app::{AppState, LoraStudioApp, Workspace};
use crate::dataset::synth::write_dataset;
use crate::dataset::validate::{all_threads, default_threads};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Scan + validation time of a dataset, and the UI's frame times while its thumbnails load.
    Dataset {
        /// Images to generate when --dir is not given (or is empty).
        #[arg(long, default_value_t = 5000)]
        images: usize,
        /// Longest side of the generated images.
        #[arg(long, default_value_t = 768)]
        max_side: u32,
        /// Measure this folder instead of a generated one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// UI frames to run while scrolling the grid.
        #[arg(long, default_value_t = 300)]
        frames: usize,
        #[arg(long)]
        json: bool,
    },
    /// The UI's frame times while the demo project trains (the real app, headless, on this machine's CPU).
    GuiTrain {
        /// Give up after this many frames (~60 a second) if the run has not finished.
        #[arg(long, default_value_t = 36_000)]
        max_frames: usize,
        #[arg(long)]
        json: bool,
    },
    /// Training speed and memory of a full-size network with random weights (no checkpoint needed): random
    /// latents and text embeddings, LoRA on the attention projections, AdamW, like the PyTorch reference.
    Train(super::bench_train::TrainBench),
    /// Our fused CUDA kernels against the candle ops they replace, at SD1.5's shapes: result error (vs the CPU)
    /// and GPU time of both (needs a CUDA build and GPU).
    Kernels {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Only the ops whose description contains this text (e.g. "conv"), to profile one op.
        #[arg(long)]
        only: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode, String> {
    match cmd {
        BenchCommand::Train(args) => super::bench_train::run(&args),
        BenchCommand::Kernels { batch, only, json } => {
            super::bench_kernels::run(batch, only.as_deref(), json)
        }
        BenchCommand::GuiTrain { max_frames, json } => {
            let result = gui_train_bench(max_frames)?;
            print_result(&result, json, result.table())
        }
        BenchCommand::Dataset {
            images,
            max_side,
            dir,
            frames,
            json,
        } => {
            let tmp;
            let dir = match dir {
                Some(d) if d.read_dir().is_ok_and(|mut r| r.next().is_some()) => d,
                other => {
                    tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
                    let d = other.unwrap_or_else(|| tmp.path().to_owned());
                    eprintln!(
                        "generating {images} images (up to {max_side} px) in {} …",
                        d.display()
                    );
                    write_dataset(&d, images, max_side, 1, all_threads())
                        .map_err(|e| e.to_string())?;
                    d
                }
            };
            let result = dataset_bench(&dir, frames)?;
            print_result(&result, json, result.table())
        }
    }
}

/// Prints a benchmark's result as pretty JSON or as its table.
pub(super) fn print_result(
    result: &impl serde::Serialize,
    json: bool,
    table: String,
) -> Result<ExitCode, String> {
    if json {
        let text = serde_json::to_string_pretty(result).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{table}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct DatasetBench {
    dir: String,
    images: usize,
    threads: usize,
    gui_threads: usize,
    scan_s: f64,
    validate_s: f64,
    ui_frames: usize,
    ui_frame_median_ms: f64,
    ui_frame_p99_ms: f64,
    ui_frame_worst_ms: f64,
    thumbnails_loaded: usize,
}

impl DatasetBench {
    fn table(&self) -> String {
        format!(
            "dataset benchmark: {} ({} images; {} validation threads, {} GUI decode threads)\n\
             | measure | value |\n|---|---:|\n\
             | scan (walk + read captions) | {:.2} s |\n\
             | validation (decode + hash every image) | {:.2} s |\n\
             | UI frames while thumbnails load and the grid scrolls | {} |\n\
             | UI frame time, median | {:.2} ms |\n\
             | UI frame time, p99 | {:.2} ms |\n\
             | UI frame time, worst | {:.2} ms |\n\
             | thumbnails on screen at the end | {} |\n",
            self.dir,
            self.images,
            self.threads,
            self.gui_threads,
            self.scan_s,
            self.validate_s,
            self.ui_frames,
            self.ui_frame_median_ms,
            self.ui_frame_p99_ms,
            self.ui_frame_worst_ms,
            self.thumbnails_loaded
        )
    }
}

fn dataset_bench(dir: &std::path::Path, frames: usize) -> Result<DatasetBench, String> {
    let t = Instant::now();
    let s = crate::dataset::scan(dir, &std::sync::atomic::AtomicBool::new(false))
        .map_err(|e| e.to_string())?;
    let scan_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    crate::cli::check(dir, &crate::dataset::BucketConfig::for_resolution(512), 1)?;
    let validate_s = t.elapsed().as_secs_f64() - scan_s;
    let (times, thumbnails_loaded) = ui_frames(dir, frames);
    let pct = |p: f64| percentile_ms(&times, p);
    Ok(DatasetBench {
        dir: dir.display().to_string(),
        images: s.entries.len(),
        threads: all_threads(),
        gui_threads: default_threads(),
        scan_s,
        validate_s: validate_s.max(0.0),
        ui_frames: times.len(),
        ui_frame_median_ms: pct(0.5),
        ui_frame_p99_ms: pct(0.99),
        ui_frame_worst_ms: pct(1.0),
        thumbnails_loaded,
    })
}

/// Runs the real app in a headless egui context at ~60 frames a second while the dataset opens and the grid
/// scrolls, timing the UI thread's work per frame (layout, texture creation, tessellation). GPU upload and
/// presentation are not included: they happen in the renderer, not in our code.
fn ui_frames(dir: &std::path::Path, frames: usize) -> (Vec<Duration>, usize) {
    let ctx = egui::Context::default();
    let mut state = AppState::default();
    state
        .dataset
        .recent
        .push(dir.to_string_lossy().into_owned());
    let mut app = LoraStudioApp::new(&ctx, state);
    let mut times = Vec::with_capacity(frames);
    let start = Instant::now();
    for frame in 0..frames {
        times.push(ui_frame(
            &ctx,
            &mut app,
            start,
            if frame > 30 { -120.0 } else { 0.0 },
        ));
    }
    let loaded = app.dataset().thumbnails_loaded();
    times.sort();
    (times, loaded)
}

/// The `p` quantile (0–1) of sorted frame times, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// One frame of the app at ~60 frames a second, with the pointer over the window and `scroll` points of mouse
/// wheel; returns the UI thread's time for it (layout, texture creation, tessellation).
fn ui_frame(ctx: &egui::Context, app: &mut LoraStudioApp, start: Instant, scroll: f32) -> Duration {
    let screen = egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(1280.0, 820.0));
    let mut input = egui::RawInput {
        screen_rect: Some(screen),
        ..Default::default()
    };
    input.time = Some(start.elapsed().as_secs_f64());
    input
        .events
        .push(egui::Event::PointerMoved(egui::pos2(400.0, 400.0)));
    if scroll != 0.0 {
        input.events.push(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, scroll),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: egui::Modifiers::NONE,
        });
    }
    let t = Instant::now();
    let mut out = ctx.run_ui(input, |ui| app.show(ui));
    // Headless: no renderer takes the texture uploads (epaint asserts that someone did).
    out.textures_delta.clear();
    let _ = ctx.tessellate(out.shapes, out.pixels_per_point);
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(16).saturating_sub(took));
    took
}

#[derive(serde::Serialize)]
struct GuiTrainBench {
    steps: u64,
    samples: usize,
    train_s: f64,
    ui_frames: usize,
    ui_frame_median_ms: f64,
    ui_frame_p99_ms: f64,
    ui_frame_worst_ms: f64,
    lora: Option<String>,
}

impl GuiTrainBench {
    fn table(&self) -> String {
        format!(
            "UI frames while the demo project trains ({} steps, {} samples, {:.1} s)\n\
             | measure | value |\n|---|---:|\n\
             | UI frames during the run | {} |\n\
             | UI frame time, median | {:.2} ms |\n\
             | UI frame time, p99 | {:.2} ms |\n\
             | UI frame time, worst | {:.2} ms |\n\
             | LoRA written | {} |\n",
            self.steps,
            self.samples,
            self.train_s,
            self.ui_frames,
            self.ui_frame_median_ms,
            self.ui_frame_p99_ms,
            self.ui_frame_worst_ms,
            self.lora.as_deref().unwrap_or("none")
        )
    }
}

/// Opens the demo project as on a first start, presses Train once the model check is done, and times every
/// frame until the run ends, switching between the Training and Samples workspaces every five seconds so that
/// both the curves and the filling sample grid are drawn.
fn gui_train_bench(max_frames: usize) -> Result<GuiTrainBench, String> {
    let mut state = AppState::first_start();
    if !state.training.demo {
        return Err("the demo project (assets/demo) was not found next to the program or in the source tree; \
                    run this from the repository"
            .into());
    }
    let out = tempfile::tempdir().map_err(|e| e.to_string())?;
    state.training.config.saving.output_dir = out.path().to_owned();
    let ctx = egui::Context::default();
    let mut app = LoraStudioApp::new(&ctx, state);
    let start = Instant::now();
    let mut times = Vec::new();
    let mut started: Option<Instant> = None;
    for frame in 0..max_frames {
        let took = ui_frame(&ctx, &mut app, start, 0.0);
        match started {
            None if app.training().model().is_some_and(|m| m.is_ok())
                && !app.training().is_busy() =>
            {
                let settings = app.state().training.clone();
                app.training().start(&ctx, &settings);
                started = Some(Instant::now());
            }
            None if frame > 600 => {
                return Err("the demo model could not be checked within ten seconds".into());
            }
            None => {}
            Some(_) => times.push(took),
        }
        if started.is_some() && !app.training().is_running() {
            break;
        }
        if frame % 300 == 299 {
            let ws = &mut app.state_mut().workspace;
            *ws = if *ws == Workspace::Training {
                Workspace::Samples
            } else {
                Workspace::Training
            };
        }
    }
    let train_s = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let run = app.training().run().ok_or("the run did not start")?;
    if let Some((message, hint)) = &run.failed {
        return Err(format!("the demo run failed: {message} {hint}"));
    }
    let (steps, samples) = (run.last.as_ref().map_or(0, |s| s.step), run.samples.len());
    let lora = run
        .finished
        .as_ref()
        .and_then(|f| f.lora.as_ref())
        .map(|p| p.display().to_string());
    times.sort();
    if times.is_empty() {
        return Err("no frames ran during training".into());
    }
    let pct = |p: f64| percentile_ms(&times, p);
    Ok(GuiTrainBench {
        steps,
        samples,
        train_s,
        ui_frames: times.len(),
        ui_frame_median_ms: pct(0.5),
        ui_frame_p99_ms: pct(0.99),
        ui_frame_worst_ms: pct(1.0),
        lora,
    })
}
