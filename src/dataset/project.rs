//! The dataset's project file (`lora-studio.toml` in the dataset folder) and how repeats are decided.
//!
//! kohya encodes repeats in folder names (`10_cat`). We read that convention but never require it and never
//! rename a user's folder: repeats for other folders live in the project file.

use crate::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const PROJECT_FILE: &str = "lora-studio.toml";
/// The most repeats a folder may have: enough for a handful of images among thousands, and small enough that
/// an epoch (every image `repeats` times) stays a list in memory.
pub const MAX_REPEATS: u64 = 10_000;
const SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub schema: u32,
    /// Extension of caption sidecar files, with the dot (`.txt`, `.caption`).
    pub caption_extension: String,
    /// Repeats for folders without a kohya `N_` prefix, by folder path relative to the dataset (`.` = the
    /// dataset folder itself).
    #[serde(default)]
    pub repeats: BTreeMap<String, u32>,
}

impl Default for ProjectFile {
    fn default() -> Self {
        ProjectFile {
            schema: SCHEMA,
            caption_extension: ".txt".into(),
            repeats: BTreeMap::new(),
        }
    }
}

impl ProjectFile {
    /// Reads the project file of `root`; a folder without one gets the defaults.
    pub fn load(root: &Path) -> Result<Self, String> {
        let path = root.join(PROJECT_FILE);
        let text = match crate::fsutil::admit::read_text(&path, crate::fsutil::admit::TOML) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let file: ProjectFile = toml::from_str(&text).map_err(|e| {
            format!(
                "{} is not a valid project file: {e}\nFix or delete the file to use the defaults.",
                path.display()
            )
        })?;
        if let Some((folder, n)) = file
            .repeats
            .iter()
            .find(|(_, n)| !(1..=MAX_REPEATS).contains(&u64::from(**n)))
        {
            return Err(format!(
                "{}: `repeats` of folder \"{folder}\" is {n}; it must be from 1 to {MAX_REPEATS}. Fix the \
                 number in the file (or delete the line for 1 repeat).",
                path.display()
            ));
        }
        if file.schema > SCHEMA {
            return Err(format!(
                "{} was written by a newer lora-studio (schema {}); update the app to open it.",
                path.display(),
                file.schema
            ));
        }
        Ok(file)
    }

    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).expect("project file serializes");
        write_atomic(&root.join(PROJECT_FILE), text.as_bytes())
    }

    /// The normalized caption extension: leading dot, never empty.
    pub fn caption_ext(&self) -> String {
        normalize_ext(&self.caption_extension)
    }

    /// Repeats of a concept folder (relative path, `.` for the root) whose last component is `folder_name`.
    pub fn repeats_of(&self, folder: &str, folder_name: &str) -> Repeats {
        match kohya_repeats(folder_name) {
            Some(n) => Repeats {
                count: u32::try_from(n).unwrap_or(u32::MAX),
                from_folder_name: true,
            },
            None => Repeats {
                count: self.repeats.get(folder).copied().unwrap_or(1).max(1),
                from_folder_name: false,
            },
        }
    }
}

/// How many times a folder's images are seen per epoch, and where that number came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Repeats {
    pub count: u32,
    /// True when the folder name (`10_cat`) sets it; false when it comes from the project file or the default 1.
    pub from_folder_name: bool,
}

/// `10_cat` → 10. Folders like `2024_photos` are dates, not repeats, to kohya too: it takes any number, and so
/// do we — but only when a name follows the underscore. Numbers too long for a u64 read as `u64::MAX`, so that
/// the repeats limit refuses them rather than the name being taken for a plain folder.
pub fn kohya_repeats(folder_name: &str) -> Option<u64> {
    let (num, rest) = folder_name.split_once('_')?;
    if rest.is_empty() || num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(num.parse().unwrap_or(u64::MAX)).filter(|n| *n > 0)
}

pub fn normalize_ext(ext: &str) -> String {
    let ext = ext.trim().trim_start_matches('.');
    if ext.is_empty() {
        ".txt".into()
    } else {
        format!(".{ext}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kohya_prefixes() {
        assert_eq!(kohya_repeats("10_cat"), Some(10));
        assert_eq!(kohya_repeats("3_my_dog"), Some(3));
        assert_eq!(kohya_repeats("cat"), None);
        assert_eq!(kohya_repeats("10_"), None);
        assert_eq!(kohya_repeats("x10_cat"), None);
        assert_eq!(kohya_repeats("0_cat"), None);
    }

    #[test]
    fn round_trips_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ProjectFile::default();
        p.repeats.insert("cats".into(), 4);
        p.caption_extension = "caption".into();
        p.save(dir.path()).unwrap();
        let back = ProjectFile::load(dir.path()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.caption_ext(), ".caption");
        assert_eq!(
            back.repeats_of("cats", "cats"),
            Repeats {
                count: 4,
                from_folder_name: false
            }
        );
        assert_eq!(
            back.repeats_of("5_dogs", "5_dogs"),
            Repeats {
                count: 5,
                from_folder_name: true
            }
        );
        std::fs::write(
            dir.path().join(PROJECT_FILE),
            "schema = 1\ncaption_extension = '.txt'\nrepeat = 3\n",
        )
        .unwrap();
        let err = ProjectFile::load(dir.path()).unwrap_err();
        assert!(err.contains("repeat"), "{err}");
    }
}
