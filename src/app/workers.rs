//! Background work of the panels: each job runs on its own named thread and reports through one channel per
//! panel, which the UI polls every frame without waiting; every report wakes the UI.

use crossbeam_channel::{Receiver, Sender, TryIter, unbounded};
use std::path::PathBuf;

/// The sending end a job reports through.
pub struct Report<E> {
    tx: Sender<E>,
    ctx: egui::Context,
}

impl<E> Report<E> {
    /// Sends `event` (dropped if the panel is gone) and asks for a frame to show it.
    pub fn send(&self, event: E) {
        let _ = self.tx.send(event);
        self.ctx.request_repaint();
    }
}

/// A panel's jobs: spawns them and hands their reports to the UI.
pub struct Workers<E> {
    tx: Sender<E>,
    rx: Receiver<E>,
    ctx: egui::Context,
}

impl<E: Send + 'static> Workers<E> {
    pub fn new(ctx: &egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Workers {
            tx,
            rx,
            ctx: ctx.clone(),
        }
    }

    /// The reports that arrived since the last call.
    pub fn events(&self) -> TryIter<'_, E> {
        self.rx.try_iter()
    }

    pub fn spawn(&self, name: &str, work: impl FnOnce(&Report<E>) + Send + 'static) {
        let report = Report {
            tx: self.tx.clone(),
            ctx: self.ctx.clone(),
        };
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || work(&report))
            .expect("spawning a worker thread");
    }
}

/// A native file dialog starting in `start_dir` when that is a folder. Show it from a job: it blocks for as
/// long as the user looks at it.
pub fn file_dialog(start_dir: Option<PathBuf>) -> rfd::FileDialog {
    let dialog = rfd::FileDialog::new();
    match start_dir.filter(|d| d.is_dir()) {
        Some(dir) => dialog.set_directory(dir),
        None => dialog,
    }
}
