//! Driving the real app headless with egui_kittest.

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use lora_studio::app::{AppState, LoraStudioApp};
use std::time::{Duration, Instant};

/// The app in a 1280×820 window, built from `state` as eframe would build it.
pub fn harness(state: AppState) -> Harness<'static, LoraStudioApp> {
    Harness::builder()
        .with_size([1280.0, 820.0])
        .build_eframe(move |cc| LoraStudioApp::new(&cc.egui_ctx, state))
}

/// Steps frames until `done` holds (background threads deliver between frames), failing after `secs`.
pub fn wait_for(
    h: &mut Harness<'static, LoraStudioApp>,
    what: &str,
    secs: u64,
    done: impl Fn(&mut LoraStudioApp) -> bool,
) {
    let start = Instant::now();
    while !done(h.state_mut()) {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(2);
}

pub fn type_into(h: &mut Harness<'static, LoraStudioApp>, label: &str, text: &str, replace: bool) {
    let field = h.get_by_role_and_label(Role::TextInput, label);
    field.focus();
    h.run_steps(2);
    if replace {
        h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
        h.run_steps(2);
    }
    h.get_by_role_and_label(Role::TextInput, label)
        .type_text(text);
    h.run_steps(3);
}

/// Switches the workspace in the left navigation.
pub fn nav(h: &mut Harness<'static, LoraStudioApp>, workspace: &str) {
    h.get_by_role_and_label(Role::Button, workspace).click();
    h.run_steps(3);
}

/// Types `value` over what a number field of the form holds.
pub fn set_number(h: &mut Harness<'static, LoraStudioApp>, label: &str, value: &str) {
    type_into(h, label, value, true);
}
