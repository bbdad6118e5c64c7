//! Caption edits on a scanned dataset: one image or many at once, each write atomic, each batch undoable.

use super::caption::{self, Caption, CaptionStatus};
use super::scan::Scan;
use std::path::PathBuf;

/// A bulk operation on captions.
#[derive(Clone, Debug, PartialEq)]
pub enum BulkOp {
    AddTrigger(String),
    Replace { find: String, replace: String },
    RemoveTag(String),
}

impl BulkOp {
    pub fn apply(&self, text: &str) -> String {
        match self {
            BulkOp::AddTrigger(t) => caption::add_trigger(text, t),
            BulkOp::Replace { find, replace } => caption::find_replace(text, find, replace),
            BulkOp::RemoveTag(t) => caption::remove_tag(text, t),
        }
    }
}

/// One caption change: `before` is `None` when the caption file did not exist.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionEdit {
    pub index: usize,
    pub before: Option<String>,
    pub after: String,
}

/// What a bulk operation did.
#[derive(Debug, Default)]
pub struct BulkResult {
    pub edits: Vec<CaptionEdit>,
    /// Captions left alone because they are not UTF-8 (rewriting them would mangle what we cannot read).
    pub skipped_not_utf8: usize,
    pub failed: Vec<(PathBuf, String)>,
}

impl BulkResult {
    pub fn describe(&self) -> String {
        let mut s = format!("Changed {} captions", self.edits.len());
        if self.skipped_not_utf8 > 0 {
            s += &format!(
                "; left {} non-UTF-8 captions alone (fix them one by one)",
                self.skipped_not_utf8
            );
        }
        if let Some((path, e)) = self.failed.first() {
            s += &format!(
                "; {} failed, first {}: {e}",
                self.failed.len(),
                path.display()
            );
        }
        s
    }
}

fn previous_text(c: &Caption) -> Option<String> {
    (c.status != CaptionStatus::Missing).then(|| c.text.clone())
}

/// Writes `text` as the caption of entry `index` (atomically) and returns the edit, or `None` if unchanged.
pub fn set_caption(
    scan: &mut Scan,
    index: usize,
    text: &str,
) -> std::io::Result<Option<CaptionEdit>> {
    let entry = &mut scan.entries[index];
    let before = previous_text(&entry.caption);
    if before.as_deref() == Some(text) {
        return Ok(None);
    }
    entry.caption.save(&entry.caption_path, text)?;
    Ok(Some(CaptionEdit {
        index,
        before,
        after: text.to_owned(),
    }))
}

/// Applies `op` to the captions of `indices`. Missing captions take part (adding a trigger creates them).
pub fn apply_bulk(scan: &mut Scan, indices: &[usize], op: &BulkOp) -> BulkResult {
    let mut result = BulkResult::default();
    for &i in indices {
        let caption = &scan.entries[i].caption;
        if matches!(
            caption.status,
            CaptionStatus::NotUtf8 | CaptionStatus::Unreadable
        ) {
            result.skipped_not_utf8 += 1;
            continue;
        }
        let after = op.apply(&caption.text);
        if after == caption.text && caption.status != CaptionStatus::Missing {
            continue;
        }
        if after.is_empty() && caption.status == CaptionStatus::Missing {
            continue;
        }
        match set_caption(scan, i, &after) {
            Ok(Some(edit)) => result.edits.push(edit),
            Ok(None) => {}
            Err(e) => result
                .failed
                .push((scan.entries[i].caption_path.clone(), e.to_string())),
        }
    }
    result
}

/// Reverts a batch of edits (newest last): restores each old text, or removes a caption file the batch created.
pub fn undo(scan: &mut Scan, edits: &[CaptionEdit]) -> std::io::Result<()> {
    for edit in edits.iter().rev() {
        let entry = &mut scan.entries[edit.index];
        match &edit.before {
            Some(text) => entry.caption.save(&entry.caption_path, text)?,
            None => {
                match std::fs::remove_file(&entry.caption_path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                entry.caption = Caption::missing();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn bulk_trigger_then_undo_restores_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("a.txt"), b"cat, sitting").unwrap();
        std::fs::write(dir.path().join("b.png"), b"x").unwrap();
        std::fs::write(dir.path().join("c.png"), b"x").unwrap();
        std::fs::write(dir.path().join("c.txt"), b"caf\xE9").unwrap();
        let mut s = super::super::scan(dir.path(), &AtomicBool::new(false)).unwrap();
        let r = apply_bulk(&mut s, &[0, 1, 2], &BulkOp::AddTrigger("ohwx".into()));
        assert_eq!(r.edits.len(), 2);
        assert_eq!(r.skipped_not_utf8, 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "ohwx, cat, sitting"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b.txt")).unwrap(),
            "ohwx"
        );
        let again = apply_bulk(&mut s, &[0, 1], &BulkOp::AddTrigger("ohwx".into()));
        assert!(again.edits.is_empty());
        undo(&mut s, &r.edits).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "cat, sitting"
        );
        assert!(!dir.path().join("b.txt").exists());
        assert_eq!(std::fs::read(dir.path().join("c.txt")).unwrap(), b"caf\xE9");
    }

    #[test]
    fn replace_and_remove_tag() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("a.txt"), b"red hair, smile, red eyes").unwrap();
        let mut s = super::super::scan(dir.path(), &AtomicBool::new(false)).unwrap();
        apply_bulk(
            &mut s,
            &[0],
            &BulkOp::Replace {
                find: "red".into(),
                replace: "blue".into(),
            },
        );
        apply_bulk(&mut s, &[0], &BulkOp::RemoveTag("smile".into()));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "blue hair, blue eyes"
        );
    }
}
