//! What a run leaves in its output folder beside the LoRA files, and reading it back: each sample's settings in
//! a JSON file beside its PNG, the loss curve (`NAME-loss.csv`), and a folder summarized into its runs, so that
//! past runs can be shown after a restart as they were shown live.

use super::config::TrainConfig;
use super::plan::OutputPaths;
use crate::sample::Sampler;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How one sample image was made: enough to make it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleInfo {
    /// The training step of the adapter (0 for the baseline).
    pub step: u64,
    /// Index into the run's sample prompts.
    pub prompt_index: usize,
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub sampler: Sampler,
    pub steps: u32,
    pub cfg: f64,
    pub width: u32,
    pub height: u32,
    /// The LoRA's weight (0 for the baseline, drawn without it).
    pub lora_weight: f64,
    /// Drawn without the LoRA, to show what the LoRA changes.
    pub baseline: bool,
}

impl SampleInfo {
    /// One line for people: `step 300 · seed 1 · euler 20 steps · cfg 7 · LoRA 1`.
    pub fn describe(&self) -> String {
        let at = if self.baseline {
            "without LoRA".to_owned()
        } else {
            format!("step {} · LoRA weight {}", self.step, self.lora_weight)
        };
        format!(
            "{at} · seed {} · {} {} steps · cfg {} · {}×{}",
            self.seed, self.sampler, self.steps, self.cfg, self.width, self.height
        )
    }
}

/// The settings file beside a sample image (`X.png` → `X.json`).
pub fn info_path(png: &Path) -> PathBuf {
    png.with_extension("json")
}

/// Writes a sample image and its settings beside it (each file atomically).
pub fn write_sample(png: &Path, image: &image::RgbImage, info: &SampleInfo) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(png, &bytes)?;
    let json = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(&info_path(png), &json)
}

/// The settings saved beside a sample image, if they are there and readable.
pub fn read_info(png: &Path) -> Option<SampleInfo> {
    let text = std::fs::read(info_path(png)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// One point of the loss curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

const LOSS_HEADER: &str = "step,loss,lr\n";

/// The loss curve of a run being trained, one `step,loss,lr` line appended per step. A line is written with one
/// `write` call, so a crash leaves at most a torn last line, which the reader skips.
pub struct LossLog {
    file: std::fs::File,
}

impl LossLog {
    /// Opens the curve at `path` for a run starting at `start_step`: a new run (step 0) starts it afresh; a
    /// resumed run keeps the points up to its state's step and drops later ones (they were trained after the
    /// state was saved, and are trained again now).
    pub fn open(path: &Path, start_step: u64) -> std::io::Result<LossLog> {
        let kept: Vec<LossPoint> = if start_step == 0 {
            Vec::new()
        } else {
            read_losses(path)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.step <= start_step)
                .collect()
        };
        let mut text = LOSS_HEADER.to_owned();
        for p in &kept {
            text.push_str(&line(p));
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(LossLog { file })
    }

    pub fn append(&mut self, point: LossPoint) -> std::io::Result<()> {
        self.file.write_all(line(&point).as_bytes())
    }
}

fn line(p: &LossPoint) -> String {
    format!("{},{},{}\n", p.step, p.loss, p.lr)
}

/// The points of a loss curve file, in file order; the header, a torn last line and lines that do not parse
/// are skipped.
pub fn read_losses(path: &Path) -> std::io::Result<Vec<LossPoint>> {
    let text = std::fs::read_to_string(path)?;
    // Only lines ended by a newline are whole: a torn last one could parse as a wrong number.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    Ok(whole
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let point = LossPoint {
                step: f.next()?.parse().ok()?,
                loss: f.next()?.parse().ok()?,
                lr: f.next()?.parse().ok()?,
            };
            f.next().is_none().then_some(point)
        })
        .collect())
}

/// A sample image found in a run folder.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRecord {
    pub path: PathBuf,
    pub step: u64,
    pub prompt_index: usize,
    pub baseline: bool,
    /// Its settings, when they were saved beside it (runs of older versions have none).
    pub info: Option<SampleInfo>,
}

/// A LoRA file of a run: an intermediate one at a step, or the final one.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRecord {
    pub path: PathBuf,
    pub step: Option<u64>,
}

/// One run (one output name) found in an output folder.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub dir: PathBuf,
    pub name: String,
    /// By (step, prompt index); the baselines separately by prompt index.
    pub samples: Vec<SampleRecord>,
    pub baseline: Vec<SampleRecord>,
    pub loras: Vec<LoraRecord>,
    pub losses: Vec<LossPoint>,
    /// The config the run's saved state was made with, when the folder's state is this run's.
    pub config: Option<TrainConfig>,
}

impl RunSummary {
    /// The newest LoRA file: the final one, else the one of the highest step.
    pub fn latest_lora(&self) -> Option<&Path> {
        self.loras
            .iter()
            .max_by_key(|l| l.step.unwrap_or(u64::MAX))
            .map(|l| l.path.as_path())
    }

    /// The text of prompt `index`, from the samples' settings or the saved config.
    pub fn prompt_text(&self, index: usize) -> Option<&str> {
        self.samples
            .iter()
            .chain(&self.baseline)
            .filter(|s| s.prompt_index == index)
            .find_map(|s| s.info.as_ref().map(|i| i.prompt.as_str()))
            .or_else(|| {
                let p = self.config.as_ref()?.sampling.prompts.get(index)?;
                Some(p.prompt.as_str())
            })
    }
}

/// The runs in an output folder, by name: every output name that has samples, LoRA files or a loss curve there.
/// A folder that does not exist has none; one that cannot be read is an error naming it.
pub fn summarize(dir: &Path) -> Result<Vec<RunSummary>, String> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut runs: BTreeMap<String, RunSummary> = BTreeMap::new();
    let new = |name: &str| RunSummary {
        dir: dir.to_owned(),
        name: name.to_owned(),
        samples: Vec::new(),
        baseline: Vec::new(),
        loras: Vec::new(),
        losses: Vec::new(),
        config: None,
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("Cannot read the output folder {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(name) = file.strip_suffix("-loss.csv") {
            let run = runs.entry(name.to_owned()).or_insert_with(|| new(name));
            run.losses = read_losses(&path).unwrap_or_default();
        } else if let Some(stem) = file.strip_suffix(".safetensors") {
            let (name, step) = match stem.rsplit_once("-step") {
                Some((n, s)) if s.parse::<u64>().is_ok() => (n, s.parse().ok()),
                _ => (stem, None),
            };
            let run = runs.entry(name.to_owned()).or_insert_with(|| new(name));
            run.loras.push(LoraRecord { path, step });
        }
    }
    let samples = OutputPaths {
        dir: dir.to_owned(),
        name: String::new(),
    }
    .samples();
    for e in std::fs::read_dir(&samples).into_iter().flatten().flatten() {
        let path = e.path();
        let Some((name, record)) = sample_record(&path) else {
            continue;
        };
        let run = runs.entry(name.clone()).or_insert_with(|| new(&name));
        if record.baseline {
            run.baseline.push(record);
        } else {
            run.samples.push(record);
        }
    }
    let state = super::state::saved(&dir.join("state")).ok().map(|(_, c)| c);
    for run in runs.values_mut() {
        run.samples.sort_by_key(|s| (s.step, s.prompt_index));
        run.baseline.sort_by_key(|s| s.prompt_index);
        run.loras.sort_by_key(|l| l.step.unwrap_or(u64::MAX));
        run.config = state.clone().filter(|c| c.saving.output_name == run.name);
    }
    Ok(runs.into_values().collect())
}

/// `NAME-step000300-p0.png` or `NAME-base-p0.png` (as `OutputPaths` names them) → the run's name and the record.
fn sample_record(path: &Path) -> Option<(String, SampleRecord)> {
    if path.extension()? != "png" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let (rest, index) = stem.rsplit_once("-p")?;
    let prompt_index = index.parse().ok()?;
    let (name, step, baseline) = match rest.strip_suffix("-base") {
        Some(name) => (name, 0, true),
        None => {
            let (name, step) = rest.rsplit_once("-step")?;
            (name, step.parse().ok()?, false)
        }
    };
    Some((
        name.to_owned(),
        SampleRecord {
            path: path.to_owned(),
            step,
            prompt_index,
            baseline,
            info: read_info(path),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_skipped_and_a_resume_drops_later_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r-loss.csv");
        let mut log = LossLog::open(&path, 0).unwrap();
        for step in 1..=5 {
            log.append(LossPoint {
                step,
                loss: 0.5 / step as f64,
                lr: 1e-4,
            })
            .unwrap();
        }
        drop(log);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"6,0.0").unwrap();
        let read = read_losses(&path).unwrap();
        assert_eq!(
            read.iter().map(|p| p.step).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(read[1].loss, 0.25);
        // Resumed from a state saved at step 3: steps 4 and 5 are trained again.
        let mut log = LossLog::open(&path, 3).unwrap();
        log.append(LossPoint {
            step: 4,
            loss: 9.0,
            lr: 2e-4,
        })
        .unwrap();
        let read = read_losses(&path).unwrap();
        assert_eq!(
            read.iter().map(|p| p.step).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!((read[3].loss, read[3].lr), (9.0, 2e-4));
    }

    #[test]
    fn sample_names_give_their_run_step_and_prompt() {
        let (name, r) = sample_record(Path::new("/o/samples/my-lora-step000300-p2.png")).unwrap();
        assert_eq!(
            (name.as_str(), r.step, r.prompt_index, r.baseline),
            ("my-lora", 300, 2, false)
        );
        let (name, r) = sample_record(Path::new("/o/samples/my-lora-base-p0.png")).unwrap();
        assert_eq!(
            (name.as_str(), r.step, r.prompt_index, r.baseline),
            ("my-lora", 0, 0, true)
        );
        assert!(sample_record(Path::new("/o/samples/notes.png")).is_none());
        assert!(sample_record(Path::new("/o/samples/x-step1-p0.json")).is_none());
    }
}
