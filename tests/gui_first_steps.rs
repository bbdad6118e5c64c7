//! A new user's first steps, driven through the window (egui_kittest, headless): opening datasets one after the
//! other, switching presets back and forth, typing bad values, choosing an optimizer, and resuming a stopped run
//! after a restart.
//! Each test failed before the fix it guards.

mod common;

use common::gui::{harness, nav, set_number, type_into, wait_for};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use lora_studio::app::{AppState, LoraStudioApp};
use lora_studio::train::optim::OptimizerKind;
use std::path::Path;

fn dataset(root: &Path, images: u64, seed: u64) {
    for i in 0..images {
        let p = root.join(format!("img{i}.png"));
        common::write_png(&p, 64, 64, seed + i);
        common::caption(&p, format!("zk, thing {i}").as_bytes());
    }
}

fn open_dataset(h: &mut Harness<'static, LoraStudioApp>, root: &Path) {
    nav(h, "Dataset");
    type_into(h, "Dataset folder", &root.to_string_lossy(), true);
    h.key_press(egui::Key::Enter);
    h.run_steps(2);
    wait_for(h, "the dataset", 60, |app| {
        let d = app.dataset();
        !d.is_busy() && d.scan().is_some_and(|s| s.root == root) && d.report().is_some()
    });
}

/// The state as a restart finds it (what eframe persists, through serde).
fn restarted(h: &mut Harness<'static, LoraStudioApp>) -> Harness<'static, LoraStudioApp> {
    let text = serde_json::to_string(h.state().state()).unwrap();
    harness(serde_json::from_str(&text).unwrap())
}

#[test]
fn opening_a_larger_dataset_after_a_smaller_one_shows_its_own_images() {
    let dir = tempfile::tempdir().unwrap();
    let (empty, small, large) = (
        dir.path().join("empty"),
        dir.path().join("small"),
        dir.path().join("large"),
    );
    std::fs::create_dir_all(&empty).unwrap();
    dataset(&small, 3, 1);
    dataset(&large, 9, 100);
    let mut h = harness(AppState::default());
    h.run_steps(3);

    open_dataset(&mut h, &empty);
    open_dataset(&mut h, &small);
    wait_for(&mut h, "the small dataset's thumbnails", 60, |app| {
        app.dataset().thumbnails_loaded() >= 3
    });
    // A larger folder right after: its grid is drawn with the previous folder's checks still around.
    open_dataset(&mut h, &large);
    wait_for(&mut h, "the large dataset's thumbnails", 60, |app| {
        app.dataset().thumbnails_loaded() >= 9
    });
    h.run_steps(5);
    assert_eq!(h.state_mut().dataset().report().unwrap().images, 9);
    let paths = h.state_mut().dataset().thumbnail_paths();
    assert!(
        paths.iter().all(|p| p.starts_with(&large)),
        "a cell shows another folder's image: {paths:?}"
    );
    // Back and forth, then a restart from what was saved: it opens the last folder and draws it.
    open_dataset(&mut h, &empty);
    open_dataset(&mut h, &large);
    let mut again = restarted(&mut h);
    wait_for(&mut again, "the reopened dataset", 60, |app| {
        !app.dataset().is_busy() && app.dataset().report().is_some()
    });
    nav(&mut again, "Dataset");
    again.run_steps(3);
    assert_eq!(again.state_mut().dataset().report().unwrap().images, 9);
}

#[test]
fn choosing_presets_back_and_forth_gives_the_same_settings() {
    let Some(_) = lora_studio::app::demo_dir() else {
        eprintln!("assets/demo is missing; nothing to check");
        return;
    };
    let mut h = harness(AppState::first_start());
    nav(&mut h, "Training");
    let demo = h.state().state().training.config.to_toml();
    h.get_by_label("Preset").click();
    h.run_steps(2);
    h.get_by_label("SD 1.5 — 6 GB card").click();
    h.run_steps(3);
    assert_ne!(h.state().state().training.config.to_toml(), demo);
    h.get_by_label("Preset").click();
    h.run_steps(2);
    h.get_by_label("CPU demo (small model)").click();
    h.run_steps(3);
    assert_eq!(h.state().state().training.config.to_toml(), demo);
}

#[test]
fn bad_values_are_named_by_their_label_and_block_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 3, 1);
    let mut h = harness(AppState::default());
    open_dataset(&mut h, &data);
    nav(&mut h, "Training");
    let model = common::sd_tiny::fixture("sd1").join("diffusers");
    type_into(&mut h, "Checkpoint", &model.to_string_lossy(), true);
    type_into(
        &mut h,
        "Output folder",
        &dir.path().join("out").to_string_lossy(),
        true,
    );
    wait_for(&mut h, "the plan", 60, |app| {
        !app.training().is_busy() && matches!(app.training().plan(), Some(Ok(_)))
    });
    let rank = h.state().state().training.config.network.rank;

    // Rank 0 is not corrected to 1: it stays on screen, is named, and blocks Start.
    set_number(&mut h, "Rank", "0");
    assert_eq!(h.state().state().training.config.network.rank, rank);
    let problem = h.state_mut().training().form_problem().map(str::to_owned);
    assert!(
        problem.as_deref().is_some_and(|p| p.starts_with("Rank:")),
        "{problem:?}"
    );
    assert!(
        h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
    assert_eq!(
        h.get_by_role_and_label(Role::TextInput, "Rank")
            .accesskit_node()
            .value()
            .as_deref(),
        Some("0")
    );
    set_number(&mut h, "Rank", "8");
    assert_eq!(h.state().state().training.config.network.rank, 8);

    // Text where a number belongs stays too.
    set_number(&mut h, "Learning rate", "abc");
    let problem = h.state_mut().training().form_problem().map(str::to_owned);
    assert!(
        problem
            .as_deref()
            .is_some_and(|p| p.contains("Learning rate")),
        "{problem:?}"
    );
    set_number(&mut h, "Learning rate", "2e-4");
    assert_eq!(h.state().state().training.config.optimizer.lr, 2e-4);
    assert!(h.state_mut().training().form_problem().is_none());

    // A batch larger than the dataset blocks Start, named by its label, before anything runs.
    set_number(&mut h, "Batch size", "20");
    wait_for(&mut h, "the plan", 60, |app| !app.training().is_busy());
    assert!(
        h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
    assert!(
        h.query_all_by_label_contains("Lower \"Batch size\"")
            .count()
            >= 1,
        "the plan names the field"
    );
    set_number(&mut h, "Batch size", "1");
    wait_for(&mut h, "the plan", 60, |app| {
        !app.training().is_busy() && matches!(app.training().plan(), Some(Ok(_)))
    });
    assert!(
        !h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
}

#[test]
fn a_stopped_run_resumes_after_a_restart_and_is_never_replaced_silently() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    dataset(&data, 4, 1);
    let mut h = harness(AppState::default());
    open_dataset(&mut h, &data);
    nav(&mut h, "Training");
    let model = common::sd_tiny::fixture("sd1").join("diffusers");
    type_into(&mut h, "Checkpoint", &model.to_string_lossy(), true);
    h.get_by_label("Preset").click();
    h.run_steps(2);
    h.get_by_label("CPU demo (small model)").click();
    h.run_steps(3);
    type_into(&mut h, "Output folder", &out.to_string_lossy(), true);
    set_number(&mut h, "Steps", "400");
    set_number(&mut h, "Sample every N steps", "0");
    set_number(&mut h, "Save every N steps", "0");
    wait_for(&mut h, "the plan", 60, |app| {
        !app.training().is_busy() && matches!(app.training().plan(), Some(Ok(_)))
    });
    h.get_by_label("Start training").click();
    wait_for(&mut h, "two steps", 120, |app| {
        app.training()
            .run()
            .is_some_and(|r| r.last.as_ref().is_some_and(|s| s.step >= 2) || !r.is_active())
    });
    h.get_by_label("Stop").click();
    h.run_steps(3);
    h.get_by_label("Stop and save").click();
    wait_for(&mut h, "the stopped run to end and be found", 120, |app| {
        app.training().resumable().is_some()
    });
    let stopped = h.state_mut().training().resumable().unwrap().step;
    assert!(stopped >= 2);

    // After a restart the saved run is found again; Start asks before replacing it.
    let mut h = restarted(&mut h);
    wait_for(&mut h, "the saved run", 60, |app| {
        !app.training().is_busy() && app.training().resumable().is_some()
    });
    nav(&mut h, "Training");
    assert!(
        h.query_by_label(&format!("Resume from step {stopped}"))
            .is_some()
    );
    h.get_by_label("Start training").click();
    h.run_steps(3);
    assert!(h.query_by_label("Replace the saved run?").is_some());
    assert!(
        h.state_mut().training().run().is_none(),
        "nothing starts before the answer"
    );
    h.get_by_label("Resume it").click();
    wait_for(&mut h, "a resumed step", 120, |app| {
        app.training()
            .run()
            .is_some_and(|r| r.last.is_some() || !r.is_active())
    });
    let run = h.state_mut().training().run().unwrap();
    assert!(run.failed.is_none(), "{:?}", run.failed);
    let first = run.losses.first().map(|p| p[0] as u64);
    assert_eq!(
        first,
        Some(stopped + 1),
        "the resumed run goes on from the saved step"
    );
    h.get_by_label("Stop").click();
    h.run_steps(3);
    h.get_by_label("Stop and save").click();
    wait_for(&mut h, "the end", 120, |app| {
        app.training().run().is_some_and(|r| !r.is_active())
    });
}

/// Choosing Prodigy sets the learning rates it wants and shows its own setting; going back to an AdamW sets the
/// usual ones again.
#[test]
fn choosing_an_optimizer_sets_its_learning_rates() {
    let mut h = harness(AppState::default());
    nav(&mut h, "Training");
    let pick = |h: &mut Harness<'static, LoraStudioApp>, name: &str| {
        h.get_by_role_and_label(Role::ComboBox, "Optimizer").click();
        h.run_steps(3);
        h.get_by_label(name).click();
        h.run_steps(3);
    };
    pick(&mut h, "Prodigy");
    let o = h.state().state().training.config.optimizer.clone();
    assert_eq!(o.kind, OptimizerKind::Prodigy);
    assert_eq!((o.lr, o.lr_text_encoder), (1.0, 1.0));
    assert!(h.query_by_label("Prodigy d coef").is_some());
    set_number(&mut h, "Prodigy d coef", "0.5");
    assert_eq!(
        h.state().state().training.config.optimizer.params.d_coef,
        0.5
    );
    pick(&mut h, "AdamW 8-bit");
    let o = h.state().state().training.config.optimizer.clone();
    assert_eq!(o.kind, OptimizerKind::AdamW8bit);
    assert_eq!((o.lr, o.lr_text_encoder), (1e-4, 5e-5));
    assert!(h.query_by_label("Prodigy d coef").is_none());
}
