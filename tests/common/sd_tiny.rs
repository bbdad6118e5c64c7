//! The tiny random-weight SD fixtures (`tests/fixtures/sd_tiny`, made by `tools/make_sd_reference.py`).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

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
