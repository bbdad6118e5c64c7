//! The training workflow driven like a person would, through accessible labels (egui_kittest, headless, CPU):
//! open a dataset, choose the tiny fixture model, load a preset, change settings, train, watch samples arrive,
//! stop a second run and find its LoRA file.

mod common;

use common::gui::{harness, nav, set_number, type_into, wait_for};

use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use lora_studio::app::{AppState, LoraStudioApp};
use std::path::{Path, PathBuf};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// A fixed folder (so snapshot text is the same on every machine) with a dataset of six small captioned
/// images and a copy of the tiny SD1 model.
fn project() -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let root = std::env::temp_dir().join("lora-studio-snapshot-training");
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("dataset");
    for i in 0..6u64 {
        let p = data.join(format!("img{i}.png"));
        common::write_png(&p, 64, 64, i + 1);
        common::caption(&p, format!("zk, thing {i}, red").as_bytes());
    }
    let model = root.join("model");
    copy_dir(&common::sd_tiny::fixture("sd1").join("diffusers"), &model);
    let out = root.join("output");
    (root, data, model, out)
}

/// A snapshot without the pointer (so that no hover or tooltip depends on where the last click was).
fn snap(h: &mut Harness<'static, LoraStudioApp>, name: &str) {
    h.remove_cursor();
    h.run_steps(3);
    h.snapshot(name);
}

/// Covers the parts of a snapshot whose text depends on timing (it/s, ETA, time estimates).
fn mask_timings(h: &mut Harness<'static, LoraStudioApp>) {
    let rects: Vec<egui::Rect> = ["it/s", "Estimated time"]
        .iter()
        .flat_map(|t| {
            h.query_all_by_label_contains(t)
                .map(|n| n.rect())
                .collect::<Vec<_>>()
        })
        .collect();
    for r in rects {
        h.mask(r);
    }
}

#[test]
fn the_whole_training_journey() {
    let (root, data, model, out) = project();
    let mut h = harness(AppState::default());
    h.run_steps(4);

    // The dataset, by typed path.
    type_into(&mut h, "Dataset folder", &data.to_string_lossy(), false);
    h.get_by_label("Open").click();
    wait_for(&mut h, "the dataset", 60, |app| {
        let d = app.dataset();
        !d.is_busy() && d.report().is_some()
    });

    // The model, by typed path; what was detected is shown.
    nav(&mut h, "Training");
    h.run_steps(3);
    type_into(&mut h, "Checkpoint", &model.to_string_lossy(), false);
    wait_for(&mut h, "the model check", 60, |app| {
        app.training().model().is_some() && !app.training().is_busy()
    });
    let detected = h.state_mut().training().model().unwrap().clone();
    assert_eq!(detected.as_ref().unwrap().family, "SD 1.x", "{detected:?}");

    // The CPU demo preset, then a few fields changed.
    h.get_by_label("Preset").click();
    h.run_steps(2);
    h.get_by_label("CPU demo (small model)").click();
    h.run_steps(3);
    assert_eq!(h.state().state().training.preset, "cpu-demo");
    assert_eq!(h.state().state().training.config.dataset.resolution, 64);
    set_number(&mut h, "Steps", "6");
    set_number(&mut h, "Sample every N steps", "3");
    h.get_by_label("Add prompt").click_accesskit();
    h.run_steps(3);
    type_into(&mut h, "Prompt 1", "zk, thing", false);
    set_number(&mut h, "Width", "32");
    set_number(&mut h, "Height", "32");
    set_number(&mut h, "Sampling steps", "2");
    type_into(&mut h, "Output folder", &out.to_string_lossy(), true);
    {
        let c = &h.state().state().training.config;
        assert_eq!(c.training.steps, 6);
        assert_eq!(c.sampling.every_n_steps, 3);
        assert_eq!(c.sampling.prompts.len(), 1);
        assert_eq!(
            (c.sampling.prompts[0].width, c.sampling.prompts[0].steps),
            (32, 2)
        );
        assert_eq!(c.saving.output_dir, out);
        assert_eq!(c.dataset.folder, data);
    }

    // An invalid value is named and blocks Start; fixing it brings the plan back.
    type_into(&mut h, "Output name", "bad/name", true);
    let v = h.state_mut().training().form_problem().map(str::to_owned);
    assert!(
        v.as_deref()
            .is_some_and(|v| v.contains("\"Output name\" must be")),
        "{v:?}"
    );
    assert!(
        h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
    assert!(
        h.query_all_by_label_contains("Invalid setting: \"Output name\"")
            .count()
            >= 1
    );
    type_into(&mut h, "Output name", "gui-test", true);
    assert!(h.state_mut().training().form_problem().is_none());
    assert_eq!(
        h.state().state().training.config.saving.output_name,
        "gui-test"
    );
    wait_for(&mut h, "the plan", 60, |app| {
        matches!(app.training().plan(), Some(Ok(_))) && !app.training().is_busy()
    });
    let total = match h.state_mut().training().plan() {
        Some(Ok(p)) => p.plan.total_steps,
        other => panic!("no plan: {:?}", other.map(|r| r.as_ref().err())),
    };
    assert_eq!(total, 6);
    h.key_press(egui::Key::Escape);
    h.run_steps(3);
    snap(&mut h, "training_configured");
    // The lower part of the form: the advanced settings and the sample prompts.
    h.get_by_label("Advanced").click_accesskit();
    h.run_steps(3);
    h.get_by_label("Add prompt").scroll_to_me();
    h.run_steps(4);
    snap(&mut h, "training_form_prompts");

    // Train: progress, then samples, then the end.
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the first step", 120, |app| {
        app.training()
            .run()
            .is_some_and(|r| r.last.is_some() || !r.is_active())
    });
    wait_for(&mut h, "the end of the run", 120, |app| {
        app.training().run().is_some_and(|r| !r.is_active())
    });
    {
        let app = h.state_mut();
        let run = app.training().run().unwrap();
        assert!(run.failed.is_none(), "the run failed: {:?}", run.failed);
        assert_eq!(run.losses.len(), 6);
        let steps = run.sample_steps();
        assert_eq!(steps, vec![3, 6], "samples at steps 3 and 6");
        let lora = run.finished.as_ref().unwrap().lora.clone().unwrap();
        assert!(
            lora.starts_with(&out) && lora.is_file(),
            "{}",
            lora.display()
        );
        assert!(run.saved.iter().any(|s| s.final_file));
    }
    h.remove_cursor();
    h.run_steps(3);
    mask_timings(&mut h);
    h.snapshot("training_finished");
    h.get_by_label("Log scale").click();
    h.run_steps(3);
    h.get_by_label("Log scale").click();
    h.run_steps(3);

    // The samples grid: steps by prompts; a click enlarges one.
    nav(&mut h, "Samples");
    h.run_steps(4);
    snap(&mut h, "samples_grid");
    h.get_by_label("Copy path 1").click();
    h.step();
    let commands = h.output().platform_output.commands.clone();
    let copied = commands.iter().any(
        |c| matches!(c, egui::OutputCommand::CopyText(t) if t.ends_with("gui-test.safetensors")),
    );
    assert!(
        copied,
        "Copy path puts the LoRA's path on the clipboard: {commands:?}"
    );
    h.run_steps(2);
    h.get_by_label("Sample step 6 prompt 1").click();
    h.run_steps(4);
    assert!(h.query_by_label("Step 6, prompt 1").is_some());
    h.get_by_label("Close").click();
    h.run_steps(3);
    assert!(h.query_by_label("Step 6, prompt 1").is_none());
    h.get_by_label("Compare two steps").click();
    h.run_steps(4);
    assert!(h.query_by_label("Left step").is_some());
    snap(&mut h, "samples_compare");

    // A second, longer run, stopped: it saves first and the LoRA is on disk.
    nav(&mut h, "Training");
    h.run_steps(3);
    set_number(&mut h, "Steps", "2000");
    wait_for(&mut h, "the new plan", 60, |app| !app.training().is_busy());
    h.get_by_label("Start training").click();
    wait_for(&mut h, "two steps of the second run", 120, |app| {
        app.training()
            .run()
            .is_some_and(|r| r.last.as_ref().is_some_and(|s| s.step >= 2) || !r.is_active())
    });
    // Closing the window during a run asks first; keep training.
    h.input_mut()
        .viewports
        .entry(egui::ViewportId::ROOT)
        .or_default()
        .events
        .push(egui::ViewportEvent::Close);
    h.step();
    let cancelled = h.output().viewport_output.values().any(|v| {
        v.commands
            .iter()
            .any(|c| matches!(c, egui::ViewportCommand::CancelClose))
    });
    assert!(cancelled, "the close is held back during a run");
    h.run_steps(2);
    assert!(h.query_by_label("A training run is in progress").is_some());
    h.get_by_label("Keep training").click();
    h.run_steps(3);
    assert!(h.query_by_label("A training run is in progress").is_none());
    assert!(h.state_mut().training().is_running());

    h.get_by_label("Stop").click();
    h.run_steps(3);
    h.get_by_label("Stop and save").click();
    wait_for(&mut h, "the stopped run to end", 120, |app| {
        app.training().run().is_some_and(|r| !r.is_active())
    });
    let app = h.state_mut();
    let run = app.training().run().unwrap();
    assert!(run.failed.is_none(), "the run failed: {:?}", run.failed);
    let f = run.finished.as_ref().unwrap();
    assert!(f.stopped && f.step < 2000, "stopped at {}", f.step);
    let lora = f.lora.clone().expect("a stopped run saves its LoRA");
    assert!(
        lora.starts_with(&out) && lora.is_file(),
        "{}",
        lora.display()
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&root);
}

/// The regularization images' folder and numbers are found by their labels; a folder that does not exist is
/// named by its label beside the field and beside Start, which it blocks; a real one is counted in the plan.
#[test]
fn a_bad_regularization_folder_blocks_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    let reg = dir.path().join("reg");
    for i in 0..4u64 {
        let p = data.join(format!("img{i}.png"));
        common::write_png(&p, 64, 64, i + 1);
        common::caption(&p, b"zk, thing");
        let r = reg.join(format!("1_thing/r{i}.png"));
        common::write_png(&r, 64, 64, i + 20);
        common::caption(&r, b"a thing");
    }
    let mut state = AppState::default();
    let c = &mut state.training.config;
    c.model.checkpoint = common::sd_tiny::fixture("sd1").join("diffusers");
    c.dataset.folder = data;
    c.dataset.resolution = 64;
    c.saving.output_dir = dir.path().join("out");
    let mut h = harness(state);
    nav(&mut h, "Training");
    let plan_done =
        |app: &mut LoraStudioApp| app.training().plan().is_some() && !app.training().is_busy();
    wait_for(&mut h, "the plan", 60, plan_done);
    assert!(matches!(h.state_mut().training().plan(), Some(Ok(_))));

    let missing = dir.path().join("no-such-reg");
    type_into(
        &mut h,
        "Regularization images",
        &missing.to_string_lossy(),
        false,
    );
    wait_for(&mut h, "the plan with the missing folder", 60, plan_done);
    let named = "(\"Regularization images\") does not exist";
    match h.state_mut().training().plan() {
        Some(Err(e)) => assert!(e.contains(named) && e.contains("no-such-reg"), "{e}"),
        other => panic!(
            "the missing folder was not refused: {:?}",
            other.map(|r| r.is_ok())
        ),
    }
    assert!(
        h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
    // Beside the field, beside Start and in the plan.
    assert!(h.query_all_by_label_contains(named).count() >= 2);

    type_into(
        &mut h,
        "Regularization images",
        &reg.to_string_lossy(),
        true,
    );
    set_number(&mut h, "Regularization repeats", "2");
    set_number(&mut h, "Prior loss weight", "0.5");
    wait_for(&mut h, "the plan with regularization images", 60, plan_done);
    let c = &h.state().state().training.config.dataset;
    assert_eq!(c.regularization_folder.as_deref(), Some(reg.as_path()));
    assert_eq!((c.regularization_repeats, c.prior_loss_weight), (2, 0.5));
    match h.state_mut().training().plan() {
        Some(Ok(p)) => assert_eq!(
            (
                p.plan.images,
                p.plan.regularization_images,
                p.plan.samples_per_epoch
            ),
            (4, 4, 8)
        ),
        other => panic!("no plan: {:?}", other.map(|r| r.as_ref().err())),
    }
    assert!(
        h.query_by_label("4 (4 uses per epoch)").is_some(),
        "the plan's regularization row"
    );
    assert!(
        !h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
    // A bad weight is named by its label and blocks Start.
    set_number(&mut h, "Prior loss weight", "-1");
    let v = h.state_mut().training().form_problem().map(str::to_owned);
    assert!(
        v.as_deref()
            .is_some_and(|v| v.starts_with("Prior loss weight:")),
        "{v:?}"
    );
    assert!(
        h.get_by_label("Start training")
            .accesskit_node()
            .is_disabled()
    );
}

#[test]
fn the_first_start_opens_the_demo_project() {
    let Some(demo) = lora_studio::app::demo_dir() else {
        eprintln!("assets/demo is missing; nothing to check");
        return;
    };
    let state = AppState::first_start();
    let t = &state.training;
    assert!(t.demo);
    assert_eq!(t.preset, "cpu-demo");
    assert_eq!(t.config.model.checkpoint, demo.join("model"));
    // The user's copy of the dataset, not the program's own files.
    assert!(t.config.dataset.folder.ends_with("demo-dataset"));
    assert!(t.config.dataset.folder.join("zkstar_01.txt").is_file());
    assert!(t.config.saving.output_dir.ends_with("demo-output"));
    assert_eq!(
        state.dataset.recent[0],
        t.config.dataset.folder.to_string_lossy()
    );
    let mut h = harness(state);
    wait_for(&mut h, "the demo's plan", 60, |app| {
        !app.dataset().is_busy() && app.training().plan().is_some() && !app.training().is_busy()
    });
    let plan = h
        .state_mut()
        .training()
        .plan()
        .unwrap()
        .as_ref()
        .map(|p| p.plan.total_steps);
    // (The demo model may be half-written while it is being regenerated; then only its error shows.)
    if demo.join("model/model_index.json").is_file() {
        assert_eq!(plan, Ok(60));
    }
    assert!(h.query_by_label("Demo project").is_some());
    assert!(h.state_mut().training().model().is_some());
    h.get_by_label("Use my own dataset and model").click();
    h.run_steps(3);
    assert!(h.query_by_label("Demo project").is_none());
    assert!(!h.state().state().training.demo);
}
