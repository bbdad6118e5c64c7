//! Background work of the dataset workspace: scanning, inspecting, file dialogs and imports. Each runs on its
//! own thread and reports through one channel; the UI polls it every frame and never waits.

use super::workers::{Workers, file_dialog};
use crate::dataset::import::{ImportSummary, hash_files, import};
use crate::dataset::validate::{default_threads, inspect_all};
use crate::dataset::{ImageError, ImageInfo, Scan, scan};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a file dialog was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    DatasetFolder,
    ImportFiles,
    ImportFolder,
}

pub enum JobEvent {
    Scanned {
        generation: u64,
        result: Result<Scan, String>,
    },
    Inspected {
        generation: u64,
        index: usize,
        result: Result<ImageInfo, ImageError>,
    },
    InspectionDone {
        generation: u64,
    },
    Picked {
        purpose: Pick,
        paths: Vec<PathBuf>,
    },
    Imported {
        summary: ImportSummary,
    },
    Derived {
        generation: u64,
        derived: Box<super::dataset_view::Derived>,
    },
}

pub struct Jobs {
    workers: Workers<JobEvent>,
    cancel_scan: Arc<AtomicBool>,
}

impl Jobs {
    pub fn new(ctx: &egui::Context) -> Self {
        Jobs {
            workers: Workers::new(ctx),
            cancel_scan: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn events(&self) -> impl Iterator<Item = JobEvent> + '_ {
        self.workers.events()
    }

    /// Scans `root`, then decodes every image; cancels the scan that was running.
    pub fn scan(&mut self, root: PathBuf, generation: u64) {
        self.cancel_scan.store(true, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancel_scan = cancel.clone();
        self.workers.spawn("dataset-scan", move |report| {
            let result = scan(&root, &cancel).map_err(|e| e.to_string());
            let paths: Vec<PathBuf> = result
                .iter()
                .flat_map(|s| s.entries.iter().map(|e| e.path.clone()))
                .collect();
            report.send(JobEvent::Scanned { generation, result });
            inspect_all(&paths, default_threads(), &cancel, &|index, result| {
                report.send(JobEvent::Inspected {
                    generation,
                    index,
                    result,
                });
            });
            if !cancel.load(Ordering::Relaxed) {
                report.send(JobEvent::InspectionDone { generation });
            }
        });
    }

    /// Opens a native file dialog on a worker thread (it may block for as long as the user looks at it).
    pub fn pick(&self, purpose: Pick, start_dir: Option<PathBuf>) {
        self.workers.spawn("file-dialog", move |report| {
            let dialog = file_dialog(start_dir);
            let paths = match purpose {
                Pick::DatasetFolder | Pick::ImportFolder => {
                    dialog.pick_folder().into_iter().collect()
                }
                Pick::ImportFiles => dialog
                    .add_filter("Images", &crate::dataset::scan::IMAGE_EXTENSIONS)
                    .pick_files()
                    .unwrap_or_default(),
            };
            report.send(JobEvent::Picked { purpose, paths });
        });
    }

    /// Copies `sources` into `dest`. `known` are the hashes already computed; `unhashed` the dataset images
    /// whose hashes are not known yet.
    pub fn import(
        &self,
        sources: Vec<PathBuf>,
        dest: PathBuf,
        caption_ext: String,
        mut known: HashSet<String>,
        unhashed: Vec<PathBuf>,
    ) {
        self.workers.spawn("dataset-import", move |report| {
            known.extend(hash_files(unhashed.iter().map(PathBuf::as_path)));
            let summary = import(&sources, &dest, &caption_ext, &mut known);
            report.send(JobEvent::Imported { summary });
        });
    }

    /// Computes the derived dataset view (report, marks, tags) off the UI thread.
    pub fn derive(
        &self,
        generation: u64,
        work: impl FnOnce() -> super::dataset_view::Derived + Send + 'static,
    ) {
        self.workers.spawn("dataset-derive", move |report| {
            report.send(JobEvent::Derived {
                generation,
                derived: Box::new(work()),
            });
        });
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.cancel_scan.store(true, Ordering::Relaxed);
    }
}
