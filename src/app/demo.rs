//! The demo project a first start opens: the tiny model and the LoRA dataset shipped in `assets/demo`, with the
//! `cpu-demo` preset. The dataset is copied to the user's data folder once, so that editing its captions in the
//! window never changes the program's own files.

use super::training_view::TrainingSettings;
use crate::train::config::TrainConfig;
use crate::train::presets;
use std::io;
use std::path::{Path, PathBuf};

/// The demo project folder (`assets/demo`), next to the executable or in the source tree.
pub fn demo_dir() -> Option<PathBuf> {
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("assets/demo")));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    beside_exe
        .into_iter()
        .chain([source])
        .find(|d| d.join("model").exists() && d.join("dataset").is_dir())
}

/// `~/.local/share/lora-studio/NAME` (the platform's data folder), else `~/lora-studio/NAME`.
pub fn default_output_dir(name: &str) -> PathBuf {
    directories::ProjectDirs::from("", "", "lora-studio")
        .map(|d| d.data_dir().join(name))
        .or_else(|| {
            directories::UserDirs::new().map(|u| u.home_dir().join("lora-studio").join(name))
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

impl TrainingSettings {
    /// The demo project: its model, its dataset (the user's copy in `data_dir`), the `cpu-demo` preset, the
    /// project's own settings from its `demo.toml` (output name, sample prompts) and an output folder in
    /// `data_dir`. `demo` is the demo project folder. The config is what choosing the preset in the window
    /// gives too.
    pub fn demo(demo: &Path, data_dir: &Path) -> Result<Self, String> {
        let preset = presets::find("cpu-demo").map_err(|e| e.0)?;
        let layer_path = demo.join("demo.toml");
        let layer = std::fs::read_to_string(&layer_path).unwrap_or_default();
        let mut project = TrainConfig::build(&[(&layer_path.display().to_string(), &layer)], &[])
            .map_err(|e| e.0)?;
        project.model.checkpoint = demo.join("model");
        project.dataset.folder = users_copy(&demo.join("dataset"), &data_dir.join("demo-dataset"));
        project.saving.output_dir = data_dir.join("demo-output");
        if project.saving.output_name == TrainConfig::default().saving.output_name {
            project.saving.output_name = "demo-lora".into();
        }
        let config = preset.apply_to(&project).map_err(|e| e.0)?;
        let mut s = TrainingSettings {
            config,
            preset: "cpu-demo".into(),
            recent_models: Vec::new(),
            demo: true,
            output_dirs: Vec::new(),
        };
        s.remember_model(&demo.join("model"));
        Ok(s)
    }
}

/// `copy`, made from `shipped` the first time (an existing copy is the user's and is kept as it is); the
/// shipped folder itself when no copy can be made there.
fn users_copy(shipped: &Path, copy: &Path) -> PathBuf {
    match copy_once(shipped, copy) {
        Ok(()) => copy.to_owned(),
        Err(e) => {
            eprintln!(
                "lora-studio: cannot copy the demo dataset to {} ({e}); using {}",
                copy.display(),
                shipped.display()
            );
            shipped.to_owned()
        }
    }
}

/// Copies the regular files of `from` into a new folder `to`, unless `to` exists. The files go to a staging
/// folder beside `to` that is renamed at the end, so an interrupted copy never passes for a finished one.
fn copy_once(from: &Path, to: &Path) -> io::Result<()> {
    if to.exists() {
        return Ok(());
    }
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(crate::fsutil::STATE_STAGING_PREFIX)
        .tempdir_in(parent)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), staging.path().join(entry.file_name()))?;
        }
    }
    std::fs::rename(staging.keep(), to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_project_is_the_cpu_preset_with_its_project_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (demo, data) = (dir.path().join("demo"), dir.path().join("data"));
        std::fs::create_dir_all(demo.join("dataset")).unwrap();
        std::fs::write(
            demo.join("demo.toml"),
            "[saving]\noutput_name = \"d\"\n[[sampling.prompts]]\nprompt = \"zk\"\n",
        )
        .unwrap();
        let s = TrainingSettings::demo(&demo, &data).unwrap();
        assert!(s.demo);
        assert_eq!(s.preset, "cpu-demo");
        let preset = presets::find("cpu-demo").unwrap().config().unwrap();
        assert_eq!(s.config.training.steps, preset.training.steps);
        assert_eq!(s.config.optimizer.lr, preset.optimizer.lr);
        assert_eq!(s.config.dataset.resolution, 64, "from the preset");
        assert_eq!(s.config.sampling.prompts[0].prompt, "zk");
        assert_eq!(s.config.saving.output_name, "d");
        assert_eq!(s.config.model.checkpoint, demo.join("model"));
        assert_eq!(s.config.dataset.folder, data.join("demo-dataset"));
        assert_eq!(s.config.saving.output_dir, data.join("demo-output"));
    }

    /// The user's copy is made once: edits in it survive the next start, and the shipped folder is not touched.
    #[test]
    fn the_dataset_is_copied_once_and_edits_stay_in_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (shipped, copy) = (dir.path().join("shipped"), dir.path().join("data/copy"));
        std::fs::create_dir_all(&shipped).unwrap();
        std::fs::write(shipped.join("a.txt"), "zkstar, a purple star").unwrap();
        std::fs::write(shipped.join("a.png"), b"png").unwrap();
        assert_eq!(users_copy(&shipped, &copy), copy);
        assert_eq!(std::fs::read(copy.join("a.png")).unwrap(), b"png");
        std::fs::write(copy.join("a.txt"), "edited").unwrap();
        assert_eq!(users_copy(&shipped, &copy), copy);
        assert_eq!(
            std::fs::read_to_string(copy.join("a.txt")).unwrap(),
            "edited"
        );
        assert_eq!(
            std::fs::read_to_string(shipped.join("a.txt")).unwrap(),
            "zkstar, a purple star"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("copy")]);
    }
}
