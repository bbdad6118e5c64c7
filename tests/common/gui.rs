//! Driving the real app headless with egui_kittest.

use egui_kittest::Harness;
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
