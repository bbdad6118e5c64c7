//! What whole decodes found out about image files, shared by everything in this process that reads the same
//! dataset: the dataset checks decode every image, and the training plan, which reads only headers, then
//! leaves out the same unreadable images instead of counting them (a truncated PNG has a valid header).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

/// A file as it is now: a replaced or edited image is a new one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileId {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileId {
            path: path.to_owned(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

static BROKEN: LazyLock<Mutex<HashMap<FileId, String>>> = LazyLock::new(Mutex::default);

/// Records what decoding `path` gave.
pub fn note<T, E: std::fmt::Display>(path: &Path, result: &Result<T, E>) {
    let Some(id) = FileId::of(path) else { return };
    let mut broken = BROKEN.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(_) => broken.remove(&id),
        Err(e) => broken.insert(id, e.to_string()),
    };
}

/// Why the file at `path`, as it is now, could not be decoded, if a decode in this process failed.
pub fn broken(path: &Path) -> Option<String> {
    let id = FileId::of(path)?;
    let broken = BROKEN.lock().unwrap_or_else(|e| e.into_inner());
    broken.get(&id).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_decode_is_known_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        std::fs::write(&p, b"not a png at all").unwrap();
        assert_eq!(broken(&p), None);
        note::<(), _>(&p, &Err("truncated"));
        assert_eq!(broken(&p).as_deref(), Some("truncated"));
        std::fs::write(&p, b"a longer, different file").unwrap();
        assert_eq!(broken(&p), None, "a changed file is judged again");
    }
}
