//! Training state on disk, for resume: adapter weights, optimizer state and the counters, in one folder that is
//! replaced as a whole (written beside it, then swapped in), so a crash leaves the previous state usable.
//! No random-generator state is stored: the data order follows from (seed, epoch) and per-step noise from
//! (seed, step), so the counters are enough to continue the same run.

use super::config::TrainConfig;
use super::optim::Optimizer;
use crate::fsutil::admit;
use crate::model::adapters::Trainable;
use crate::model::weights::all_finite;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Batches of the current epoch already trained.
    pub batch_in_epoch: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    schema: u32,
    counters: Counters,
    optimizer_steps: u64,
    config: TrainConfig,
}

const STATE: &str = "state.toml";
/// More optimizer steps than any LoRA run takes; a larger count means a damaged file.
const MAX_STEP: u64 = 100_000_000;
/// What to do about a state that cannot be used.
const DAMAGED: &str = "start a new run or pick another state";
const ADAPTERS: &str = "adapters.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Writes the state folder `dir` (replacing an earlier one only once the new one is complete).
pub fn save(
    dir: &Path,
    counters: &Counters,
    config: &TrainConfig,
    trainable: &Trainable,
    opt: &Optimizer,
) -> candle_core::Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(crate::fsutil::STATE_STAGING_PREFIX)
        .tempdir_in(parent)?;
    let adapters: HashMap<String, Tensor> = trainable
        .adapters
        .iter()
        .flat_map(|(path, a)| {
            [
                (format!("{path}.down"), a.down.as_tensor().clone()),
                (format!("{path}.up"), a.up.as_tensor().clone()),
            ]
        })
        .collect();
    candle_core::safetensors::save(&adapters, tmp.path().join(ADAPTERS))?;
    let (opt_state, optimizer_steps) = opt.state_tensors()?;
    candle_core::safetensors::save(&opt_state, tmp.path().join(OPTIMIZER))?;
    let file = StateFile {
        schema: 1,
        counters: counters.clone(),
        optimizer_steps,
        config: config.clone(),
    };
    std::fs::write(
        tmp.path().join(STATE),
        toml::to_string_pretty(&file).map_err(msg)?,
    )?;
    let staged: PathBuf = tmp.keep();
    let old = dir.with_extension("old");
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&staged, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Where a saved run stands and the config it was started with (for `--resume` to build on).
pub fn saved(dir: &Path) -> candle_core::Result<(Counters, TrainConfig)> {
    let file = read_state(&state_dir(dir))?;
    Ok((file.counters, file.config))
}

/// The folder to read: `dir`, or its `.old` twin when a crash between the two renames of `save` left only that.
fn state_dir(dir: &Path) -> PathBuf {
    let old = dir.with_extension("old");
    if !dir.join(STATE).is_file() && old.join(STATE).is_file() {
        old
    } else {
        dir.to_owned()
    }
}

fn read_state(dir: &Path) -> candle_core::Result<StateFile> {
    let path = dir.join(STATE);
    let text = admit::read_text(&path, admit::TOML).map_err(|e| {
        msg(format!(
            "{} is not a training state folder ({}: {e}); {DAMAGED}",
            dir.display(),
            path.display()
        ))
    })?;
    let file: StateFile = toml::from_str(&text)
        .map_err(|e| msg(format!("{} is damaged: {e}; {DAMAGED}", path.display())))?;
    let c = &file.counters;
    if c.step > MAX_STEP || file.optimizer_steps > c.step || c.epoch > c.step {
        return Err(msg(format!(
            "{} is damaged: it says step {}, epoch {} and {} optimizer steps, which cannot come from one run; \
             {DAMAGED}",
            path.display(),
            c.step,
            c.epoch,
            file.optimizer_steps
        )));
    }
    Ok(file)
}

/// The tensors of one state file, each checked to be finite.
fn read_tensors(path: &Path) -> candle_core::Result<HashMap<String, Tensor>> {
    let damaged =
        |e: &dyn std::fmt::Display| msg(format!("{} is damaged ({e}); {DAMAGED}", path.display()));
    admit::regular_file(path, admit::SAFETENSORS).map_err(|e| damaged(&e))?;
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| damaged(&e))?;
    for (name, t) in &tensors {
        if !all_finite(t).map_err(|e| damaged(&e))? {
            return Err(damaged(&format!("`{name}` holds NaN or infinite values")));
        }
    }
    Ok(tensors)
}

/// Restores adapters (into `trainable`'s variables) and optimizer state from `dir`; returns the counters and the
/// config the run was started with.
pub fn load(
    dir: &Path,
    trainable: &Trainable,
    opt: &mut Optimizer,
) -> candle_core::Result<(Counters, TrainConfig)> {
    let dir = &state_dir(dir);
    let file = read_state(dir)?;
    let adapters_path = dir.join(ADAPTERS);
    let adapters = read_tensors(&adapters_path)?;
    for (path, a) in &trainable.adapters {
        for (part, var) in [("down", &a.down), ("up", &a.up)] {
            let key = format!("{path}.{part}");
            let t = adapters.get(&key).ok_or_else(|| {
                msg(format!(
                    "{} has no adapter for {path}: it is from another network; {DAMAGED}",
                    adapters_path.display()
                ))
            })?;
            if t.dims() != var.dims() {
                return Err(msg(format!(
                    "{}: `{key}` has shape {:?}, the network's adapter {:?}; {DAMAGED}",
                    adapters_path.display(),
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
    }
    let opt_path = dir.join(OPTIMIZER);
    let opt_state = read_tensors(&opt_path)?;
    opt.load_state(&opt_state, file.optimizer_steps)
        .map_err(|e| msg(format!("{} is damaged: {e}; {DAMAGED}", opt_path.display())))?;
    Ok((file.counters, file.config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::adapters::{Slot, Trainable};
    use crate::model::layers::{Adaptable, AdapterShape};
    use crate::train::optim::{Group, OptimizerKind};
    use rand::SeedableRng;

    fn setup(seed: u64) -> (Vec<Adaptable>, Trainable, Optimizer) {
        let w = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut layers = vec![Adaptable::new(
            "a.to_q",
            w.clone(),
            None,
            AdapterShape::Linear,
        )];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = Trainable::attach(
            layers.iter_mut().collect(),
            |_| Some(Slot::Linear),
            (2, 2.0),
            (2, 2.0),
            0.0,
            &mut rng,
        )
        .unwrap();
        let opt = Optimizer::new(
            OptimizerKind::AdamW,
            Default::default(),
            vec![Group {
                vars: t.vars(),
                lr: 0.1,
            }],
        );
        (layers, t, opt)
    }

    fn train_step(layers: &[Adaptable], opt: &mut Optimizer) {
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let loss = layers[0]
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(&loss.backward().unwrap(), 1.0, 1.0, 1.0).unwrap();
    }

    #[test]
    fn resume_continues_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (layers, t, mut opt) = setup(1);
        train_step(&layers, &mut opt);
        let counters = Counters {
            step: 1,
            epoch: 0,
            batch_in_epoch: 1,
        };
        save(&state, &counters, &TrainConfig::default(), &t, &opt).unwrap();
        save(&state, &counters, &TrainConfig::default(), &t, &opt).unwrap(); // replacing works too
        let (layers2, t2, mut opt2) = setup(2); // other initial values, overwritten by the load
        let (c, cfg) = load(&state, &t2, &mut opt2).unwrap();
        assert_eq!((c, cfg), (counters, TrainConfig::default()));
        train_step(&layers, &mut opt);
        train_step(&layers2, &mut opt2);
        for ((_, a), (_, b)) in t.adapters.iter().zip(&t2.adapters) {
            for (x, y) in [(&a.down, &b.down), (&a.up, &b.up)] {
                let d = (x.as_tensor() - y.as_tensor())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
        assert!(
            load(dir.path(), &t2, &mut opt2).is_err(),
            "a folder without state is refused"
        );
    }
}
