//! Synthetic datasets of real image files, for the dataset benchmark and for tests: deterministic from a seed.

use image::{ImageFormat, Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// A tiny deterministic generator (xorshift64*); we need repeatable files, not statistical quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

const TAGS: [&str; 12] = [
    "red", "blue", "circle", "square", "outdoors", "indoors", "smile", "night", "day", "portrait",
    "close-up", "wide",
];

/// A picture with a gradient background and a few coloured rectangles.
pub fn picture(width: u32, height: u32, rng: &mut Rng) -> RgbImage {
    let base = [
        rng.below(256) as u8,
        rng.below(256) as u8,
        rng.below(256) as u8,
    ];
    let mut img = RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            base[0].wrapping_add((x * 255 / width.max(1)) as u8 / 2),
            base[1].wrapping_add((y * 255 / height.max(1)) as u8 / 2),
            base[2],
        ])
    });
    for _ in 0..3 {
        let (w, h) = (
            1 + rng.below(u64::from(width / 2)) as u32,
            1 + rng.below(u64::from(height / 2)) as u32,
        );
        let (x0, y0) = (
            rng.below(u64::from(width - w + 1)) as u32,
            rng.below(u64::from(height - h + 1)) as u32,
        );
        let c = Rgb([
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ]);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                img.put_pixel(x, y, c);
            }
        }
    }
    img
}

/// Writes `count` captioned images (mostly JPEG, every fifth PNG) with sides up to `max_side` into `dir`,
/// spread over kohya-style folders, using `threads` threads. Returns the image paths.
pub fn write_dataset(
    dir: &Path,
    count: usize,
    max_side: u32,
    seed: u64,
    threads: usize,
) -> std::io::Result<Vec<PathBuf>> {
    for folder in ["10_subject", "3_style", "extra"] {
        std::fs::create_dir_all(dir.join(folder))?;
    }
    let paths: Vec<PathBuf> = (0..count)
        .map(|i| {
            let folder = ["10_subject", "3_style", "extra"][i % 3];
            let ext = if i % 5 == 0 { "png" } else { "jpg" };
            dir.join(folder).join(format!("img_{i:05}.{ext}"))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = paths.get(i) else {
                            return Ok(());
                        };
                        write_one(path, max_side, seed ^ i as u64)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("generator thread"))
    })?;
    Ok(paths)
}

fn write_one(path: &Path, max_side: u32, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng::new(seed);
    let long = max_side / 2 + rng.below(u64::from(max_side / 2 + 1)) as u32;
    let short = long * (9 + rng.below(8) as u32) / 16;
    let (w, h) = if rng.below(2) == 0 {
        (long, short)
    } else {
        (short, long)
    };
    let img = picture(w.max(8), h.max(8), &mut rng);
    let format = if path.extension().is_some_and(|e| e == "png") {
        ImageFormat::Png
    } else {
        ImageFormat::Jpeg
    };
    img.save_with_format(path, format)
        .map_err(std::io::Error::other)?;
    let mut tags: Vec<&str> = Vec::new();
    while tags.len() < 3 {
        let tag = TAGS[rng.below(TAGS.len() as u64) as usize];
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    std::fs::write(path.with_extension("txt"), tags.join(", "))
}
