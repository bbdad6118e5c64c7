//! The tiny random-weight SD fixtures (`tests/fixtures/sd_tiny`, made by `tools/make_sd_reference.py`).

use candle_core::{DType, Device, Tensor};
use lora_studio::lora::{LoadReport, LoraSet, load};
use lora_studio::model::adapters::{Attach, attach};
use lora_studio::model::checkpoint::{self, ModelFiles};
use lora_studio::model::text_encoder::TextEncoder;
use lora_studio::model::unet::{UNet, UNetOptions};
use lora_studio::model::weights::WithDeltas;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The folder of a fixture family (`sd1`, `sd2v`).
pub fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd_tiny")
        .join(family)
}

/// diffusers' reference tensors of a family.
pub fn reference(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(family).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The family's `fixture.json` (configs, special token ids, sampling settings).
pub fn fixture_json(family: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(family).join("fixture.json")).unwrap())
        .unwrap()
}

/// The largest absolute value of a tensor, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Our UNet of a fixture's diffusers weights, fp32 on the CPU.
pub fn load_unet(files: &ModelFiles) -> UNet {
    UNet::load(
        files.unet(),
        &files.unet_config,
        UNetOptions::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The module paths our loader matches LoRA keys against: our UNet's adaptable layers and the text encoder's
/// linear layers.
pub fn model_module_paths(files: &ModelFiles, unet: &mut UNet) -> BTreeSet<String> {
    let mut paths = unet.module_paths().unwrap();
    let te = files.text_encoder();
    paths.extend(
        te.names()
            .into_iter()
            .filter(|n| n.contains(".encoder.layers.") && te.shape(n).is_some_and(|s| s.len() == 2))
            .filter_map(|n| Some(format!("text_encoder.{}", n.strip_suffix(".weight")?))),
    );
    paths
}

/// What our models give with a LoRA file applied the way the application applies it: our loader reads it against
/// the model's module paths, the UNet gets it attached unmerged at weight 1 and runs on `unet.sample_in` /
/// `unet.timesteps` / `unet.encoder_hidden_states`, and the text encoder gets its deltas merged (as the
/// pipeline does) and runs on `te.input_ids`.
pub struct WithLora {
    pub set: LoraSet,
    pub report: LoadReport,
    /// UNet modules `attach` put an adapter on.
    pub unet_attached: usize,
    pub unet_out: Tensor,
    pub te_last: Tensor,
}

pub fn with_lora(family: &str, lora: &Path, r: &HashMap<String, Tensor>) -> WithLora {
    let files = checkpoint::open(&fixture(family).join("diffusers")).unwrap();
    let mut unet = load_unet(&files);
    let paths = model_module_paths(&files, &mut unet);
    let (set, report) = load(lora, &paths).unwrap();
    let unet_attached = attach(
        unet.layers_mut().unwrap(),
        &set,
        "unet",
        1.0,
        Attach::Unmerged,
    )
    .unwrap();
    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    let unet_out = unet
        .forward(&r["unet.sample_in"], &t, &r["unet.encoder_hidden_states"])
        .unwrap();

    let deltas: HashMap<String, Tensor> = set
        .modules
        .iter()
        .filter_map(|(k, m)| {
            let name = k.strip_prefix("text_encoder.")?;
            Some((format!("{name}.weight"), m.delta(1.0).unwrap()))
        })
        .collect();
    let weights = WithDeltas::new(files.text_encoder(), deltas);
    let te = TextEncoder::new(
        &weights,
        &files.text_encoder_config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let te_last = te.forward(&r["te.input_ids"]).unwrap().last;
    WithLora {
        set,
        report,
        unet_attached,
        unet_out,
        te_last,
    }
}

/// `got` against diffusers' `expected`: (max abs error, max abs of `expected`, how far `expected` is from
/// `without`, the output without the LoRA).
pub fn compare(got: &Tensor, expected: &Tensor, without: &Tensor) -> (f32, f32, f32) {
    (
        max_abs(&(got - expected).unwrap()),
        max_abs(expected),
        max_abs(&(expected - without).unwrap()),
    )
}
