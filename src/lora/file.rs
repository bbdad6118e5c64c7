//! Reading and writing LoRA `.safetensors` files. Save writes kohya's layout (what ComfyUI, A1111/Forge and
//! diffusers all load); load also reads diffusers/PEFT files.

use super::names::{KohyaIndex, kohya_name};
use super::{LoraError, LoraMetadata, LoraModule, LoraSet};
use crate::fsutil::write_atomic;
use crate::model::weights::all_finite;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// What a load found, so the caller can tell the user about keys it ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Module paths that got an adapter.
    pub matched: Vec<String>,
    /// File keys that name no module of the model, or are not plain LoRA tensors (LoHa/LoKr factors, DoRA
    /// magnitudes, …).
    pub unmatched: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Key suffixes of the layouts we read, after the module name.
const PARTS: [(&str, Part); 9] = [
    // kohya: `lora_unet_<name>.lora_down.weight`
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    // PEFT / current diffusers: `unet.<path>.lora_A.weight`, scale baked into B or given by `.alpha`
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    // older diffusers: `unet.<path>.lora.down.weight`, text encoder `….lora_linear_layer.down.weight`
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// The tensors found for one module, each with the key it came from (for messages).
#[derive(Default)]
struct Found {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
}

/// Reads a LoRA in kohya or diffusers/PEFT layout and matches it to `module_paths`, the adaptable modules of the
/// model (`unet.down_blocks.0.attentions.0.proj_in`, …). Tensors stay on the CPU in their stored dtype. Where a
/// file has no alpha (PEFT, which bakes its scale into B), alpha is the rank: scale 1.
pub fn load(
    path: &Path,
    module_paths: &BTreeSet<String>,
) -> Result<(LoraSet, LoadReport), LoraError> {
    let bytes =
        crate::fsutil::admit::read_bounded(path, crate::fsutil::admit::LORA).map_err(|source| {
            LoraError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
    let in_file = |message: String| {
        LoraError::Invalid(format!(
            "{}: {message}. The LoRA file is damaged or not one lora-studio reads: download or export it \
             again, or pick another LoRA.",
            path.display()
        ))
    };
    let not_safetensors =
        |e: safetensors::SafeTensorError| in_file(format!("not a safetensors file ({e})"));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;
    let (found, unmatched) = group_by_module(&tensors, module_paths).map_err(in_file)?;

    let metadata = header.metadata().clone().unwrap_or_default();
    let mut set = LoraSet {
        modules: BTreeMap::new(),
        metadata: metadata.into_iter().collect(),
    };
    for (module, parts) in found {
        let adapter = build_module(&module, parts).map_err(in_file)?;
        set.modules.insert(module, adapter);
    }
    let matched = set.modules.keys().cloned().collect();
    Ok((set, LoadReport { matched, unmatched }))
}

/// The LoRA tensors of the file by module path, and the keys (sorted) that are not LoRA tensors of a known
/// module.
fn group_by_module(
    tensors: &SafeTensors,
    module_paths: &BTreeSet<String>,
) -> Result<(BTreeMap<String, Found>, Vec<String>), String> {
    let index = KohyaIndex::new(module_paths);
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for (key, view) in tensors.iter() {
        let Some((module, part)) = split_key(key, module_paths, &index) else {
            unmatched.push(key.to_owned());
            continue;
        };
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| format!("`{key}`: {e}"))?;
        if !all_finite(&tensor).map_err(|e| format!("`{key}`: {e}"))? {
            return Err(format!(
                "`{key}` holds NaN or infinite values (or values too large for a weight)"
            ));
        }
        let entry = found.entry(module.clone()).or_default();
        let slot = match part {
            Part::Down => &mut entry.down,
            Part::Up => &mut entry.up,
            Part::Alpha => &mut entry.alpha,
        };
        if let Some((first, _)) = slot.replace((key.to_owned(), tensor)) {
            return Err(format!(
                "`{first}` and `{key}` are both for module `{module}`"
            ));
        }
    }
    unmatched.sort();
    Ok((found, unmatched))
}

/// The module path and tensor role of a file key, if the key is a LoRA tensor of a known module.
fn split_key(
    key: &str,
    module_paths: &BTreeSet<String>,
    index: &KohyaIndex,
) -> Option<(String, Part)> {
    PARTS.iter().find_map(|&(suffix, part)| {
        let stem = key.strip_suffix(suffix)?;
        let module = if module_paths.contains(stem) {
            stem
        } else {
            index.resolve(stem)?
        };
        Some((module.to_owned(), part))
    })
}

fn build_module(module: &str, found: Found) -> Result<LoraModule, String> {
    let keys = || {
        [&found.down, &found.up, &found.alpha]
            .into_iter()
            .flatten()
            .map(|(k, _)| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (Some((down_key, down)), Some((up_key, up))) = (&found.down, &found.up) else {
        return Err(format!(
            "module `{module}` needs both a down and an up matrix but has only {}",
            keys()
        ));
    };
    let rank = down.dims().first().copied().unwrap_or(0);
    let alpha = match &found.alpha {
        Some((key, t)) => scalar(t)
            .ok_or_else(|| format!("`{key}` should be one number, has shape {:?}", t.dims()))?,
        None => 0.0,
    };
    // kohya treats a missing or zero alpha as alpha = rank.
    let alpha = if alpha == 0.0 { rank as f32 } else { alpha };
    LoraModule::new(down.clone(), up.clone(), alpha)
        .map_err(|e| format!("`{down_key}` / `{up_key}`: {e}"))
}

/// The value of a one-element tensor (kohya writes alpha 0-d; some tools write shape [1]).
fn scalar(t: &Tensor) -> Option<f32> {
    if t.elem_count() != 1 {
        return None;
    }
    let value = t
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32)?.get(0)?.to_scalar());
    value.ok()
}

/// Writes `set` as a kohya LoRA: `<kohya name>.lora_down.weight` / `.lora_up.weight` / `.alpha` (0-d) in
/// `dtype` (F32, F16 or BF16), with `metadata` and the `sshs_*` hashes A1111's additional-networks indexes by.
/// The file is replaced atomically, and the same adapter and metadata always give the same bytes.
pub fn save_kohya(
    set: &LoraSet,
    path: &Path,
    metadata: &LoraMetadata,
    dtype: DType,
) -> Result<(), LoraError> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(LoraError::Invalid(format!(
            "LoRA files are saved as f32, f16 or bf16, not {dtype:?}"
        )));
    }
    let tensors = kohya_tensors(set, dtype)?;
    let mut metadata = metadata.to_map();
    let (model_hash, legacy_hash) = addnet_hashes(&tensors, &metadata)?;
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = serialize(&tensors, &metadata)?;
    write_atomic(path, &bytes).map_err(|source| LoraError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The kohya-named tensors of `set`, on the CPU in `dtype`.
fn kohya_tensors(set: &LoraSet, dtype: DType) -> Result<BTreeMap<String, Tensor>, LoraError> {
    let to_file = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous();
    let mut tensors = BTreeMap::new();
    for (path, module) in &set.modules {
        let name = kohya_name(path)?;
        let alpha = Tensor::new(module.alpha, &Device::Cpu)?.to_dtype(dtype)?;
        let entries = [
            (format!("{name}.lora_down.weight"), to_file(&module.down)?),
            (format!("{name}.lora_up.weight"), to_file(&module.up)?),
            (format!("{name}.alpha"), alpha),
        ];
        for (key, tensor) in entries {
            if tensors.insert(key, tensor).is_some() {
                return Err(LoraError::Invalid(format!(
                    "two modules share the kohya name `{name}`; one of them is `{path}`"
                )));
            }
        }
    }
    Ok(tensors)
}

/// kohya's `precalculate_safetensors_hashes`: hashes of the file as it would be saved with only its `ss_*`
/// metadata (user metadata must not change them). `sshs_model_hash` is the SHA-256 of everything after the
/// header; `sshs_legacy_hash` the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000.
fn addnet_hashes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(String, String), LoraError> {
    let training_only = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = serialize(tensors, &training_only)?;
    let header_len = 8 + header_size(&bytes);
    let model_hash = hex(&Sha256::digest(&bytes[header_len..]));
    let legacy_range = 0x100000.min(bytes.len())..0x110000.min(bytes.len());
    let legacy_hash = hex(&Sha256::digest(&bytes[legacy_range]))[..8].to_owned();
    Ok((model_hash, legacy_hash))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header_size(bytes: &[u8]) -> usize {
    let mut size = [0u8; 8];
    size.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(size) as usize
}

/// safetensors' serialization with its JSON header rewritten in sorted key order. The crate writes
/// `__metadata__` from a `HashMap`, so its order (not its length) changes from run to run; sorting makes
/// identical saves byte-identical, and the equal length keeps every data offset valid.
fn serialize(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, LoraError> {
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let failed =
        |e: &dyn std::fmt::Display| LoraError::Invalid(format!("cannot serialize the LoRA: {e}"));
    let mut bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| failed(&e))?;
    let size = header_size(&bytes);
    let header = &bytes[8..8 + size];
    let sorted: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_slice(header).map_err(|e| failed(&e))?;
    let sorted = serde_json::to_vec(&sorted).map_err(|e| failed(&e))?;
    if sorted.len() > size {
        return Err(failed(&"the sorted header is longer than the original"));
    }
    bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
    bytes[8 + sorted.len()..8 + size].fill(b' ');
    Ok(bytes)
}
