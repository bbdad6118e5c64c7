//! Why a run could not go on, for people: what happened and what to change. Device out-of-memory errors are
//! recognised and answered with the setting to lower.

use super::config::TrainConfig;

#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub message: String,
    pub hint: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hint.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}\n{}", self.message, self.hint)
        }
    }
}

impl Failure {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A failure of `doing` (a phrase: "encoding the images") from an engine error, with an out-of-memory or
    /// full-disk error turned into advice for this config.
    pub fn from_error(doing: &str, error: impl std::fmt::Display, config: &TrainConfig) -> Self {
        let text = error.to_string();
        let lower = text.to_lowercase();
        if lower.contains("out of memory") || lower.contains("out_of_memory") {
            return Failure::new(
                format!("The GPU ran out of memory while {doing}."),
                oom_advice(config),
            );
        }
        if lower.contains("no space left") || lower.contains("disk quota") {
            return Failure::new(
                format!("The disk is full ({doing}): {text}"),
                format!(
                    "Free some space on the drive of {} (or choose another output folder) and resume from its \
                     state folder; the last complete save is intact.",
                    config.saving.output_dir.display()
                ),
            );
        }
        Failure::new(format!("Failed while {doing}: {text}"), String::new())
    }
}

/// Which settings to lower, first the ones that save the most for the least quality.
pub fn oom_advice(config: &TrainConfig) -> String {
    let t = &config.training;
    let mut steps = Vec::new();
    if !t.recompute {
        steps.push(
            "turn on `training.recompute` (saves the most; steps get about a third slower)"
                .to_owned(),
        );
    }
    if t.batch_size > 1 {
        steps.push(format!(
            "lower `training.batch_size` from {} (use `optimizer.gradient_accumulation` to keep the effective batch)",
            t.batch_size
        ));
    }
    if config.dataset.max_bucket_side > config.dataset.resolution {
        steps.push(format!(
            "lower `dataset.max_bucket_side` from {} to {}",
            config.dataset.max_bucket_side, config.dataset.resolution
        ));
    }
    if config.dataset.resolution > 512 {
        steps.push(format!(
            "lower `dataset.resolution` from {}",
            config.dataset.resolution
        ));
    }
    steps.push("or pick the preset for a smaller card (sd15-6gb)".to_owned());
    format!("To fit: {}.", steps.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_names_the_settings_to_lower() {
        let mut c = TrainConfig::default();
        c.training.recompute = false;
        c.training.batch_size = 4;
        let f = Failure::from_error("training", "CUDA_ERROR_OUT_OF_MEMORY: out of memory", &c);
        assert!(f.message.contains("ran out of memory"));
        assert!(f.hint.contains("training.recompute") && f.hint.contains("batch_size"));
        let disk = Failure::from_error("saving", "No space left on device (os error 28)", &c);
        assert!(disk.message.contains("disk is full"), "{disk}");
    }
}
