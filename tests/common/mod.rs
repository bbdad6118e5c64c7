//! Fixture datasets written by the tests themselves: real image files, each kind of problem once.
#![allow(dead_code)]

pub mod cli;
pub mod engine;
pub mod gui;
pub mod sd_tiny;

use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use lora_studio::dataset::synth::{Rng, picture};
use std::path::{Path, PathBuf};

pub fn write_png(path: &Path, w: u32, h: u32, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    picture(w, h, &mut Rng::new(seed))
        .save_with_format(path, ImageFormat::Png)
        .unwrap();
}

pub fn write_jpeg(path: &Path, w: u32, h: u32, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    picture(w, h, &mut Rng::new(seed))
        .save_with_format(path, ImageFormat::Jpeg)
        .unwrap();
}

/// A JPEG with an EXIF APP1 segment whose orientation tag says "rotate 90° clockwise" (6).
pub fn write_exif_rotated_jpeg(path: &Path, w: u32, h: u32) {
    let mut bytes = Vec::new();
    picture(w, h, &mut Rng::new(7))
        .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Jpeg)
        .unwrap();
    // TIFF header (big endian), one IFD entry: tag 0x0112 Orientation, type SHORT, count 1, value 6.
    let tiff: [u8; 26] = [
        b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0,
    ];
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = bytes[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&bytes[2..]);
    std::fs::write(path, out).unwrap();
}

pub fn caption(image: &Path, bytes: &[u8]) {
    std::fs::write(image.with_extension("txt"), bytes).unwrap();
}

/// Paths of the interesting files of `bad_dataset`, relative to its root.
pub struct Bad {
    pub root: PathBuf,
}

impl Bad {
    pub fn path(&self, rel: &str) -> String {
        self.root.join(rel).to_string_lossy().into_owned()
    }
}

/// A dataset with one of every problem, and good images beside them (sizes chosen for 512 px buckets).
pub fn bad_dataset(root: &Path) -> Bad {
    let good = root.join("10_subject");
    for i in 0..4 {
        let p = good.join(format!("good{i}.png"));
        write_png(&p, 640, 512, i);
        caption(&p, format!("ohwx, photo {i}, red").as_bytes());
    }
    let missing = root.join("10_subject/no_caption.jpg");
    write_jpeg(&missing, 512, 640, 11);
    let empty = root.join("style/empty_caption.png");
    write_png(&empty, 512, 512, 12);
    caption(&empty, b"  \n");
    let latin1 = root.join("style/latin1.png");
    write_png(&latin1, 512, 512, 13);
    caption(&latin1, b"caf\xE9, blue");
    let corrupt = root.join("style/corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n this is not really a png").unwrap();
    let zero = root.join("style/zero.jpg");
    std::fs::write(&zero, b"").unwrap();
    let not_image = root.join("style/notes.webp");
    std::fs::write(&not_image, b"just some text pretending to be webp").unwrap();
    let trunc_src = root.join("style/whole.png");
    write_png(&trunc_src, 512, 512, 14);
    let bytes = std::fs::read(&trunc_src).unwrap();
    std::fs::remove_file(&trunc_src).unwrap();
    std::fs::write(root.join("style/truncated.png"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::copy(good.join("good0.png"), root.join("style/dup_of_good0.png")).unwrap();
    let small = root.join("style/small.png");
    write_png(&small, 100, 80, 15);
    caption(&small, b"tiny");
    let mut rgba = RgbaImage::from_pixel(512, 512, Rgba([10, 20, 30, 255]));
    rgba.put_pixel(5, 5, Rgba([0, 0, 0, 0]));
    DynamicImage::ImageRgba8(rgba)
        .save(root.join("style/alpha.png"))
        .unwrap();
    caption(&root.join("style/alpha.png"), b"alpha");
    DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
        512,
        512,
        image::Rgb([1000u16, 2000, 3000]),
    ))
    .save(root.join("style/deep.png"))
    .unwrap();
    caption(&root.join("style/deep.png"), b"deep");
    write_exif_rotated_jpeg(&root.join("style/rotated.jpg"), 640, 512);
    caption(&root.join("style/rotated.jpg"), b"rotated");
    Bad {
        root: root.to_owned(),
    }
}
