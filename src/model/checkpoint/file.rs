//! One memory-mapped safetensors file, or the shards of one component, checked before it is mapped.
//!
//! The header is read and validated here (rather than left to the safetensors crate) so that a damaged
//! download gets a message that says what is wrong with it, not "MetadataIncompleteBuffer".

use super::CheckpointError;
use crate::fsutil::admit;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The safetensors crate refuses headers above this size; so do we, with a better message.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What a file's header says about one tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A safetensors file (or a set of shards), mapped into memory; tensors are copied out one at a time.
pub struct SafetensorsFile {
    mapped: MmapedSafetensors,
    tensors: HashMap<String, TensorMeta>,
    metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        Self::open_shards(&[path.to_path_buf()])
    }

    /// Several files that together hold one component (diffusers' `*.safetensors.index.json`).
    pub fn open_shards(paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::new();
        for path in paths {
            let header = read_header(path)?;
            tensors.extend(header.tensors);
            metadata.extend(header.metadata);
        }
        // SAFETY: a memory map is undefined behaviour if the file changes while mapped. We only ever read
        // these files and never write to a model file while it is open; the headers were validated above, so
        // every tensor's byte range lies inside the map. (A user overwriting the checkpoint during training is
        // the one remaining hazard, shared by every program that maps model files.)
        let mapped =
            unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| CheckpointError::Corrupt {
                path: paths.first().cloned().unwrap_or_default(),
                detail: e.to_string(),
            })?;
        Ok(SafetensorsFile {
            mapped,
            tensors,
            metadata,
        })
    }

    /// The `__metadata__` strings of the header (all shards together).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor as stored (file dtype) on `device`.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.mapped.load(name, device)
    }
}

struct Header {
    tensors: HashMap<String, TensorMeta>,
    metadata: HashMap<String, String>,
}

/// Reads and checks the header: JSON, every tensor's byte range, and the file length.
fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = admit::open_regular(path, admit::SAFETENSORS).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    if file_len < 8 {
        return Err(corrupt(path, format!("it is only {file_len} bytes long")));
    }
    file.read_exact(&mut prefix).map_err(io)?;
    if prefix.starts_with(b"PK\x03\x04") {
        return Err(CheckpointError::Archive {
            path: path.to_path_buf(),
        });
    }
    if let Some(kind) = pickle_magic(&prefix) {
        return Err(CheckpointError::Pickle {
            path: path.to_path_buf(),
            kind,
        });
    }
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(not_safetensors(
            path,
            format!(
                "it starts with a header length of {header_len} bytes, but the file has {file_len} bytes"
            ),
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(io)?;
    let header = parse_header(path, &json)?;
    let data_len = check_offsets(path, &header.tensors)?;
    check_length(path, file_len, 8 + header_len + data_len)?;
    Ok(Header {
        tensors: header
            .tensors
            .into_iter()
            .map(|(k, i)| {
                (
                    k,
                    TensorMeta {
                        dtype: i.dtype,
                        shape: i.shape,
                    },
                )
            })
            .collect(),
        metadata: header.metadata,
    })
}

struct RawHeader {
    tensors: Vec<(String, TensorInfo)>,
    metadata: HashMap<String, String>,
}

fn parse_header(path: &Path, json: &[u8]) -> Result<RawHeader, CheckpointError> {
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| {
            not_safetensors(
                path,
                format!("its header is not the JSON a safetensors file starts with ({e})"),
            )
        })?;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut metadata = HashMap::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            // Metadata is specified as string → string; tools that write other values get them skipped.
            if let serde_json::Value::Object(map) = value {
                metadata.extend(
                    map.into_iter()
                        .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned()))),
                );
            }
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
            corrupt(
                path,
                format!("the header entry for `{name}` is malformed ({e})"),
            )
        })?;
        tensors.push((name, info));
    }
    Ok(RawHeader { tensors, metadata })
}

/// Tensors must tile the data area without gaps or overlaps, each exactly as large as dtype × shape.
/// Returns the length of the data area the header describes.
fn check_offsets(path: &Path, tensors: &[(String, TensorInfo)]) -> Result<u64, CheckpointError> {
    let mut sorted: Vec<&(String, TensorInfo)> = tensors.iter().collect();
    sorted.sort_by_key(|(_, info)| info.data_offsets);
    let mut end = 0usize;
    for (name, info) in sorted {
        let (start, stop) = info.data_offsets;
        let elems = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elems
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        let Some(bytes) = bytes else {
            return Err(corrupt(
                path,
                format!(
                    "the header gives `{name}` an impossible shape {:?}",
                    info.shape
                ),
            ));
        };
        if start != end || stop < start || stop - start != bytes {
            return Err(corrupt(
                path,
                format!(
                    "its header is inconsistent: `{name}` ({:?} {:?}, {bytes} bytes) is said to lie at bytes \
                     {start}..{stop} of the data, but the previous tensor ends at byte {end}",
                    info.dtype, info.shape
                ),
            ));
        }
        end = stop;
    }
    Ok(end as u64)
}

fn check_length(path: &Path, file_len: u64, expected: u64) -> Result<(), CheckpointError> {
    if file_len < expected {
        return Err(corrupt(
            path,
            format!(
                "it is truncated: its header describes {expected} bytes but the file has only {file_len} \
                 ({:.1}% present)",
                100.0 * file_len as f64 / expected as f64
            ),
        ));
    }
    if file_len > expected {
        return Err(corrupt(
            path,
            format!(
                "it has {} bytes after the last tensor its header describes",
                file_len - expected
            ),
        ));
    }
    Ok(())
}

/// Old PyTorch pickles start with a pickle protocol opcode (since 1.6 torch.save writes a zip, refused above).
fn pickle_magic(prefix: &[u8; 8]) -> Option<&'static str> {
    match prefix {
        [0x80, 2..=5, ..] => Some("a Python pickle"),
        _ => None,
    }
}

fn corrupt(path: &Path, detail: String) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        detail,
    }
}

fn not_safetensors(path: &Path, detail: String) -> CheckpointError {
    CheckpointError::NotSafetensors {
        path: path.to_path_buf(),
        detail,
    }
}
