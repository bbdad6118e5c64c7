//! Validation: every problem of a dataset by path, the bucket table and the epoch arithmetic.
//! The GUI shows it and `lora-studio dataset check` prints it; both use this one report.

use super::buckets::{BucketConfig, Buckets, steps_per_epoch};
use super::caption::CaptionStatus;
use super::inspect::{ImageError, ImageInfo, inspect};
use super::scan::{ImageEntry, Scan};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The result of inspecting one image; `None` while it has not been inspected yet.
pub type Inspection = Option<Result<ImageInfo, ImageError>>;

/// Decodes every entry on `threads` worker threads, calling `done(index, result)` as each finishes.
/// Returns early (leaving the rest uncalled) when `cancel` is set.
pub fn inspect_all(
    paths: &[std::path::PathBuf],
    threads: usize,
    cancel: &AtomicBool,
    done: &(dyn Fn(usize, Result<ImageInfo, ImageError>) + Sync),
) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= paths.len() || cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = inspect(&paths[i]);
                    super::decoded::note(&paths[i], &result);
                    done(i, result);
                }
            });
        }
    });
}

/// Every core: for headless work, where nothing else needs the machine.
pub fn all_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Worker threads for decoding behind the GUI: all cores but one, so the UI and the OS keep one.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().saturating_sub(1).max(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One finding about one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

fn finding(severity: Severity, message: impl Into<String>) -> Finding {
    Finding {
        severity,
        message: message.into(),
    }
}

/// What is wrong with one image and its caption (given the duplicates found across the dataset).
pub fn findings(
    entry: &ImageEntry,
    inspection: &Inspection,
    buckets: &Buckets,
    duplicate_of: Option<&str>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    match inspection {
        // An image that will be skipped needs no advice about its caption or duplicates.
        Some(Err(e)) => {
            return vec![finding(
                Severity::Error,
                format!("Unreadable: {e}. It will be skipped."),
            )];
        }
        Some(Ok(info)) => out.extend(image_findings(info, buckets)),
        None => {}
    }
    out.extend(caption_finding(entry));
    if let Some(other) = duplicate_of {
        out.push(finding(
            Severity::Warning,
            format!("Exact duplicate of {other}; it will be seen twice as often."),
        ));
    }
    out
}

fn image_findings(info: &ImageInfo, buckets: &Buckets) -> Vec<Finding> {
    let mut out = Vec::new();
    let p = buckets.place((info.width, info.height));
    if p.upscaled() {
        out.push(finding(
            Severity::Warning,
            format!(
                "Too small: {}×{} is upscaled ×{:.2} to its bucket {}×{}, so it trains blurry. Use a larger original \
                 or a lower resolution.",
                info.width, info.height, p.scale, p.bucket.0, p.bucket.1
            ),
        ));
    }
    if info.transparent {
        out.push(finding(
            Severity::Warning,
            "Has transparent pixels; they are trained as whatever colour hides under them. Flatten it onto a \
             background.",
        ));
    }
    match info.mode {
        super::PixelMode::HighBitDepth => out.push(finding(
            Severity::Warning,
            "16-bit or float image; converted to 8-bit for training.",
        )),
        super::PixelMode::Cmyk => out.push(finding(
            Severity::Warning,
            "CMYK JPEG; converted to RGB, colours may shift. Save it as RGB.",
        )),
        super::PixelMode::Other => out.push(finding(
            Severity::Info,
            "Palette or unusual pixel format; expanded to RGB.",
        )),
        super::PixelMode::Rgb | super::PixelMode::Gray => {}
    }
    if info.exif_rotated {
        out.push(finding(
            Severity::Info,
            "EXIF orientation: shown and trained rotated as a camera intends.",
        ));
    }
    out
}

fn caption_finding(entry: &ImageEntry) -> Option<Finding> {
    let name = entry
        .caption_path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    match entry.caption.status {
        CaptionStatus::Ok => None,
        CaptionStatus::Missing => Some(finding(
            Severity::Warning,
            format!("No caption: {name} does not exist; it trains with an empty one."),
        )),
        CaptionStatus::Empty => Some(finding(
            Severity::Warning,
            format!("Empty caption: {name} holds no text."),
        )),
        CaptionStatus::NotUtf8 => Some(finding(
            Severity::Warning,
            format!(
                "{name} is not UTF-8 text; characters that cannot be read are shown as boxes. Saving it writes UTF-8."
            ),
        )),
        CaptionStatus::Unreadable => Some(finding(
            Severity::Error,
            format!("{name} cannot be read: {}", entry.caption.text),
        )),
    }
}

/// For each entry, the first other entry with the same content (by hash), if any.
pub fn duplicate_map(entries: &[ImageEntry], inspections: &[Inspection]) -> Vec<Option<usize>> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut groups: HashMap<&str, usize> = HashMap::new();
    for (i, ins) in inspections.iter().enumerate().take(entries.len()) {
        if let Some(Ok(info)) = ins {
            first.entry(info.hash.as_str()).or_insert(i);
            *groups.entry(info.hash.as_str()).or_default() += 1;
        }
    }
    inspections
        .iter()
        .enumerate()
        .map(|(i, ins)| match ins {
            Some(Ok(info)) if groups[info.hash.as_str()] > 1 => {
                let f = first[info.hash.as_str()];
                Some(if f == i {
                    next_with_hash(inspections, &info.hash, i)
                } else {
                    f
                })
            }
            _ => None,
        })
        .collect()
}

fn next_with_hash(inspections: &[Inspection], hash: &str, after: usize) -> usize {
    (after + 1..inspections.len())
        .find(|&j| matches!(&inspections[j], Some(Ok(o)) if o.hash == hash))
        .unwrap_or(after)
}

/// A path with what is wrong with it.
#[derive(Clone, Debug, Serialize)]
pub struct PathProblem {
    pub path: String,
    pub problem: String,
}

/// The whole validation of a dataset, serialized as `dataset check --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub root: String,
    /// Image files found (by extension).
    pub files: usize,
    /// Images that decode and will train.
    pub images: usize,
    pub with_caption: usize,
    pub missing_caption: Vec<String>,
    pub empty_caption: Vec<String>,
    pub non_utf8_caption: Vec<String>,
    pub unreadable: Vec<String>,
    pub too_small: Vec<String>,
    pub duplicates: Vec<Vec<String>>,
    pub transparent: Vec<String>,
    pub odd_mode: Vec<PathProblem>,
    pub exif_rotated: Vec<String>,
    /// Every error and warning with its explanation (unreadable reasons, unreadable folders, symlink loops …).
    pub problems: Vec<PathProblem>,
    pub repeats: BTreeMap<String, u32>,
    pub resolution: u32,
    pub batch_size: u32,
    pub bucket_settings: BucketConfig,
    pub buckets: BTreeMap<String, usize>,
    pub images_per_epoch: u64,
    pub steps_per_epoch: u64,
    /// False when nothing can be trained.
    pub usable: bool,
}

impl Report {
    /// Builds the report from a scan and one inspection per entry.
    pub fn build(
        scan: &Scan,
        inspections: &[Inspection],
        buckets_cfg: &BucketConfig,
        batch_size: u32,
    ) -> Report {
        let buckets = Buckets::new(buckets_cfg);
        let path_of = |e: &ImageEntry| e.path.to_string_lossy().into_owned();
        let dups = duplicate_map(&scan.entries, inspections);
        let mut r = Report::empty(scan, buckets_cfg, batch_size);
        let mut per_bucket: BTreeMap<(u32, u32), (usize, u64)> = BTreeMap::new();
        let mut dup_groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (i, e) in scan.entries.iter().enumerate() {
            let ins = inspections.get(i).cloned().flatten();
            let dup = dups
                .get(i)
                .copied()
                .flatten()
                .map(|j| scan.entries[j].rel.as_str());
            for f in findings(e, &ins, &buckets, dup) {
                if f.severity > Severity::Info {
                    r.problems.push(PathProblem {
                        path: path_of(e),
                        problem: f.message,
                    });
                }
            }
            let info = match ins {
                Some(Ok(info)) => info,
                Some(Err(_)) | None => {
                    r.unreadable.push(path_of(e));
                    continue;
                }
            };
            r.images += 1;
            match e.caption.status {
                CaptionStatus::Ok => r.with_caption += 1,
                CaptionStatus::Missing => r.missing_caption.push(path_of(e)),
                CaptionStatus::Empty => r.empty_caption.push(path_of(e)),
                CaptionStatus::NotUtf8 | CaptionStatus::Unreadable => {
                    r.non_utf8_caption.push(path_of(e))
                }
            }
            let place = buckets.place((info.width, info.height));
            if place.upscaled() {
                r.too_small.push(path_of(e));
            }
            if info.transparent {
                r.transparent.push(path_of(e));
            }
            if info.mode.is_odd() {
                r.odd_mode.push(PathProblem {
                    path: path_of(e),
                    problem: format!("{:?}", info.mode).to_lowercase(),
                });
            }
            if info.exif_rotated {
                r.exif_rotated.push(path_of(e));
            }
            if dups[i].is_some() {
                dup_groups
                    .entry(
                        inspections[i]
                            .as_ref()
                            .unwrap()
                            .as_ref()
                            .unwrap()
                            .hash
                            .as_str(),
                    )
                    .or_default()
                    .push(path_of(e));
            }
            let repeats = u64::from(scan.repeats_of(&e.folder));
            let slot = per_bucket.entry(place.bucket).or_default();
            slot.0 += 1;
            slot.1 += repeats;
            r.images_per_epoch += repeats;
        }
        r.duplicates = dup_groups.into_values().collect();
        r.buckets = per_bucket
            .iter()
            .map(|((w, h), (n, _))| (format!("{w}x{h}"), *n))
            .collect();
        r.steps_per_epoch = steps_per_epoch(per_bucket.values().map(|(_, s)| *s), batch_size);
        r.usable = r.images > 0;
        r
    }

    fn empty(scan: &Scan, buckets_cfg: &BucketConfig, batch_size: u32) -> Report {
        Report {
            root: scan.root.to_string_lossy().into_owned(),
            files: scan.entries.len(),
            images: 0,
            with_caption: 0,
            missing_caption: vec![],
            empty_caption: vec![],
            non_utf8_caption: vec![],
            unreadable: vec![],
            too_small: vec![],
            duplicates: vec![],
            transparent: vec![],
            odd_mode: vec![],
            exif_rotated: vec![],
            problems: scan
                .problems
                .iter()
                .map(|p| PathProblem {
                    path: p.path.to_string_lossy().into_owned(),
                    problem: p.what.clone(),
                })
                .collect(),
            repeats: scan
                .folders
                .iter()
                .map(|f| (f.name.clone(), f.repeats.count))
                .collect(),
            resolution: buckets_cfg.sanitized().resolution,
            batch_size: batch_size.max(1),
            bucket_settings: buckets_cfg.sanitized(),
            buckets: BTreeMap::new(),
            images_per_epoch: 0,
            steps_per_epoch: 0,
            usable: false,
        }
    }

    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "Dataset {}", self.root);
        let _ = writeln!(
            s,
            "  {} image files, {} readable, {} with a caption",
            self.files, self.images, self.with_caption
        );
        let _ = writeln!(s, "Repeats");
        for (folder, n) in &self.repeats {
            let _ = writeln!(s, "  {folder:<40} ×{n}");
        }
        let _ = writeln!(
            s,
            "Buckets at {} px (sides {}–{}, step {})",
            self.resolution,
            self.bucket_settings.min_side,
            self.bucket_settings.max_side,
            self.bucket_settings.step
        );
        for (bucket, n) in &self.buckets {
            let _ = writeln!(s, "  {bucket:>10}  {n:>6} images");
        }
        let _ = writeln!(
            s,
            "Images per epoch (with repeats): {}; steps per epoch at batch size {}: {}",
            self.images_per_epoch, self.batch_size, self.steps_per_epoch
        );
        if self.problems.is_empty() {
            let _ = writeln!(s, "No problems found.");
        } else {
            let _ = writeln!(s, "Problems ({})", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "  {}: {}", p.path, p.problem);
            }
        }
        if !self.usable {
            let _ = writeln!(
                s,
                "Nothing here can be trained: no readable images were found."
            );
        }
        s
    }
}
