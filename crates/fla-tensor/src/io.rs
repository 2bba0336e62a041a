//! The safetensors files of the `fla op` exchange format: f32 tensors by name, with string
//! metadata. Reading also accepts f64, f16 and bf16 (converted to f32); writing is atomic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{Error, Result, Tensor};

/// The tensors and metadata of one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor<f32>>,
    pub metadata: BTreeMap<String, String>,
}

pub fn read_safetensors(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let format = |message: String| Error::Format {
        path: path.into(),
        message,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| format(format!("not a safetensors file ({e})")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format(format!("not a safetensors file ({e})")))?;
    let mut file = TensorFile::default();
    if let Some(m) = meta.metadata() {
        file.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    for (name, view) in st.tensors() {
        let data = to_f32(&view).map_err(|m| format(format!("tensor `{name}`: {m}")))?;
        let t = Tensor::new(view.shape().to_vec(), data).map_err(|e| format(e.to_string()))?;
        file.tensors.insert(name, t);
    }
    Ok(file)
}

/// One integer tensor (I64, I32, U32, ...; or a float tensor holding whole numbers) of a
/// safetensors file, with its shape: token ids.
pub fn read_int_tensor(path: &Path, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let format = |message: String| Error::Format {
        path: path.into(),
        message,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format(format!("not a safetensors file ({e})")))?;
    let view = st
        .tensor(name)
        .map_err(|_| format(format!("no tensor `{name}`")))?;
    let b = view.data();
    let ints: Vec<i64> = match view.dtype() {
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Dtype::U32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Dtype::I16 => b
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        Dtype::U8 => b.iter().map(|&x| x as i64).collect(),
        _ => {
            let floats = to_f32(&view).map_err(|m| format(format!("tensor `{name}`: {m}")))?;
            if let Some(x) = floats.iter().find(|x| x.fract() != 0.0 || !x.is_finite()) {
                return Err(format(format!(
                    "tensor `{name}` holds {x}, not a whole number"
                )));
            }
            floats.iter().map(|&x| x as i64).collect()
        }
    };
    Ok((ints, view.shape().to_vec()))
}

fn to_f32(view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type (expected F32)"
            ))
        }
    })
}

/// IEEE half to single precision, exactly.
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// Writes the tensors as F32 with the metadata, through a temporary file renamed into place,
/// so a reader never sees a half-written file and an old file survives a failed write.
pub fn write_safetensors(path: &Path, file: &TensorFile) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = file
        .tensors
        .iter()
        .map(|(n, t)| {
            let b = t.data().iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), b, t.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = file
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let out = safetensors::serialize(views, &meta).map_err(|e| Error::Format {
        path: path.into(),
        message: e.to_string(),
    })?;
    write_atomic(path, &out)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
