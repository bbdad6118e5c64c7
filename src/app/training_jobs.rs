//! Background work of the training workspaces: model detection, the plan preview, the device query, file
//! dialogs and opening folders. Each runs on its own thread and reports through one channel; the UI polls it
//! every frame and never waits.

use super::resume::Resumable;
use super::workers::{Workers, file_dialog};
use crate::train::config::TrainConfig;
use crate::train::plan::Preview;
use std::path::{Path, PathBuf};

/// Why a file dialog was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    ModelFile,
    ModelFolder,
    Vae,
    OutputFolder,
    RegularizationFolder,
}

/// What the model picker found in a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub family: String,
    pub prediction: String,
    pub precision: String,
    pub parameters: u64,
    pub bytes: u64,
    /// The long form (`ModelFiles::describe`), shown on hover.
    pub description: String,
}

/// The compute device the app found.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    /// (free, total) bytes; `None` on the CPU.
    pub memory: Option<(u64, u64)>,
    pub warning: Option<String>,
}

pub enum JobEvent {
    Model {
        generation: u64,
        result: Result<ModelInfo, String>,
    },
    Plan {
        generation: u64,
        result: Result<Box<Preview>, String>,
    },
    /// The run saved in the output folder of the config checked with `generation`, if one can go on.
    Resumable {
        generation: u64,
        found: Option<Box<Resumable>>,
    },
    Device(DeviceInfo),
    Picked {
        purpose: Pick,
        path: Option<PathBuf>,
    },
}

pub struct Jobs {
    workers: Workers<JobEvent>,
}

impl Jobs {
    pub fn new(ctx: &egui::Context) -> Self {
        Jobs {
            workers: Workers::new(ctx),
        }
    }

    pub fn events(&self) -> Vec<JobEvent> {
        self.workers.events().collect()
    }

    /// Runs `work` on its own thread and reports its one event.
    fn spawn(&self, name: &str, work: impl FnOnce() -> JobEvent + Send + 'static) {
        self.workers.spawn(name, move |report| report.send(work()));
    }

    /// Reads the checkpoint's headers (and the VAE's, when one is given) and says what the model is.
    pub fn detect_model(&self, generation: u64, path: PathBuf, vae: Option<PathBuf>) {
        self.spawn("model-detect", move || JobEvent::Model {
            generation,
            result: detect(&path, vae.as_deref()),
        });
    }

    /// Computes the plan of `config` (scans the dataset and reads the checkpoint's header).
    pub fn plan(&self, generation: u64, config: TrainConfig) {
        self.spawn("plan-preview", move || JobEvent::Plan {
            generation,
            result: crate::train::plan::preview(&config)
                .map(Box::new)
                .map_err(|f| f.to_string()),
        });
    }

    /// Looks for a saved run in `config`'s output folder.
    pub fn resumable(&self, generation: u64, config: TrainConfig) {
        self.spawn("resume-check", move || JobEvent::Resumable {
            generation,
            found: Resumable::find(&config).map(Box::new),
        });
    }

    pub fn device(&self) {
        self.spawn("device-query", || {
            let (device, warning) = crate::device::best();
            JobEvent::Device(DeviceInfo {
                name: crate::device::describe(&device),
                memory: crate::device::memory(&device),
                warning,
            })
        });
    }

    /// Opens a native file dialog on a worker thread (it may block for as long as the user looks at it).
    pub fn pick(&self, purpose: Pick, start_dir: Option<PathBuf>) {
        self.spawn("file-dialog", move || {
            let dialog = file_dialog(start_dir);
            let path = match purpose {
                Pick::ModelFile | Pick::Vae => dialog
                    .add_filter("Safetensors", &["safetensors"])
                    .pick_file(),
                Pick::ModelFolder | Pick::OutputFolder | Pick::RegularizationFolder => {
                    dialog.pick_folder()
                }
            };
            JobEvent::Picked { purpose, path }
        });
    }
}

fn detect(path: &Path, vae: Option<&Path>) -> Result<ModelInfo, String> {
    if path.as_os_str().is_empty() {
        return Err(
            "Choose the base checkpoint: a .safetensors file or a diffusers folder.".into(),
        );
    }
    let mut files = crate::model::checkpoint::open(path).map_err(|e| e.to_string())?;
    if let Some(vae) = vae {
        files = files.with_vae(vae).map_err(|e| e.to_string())?;
    }
    let s = files.summary();
    let precision = match s.main_dtype.as_str() {
        "F16" => "fp16".to_owned(),
        "BF16" => "bf16".to_owned(),
        "F32" => "fp32".to_owned(),
        other => other.to_ascii_lowercase(),
    };
    Ok(ModelInfo {
        family: files.family.to_string(),
        prediction: files.prediction.describe().to_string(),
        precision,
        parameters: s.parameters,
        bytes: s.bytes,
        description: files.describe(),
    })
}

/// Opens `dir` in the desktop's file manager, on a thread (the launcher may take a moment).
pub fn open_folder(dir: PathBuf) {
    std::thread::spawn(move || {
        let program = if cfg!(target_os = "windows") {
            "explorer"
        } else if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        let _ = std::process::Command::new(program).arg(dir).status();
    });
}
