//! What the trainer sees of a dataset: each image in its aspect-ratio bucket, repeated, in a shuffled order that
//! depends only on the seed and the epoch (so a resumed run sees the same batches), cropped to its bucket, and its
//! caption varied as configured (tag shuffle keeping the first N, tag dropout, caption dropout). Regularization
//! (prior-preservation) images join the same buckets, as many uses per epoch as the dataset's, as kohya does.

use crate::dataset::buckets::{BucketConfig, Buckets};
use crate::dataset::inspect::{dimensions, open_image};
use crate::dataset::{CaptionStatus, Scan};
use crate::train::config::DatasetConfig;
use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One trainable image.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub path: PathBuf,
    pub caption: String,
    /// Uses per epoch as its folder sets them (a regularization image's uses follow from the dataset's: see
    /// [`DataPlan::uses`]).
    pub repeats: u32,
    /// (width, height) of its bucket.
    pub bucket: (u32, u32),
    /// A regularization image: its loss is weighted by `dataset.prior_loss_weight`.
    pub regularization: bool,
}

/// One use of an image in an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub item: usize,
    pub flip: bool,
}

/// The trainable images of a dataset and how epochs are drawn from them.
#[derive(Clone, Debug)]
pub struct DataPlan {
    /// The dataset's images, then the regularization images (in scan order).
    pub items: Vec<Item>,
    /// Images that cannot be read (path, why): left out, reported once.
    pub skipped: Vec<(PathBuf, String)>,
    /// How much the most upscaled image is enlarged to cover its bucket, and how many are (the dataset
    /// workspace's "too small" check, from the same placement).
    pub upscaled: (usize, f64),
    /// Regularization images left out because an epoch reaches the dataset's uses before them.
    pub regularization_unused: usize,
    batch_size: usize,
    flip: bool,
    seed: u64,
}

impl DataPlan {
    /// Places every readable image of `scan` in its bucket (square at the resolution when bucketing is off).
    pub fn new(scan: &Scan, cfg: &DatasetConfig, batch_size: usize, seed: u64) -> DataPlan {
        let mut plan = DataPlan {
            items: Vec::new(),
            skipped: Vec::new(),
            upscaled: (0, 1.0),
            regularization_unused: 0,
            batch_size: batch_size.max(1),
            flip: cfg.flip,
            seed,
        };
        plan.place(scan, cfg, false);
        plan
    }

    /// Adds the readable images of the regularization folder's `scan`: kohya `N_name` folders give N repeats,
    /// other images `dataset.regularization_repeats`. Those an epoch never reaches are left out and counted.
    pub fn with_regularization(mut self, scan: &Scan, cfg: &DatasetConfig) -> DataPlan {
        self.place(scan, cfg, true);
        let uses = self.uses();
        let before = self.items.len();
        let mut used = uses.iter();
        self.items.retain(|item| {
            let n = used.next().copied().unwrap_or(0);
            n > 0 || !item.regularization
        });
        self.regularization_unused = before - self.items.len();
        self
    }

    fn place(&mut self, scan: &Scan, cfg: &DatasetConfig, regularization: bool) {
        let buckets = if cfg.bucketing {
            Buckets::new(&bucket_config(cfg))
        } else {
            Buckets::square(cfg.resolution)
        };
        for e in &scan.entries {
            let size = match crate::dataset::decoded::broken(&e.path) {
                Some(why) => Err(crate::dataset::ImageError(why)),
                None => dimensions(&e.path),
            };
            let size = match size {
                Ok(size) => size,
                Err(why) => {
                    self.skipped.push((e.path.clone(), why.0));
                    continue;
                }
            };
            let placed = buckets.place(size);
            if placed.upscaled() {
                self.upscaled = (self.upscaled.0 + 1, self.upscaled.1.max(placed.scale));
            }
            let repeats = match scan.folders.iter().find(|f| f.name == e.folder) {
                _ if !regularization => scan.repeats_of(&e.folder),
                Some(f) if f.repeats.from_folder_name => f.repeats.count,
                _ => cfg.regularization_repeats.max(1),
            };
            self.items.push(Item {
                path: e.path.clone(),
                caption: if e.caption.status == CaptionStatus::Ok {
                    e.caption.text.trim().to_owned()
                } else {
                    String::new()
                },
                repeats,
                bucket: placed.bucket,
                regularization,
            });
        }
    }

    /// Uses of each item per epoch: a dataset image its repeats; the regularization images together as many as
    /// the dataset's, filled as kohya's sd-scripts does — in order, each its repeats until the count is reached
    /// (the last one may pass it), then one more use each, round after round.
    pub fn uses(&self) -> Vec<u64> {
        let target: u64 = self
            .items
            .iter()
            .filter(|i| !i.regularization)
            .map(|i| u64::from(i.repeats))
            .sum();
        let reg: Vec<u32> = self
            .items
            .iter()
            .filter(|i| i.regularization)
            .map(|i| i.repeats)
            .collect();
        let mut filled = fill(&reg, target).into_iter();
        self.items
            .iter()
            .map(|i| {
                if i.regularization {
                    filled.next().unwrap_or(0)
                } else {
                    u64::from(i.repeats)
                }
            })
            .collect()
    }

    /// Image uses per epoch: (dataset, regularization).
    pub fn epoch_uses(&self) -> (u64, u64) {
        let mut uses = (0, 0);
        for (item, n) in self.items.iter().zip(self.uses()) {
            if item.regularization {
                uses.1 += n;
            } else {
                uses.0 += n;
            }
        }
        uses
    }

    /// The batches of epoch `epoch`: every image used `uses` times (each use mirrored with probability ½ when
    /// flipping), shuffled, grouped by bucket into batches of at most the batch size, then the batches shuffled.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<Sample>> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut by_bucket: BTreeMap<(u32, u32), Vec<Sample>> = BTreeMap::new();
        for (i, (item, uses)) in self.items.iter().zip(self.uses()).enumerate() {
            for _ in 0..uses {
                let flip = self.flip && rng.random_bool(0.5);
                by_bucket
                    .entry(item.bucket)
                    .or_default()
                    .push(Sample { item: i, flip });
            }
        }
        let mut batches = Vec::new();
        for samples in by_bucket.values_mut() {
            samples.shuffle(&mut rng);
            batches.extend(samples.chunks(self.batch_size).map(<[Sample]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// Image uses per epoch by bucket (regularization images included).
    pub fn bucket_uses(&self) -> BTreeMap<(u32, u32), u64> {
        let mut per_bucket: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (item, n) in self.items.iter().zip(self.uses()) {
            if n > 0 {
                *per_bucket.entry(item.bucket).or_default() += n;
            }
        }
        per_bucket
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.bucket_uses()
            .values()
            .map(|&n| n.div_ceil(self.batch_size as u64) as usize)
            .sum()
    }
}

/// kohya's regularization fill: uses of each image (of `repeats`) that add up to at least `target`.
fn fill(repeats: &[u32], target: u64) -> Vec<u64> {
    let mut uses = vec![0; repeats.len()];
    let mut n = 0;
    for (u, &r) in uses.iter_mut().zip(repeats) {
        if n >= target {
            return uses;
        }
        *u = u64::from(r);
        n += u64::from(r);
    }
    let len = repeats.len() as u64;
    if n < target && len > 0 {
        let (rounds, rest) = ((target - n) / len, (target - n) % len);
        for (i, u) in (0..).zip(uses.iter_mut()) {
            *u += rounds + u64::from(i < rest);
        }
    }
    uses
}

/// The buckets a dataset config trains with (made consistent).
pub fn bucket_config(cfg: &DatasetConfig) -> BucketConfig {
    BucketConfig {
        resolution: cfg.resolution,
        min_side: cfg.min_bucket_side,
        max_side: cfg.max_bucket_side,
        step: cfg.bucket_step,
    }
    .sanitized()
}

/// The image scaled to cover its bucket and centre-cropped to it (kohya's way), optionally mirrored, as a
/// [3, H, W] tensor in [-1, 1].
pub fn load_for_bucket(item: &Item, flip: bool, device: &Device) -> Result<Tensor> {
    let img = open_image(&item.path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", item.path.display())))?;
    let (bw, bh) = item.bucket;
    let scale =
        (f64::from(bw) / f64::from(img.width())).max(f64::from(bh) / f64::from(img.height()));
    let (sw, sh) = (
        ((f64::from(img.width()) * scale).round() as u32).max(bw),
        ((f64::from(img.height()) * scale).round() as u32).max(bh),
    );
    let resized = img.resize_exact(sw, sh, image::imageops::FilterType::Lanczos3);
    let mut cropped = resized
        .crop_imm((sw - bw) / 2, (sh - bh) / 2, bw, bh)
        .to_rgb8();
    if flip {
        image::imageops::flip_horizontal_in_place(&mut cropped);
    }
    let data: Vec<f32> = cropped
        .into_raw()
        .into_iter()
        .map(|v| f32::from(v) / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(data, (bh as usize, bw as usize, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()
}

/// How a caption is varied each time it is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CaptionOptions {
    pub shuffle: bool,
    /// Tags at the front that keep their place and are never dropped (the trigger word).
    pub keep_tokens: usize,
    pub tag_dropout: f64,
    pub caption_dropout: f64,
}

impl From<&DatasetConfig> for CaptionOptions {
    fn from(c: &DatasetConfig) -> Self {
        CaptionOptions {
            shuffle: c.shuffle_caption,
            keep_tokens: c.keep_tokens as usize,
            tag_dropout: c.tag_dropout,
            caption_dropout: c.caption_dropout,
        }
    }
}

/// The caption as the text encoder gets it this time.
pub fn vary_caption(caption: &str, o: CaptionOptions, rng: &mut impl Rng) -> String {
    if o.caption_dropout > 0.0 && rng.random_bool(o.caption_dropout.min(1.0)) {
        return String::new();
    }
    if !o.shuffle && o.tag_dropout <= 0.0 {
        return caption.to_owned();
    }
    let tags: Vec<&str> = crate::dataset::caption::split_tags(caption).collect();
    let (kept, rest) = tags.split_at(o.keep_tokens.min(tags.len()));
    let mut rest: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|_| o.tag_dropout <= 0.0 || !rng.random_bool(o.tag_dropout.min(1.0)))
        .collect();
    if o.shuffle {
        rest.shuffle(rng);
    }
    kept.iter()
        .chain(&rest)
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn dataset(dir: &std::path::Path) -> Scan {
        let write = |rel: &str, w: u32, h: u32| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            image::RgbImage::from_fn(w, h, |x, _| image::Rgb([(x % 256) as u8, 0, 0]))
                .save(&p)
                .unwrap();
            std::fs::write(p.with_extension("txt"), format!("{rel}, tag")).unwrap();
        };
        write("3_a/wide.png", 640, 512);
        write("3_a/tall.png", 512, 640);
        write("3_a/square.png", 512, 512);
        write("b/wide2.png", 700, 560);
        std::fs::write(dir.join("b/broken.png"), b"no").unwrap();
        crate::dataset::scan(dir, &AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn images_the_dataset_checks_could_not_decode_are_left_out_and_small_ones_counted() {
        let dir = tempfile::tempdir().unwrap();
        let scan = dataset(dir.path());
        // A truncated PNG: its header reads, its pixels do not.
        let whole = std::fs::read(dir.path().join("3_a/square.png")).unwrap();
        std::fs::write(dir.path().join("b/cut.png"), &whole[..whole.len() / 2]).unwrap();
        let scan = crate::dataset::scan(dir.path(), &AtomicBool::new(false)).unwrap_or(scan);
        let cfg = DatasetConfig::default();
        assert_eq!(DataPlan::new(&scan, &cfg, 1, 0).items.len(), 5);
        let paths: Vec<_> = scan.entries.iter().map(|e| e.path.clone()).collect();
        crate::dataset::validate::inspect_all(&paths, 1, &AtomicBool::new(false), &|_, _| {});
        let plan = DataPlan::new(&scan, &cfg, 1, 0);
        assert_eq!(
            plan.items.len(),
            4,
            "as many as the dataset checks found readable"
        );
        assert_eq!(plan.skipped.len(), 2);
        let low = DatasetConfig {
            resolution: 1024,
            min_bucket_side: 512,
            max_bucket_side: 2048,
            ..Default::default()
        };
        assert_eq!(
            DataPlan::new(&scan, &low, 1, 0).upscaled.0,
            4,
            "every image is below 1024 px"
        );
    }

    #[test]
    fn epochs_repeat_and_batch_within_buckets_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let scan = dataset(dir.path());
        let cfg = DatasetConfig {
            flip: true,
            ..Default::default()
        };
        let plan = DataPlan::new(&scan, &cfg, 2, 7);
        assert_eq!(plan.items.len(), 4);
        assert_eq!(plan.skipped.len(), 1);
        let e0 = plan.epoch(0);
        assert_eq!(e0.len(), plan.steps_per_epoch());
        let mut uses = vec![0; 4];
        for batch in &e0 {
            assert!(batch.len() <= 2);
            assert!(
                batch
                    .iter()
                    .all(|s| plan.items[s.item].bucket == plan.items[batch[0].item].bucket)
            );
            batch.iter().for_each(|s| uses[s.item] += 1);
        }
        let repeats: Vec<usize> = plan.items.iter().map(|i| i.repeats as usize).collect();
        assert_eq!(uses, repeats);
        assert_eq!(plan.epoch(0), e0, "same seed and epoch, same batches");
        assert_ne!(plan.epoch(1), e0);
        // The dataset workspace's report counts the same steps per epoch.
        let inspections: Vec<_> = scan
            .entries
            .iter()
            .map(|e| Some(crate::dataset::inspect::inspect(&e.path)))
            .collect();
        let report = crate::dataset::Report::build(&scan, &inspections, &bucket_config(&cfg), 2);
        assert_eq!(report.steps_per_epoch as usize, plan.steps_per_epoch());
    }

    /// Square regularization images: `2_woman` (three, kohya repeats 2) and `other` (one, the configured repeats).
    fn regularization(dir: &std::path::Path) -> Scan {
        for (rel, n) in [
            ("2_woman/r0.png", 0),
            ("2_woman/r1.png", 1),
            ("2_woman/r2.png", 2),
        ]
        .into_iter()
        .chain([("other/r3.png", 3)])
        {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            image::RgbImage::from_fn(512, 512, |x, _| image::Rgb([n, (x % 256) as u8, 0]))
                .save(&p)
                .unwrap();
            std::fs::write(p.with_extension("txt"), "a woman").unwrap();
        }
        crate::dataset::scan(dir, &AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn regularization_images_fill_an_epoch_with_as_many_uses_as_the_dataset() {
        let (data, reg) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cfg = DatasetConfig::default();
        let plan = DataPlan::new(&dataset(data.path()), &cfg, 2, 7)
            .with_regularization(&regularization(reg.path()), &cfg);
        let names = |flag: bool| -> Vec<String> {
            (plan.items.iter().filter(|i| i.regularization == flag))
                .map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(true), ["r0.png", "r1.png", "r2.png", "r3.png"]);
        assert_eq!(names(false).len(), 4);
        assert_eq!(plan.items[4].repeats, 2, "the kohya folder's repeats");
        assert_eq!(plan.items[7].repeats, 1, "regularization_repeats");
        // The dataset: 3 images × 3 repeats + 1 = 10 uses. The first pass gives 2 + 2 + 2 + 1 = 7; then one more
        // use each from the first image on until 10.
        assert_eq!(plan.uses()[4..], [3, 3, 3, 1]);
        assert_eq!(plan.epoch_uses(), (10, 10));
        let e0 = plan.epoch(0);
        let mut uses = vec![0u64; plan.items.len()];
        let mut mixed = false;
        for batch in &e0 {
            let bucket = plan.items[batch[0].item].bucket;
            assert!(batch.iter().all(|s| plan.items[s.item].bucket == bucket));
            let reg = batch
                .iter()
                .filter(|s| plan.items[s.item].regularization)
                .count();
            mixed |= reg > 0 && reg < batch.len();
            batch.iter().for_each(|s| uses[s.item] += 1);
        }
        assert_eq!(uses, plan.uses(), "each image as often as planned");
        assert!(mixed, "regularization and dataset samples share batches");
        assert_eq!(e0.len(), plan.steps_per_epoch());
        assert!(
            plan.steps_per_epoch()
                > DataPlan::new(&dataset(data.path()), &cfg, 2, 7).steps_per_epoch()
        );
        assert_eq!(plan.epoch(0), e0, "same seed and epoch, same batches");
        assert_ne!(plan.epoch(1), e0);
        let other_seed = DataPlan::new(&dataset(data.path()), &cfg, 2, 8)
            .with_regularization(&regularization(reg.path()), &cfg);
        assert_ne!(other_seed.epoch(0), e0);
    }

    #[test]
    fn regularization_uses_follow_kohya_and_unreached_images_are_left_out() {
        assert_eq!(fill(&[1, 1, 1], 7), [3, 2, 2], "cycling, one use per round");
        assert_eq!(
            fill(&[4, 4, 4], 10),
            [4, 4, 4],
            "the first pass may pass the count"
        );
        assert_eq!(
            fill(&[2, 2, 2, 2], 3),
            [2, 2, 0, 0],
            "images after the count are not used"
        );
        assert_eq!(fill(&[], 5), Vec::<u64>::new());
        assert_eq!(fill(&[3], 0), [0]);
        // One dataset image, repeats 1: only the first regularization image is used.
        let (data, reg) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let p = data.path().join("only.png");
        image::RgbImage::new(512, 512).save(&p).unwrap();
        let scan = crate::dataset::scan(data.path(), &AtomicBool::new(false)).unwrap();
        let cfg = DatasetConfig {
            regularization_repeats: 5,
            ..Default::default()
        };
        let plan =
            DataPlan::new(&scan, &cfg, 1, 0).with_regularization(&regularization(reg.path()), &cfg);
        assert_eq!(plan.items.len(), 2);
        assert!(plan.items[1].path.ends_with("2_woman/r0.png"));
        assert_eq!(plan.regularization_unused, 3);
        assert_eq!(
            plan.epoch_uses(),
            (1, 2),
            "kohya's first pass keeps the image's own repeats"
        );
        assert_eq!(plan.steps_per_epoch(), 3);
    }

    #[test]
    fn images_are_cropped_to_their_bucket_and_flipped() {
        let dir = tempfile::tempdir().unwrap();
        let scan = dataset(dir.path());
        let plan = DataPlan::new(&scan, &DatasetConfig::default(), 1, 1);
        let wide = plan
            .items
            .iter()
            .find(|i| i.path.ends_with("wide.png"))
            .unwrap();
        assert_eq!(wide.bucket, (576, 448));
        let t = load_for_bucket(wide, false, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 448, 576]);
        let (lo, hi) = (
            t.min_all().unwrap().to_scalar::<f32>().unwrap(),
            t.max_all().unwrap().to_scalar::<f32>().unwrap(),
        );
        assert!(lo >= -1.0 && hi <= 1.0);
        let f = load_for_bucket(wide, true, &Device::Cpu).unwrap();
        let first_col = t.narrow(2, 0, 1).unwrap();
        let last_col_flipped = f.narrow(2, 575, 1).unwrap();
        let diff = (first_col - last_col_flipped)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn captions_keep_the_trigger_and_vary_the_rest() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let o = CaptionOptions {
            shuffle: true,
            keep_tokens: 1,
            tag_dropout: 0.0,
            caption_dropout: 0.0,
        };
        let text = "ohwx, a, b, c, d, e";
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let v = vary_caption(text, o, &mut rng);
            assert!(v.starts_with("ohwx, "));
            let mut tags: Vec<&str> = v.split(", ").collect();
            tags.sort_unstable();
            assert_eq!(tags, ["a", "b", "c", "d", "e", "ohwx"]);
            seen.insert(v);
        }
        assert!(seen.len() > 1, "the order varies");
        let all_dropped = CaptionOptions {
            caption_dropout: 1.0,
            ..o
        };
        assert_eq!(vary_caption(text, all_dropped, &mut rng), "");
        let tags_dropped = CaptionOptions {
            shuffle: false,
            tag_dropout: 1.0,
            ..o
        };
        assert_eq!(vary_caption(text, tags_dropped, &mut rng), "ohwx");
        let plain = CaptionOptions {
            shuffle: false,
            keep_tokens: 0,
            tag_dropout: 0.0,
            caption_dropout: 0.0,
        };
        assert_eq!(
            vary_caption("a photo of a cat", plain, &mut rng),
            "a photo of a cat"
        );
    }
}
