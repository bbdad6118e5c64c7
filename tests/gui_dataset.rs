//! The dataset workspace driven like a person would, through accessible labels (egui_kittest, headless).

mod common;

use common::gui::{harness, wait_for};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use lora_studio::app::{AppState, LoraStudioApp};
use std::time::Duration;

fn settle(h: &mut Harness<'static, LoraStudioApp>) {
    wait_for(h, "the dataset checks", 60, |app| {
        let d = app.dataset();
        !d.is_busy() && d.report().is_some()
    });
}

/// Types `path` into the Dataset folder field and presses Open.
fn open_folder(h: &mut Harness<'static, LoraStudioApp>, path: &str) {
    let field = h.get_by_role_and_label(Role::TextInput, "Dataset folder");
    field.focus();
    field.type_text(path);
    h.run_steps(4);
    h.get_by_label("Open").click();
}

fn small_dataset(root: &std::path::Path) {
    for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
        let p = root.join("3_cat").join(name);
        common::write_png(&p, 512 + 64 * i as u32, 512, i as u64);
        if i < 2 {
            common::caption(&p, format!("cat, pose {i}").as_bytes());
        }
    }
}

#[test]
fn open_by_typed_path_edit_caption_and_bulk_trigger() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let mut h = harness(AppState::default());
    h.run_steps(4);

    open_folder(&mut h, &dir.path().to_string_lossy());
    settle(&mut h);
    assert_eq!(h.state_mut().dataset().report().unwrap().images, 3);
    assert_eq!(
        h.state_mut().dataset().report().unwrap().images_per_epoch,
        9
    );

    // Select an image in the grid and edit its caption; it is saved to disk atomically.
    h.get_by_role_and_label(Role::Button, "a.png").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption (a.txt)")
        .focus();
    h.run_steps(4);
    h.key_press(egui::Key::End);
    h.run_steps(4);
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption (a.txt)")
        .type_text(", sitting");
    h.run_steps(4);
    h.get_by_label("Save caption").click();
    h.run_steps(4);
    let a_txt = dir.path().join("3_cat/a.txt");
    assert_eq!(
        std::fs::read_to_string(&a_txt).unwrap(),
        "cat, pose 0, sitting"
    );

    // Bulk: a trigger word on all images, created where a caption was missing, then undone.
    h.get_by_label("Bulk edit").click();
    h.run_steps(4);
    let trigger = h.get_by_role_and_label(Role::TextInput, "Trigger word");
    trigger.focus();
    trigger.type_text("ohwx");
    h.run_steps(4);
    h.get_by_label("Add to front").click();
    h.run_steps(4);
    assert_eq!(
        std::fs::read_to_string(&a_txt).unwrap(),
        "ohwx, cat, pose 0, sitting"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("3_cat/c.txt")).unwrap(),
        "ohwx"
    );
    h.get_by_label("Undo last change").click();
    h.run_steps(4);
    assert_eq!(
        std::fs::read_to_string(&a_txt).unwrap(),
        "cat, pose 0, sitting"
    );
    assert!(!dir.path().join("3_cat/c.txt").exists());

    // The tag table filters the grid (once the report has caught up with the undo).
    settle(&mut h);
    h.get_by_label("Tags").click();
    h.run_steps(4);
    h.get_by_label("sitting").click();
    h.run_steps(4);
    assert_eq!(h.state_mut().dataset().visible(), &[0]);
}

#[test]
fn a_wrong_path_is_explained_and_the_last_dataset_reopens() {
    let mut h = harness(AppState::default());
    open_folder(&mut h, "/no/such/dataset");
    wait_for(&mut h, "the error", 60, |app| {
        app.dataset().error().is_some()
    });
    assert!(
        h.state_mut()
            .dataset()
            .error()
            .unwrap()
            .contains("does not exist")
    );

    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let mut state = AppState::default();
    state
        .dataset
        .recent
        .push(dir.path().to_string_lossy().into_owned());
    let mut h = harness(state);
    settle(&mut h);
    assert_eq!(h.state_mut().dataset().report().unwrap().images, 3);
}

#[test]
fn snapshots_of_the_dataset_workspace() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed path keeps the snapshot's text identical across machines.
    let root = std::env::temp_dir().join("lora-studio-snapshot-dataset");
    let _ = std::fs::remove_dir_all(&root);
    common::bad_dataset(&root);
    let mut state = AppState::default();
    state
        .dataset
        .recent
        .push(root.to_string_lossy().into_owned());
    let mut h = harness(state);
    settle(&mut h);
    wait_for(&mut h, "thumbnails", 60, |app| {
        app.dataset().thumbnails_loaded() >= 12
    });
    h.get_by_role_and_label(Role::Button, "good1.png").click();
    wait_for(&mut h, "the preview", 60, |_| true);
    std::thread::sleep(Duration::from_millis(300));
    h.run_steps(5);
    h.snapshot("dataset_image");
    h.get_by_label("Checks").click();
    h.run_steps(4);
    h.snapshot("dataset_checks");
    h.get_by_label("Buckets").click();
    h.run_steps(4);
    h.snapshot("dataset_buckets");
    drop(dir);
    let _ = std::fs::remove_dir_all(&root);
}

/// Repeats the project file admits (up to 10,000) show as they are: the folder's spinner does not clamp them to a
/// narrower range and write that back to the project file.
#[test]
fn a_folders_large_repeat_count_is_shown_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.png", "b.png"] {
        let p = dir.path().join("cats").join(name);
        common::write_png(&p, 64, 64, 1);
        common::caption(&p, b"cat");
    }
    let project = dir.path().join("lora-studio.toml");
    let text = "schema = 1\ncaption_extension = \".txt\"\n\n[repeats]\ncats = 5000\n";
    std::fs::write(&project, text).unwrap();
    let mut h = harness(AppState::default());
    h.run_steps(4);
    open_folder(&mut h, &dir.path().to_string_lossy());
    settle(&mut h);
    h.get_by_label("Buckets").click();
    h.run_steps(6);
    let spinner = h.get_by_role_and_label(Role::SpinButton, "Repeats of cats");
    assert_eq!(spinner.accesskit_node().numeric_value(), Some(5000.0));
    assert_eq!(std::fs::read_to_string(&project).unwrap(), text);
}
