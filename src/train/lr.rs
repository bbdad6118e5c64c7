//! Learning-rate schedules: warmup, then constant, linear or cosine decay, or cosine with hard restarts.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    Linear,
    Cosine,
    CosineWithRestarts,
}

/// The factor (0..=1) applied to the base learning rate at `step` (0-based) of `total` steps.
pub fn lr_factor(schedule: LrSchedule, step: u64, total: u64, warmup: u64, restarts: u32) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => 1.0 - progress,
        LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrSchedule::CosineWithRestarts => {
            let cycles = f64::from(restarts.max(1));
            let within = (progress * cycles).fract();
            if progress >= 1.0 {
                0.0
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * within).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(lr_factor(LrSchedule::Constant, 0, 100, 10, 1), 0.1);
        assert_eq!(lr_factor(LrSchedule::Constant, 9, 100, 10, 1), 1.0);
        assert_eq!(lr_factor(LrSchedule::Constant, 50, 100, 10, 1), 1.0);
        assert!((lr_factor(LrSchedule::Linear, 55, 100, 10, 1) - 0.5).abs() < 1e-12);
        assert!((lr_factor(LrSchedule::Cosine, 10, 100, 10, 1) - 1.0).abs() < 1e-12);
        assert!((lr_factor(LrSchedule::Cosine, 55, 100, 10, 1) - 0.5).abs() < 1e-12);
        assert!(lr_factor(LrSchedule::Cosine, 99, 100, 10, 1) < 0.01);
    }

    #[test]
    fn restarts_jump_back_up() {
        let f = |s| lr_factor(LrSchedule::CosineWithRestarts, s, 100, 0, 2);
        assert!((f(0) - 1.0).abs() < 1e-12);
        assert!(f(49) < 0.01);
        assert!((f(50) - 1.0).abs() < 1e-12);
    }
}
