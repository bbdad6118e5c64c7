//! The Samples workspace after a restart, driven through the window (egui_kittest, headless): a past run found in
//! its output folder shows its samples beside the "Without LoRA" baseline, and Try the LoRA draws a prompt with
//! the run's LoRA beside the same seed without it, at the run's prompt and sample size.

mod common;

use common::engine::{config, dataset, finished, run};
use common::gui::{harness, nav};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use lora_studio::app::{AppState, LoraStudioApp};
use lora_studio::train::StartOptions;
use std::time::{Duration, Instant};

/// Steps frames until a widget labelled `label` is shown (background threads deliver between frames).
fn wait_for_label(h: &mut Harness<'static, LoraStudioApp>, label: &str, secs: u64) {
    let start = Instant::now();
    while h.query_by_label(label).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {label:?}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(2);
}

#[test]
fn a_past_run_shows_its_baseline_and_try_the_lora_draws_with_and_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let out = dir.path().join("out");
    let prompt = "sampling.prompts=[{prompt = \"zk, thing 0, red\", width = 32, height = 32, steps = 2, \
                  cfg = 5.0, seed = 7}]";
    let trained = config(&data, &out, 2, &["sampling.every_n_steps=2", prompt]);
    assert_eq!(
        finished(&run(trained.clone(), StartOptions::default())),
        (2, false)
    );

    // A restart: the app knows the run only by the output folder in its settings.
    let mut state = AppState::default();
    state.training.config = trained;
    state.training.remember_output_dir(&out);
    let mut h = harness(state);
    nav(&mut h, "Samples");
    wait_for_label(&mut h, "Step 2", 60);
    assert!(h.query_by_label("Without LoRA").is_some());
    let chosen = h
        .get_by_role_and_label(Role::ComboBox, "Run")
        .accesskit_node()
        .value()
        .map(|v| v.to_string());
    assert_eq!(chosen, Some(format!("t in {}", out.display())));

    h.get_by_label("Draw").click();
    wait_for_label(&mut h, "Try result with lora", 120);
    assert!(h.query_by_label("Try result without lora").is_some());
    assert!(h.query_by_label("Try result with lora").is_some());
    assert!(
        h.query_by_label_contains("t.safetensors at weight 1 · seed 1")
            .is_some()
    );
    // At the size of the run's samples, with the run's first prompt.
    assert!(h.query_by_label_contains("· 32×32 ·").is_some());
}
