//! Finding the images of a dataset folder and their captions.

use super::caption::Caption;
use super::project::{ProjectFile, Repeats};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Extensions we train on (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// One image of the dataset and its caption.
#[derive(Clone, Debug)]
pub struct ImageEntry {
    pub path: PathBuf,
    /// Path relative to the dataset folder, `/`-separated, for display and reports.
    pub rel: String,
    /// The concept folder the image belongs to (first folder under the dataset, `.` for the dataset itself);
    /// repeats are set per concept folder.
    pub folder: String,
    pub caption_path: PathBuf,
    pub caption: Caption,
}

/// Something the scan could not look at, by path.
#[derive(Clone, Debug, Serialize)]
pub struct ScanProblem {
    pub path: PathBuf,
    pub what: String,
}

/// A concept folder and its repeats.
#[derive(Clone, Debug, Serialize)]
pub struct Folder {
    pub name: String,
    pub repeats: Repeats,
    pub images: usize,
}

/// The result of scanning a dataset folder. Reading images is left to `inspect` (it is the slow part).
#[derive(Clone, Debug)]
pub struct Scan {
    pub root: PathBuf,
    pub project: ProjectFile,
    pub entries: Vec<ImageEntry>,
    pub folders: Vec<Folder>,
    pub problems: Vec<ScanProblem>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0} does not exist. Check the path, or use Browse… to pick the dataset folder.")]
    NotFound(PathBuf),
    #[error(
        "{0} is a file, not a folder. Open the folder that holds your images and their .txt captions."
    )]
    NotAFolder(PathBuf),
    #[error("{0}")]
    Project(String),
    #[error(
        "{}: the folder name asks for {repeats} repeats per epoch; at most {} are allowed. Rename the folder \
         with a smaller number in front (10_name gives 10 repeats).",
        folder.display(),
        super::project::MAX_REPEATS
    )]
    TooManyRepeats { folder: PathBuf, repeats: String },
    #[error("the scan was cancelled")]
    Cancelled,
}

/// Walks `root` recursively (following symlinks, reporting loops), collecting images and reading captions.
/// Hidden files and folders (starting with `.`) are skipped: they hold caches, ours included.
pub fn scan(root: &Path, cancel: &AtomicBool) -> Result<Scan, ScanError> {
    if !root.exists() {
        return Err(ScanError::NotFound(root.to_owned()));
    }
    if !root.is_dir() {
        return Err(ScanError::NotAFolder(root.to_owned()));
    }
    let project = ProjectFile::load(root).map_err(ScanError::Project)?;
    let caption_ext = project.caption_ext();
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for item in walker {
        if cancel.load(Ordering::Relaxed) {
            return Err(ScanError::Cancelled);
        }
        let entry = match item {
            Ok(e) => e,
            Err(err) => {
                problems.push(walk_problem(&err, root));
                continue;
            }
        };
        if !entry.file_type().is_file() || !is_image_path(entry.path()) {
            continue;
        }
        entries.push(image_entry(root, entry.into_path(), &caption_ext));
    }
    let folders = folders_of(root, &project, &entries);
    if let Some(f) = folders
        .iter()
        .find(|f| u64::from(f.repeats.count) > super::project::MAX_REPEATS)
    {
        // The number as the folder name writes it: beyond u32 the count itself saturates.
        let folder = root.join(&f.name);
        let name = folder.file_name().unwrap_or_default().to_string_lossy();
        let repeats = name.split_once('_').map_or(&*name, |(n, _)| n).to_owned();
        return Err(ScanError::TooManyRepeats { folder, repeats });
    }
    Ok(Scan {
        root: root.to_owned(),
        project,
        entries,
        folders,
        problems,
    })
}

fn walk_problem(err: &walkdir::Error, root: &Path) -> ScanProblem {
    let path = err.path().unwrap_or(root).to_owned();
    let what = if let Some(ancestor) = err.loop_ancestor() {
        format!("symlink loop back to {}; skipped", ancestor.display())
    } else if let Some(io) = err.io_error() {
        match io.kind() {
            std::io::ErrorKind::PermissionDenied => "permission denied; skipped".to_owned(),
            _ => format!("cannot read: {io}"),
        }
    } else {
        err.to_string()
    };
    ScanProblem { path, what }
}

fn image_entry(root: &Path, path: PathBuf, caption_ext: &str) -> ImageEntry {
    let rel_path = path.strip_prefix(root).unwrap_or(&path);
    let rel = rel_path.to_string_lossy().replace('\\', "/");
    let folder = match rel_path.components().count() {
        0 | 1 => ".".to_owned(),
        _ => rel_path
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned(),
    };
    let caption_path = caption_path_for(&path, caption_ext);
    let caption = Caption::load(&caption_path);
    ImageEntry {
        path,
        rel,
        folder,
        caption_path,
        caption,
    }
}

/// `photo.JPG` → `photo.txt` (the extension replaced, as kohya does).
pub fn caption_path_for(image: &Path, caption_ext: &str) -> PathBuf {
    let mut name = image.file_stem().unwrap_or_default().to_os_string();
    name.push(caption_ext);
    image.with_file_name(name)
}

fn folders_of(root: &Path, project: &ProjectFile, entries: &[ImageEntry]) -> Vec<Folder> {
    let mut folders: Vec<Folder> = Vec::new();
    for e in entries {
        match folders.iter_mut().find(|f| f.name == e.folder) {
            Some(f) => f.images += 1,
            None => {
                let last = if e.folder == "." {
                    root.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                } else {
                    e.folder.clone()
                };
                let repeats = project.repeats_of(&e.folder, &last);
                folders.push(Folder {
                    name: e.folder.clone(),
                    repeats,
                    images: 1,
                });
            }
        }
    }
    folders.sort_by(|a, b| a.name.cmp(&b.name));
    folders
}

impl Scan {
    pub fn repeats_of(&self, folder: &str) -> u32 {
        self.folders
            .iter()
            .find(|f| f.name == folder)
            .map_or(1, |f| f.repeats.count)
    }

    /// Sets the repeats of a folder without a kohya prefix and saves the project file. Folders named `N_…`
    /// keep their N: the name is the user's, and we do not rename it.
    pub fn set_repeats(&mut self, folder: &str, count: u32) -> Result<(), String> {
        let f = self
            .folders
            .iter_mut()
            .find(|f| f.name == folder)
            .ok_or_else(|| format!("no folder {folder}"))?;
        if f.repeats.from_folder_name {
            return Err(format!(
                "{folder} sets its repeats by its name; rename the folder to change them"
            ));
        }
        f.repeats.count = count.max(1);
        self.project.repeats.insert(folder.to_owned(), count.max(1));
        self.project
            .save(&self.root)
            .map_err(|e| format!("cannot save {}: {e}", super::PROJECT_FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn finds_images_captions_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("10_cat/a.PNG"), b"x");
        touch(&root.join("10_cat/a.txt"), b"a cat");
        touch(&root.join("10_cat/sub/b.jpeg"), b"x");
        touch(&root.join("dogs/c.webp"), b"x");
        touch(&root.join("d.bmp"), b"x");
        touch(&root.join("notes.md"), b"x");
        touch(&root.join(".cache/e.png"), b"x");
        let scan = scan(root, &AtomicBool::new(false)).unwrap();
        let rels: Vec<_> = scan.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(
            rels,
            ["10_cat/a.PNG", "10_cat/sub/b.jpeg", "d.bmp", "dogs/c.webp"]
        );
        assert!(scan.entries[0].caption.is_usable());
        assert_eq!(scan.entries[1].folder, "10_cat");
        assert_eq!(scan.repeats_of("10_cat"), 10);
        assert_eq!(scan.repeats_of("dogs"), 1);
        assert_eq!(scan.repeats_of("."), 1);
    }

    #[test]
    fn repeats_are_stored_in_the_project_file_not_the_folder_name() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("dogs/c.png"), b"x");
        touch(&dir.path().join("5_cats/c.png"), b"x");
        let mut s = scan(dir.path(), &AtomicBool::new(false)).unwrap();
        s.set_repeats("dogs", 3).unwrap();
        assert!(s.set_repeats("5_cats", 2).is_err());
        let again = scan(dir.path(), &AtomicBool::new(false)).unwrap();
        assert_eq!(again.repeats_of("dogs"), 3);
        assert!(dir.path().join("dogs").is_dir());
    }

    #[test]
    fn caption_extension_comes_from_the_project() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a.png"), b"x");
        touch(&dir.path().join("a.caption"), b"tagged");
        touch(
            &dir.path().join(super::super::PROJECT_FILE),
            b"schema = 1\ncaption_extension = \".caption\"\n",
        );
        let s = scan(dir.path(), &AtomicBool::new(false)).unwrap();
        assert_eq!(s.entries[0].caption.text, "tagged");
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_reported_not_followed_forever() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a/x.png"), b"x");
        std::os::unix::fs::symlink(dir.path(), dir.path().join("a/loop")).unwrap();
        let s = scan(dir.path(), &AtomicBool::new(false)).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert!(
            s.problems.iter().any(|p| p.what.contains("loop")),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn explains_a_wrong_path() {
        let err = scan(Path::new("/definitely/not/here"), &AtomicBool::new(false)).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
