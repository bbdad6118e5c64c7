//! Aspect-ratio buckets as kohya's sd-scripts make them, so a dataset trains the same way here as there.
//!
//! For a base resolution R the buckets are every (w, h) with sides a multiple of `step`, between `min_side` and
//! `max_side`, and w·h ≤ R². An image goes to the bucket whose aspect ratio is nearest its own, is scaled to
//! cover the bucket and centre-cropped.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    pub resolution: u32,
    pub min_side: u32,
    pub max_side: u32,
    pub step: u32,
}

impl BucketConfig {
    /// kohya's defaults scaled to the resolution: sides from R/2 to 2R in steps of 64.
    pub fn for_resolution(resolution: u32) -> Self {
        let resolution = resolution.max(64);
        BucketConfig {
            resolution,
            min_side: resolution / 2,
            max_side: resolution * 2,
            step: 64,
        }
    }

    /// The settings made consistent (step ≥ 8, sides multiples of the step, min ≤ R ≤ max).
    pub fn sanitized(self) -> Self {
        let step = self.step.max(8);
        let round = |v: u32| (v / step).max(1) * step;
        let resolution = round(self.resolution);
        let min_side = round(self.min_side).min(resolution);
        let max_side = round(self.max_side).max(resolution);
        BucketConfig {
            resolution,
            min_side,
            max_side,
            step,
        }
    }

    /// Every bucket (width, height), sorted by aspect ratio.
    pub fn buckets(&self) -> Vec<(u32, u32)> {
        let c = self.sanitized();
        let max_area = u64::from(c.resolution) * u64::from(c.resolution);
        let square = (max_area as f64).sqrt() as u32 / c.step * c.step;
        let mut out = vec![(square, square)];
        let mut w = c.min_side;
        while w <= c.max_side {
            let h = ((max_area / u64::from(w)) as u32 / c.step * c.step).min(c.max_side);
            if h >= c.min_side {
                out.push((w, h));
                out.push((h, w));
            }
            w += c.step;
        }
        out.sort_by(|a, b| aspect(*a).total_cmp(&aspect(*b)));
        out.dedup();
        out
    }
}

fn aspect((w, h): (u32, u32)) -> f64 {
    f64::from(w) / f64::from(h)
}

/// Where an image of `size` goes and how it gets there.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Placement {
    pub bucket: (u32, u32),
    /// Scale applied before cropping; above 1 means the image is upscaled (softer than its bucket).
    pub scale: f64,
}

impl Placement {
    pub fn upscaled(&self) -> bool {
        self.scale > 1.0 + 1e-9
    }
}

/// A bucket list prepared for assigning many images.
pub struct Buckets {
    list: Vec<(u32, u32)>,
}

impl Buckets {
    pub fn new(config: &BucketConfig) -> Self {
        Buckets {
            list: config.buckets(),
        }
    }

    /// One square bucket of `side` (bucketing off: every image is cropped to it).
    pub fn square(side: u32) -> Self {
        Buckets {
            list: vec![(side, side)],
        }
    }

    pub fn list(&self) -> &[(u32, u32)] {
        &self.list
    }

    /// The bucket with the nearest aspect ratio (first one on a tie, as kohya's argmin) and the cover scale.
    pub fn place(&self, (w, h): (u32, u32)) -> Placement {
        let ar = aspect((w.max(1), h.max(1)));
        let bucket = *self
            .list
            .iter()
            .min_by(|a, b| {
                (aspect(**a) - ar)
                    .abs()
                    .total_cmp(&(aspect(**b) - ar).abs())
            })
            .expect("a bucket list is never empty");
        let scale = (f64::from(bucket.0) / f64::from(w.max(1)))
            .max(f64::from(bucket.1) / f64::from(h.max(1)));
        Placement { bucket, scale }
    }
}

/// Steps in one epoch: batches are drawn within one bucket, so each bucket rounds up on its own.
pub fn steps_per_epoch(samples_per_bucket: impl IntoIterator<Item = u64>, batch_size: u32) -> u64 {
    let b = u64::from(batch_size.max(1));
    samples_per_bucket.into_iter().map(|n| n.div_ceil(b)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kohya_bucket_list_for_512() {
        // kohya make_bucket_resolutions((512,512), 256, 1024, 64) yields these 17 buckets.
        let b = BucketConfig {
            resolution: 512,
            min_side: 256,
            max_side: 1024,
            step: 64,
        }
        .buckets();
        assert_eq!(b.len(), 17);
        assert!(b.contains(&(512, 512)));
        assert!(b.contains(&(256, 1024)) && b.contains(&(1024, 256)));
        assert!(b.contains(&(576, 448)) && b.contains(&(448, 576)));
        assert!(
            b.iter()
                .all(|(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0)
        );
    }

    #[test]
    fn places_by_aspect_ratio_and_reports_upscaling() {
        let buckets = Buckets::new(&BucketConfig::for_resolution(512));
        assert_eq!(buckets.place((1024, 1024)).bucket, (512, 512));
        assert!(!buckets.place((1024, 1024)).upscaled());
        let wide = buckets.place((1920, 1080));
        assert_eq!(wide.bucket, (640, 384));
        let tiny = buckets.place((100, 100));
        assert!(tiny.upscaled() && (tiny.scale - 5.12).abs() < 1e-9);
    }

    #[test]
    fn steps_round_up_per_bucket() {
        assert_eq!(steps_per_epoch([3, 5], 2), 2 + 3);
        assert_eq!(steps_per_epoch([3, 5], 1), 8);
    }

    #[test]
    fn sanitizes_nonsense_settings() {
        let c = BucketConfig {
            resolution: 500,
            min_side: 0,
            max_side: 10,
            step: 0,
        }
        .sanitized();
        assert!(
            c.min_side >= c.step
                && c.max_side >= c.resolution
                && c.resolution.is_multiple_of(c.step)
        );
        assert!(!c.buckets().is_empty());
    }
}
