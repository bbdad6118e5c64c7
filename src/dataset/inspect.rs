//! Reading images: decoding with EXIF rotation honoured, memory limits, and the facts validation needs.

use crate::fsutil::admit;
use image::{
    DynamicImage, ExtendedColorType, ImageDecoder, ImageReader, Limits, metadata::Orientation,
};
use serde::Serialize;
use std::io::Cursor;
use std::path::Path;

/// The largest decoded image we accept (bytes). A 12000×12000 RGBA photo is 576 MB and still opens.
const MAX_DECODED_BYTES: u64 = 2 << 30;
/// The longest side we decode. Checked from the header before any pixel buffer exists: not every decoder
/// reserves `max_alloc` before allocating, and a 1 KB JPEG may declare 65500×65500.
const MAX_SIDE: u32 = 16384;

/// The pixel layout an image file stores, as far as training cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelMode {
    Rgb,
    Gray,
    /// More than 8 bits per channel (16-bit PNG, float): converted to 8-bit for training.
    HighBitDepth,
    /// A CMYK JPEG: converted to RGB, colours may shift.
    Cmyk,
    /// Palette or sub-byte formats the decoder expands.
    Other,
}

impl PixelMode {
    pub fn is_odd(self) -> bool {
        matches!(
            self,
            PixelMode::HighBitDepth | PixelMode::Cmyk | PixelMode::Other
        )
    }
}

/// What validation learns from one decoded image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageInfo {
    /// Size after EXIF rotation: the size training sees.
    pub width: u32,
    pub height: u32,
    pub mode: PixelMode,
    /// An alpha channel with at least one pixel that is not fully opaque.
    pub transparent: bool,
    /// The EXIF orientation tag asks for a rotation or flip (which we apply).
    pub exif_rotated: bool,
    /// blake3 of the file's bytes, hex; equal hashes are exact duplicates.
    pub hash: String,
    pub file_size: u64,
}

/// Why an image cannot be used, in words for a person.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_alloc = Some(MAX_DECODED_BYTES);
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l
}

fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    let bytes = admit::read_bounded(path, admit::IMAGE).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            ImageError("permission denied: the file cannot be read".into())
        }
        _ => ImageError(format!("cannot read the file: {e}")),
    })?;
    if bytes.is_empty() {
        return Err(ImageError("the file is empty (0 bytes)".into()));
    }
    Ok(bytes)
}

/// Decodes `bytes` (format sniffed from the content, not the extension) and applies the EXIF orientation.
fn decode(bytes: &[u8]) -> Result<(DynamicImage, ExtendedColorType, Orientation), ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError(format!("cannot read the file: {e}")))?;
    if reader.format().is_none() {
        return Err(ImageError(
            "not an image: the content is no PNG, JPEG, WebP or BMP".into(),
        ));
    }
    reader.limits(limits());
    let mut decoder = reader.into_decoder().map_err(describe)?;
    let original = decoder.original_color_type();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(describe)?;
    img.apply_orientation(orientation);
    Ok((img, original, orientation))
}

fn describe(e: image::ImageError) -> ImageError {
    use image::ImageError as E;
    ImageError(match e {
        E::Limits(_) => format!(
            "the image is too large to decode (a side above {MAX_SIDE} px or more than {} MB of pixels); \
             resize it below about 8000×8000",
            MAX_DECODED_BYTES >> 20
        ),
        E::Unsupported(u) => format!("unsupported image: {u}"),
        E::Decoding(d) => format!("corrupt or truncated image: {d}"),
        other => format!("cannot decode: {other}"),
    })
}

/// Width and height as training sees them (EXIF rotation applied), read from the header without decoding.
pub fn dimensions(path: &Path) -> Result<(u32, u32), ImageError> {
    let reader = admit::open_regular(path, admit::IMAGE)
        .and_then(|f| ImageReader::new(std::io::BufReader::new(f)).with_guessed_format())
        .map_err(|e| ImageError(format!("cannot read the file: {e}")))?;
    let mut reader = reader;
    reader.limits(limits());
    let mut decoder = reader.into_decoder().map_err(describe)?;
    let (w, h) = decoder.dimensions();
    let swapped = matches!(
        decoder.orientation().unwrap_or(Orientation::NoTransforms),
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    Ok(if swapped { (h, w) } else { (w, h) })
}

/// Opens an image for use (thumbnails, previews, training), EXIF rotation applied.
pub fn open_image(path: &Path) -> Result<DynamicImage, ImageError> {
    let bytes = read_file(path)?;
    decode(&bytes).map(|(img, _, _)| img)
}

/// Decodes an image fully (a truncated file fails here, not during training) and reports what validation needs.
pub fn inspect(path: &Path) -> Result<ImageInfo, ImageError> {
    let bytes = read_file(path)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let (img, original, orientation) = decode(&bytes)?;
    let mode = if jpeg_is_cmyk(&bytes) {
        PixelMode::Cmyk
    } else {
        pixel_mode(original)
    };
    Ok(ImageInfo {
        width: img.width(),
        height: img.height(),
        mode,
        transparent: has_transparency(&img),
        exif_rotated: orientation != Orientation::NoTransforms,
        hash,
        file_size: bytes.len() as u64,
    })
}

fn pixel_mode(c: ExtendedColorType) -> PixelMode {
    use ExtendedColorType as C;
    match c {
        C::Rgb8 | C::Rgba8 | C::Bgr8 | C::Bgra8 => PixelMode::Rgb,
        C::L8 | C::La8 => PixelMode::Gray,
        C::L16 | C::La16 | C::Rgb16 | C::Rgba16 | C::Rgb32F | C::Rgba32F => PixelMode::HighBitDepth,
        C::Cmyk8 | C::Cmyk16 => PixelMode::Cmyk,
        _ => PixelMode::Other,
    }
}

fn has_transparency(img: &DynamicImage) -> bool {
    if !img.color().has_alpha() {
        return false;
    }
    match img {
        DynamicImage::ImageRgba8(b) => b.pixels().any(|p| p.0[3] != u8::MAX),
        DynamicImage::ImageLumaA8(b) => b.pixels().any(|p| p.0[1] != u8::MAX),
        other => other.to_rgba8().pixels().any(|p| p.0[3] != u8::MAX),
    }
}

/// A JPEG's frame header (SOF) names its component count; 4 means CMYK/YCCK, which decoders convert silently.
fn jpeg_is_cmyk(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            return bytes.get(i + 9) == Some(&4);
        }
        if marker == 0xDA {
            return false;
        }
        i += 2 + len;
    }
    false
}

/// A small RGBA thumbnail whose longer side is `max_side`, EXIF rotation applied.
pub fn thumbnail(path: &Path, max_side: u32) -> Result<image::RgbaImage, ImageError> {
    let img = open_image(path)?;
    Ok(img.thumbnail(max_side, max_side).to_rgba8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgba, RgbaImage};

    fn png(dir: &Path, name: &str, img: DynamicImage) -> std::path::PathBuf {
        let p = dir.join(name);
        img.save_with_format(&p, ImageFormat::Png).unwrap();
        p
    }

    #[test]
    fn reports_size_mode_alpha_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let opaque = png(
            dir.path(),
            "a.png",
            DynamicImage::ImageRgb8(image::RgbImage::new(40, 30)),
        );
        let info = inspect(&opaque).unwrap();
        assert_eq!(
            (info.width, info.height, info.mode, info.transparent),
            (40, 30, PixelMode::Rgb, false)
        );
        let mut rgba = RgbaImage::from_pixel(8, 8, Rgba([1, 2, 3, 255]));
        rgba.put_pixel(0, 0, Rgba([0, 0, 0, 0]));
        assert!(
            inspect(&png(dir.path(), "b.png", DynamicImage::ImageRgba8(rgba)))
                .unwrap()
                .transparent
        );
        let deep = png(
            dir.path(),
            "c.png",
            DynamicImage::ImageRgb16(image::ImageBuffer::new(4, 4)),
        );
        assert_eq!(inspect(&deep).unwrap().mode, PixelMode::HighBitDepth);
        let copy = dir.path().join("d.png");
        std::fs::copy(&opaque, &copy).unwrap();
        assert_eq!(inspect(&copy).unwrap().hash, info.hash);
    }

    #[test]
    fn explains_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("e.png");
        std::fs::write(&empty, b"").unwrap();
        assert!(inspect(&empty).unwrap_err().0.contains("empty"));
        let text = dir.path().join("t.jpg");
        std::fs::write(&text, b"hello, I am not a picture").unwrap();
        assert!(inspect(&text).unwrap_err().0.contains("not an image"));
        let good = png(
            dir.path(),
            "g.png",
            DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)),
        );
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(inspect(&cut).is_err());
    }

    #[test]
    fn detects_cmyk_jpeg_header() {
        // SOI, then a SOF0 segment: len 17, precision 8, height 1, width 1, 4 components.
        let bytes = [
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x01, 0x00, 0x01, 0x04,
        ];
        assert!(jpeg_is_cmyk(&bytes));
        let rgb = [
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x01, 0x00, 0x01, 0x03,
        ];
        assert!(!jpeg_is_cmyk(&rgb));
    }
}
