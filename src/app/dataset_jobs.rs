//! Background work of the dataset workspace: scanning, inspecting, file dialogs and imports. Each runs on its
//! own thread and reports through one channel; the UI polls it every frame and never waits.

use crate::dataset::import::{ImportSummary, hash_files, import};
use crate::dataset::validate::{default_threads, inspect_all};
use crate::dataset::{ImageError, ImageInfo, Scan, scan};
use crossbeam_channel::{Receiver, Sender, unbounded};
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
    tx: Sender<JobEvent>,
    rx: Receiver<JobEvent>,
    ctx: egui::Context,
    cancel_scan: Arc<AtomicBool>,
}

impl Jobs {
    pub fn new(ctx: &egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Jobs {
            tx,
            rx,
            ctx: ctx.clone(),
            cancel_scan: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn events(&self) -> impl Iterator<Item = JobEvent> + '_ {
        self.rx.try_iter()
    }

    fn spawn(
        &self,
        name: &str,
        work: impl FnOnce(&Sender<JobEvent>, &egui::Context) + Send + 'static,
    ) {
        let (tx, ctx) = (self.tx.clone(), self.ctx.clone());
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || work(&tx, &ctx))
            .expect("spawning a worker thread");
    }

    /// Scans `root`, then decodes every image; cancels the scan that was running.
    pub fn scan(&mut self, root: PathBuf, generation: u64) {
        self.cancel_scan.store(true, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancel_scan = cancel.clone();
        self.spawn("dataset-scan", move |tx, ctx| {
            let result = scan(&root, &cancel).map_err(|e| e.to_string());
            let paths: Vec<PathBuf> = result
                .iter()
                .flat_map(|s| s.entries.iter().map(|e| e.path.clone()))
                .collect();
            let _ = tx.send(JobEvent::Scanned { generation, result });
            ctx.request_repaint();
            inspect_all(&paths, default_threads(), &cancel, &|index, result| {
                let _ = tx.send(JobEvent::Inspected {
                    generation,
                    index,
                    result,
                });
                ctx.request_repaint();
            });
            if !cancel.load(Ordering::Relaxed) {
                let _ = tx.send(JobEvent::InspectionDone { generation });
                ctx.request_repaint();
            }
        });
    }

    /// Opens a native file dialog on a worker thread (it may block for as long as the user looks at it).
    pub fn pick(&self, purpose: Pick, start_dir: Option<PathBuf>) {
        self.spawn("file-dialog", move |tx, ctx| {
            let mut dialog = rfd::FileDialog::new();
            if let Some(dir) = start_dir.filter(|d| d.is_dir()) {
                dialog = dialog.set_directory(dir);
            }
            let paths = match purpose {
                Pick::DatasetFolder | Pick::ImportFolder => {
                    dialog.pick_folder().into_iter().collect()
                }
                Pick::ImportFiles => dialog
                    .add_filter("Images", &crate::dataset::scan::IMAGE_EXTENSIONS)
                    .pick_files()
                    .unwrap_or_default(),
            };
            let _ = tx.send(JobEvent::Picked { purpose, paths });
            ctx.request_repaint();
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
        self.spawn("dataset-import", move |tx, ctx| {
            known.extend(hash_files(unhashed.iter().map(PathBuf::as_path)));
            let summary = import(&sources, &dest, &caption_ext, &mut known);
            let _ = tx.send(JobEvent::Imported { summary });
            ctx.request_repaint();
        });
    }

    /// Computes the derived dataset view (report, marks, tags) off the UI thread.
    pub fn derive(
        &self,
        generation: u64,
        work: impl FnOnce() -> super::dataset_view::Derived + Send + 'static,
    ) {
        self.spawn("dataset-derive", move |tx, ctx| {
            let _ = tx.send(JobEvent::Derived {
                generation,
                derived: Box::new(work()),
            });
            ctx.request_repaint();
        });
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.cancel_scan.store(true, Ordering::Relaxed);
    }
}
