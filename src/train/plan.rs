//! Before a run: the dataset as the trainer will see it, the step counts, the output files, and an estimate of
//! the device memory the run needs. The engine builds its run from the same functions, so the plan the GUI shows
//! is the plan that runs.

use super::config::{Targets, TrainConfig};
use super::data::DataPlan;
use super::events::Plan;
use super::failure::Failure;
use crate::dataset::scan::caption_path_for;
use crate::dataset::{Caption, Scan};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Where a run writes: `DIR/NAME.safetensors`, `DIR/NAME-step{N}.safetensors`, `DIR/samples/`, `DIR/state/`.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputPaths {
    pub dir: PathBuf,
    pub name: String,
}

impl OutputPaths {
    pub fn new(config: &TrainConfig) -> Self {
        OutputPaths {
            dir: config.saving.output_dir.clone(),
            name: config.saving.output_name.clone(),
        }
    }

    pub fn final_lora(&self) -> PathBuf {
        self.dir.join(format!("{}.safetensors", self.name))
    }

    pub fn step_lora(&self, step: u64) -> PathBuf {
        self.dir
            .join(format!("{}-step{step}.safetensors", self.name))
    }

    pub fn samples(&self) -> PathBuf {
        self.dir.join("samples")
    }

    pub fn sample(&self, step: u64, prompt_index: usize) -> PathBuf {
        self.samples()
            .join(format!("{}-step{step:06}-p{prompt_index}.png", self.name))
    }

    /// The sample of prompt `prompt_index` drawn without the LoRA.
    pub fn baseline_sample(&self, prompt_index: usize) -> PathBuf {
        self.samples()
            .join(format!("{}-base-p{prompt_index}.png", self.name))
    }

    /// The run's loss curve (see `record::LossLog`).
    pub fn loss_log(&self) -> PathBuf {
        self.dir.join(format!("{}-loss.csv", self.name))
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The intermediate LoRA files of this run name, by step (oldest first).
    pub fn step_loras(&self) -> Vec<(u64, PathBuf)> {
        let prefix = format!("{}-step", self.name);
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let path = e.ok()?.path();
                let stem = path.file_stem()?.to_str()?;
                let step = stem.strip_prefix(&prefix)?.parse().ok()?;
                (path.extension()? == "safetensors").then_some((step, path))
            })
            .collect();
        found.sort();
        found
    }
}

/// The dataset as the run uses it.
pub struct Data {
    pub scan: Scan,
    /// The regularization folder's scan, when one is set.
    pub regularization: Option<Scan>,
    pub plan: DataPlan,
    pub warnings: Vec<String>,
}

/// Scans `folder`, reading captions with the configured extension.
fn scan_folder(folder: &Path, config: &TrainConfig) -> Result<Scan, crate::dataset::ScanError> {
    let mut scan = crate::dataset::scan(folder, &AtomicBool::new(false))?;
    let ext = crate::dataset::project::normalize_ext(&config.dataset.caption_extension);
    if ext != scan.project.caption_ext() {
        for e in &mut scan.entries {
            e.caption_path = caption_path_for(&e.path, &ext);
            e.caption = Caption::load(&e.caption_path);
        }
    }
    Ok(scan)
}

/// Scans the dataset folder (and the regularization folder, when set), reads captions with the configured
/// extension and places every readable image in its bucket. Fails, with what to do, when nothing can be
/// trained or no batch can be filled.
pub fn load_data(config: &TrainConfig) -> Result<Data, Failure> {
    let folder = &config.dataset.folder;
    if folder.as_os_str().is_empty() {
        return Err(Failure::new(
            "No dataset folder is set.",
            "Open a dataset folder (images with .txt captions), or set `dataset.folder`.",
        ));
    }
    let scan = scan_folder(folder, config).map_err(|e| Failure::new(e.to_string(), ""))?;
    let ext = crate::dataset::project::normalize_ext(&config.dataset.caption_extension);
    if scan.entries.is_empty() {
        return Err(Failure::new(
            format!("{} holds no images.", folder.display()),
            "Put .png/.jpg/.webp/.bmp images (with .txt captions beside them) into the folder, or open the \
             folder that holds them.",
        ));
    }
    let batch = config.training.batch_size as usize;
    let mut plan = DataPlan::new(&scan, &config.dataset, batch, config.training.seed);
    if plan.items.is_empty() {
        return Err(Failure::new(
            format!(
                "None of the {} images in {} can be read (first: {}: {}).",
                plan.skipped.len(),
                folder.display(),
                plan.skipped[0].0.display(),
                plan.skipped[0].1
            ),
            "Check the files in the Dataset workspace (Problems filter) and replace the broken ones.",
        ));
    }
    let regularization = match &config.dataset.regularization_folder {
        Some(reg) if !reg.as_os_str().is_empty() => {
            let reg_scan = load_regularization(config, reg)?;
            let skipped = plan.skipped.len();
            plan = plan.with_regularization(&reg_scan, &config.dataset);
            let readable =
                plan.items.iter().filter(|i| i.regularization).count() + plan.regularization_unused;
            if let (0, Some((path, why))) = (readable, plan.skipped.get(skipped)) {
                return Err(Failure::new(
                    format!(
                        "None of the {} images in the regularization folder {} (`{REG_KEY}`) can be read \
                         (first: {}: {why}).",
                        plan.skipped.len() - skipped,
                        reg.display(),
                        path.display()
                    ),
                    "Replace the broken images (open the folder in the Dataset workspace to see them), or \
                     clear the regularization folder to train without it.",
                ));
            }
            Some(reg_scan)
        }
        _ => None,
    };
    let (dataset_uses, reg_uses) = plan.epoch_uses();
    let uses = dataset_uses + reg_uses;
    if uses > MAX_USES_PER_EPOCH {
        return Err(Failure::new(
            format!(
                "An epoch of {} would use {uses} images (repeats and regularization images included); at \
                 most {MAX_USES_PER_EPOCH} fit in memory.",
                folder.display()
            ),
            "Lower the folders' repeats (the number in front of a folder name, or the Repeats field).",
        ));
    }
    let steps = total_steps(config, &plan);
    if steps > crate::schema::MAX_STEPS {
        return Err(Failure::new(
            format!(
                "The run would take {steps} steps ({} per epoch × {} epochs); at most {} are allowed.",
                plan.steps_per_epoch(),
                config.training.epochs,
                crate::schema::MAX_STEPS
            ),
            "Lower `training.epochs` or the folders' repeats, or set `training.steps`.",
        ));
    }
    let mut warnings: Vec<String> = plan
        .skipped
        .iter()
        .map(|(p, why)| format!("{} is left out: {why}", p.display()))
        .collect();
    let missing = scan
        .entries
        .iter()
        .filter(|e| !e.caption.is_usable())
        .count();
    if missing > 0 {
        warnings.push(format!(
            "{missing} images have no usable caption ({ext}); they train with an empty caption"
        ));
    }
    if let Some(reg) = &regularization {
        warnings.extend(regularization_warnings(reg, &plan, &ext));
    }
    let (upscaled, most) = plan.upscaled;
    if upscaled > 0 {
        warnings.push(format!(
            "{upscaled} of {} images are smaller than their bucket and are upscaled (up to ×{most:.2}), so they \
             train blurry: use larger originals or a lower `dataset.resolution`",
            plan.items.len()
        ));
    }
    let uses = plan.bucket_uses();
    let largest = uses.values().copied().max().unwrap_or(0);
    if batch as u64 > largest {
        return Err(Failure::new(
            format!(
                "The batch size ({batch}) is larger than every bucket: the largest holds {largest} image uses per \
                 epoch."
            ),
            format!(
                "Lower `training.batch_size` to {largest} or less, add images or repeats, or turn off \
                 `dataset.bucketing` so all images share one square bucket."
            ),
        ));
    }
    let small = uses.values().filter(|&&n| n < batch as u64).count();
    if small > 0 {
        warnings.push(format!(
            "{small} buckets hold fewer image uses than the batch size ({batch}); their batches are smaller"
        ));
    }
    warnings.extend(learning_rate_warnings(config));
    Ok(Data {
        scan,
        regularization,
        plan,
        warnings,
    })
}

/// Learning rates that suit another optimizer than the chosen one: Prodigy multiplies its own step-size estimate
/// by the learning rate (so it wants about 1), the others take it as the step size.
fn learning_rate_warnings(config: &TrainConfig) -> Vec<String> {
    let o = &config.optimizer;
    let mut rates = vec![("`optimizer.lr`", o.lr)];
    if config.training.train_text_encoder {
        rates.push(("`optimizer.lr_text_encoder`", o.lr_text_encoder));
    }
    let prodigy = o.kind == super::optim::OptimizerKind::Prodigy;
    rates
        .into_iter()
        .filter_map(|(key, lr)| {
            if prodigy && lr < 0.1 {
                Some(format!(
                    "{key} is {lr:e}, but Prodigy multiplies its own step size by it: this trains almost                      nothing. Set it to 1 (0.5–1 for a gentler run)"
                ))
            } else if !prodigy && lr > 0.01 {
                Some(format!(
                    "{key} is {lr}, far above the usual 1e-4 (Lion: 3e-5): expect burnt, noisy images; 1                      suits only Prodigy"
                ))
            } else {
                None
            }
        })
        .collect()
}

/// An epoch is a list of its image uses; this many take about 160 MB.
const MAX_USES_PER_EPOCH: u64 = 10_000_000;

const REG_KEY: &str = "dataset.regularization_folder";

/// Scans the regularization folder `reg`; fails, naming it, when it is missing, holds no images or overlaps
/// the dataset folder (whose images would then train twice, once under the wrong loss weight).
fn load_regularization(config: &TrainConfig, reg: &Path) -> Result<Scan, Failure> {
    use crate::dataset::ScanError;
    let clear = "or clear the regularization folder to train without regularization images";
    let scan = scan_folder(reg, config).map_err(|e| match e {
        ScanError::NotFound(_) => Failure::new(
            format!(
                "The regularization folder {} (`{REG_KEY}`) does not exist.",
                reg.display()
            ),
            format!("Check the path, or use Browse… to pick the folder of regularization images, {clear}."),
        ),
        ScanError::NotAFolder(_) => Failure::new(
            format!(
                "The regularization folder {} (`{REG_KEY}`) is a file, not a folder.",
                reg.display()
            ),
            format!("Choose the folder that holds the regularization images, {clear}."),
        ),
        other => Failure::new(format!("The regularization folder (`{REG_KEY}`): {other}"), ""),
    })?;
    if scan.entries.is_empty() {
        return Err(Failure::new(
            format!(
                "The regularization folder {} (`{REG_KEY}`) holds no images.",
                reg.display()
            ),
            format!(
                "Put pictures of the class (.png/.jpg/.webp/.bmp, with captions such as \"a woman\") into it, \
                 {clear}."
            ),
        ));
    }
    let (dataset, regs) = (
        std::fs::canonicalize(&config.dataset.folder),
        std::fs::canonicalize(reg),
    );
    if let (Ok(d), Ok(r)) = (dataset, regs)
        && (d.starts_with(&r) || r.starts_with(&d))
    {
        let (inner, outer) = if r.starts_with(&d) {
            ("regularization folder", "dataset folder")
        } else {
            ("dataset folder", "regularization folder")
        };
        return Err(Failure::new(
            format!(
                "The {inner} is inside the {outer} ({} and {}, `{REG_KEY}`): its images would be trained as \
                 both.",
                config.dataset.folder.display(),
                reg.display()
            ),
            "Keep the regularization images in a folder of their own beside the dataset folder.",
        ));
    }
    Ok(scan)
}

/// What the plan tells about the regularization images: uncaptioned ones, and those an epoch never reaches.
fn regularization_warnings(reg: &Scan, plan: &DataPlan, ext: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    let missing = reg
        .entries
        .iter()
        .filter(|e| !e.caption.is_usable())
        .count();
    if missing > 0 {
        warnings.push(format!(
            "{missing} regularization images have no usable caption ({ext}); they train with an empty caption: \
             caption them with the class (\"a woman\")"
        ));
    }
    if plan.regularization_unused > 0 {
        let used = plan.items.iter().filter(|i| i.regularization).count();
        warnings.push(format!(
            "{} of the {} readable regularization images are not used: an epoch uses as many regularization \
             images as dataset images ({} with repeats), the first ones first, as kohya does",
            plan.regularization_unused,
            used + plan.regularization_unused,
            plan.epoch_uses().0
        ));
    }
    warnings
}

/// Optimizer steps of the whole run: `training.steps`, or the epochs' batches over the accumulation.
pub fn total_steps(config: &TrainConfig, plan: &DataPlan) -> u64 {
    if config.training.steps > 0 {
        return config.training.steps;
    }
    let batches = plan.steps_per_epoch() as u64 * u64::from(config.training.epochs);
    batches
        .div_ceil(u64::from(config.optimizer.gradient_accumulation))
        .max(1)
}

/// The plan event of a run.
pub fn make_plan(config: &TrainConfig, data: &Data, device: &str, precision: &str) -> Plan {
    let out = OutputPaths::new(config);
    let (uses, reg_uses) = data.plan.epoch_uses();
    let reg_images = data.plan.items.iter().filter(|i| i.regularization).count();
    Plan {
        images: data.plan.items.len() - reg_images,
        regularization_images: reg_images,
        samples_per_epoch: (uses + reg_uses) as usize,
        regularization_samples_per_epoch: reg_uses as usize,
        buckets: (data.plan.bucket_uses().into_iter())
            .map(|((w, h), n)| (w, h, n as usize))
            .collect(),
        steps_per_epoch: data.plan.steps_per_epoch(),
        total_steps: total_steps(config, &data.plan),
        start_step: 0,
        output_dir: out.dir.clone(),
        lora_file: out.final_lora(),
        device: device.to_owned(),
        precision: precision.to_owned(),
    }
}

/// Estimated device memory of a run, by part.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    pub total_bytes: u64,
    pub parts: Vec<(String, u64)>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

impl MemoryEstimate {
    /// `Some(advice)` when the run will not fit a card of `card_total_bytes` (with 5 % kept for the driver).
    pub fn advice(&self, card_total_bytes: u64, config: &TrainConfig) -> Option<String> {
        let usable = card_total_bytes as f64 * 0.95;
        (self.total_bytes as f64 > usable).then(|| {
            format!(
                "This run needs about {:.1} GiB but the card has {:.1} GiB. {}",
                self.total_bytes as f64 / GIB,
                card_total_bytes as f64 / GIB,
                super::failure::oom_advice(config)
            )
        })
    }
}

/// Estimates device memory from the UNet's size and the largest bucket, calibrated on SD 1.5 measurements
/// (docs/BENCHMARKS.md: 512 px, bf16, H200): activations per sample 0.5 GiB with recompute and 1.9 GiB without,
/// scaling with pixels and with the UNet's width, and by 4/3 with LoCon convs (they keep every conv's input;
/// the 12 GB preset's proof measured 4.6 GiB at batch 4 with recompute, and ran out of 11.5 GiB without).
pub fn estimate_memory(
    unet_params: u64,
    compute_bytes: u64,
    config: &TrainConfig,
    largest_bucket_pixels: u64,
) -> MemoryEstimate {
    let weights = unet_params * compute_bytes;
    let sd15_params = 860_000_000f64;
    let per_sample_512 = if config.training.recompute { 0.5 } else { 1.9 } * GIB;
    let pixel_scale = largest_bucket_pixels as f64 / (512.0 * 512.0);
    let width_scale = (unet_params as f64 / sd15_params).sqrt();
    let targets_scale = if config.network.targets == Targets::All {
        4.0 / 3.0
    } else {
        1.0
    };
    let activations = (per_sample_512
        * pixel_scale
        * width_scale
        * targets_scale
        * f64::from(config.training.batch_size)) as u64;
    // Adapters and gradients (f32, two copies) and the optimizer's state; an f32 copy of the adapters is about
    // rank/16 × 13 MB on SD 1.5.
    let copies = 2.0 + config.optimizer.kind.state_copies();
    let adapters = (unet_params as f64 / sd15_params * f64::from(config.network.rank) / 16.0
        * 13e6
        * copies) as u64;
    let workspace = (0.35 * GIB) as u64;
    let parts = vec![
        ("UNet weights".to_owned(), weights),
        ("activations".to_owned(), activations),
        ("adapters and optimizer".to_owned(), adapters),
        ("kernels and workspace".to_owned(), workspace),
    ];
    MemoryEstimate {
        total_bytes: parts.iter().map(|p| p.1).sum(),
        parts,
    }
}

/// Everything the GUI shows before Start.
#[derive(Clone, Debug)]
pub struct Preview {
    pub plan: Plan,
    pub memory: MemoryEstimate,
    pub warnings: Vec<String>,
}

/// The plan of `config` without loading any weights (reads the dataset and the checkpoint's header).
pub fn preview(config: &TrainConfig) -> Result<Preview, Failure> {
    config
        .validate()
        .map_err(|e| Failure::new(e.0, "Fix the setting named."))?;
    let model = open_model(config)?;
    let data = load_data(config)?;
    let (device, _) = crate::device::best();
    let describe = crate::device::describe(&device);
    let dtype = super::run::compute_dtype(config, &device);
    let plan = make_plan(
        config,
        &data,
        &describe,
        &format!("{dtype:?}").to_lowercase(),
    );
    let largest = plan
        .buckets
        .iter()
        .map(|&(w, h, _)| u64::from(w) * u64::from(h))
        .max()
        .unwrap_or(0);
    let unet = model.unet();
    let unet_params: u64 = unet
        .names()
        .iter()
        .filter_map(|n| unet.shape(n))
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    let memory = estimate_memory(unet_params, dtype.size_in_bytes() as u64, config, largest);
    Ok(Preview {
        plan,
        memory,
        warnings: data.warnings,
    })
}

/// Opens the configured checkpoint (headers only), with the VAE override and prediction setting applied.
pub fn open_model(config: &TrainConfig) -> Result<crate::model::checkpoint::ModelFiles, Failure> {
    use super::config::Prediction as P;
    let m = &config.model;
    if m.checkpoint.as_os_str().is_empty() {
        return Err(Failure::new(
            "No base model is set.",
            "Choose the Stable Diffusion 1.x/2.x checkpoint to train on (a .safetensors file or a diffusers \
             folder), or set `model.checkpoint`.",
        ));
    }
    let hint = "Choose a Stable Diffusion 1.x or 2.x checkpoint: a single-file .safetensors as downloaded, or a \
                diffusers folder.";
    let mut files = crate::model::checkpoint::open(&m.checkpoint)
        .map_err(|e| Failure::new(e.to_string(), hint))?;
    if let Some(vae) = &m.vae {
        files = files.with_vae(vae).map_err(|e| {
            Failure::new(
                e.to_string(),
                "Choose a VAE .safetensors file, or clear the VAE override.",
            )
        })?;
    }
    match m.prediction {
        P::Auto => {}
        P::Epsilon => files = files.with_prediction(crate::sample::Prediction::Epsilon),
        P::V => files = files.with_prediction(crate::sample::Prediction::V),
    }
    Ok(files)
}

/// The dataset's folder names as kohya records them (`ss_dataset_dirs`; with `regularization`, the
/// regularization folder's for `ss_reg_dataset_dirs`), with repeats and image counts.
pub fn dataset_dirs(
    data: &Data,
    regularization: bool,
) -> BTreeMap<String, crate::lora::DatasetDir> {
    let mut dirs: BTreeMap<String, crate::lora::DatasetDir> = BTreeMap::new();
    let scan = match (regularization, &data.regularization) {
        (false, _) => &data.scan,
        (true, Some(reg)) => reg,
        (true, None) => return dirs,
    };
    let items = data.plan.items.iter();
    for item in items.filter(|i| i.regularization == regularization) {
        let folder = folder_of(scan, &item.path);
        let e = dirs.entry(folder).or_insert(crate::lora::DatasetDir {
            n_repeats: item.repeats,
            img_count: 0,
        });
        e.img_count += 1;
    }
    dirs
}

/// Caption tag counts by dataset folder (kohya's `ss_tag_frequency`).
pub fn tag_frequency(data: &Data) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut freq: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for item in data.plan.items.iter().filter(|i| !i.regularization) {
        let folder = folder_of(&data.scan, &item.path);
        let tags = freq.entry(folder).or_default();
        for tag in crate::dataset::caption::split_tags(&item.caption) {
            *tags.entry(tag.to_owned()).or_insert(0) += 1;
        }
    }
    freq
}

fn folder_of(scan: &Scan, path: &Path) -> String {
    scan.entries
        .iter()
        .find(|e| e.path == path)
        .map(|e| e.folder.clone())
        .filter(|f| f != ".")
        .unwrap_or_else(|| {
            scan.root
                .file_name()
                .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::presets;

    const SD15_UNET: u64 = 860_000_000;

    fn card(gib: f64) -> u64 {
        (gib * GIB) as u64
    }

    fn preset(name: &str) -> TrainConfig {
        presets::find(name).unwrap().config().unwrap()
    }

    /// Against the GPU proofs (docs/BENCHMARKS.md): every SD 1.5 preset fits the card it names at its largest
    /// bucket, and the 12 GB preset without recompute — which ran out of 11.5 GiB — is warned about.
    #[test]
    fn the_estimate_agrees_with_the_preset_proofs() {
        let bucket = 640 * 384;
        for (name, gib) in [("sd15-6gb", 6.0), ("sd15-8gb", 8.0), ("sd15-12gb", 12.0)] {
            let c = preset(name);
            let m = estimate_memory(SD15_UNET, 2, &c, bucket);
            assert_eq!(m.advice(card(gib), &c), None, "{name}: {m:?}");
        }
        let mut c = preset("sd15-12gb");
        c.training.recompute = false;
        let m = estimate_memory(SD15_UNET, 2, &c, bucket);
        let advice = m
            .advice(card(12.0), &c)
            .expect("no-recompute batch 4 with LoCon is over 12 GB");
        assert!(advice.contains("training.recompute"), "{advice}");
    }

    #[test]
    fn learning_rates_are_checked_against_the_optimizer() {
        use crate::train::optim::OptimizerKind;
        let mut c = TrainConfig::default();
        assert!(learning_rate_warnings(&c).is_empty());
        c.optimizer.kind = OptimizerKind::Prodigy;
        let w = learning_rate_warnings(&c);
        assert!(w.len() == 1 && w[0].contains("Set it to 1"), "{w:?}");
        c.optimizer.lr = 1.0;
        assert!(learning_rate_warnings(&c).is_empty());
        c.optimizer.kind = OptimizerKind::Lion;
        let w = learning_rate_warnings(&c);
        assert!(w.len() == 1 && w[0].contains("burnt"), "{w:?}");
    }

    /// The 8-bit optimizer's state is a quarter of AdamW's; the estimate follows it.
    #[test]
    fn the_estimate_counts_the_optimizer_state() {
        use crate::train::optim::OptimizerKind;
        let mut c = TrainConfig::default();
        let adapters = |c: &TrainConfig| {
            let m = estimate_memory(SD15_UNET, 2, c, 512 * 512);
            m.parts
                .iter()
                .find(|p| p.0.starts_with("adapters"))
                .unwrap()
                .1
        };
        let adamw = adapters(&c);
        c.optimizer.kind = OptimizerKind::AdamW8bit;
        let eight_bit = adapters(&c);
        c.optimizer.kind = OptimizerKind::Prodigy;
        let prodigy = adapters(&c);
        assert!(
            eight_bit < adamw && adamw < prodigy,
            "{eight_bit} {adamw} {prodigy}"
        );
    }
}
