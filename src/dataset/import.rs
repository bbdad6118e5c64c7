//! Copying images (with their captions) into a dataset: exact duplicates skipped, nothing overwritten.

use super::scan::{caption_path_for, is_image_path};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What an import did, by path.
#[derive(Debug, Default)]
pub struct ImportSummary {
    pub copied: Vec<PathBuf>,
    /// Sources whose content already is in the dataset (or earlier in this import).
    pub duplicates: Vec<PathBuf>,
    /// (source, new name) for files copied under another name because a different file had theirs.
    pub renamed: Vec<(PathBuf, PathBuf)>,
    pub captions: usize,
    pub failed: Vec<(PathBuf, String)>,
}

impl ImportSummary {
    pub fn describe(&self) -> String {
        let mut s = format!(
            "Imported {} images ({} captions); skipped {} exact duplicates",
            self.copied.len(),
            self.captions,
            self.duplicates.len()
        );
        if !self.renamed.is_empty() {
            s += &format!(
                "; {} renamed to avoid overwriting a different file",
                self.renamed.len()
            );
        }
        if !self.failed.is_empty() {
            s += &format!("; {} failed: {}", self.failed.len(), self.failed[0].1);
        }
        s
    }
}

/// The blake3 hex hashes of the files at `paths` (unreadable ones are left out).
pub fn hash_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> HashSet<String> {
    paths
        .into_iter()
        .filter_map(|p| hash_file(p).ok())
        .collect()
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Copies image files, and the images of folders (recursively, keeping the folder as a subfolder of `dest`),
/// into `dest` with their `caption_ext` sidecars. `known` holds the hashes of the images already in the dataset.
pub fn import(
    sources: &[PathBuf],
    dest: &Path,
    caption_ext: &str,
    known: &mut HashSet<String>,
) -> ImportSummary {
    let mut summary = ImportSummary::default();
    for src in sources {
        if src.is_dir() {
            let name = src.file_name().map(PathBuf::from).unwrap_or_default();
            for entry in walkdir::WalkDir::new(src)
                .follow_links(true)
                .sort_by_file_name()
                .into_iter()
                .flatten()
            {
                if entry.file_type().is_file() && is_image_path(entry.path()) {
                    let rel = entry.path().strip_prefix(src).unwrap_or(entry.path());
                    let target_dir = dest.join(&name).join(rel.parent().unwrap_or(Path::new("")));
                    import_file(entry.path(), &target_dir, caption_ext, known, &mut summary);
                }
            }
        } else if is_image_path(src) {
            import_file(src, dest, caption_ext, known, &mut summary);
        } else {
            summary.failed.push((
                src.clone(),
                format!("{} is not a png, jpg, webp or bmp image", src.display()),
            ));
        }
    }
    summary
}

fn import_file(
    src: &Path,
    dir: &Path,
    caption_ext: &str,
    known: &mut HashSet<String>,
    s: &mut ImportSummary,
) {
    let hash = match hash_file(src) {
        Ok(h) => h,
        Err(e) => {
            return s.failed.push((
                src.to_owned(),
                format!("cannot read {}: {e}", src.display()),
            ));
        }
    };
    if known.contains(&hash) {
        return s.duplicates.push(src.to_owned());
    }
    let file_name = src.file_name().unwrap_or_default();
    match copy_no_clobber(src, dir, Path::new(file_name)) {
        Ok(target) => {
            known.insert(hash);
            if target.file_name() != Some(file_name) {
                s.renamed.push((src.to_owned(), target.clone()));
            }
            let caption = caption_path_for(src, caption_ext);
            if caption.is_file() {
                match std::fs::copy(&caption, caption_path_for(&target, caption_ext)) {
                    Ok(_) => s.captions += 1,
                    Err(e) => s.failed.push((caption, format!("caption not copied: {e}"))),
                }
            }
            s.copied.push(target);
        }
        Err(e) => s.failed.push((
            src.to_owned(),
            format!("cannot copy {}: {e}", src.display()),
        )),
    }
}

/// Copies `src` into `dir` as `name`, or `stem-1.ext`, `stem-2.ext` … when the name is taken (by a file of
/// other content: equal content was caught by the hash). The copy goes through a temp file, so a crash never
/// leaves a half image, and the final link refuses to replace anything.
fn copy_no_clobber(src: &Path, dir: &Path, name: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".lora-studio-import-")
        .tempfile_in(dir)?;
    std::fs::copy(src, tmp.path())?;
    let stem = name
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let ext = name
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut tmp = tmp;
    for n in 0..10_000 {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{stem}-{n}{ext}"))
        };
        // A caption of that name without an image would be adopted by the new image: avoid it too.
        if candidate.exists() {
            continue;
        }
        match tmp.persist_noclobber(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => tmp = e.file,
            Err(e) => return Err(e.error),
        }
    }
    Err(std::io::Error::other("no free file name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_duplicates_and_never_overwrites() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(dst.path().join("a.png"), b"existing").unwrap();
        std::fs::write(src.path().join("a.png"), b"new content").unwrap();
        std::fs::write(src.path().join("a.txt"), b"a caption").unwrap();
        std::fs::write(src.path().join("dup.png"), b"existing").unwrap();
        std::fs::write(src.path().join("readme.md"), b"x").unwrap();
        let mut known = hash_files([dst.path().join("a.png").as_path()]);
        let sources = vec![
            src.path().join("a.png"),
            src.path().join("dup.png"),
            src.path().join("readme.md"),
        ];
        let s = import(&sources, dst.path(), ".txt", &mut known);
        assert_eq!(s.copied, vec![dst.path().join("a-1.png")]);
        assert_eq!(s.duplicates, vec![src.path().join("dup.png")]);
        assert_eq!(s.failed.len(), 1);
        assert_eq!(
            std::fs::read(dst.path().join("a.png")).unwrap(),
            b"existing"
        );
        assert_eq!(
            std::fs::read(dst.path().join("a-1.txt")).unwrap(),
            b"a caption"
        );
        // Importing the same again finds only duplicates.
        let again = import(&sources[..1], dst.path(), ".txt", &mut known);
        assert_eq!(again.duplicates.len(), 1);
    }

    #[test]
    fn imports_a_folder_as_a_subfolder() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let folder = src.path().join("4_dog");
        std::fs::create_dir_all(folder.join("more")).unwrap();
        std::fs::write(folder.join("x.jpg"), b"1").unwrap();
        std::fs::write(folder.join("more/y.webp"), b"2").unwrap();
        let s = import(&[folder], dst.path(), ".txt", &mut HashSet::new());
        assert_eq!(s.copied.len(), 2);
        assert!(dst.path().join("4_dog/x.jpg").is_file());
        assert!(dst.path().join("4_dog/more/y.webp").is_file());
    }
}
