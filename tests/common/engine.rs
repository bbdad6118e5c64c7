//! Driving the training engine in tests: the tiny SD1 fixture model, a small generated dataset, a fast config,
//! and a run collected to its end.

use super::sd_tiny::fixture;
use lora_studio::train::config::TrainConfig;
use lora_studio::train::{Engine, Event, StartOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tiny SD1 fixture model (a diffusers folder).
pub fn model() -> PathBuf {
    fixture("sd1").join("diffusers")
}

/// `n` small images (40×40) with captions starting with a trigger word (`zk, thing {i}, red`).
pub fn dataset(dir: &Path, n: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let p = dir.join(format!("img{i}.png"));
        super::write_png(&p, 40, 40, i + 1);
        std::fs::write(p.with_extension("txt"), format!("zk, thing {i}, red")).unwrap();
    }
}

/// A fast run on the tiny model: 32 px without buckets, batch 2, rank 4 / alpha 4, fp32 files named `t`, then
/// `extra` overrides (`key=value`, later ones win).
pub fn config(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> TrainConfig {
    let s = |p: &Path| format!("{:?}", p.to_str().unwrap());
    let mut o = vec![
        format!("model.checkpoint={}", s(&model())),
        format!("dataset.folder={}", s(data)),
        format!("saving.output_dir={}", s(out)),
        "saving.output_name=\"t\"".into(),
        "saving.dtype=\"fp32\"".into(),
        "dataset.resolution=32".into(),
        "dataset.bucketing=false".into(),
        format!("training.steps={steps}"),
        "training.batch_size=2".into(),
        "training.recompute=false".into(),
        "network.rank=4".into(),
        "network.alpha=4.0".into(),
        "optimizer.lr=2e-3".into(),
    ];
    o.extend(extra.iter().map(|e| (*e).to_owned()));
    TrainConfig::build(&[], &o).unwrap()
}

pub fn start(config: TrainConfig, options: StartOptions) -> Engine {
    Engine::start(config, options, Arc::new(|| {}))
}

/// Every event of a run, to its end.
pub fn run(config: TrainConfig, options: StartOptions) -> Vec<Event> {
    let engine = start(config, options);
    let events: Vec<Event> = engine.events().iter().take_while_inclusive().collect();
    engine.join();
    events
}

trait TakeWhileInclusive: Iterator<Item = Event> + Sized {
    fn take_while_inclusive(self) -> impl Iterator<Item = Event> {
        let mut done = false;
        self.take_while(move |e| {
            let go = !done;
            done |= e.is_terminal();
            go
        })
    }
}
impl<I: Iterator<Item = Event>> TakeWhileInclusive for I {}

/// The last step and whether the run was stopped; panics (with every event) if the run did not finish.
pub fn finished(events: &[Event]) -> (u64, bool) {
    match events.last().unwrap() {
        Event::Finished { step, stopped, .. } => (*step, *stopped),
        other => panic!("the run did not finish: {other:?}\n{events:#?}"),
    }
}
