//! The dataset: scanning a folder, captions, validation, buckets, import and thumbnails. No GUI types here:
//! the GUI and the CLI both build on this module.

pub mod buckets;
pub mod caption;
pub mod decoded;
pub mod edit;
pub mod import;
pub mod inspect;
pub mod project;
pub mod scan;
pub mod synth;
pub mod thumbs;
pub mod validate;

pub use buckets::{BucketConfig, Buckets};
pub use caption::{Caption, CaptionStatus};
pub use inspect::{ImageError, ImageInfo, PixelMode};
pub use project::{PROJECT_FILE, ProjectFile};
pub use scan::{ImageEntry, Scan, ScanError, scan};
pub use validate::{Inspection, Report};
