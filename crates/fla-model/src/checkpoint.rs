//! Model directories as fla's `save_pretrained` writes them: config.json and
//! model.safetensors (or shards listed in model.safetensors.index.json), parameters under
//! fla's names. Reading accepts f32, f64, f16 and bf16 weights; writing is f32, atomic.

use std::collections::BTreeMap;
use std::path::Path;

use fla_tensor::{
    read_safetensors, write_atomic, write_safetensors, Error, Real, Result, Tensor, TensorFile,
};
use serde_json::Value;

use crate::config::GlaConfig;
use crate::model::Model;

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

/// Reads config.json of a model directory.
pub fn load_config(dir: &Path) -> Result<GlaConfig> {
    GlaConfig::from_file(&dir.join("config.json"))
}

/// Every tensor of the directory's weights, by name.
fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor<f32>>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(read_safetensors(&single)?.tensors);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors (nor an index of shards) in the model directory",
            ),
        });
    }
    let bad = |message: String| Error::Format {
        path: index.clone(),
        message,
    };
    let v: Value = serde_json::from_str(&read_text(&index)?)
        .map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut out = BTreeMap::new();
    for shard in shards {
        out.extend(read_safetensors(&dir.join(shard))?.tensors);
    }
    Ok(out)
}

/// Loads a model directory; every parameter the config implies must be there with its
/// shape, and nothing else (a tied lm_head.weight is accepted and ignored).
pub fn load_model<F: Real>(dir: &Path) -> Result<Model<F>> {
    let config = load_config(dir)?;
    let mut weights = read_weights(dir)?;
    let mut model = Model::<F>::new(config, 0);
    let file = dir.join("model.safetensors");
    let bad = |message: String| Error::Format {
        path: file.clone(),
        message,
    };
    for (spec, param) in model.layout.specs.iter().zip(model.params.iter_mut()) {
        let t = weights.remove(&spec.name).ok_or_else(|| {
            bad(format!(
                "parameter `{}` {:?} is missing",
                spec.name, spec.shape
            ))
        })?;
        if t.shape() != spec.shape {
            return Err(bad(format!(
                "parameter `{}` has shape {:?}, config.json implies {:?}",
                spec.name,
                t.shape(),
                spec.shape
            )));
        }
        t.check_finite(&spec.name)?;
        *param = t.cast();
    }
    if model.config.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    if let Some(name) = weights.keys().next() {
        return Err(bad(format!(
            "unexpected tensor `{name}` (not a parameter of this GLA config)"
        )));
    }
    Ok(model)
}

/// Writes config.json and model.safetensors (f32, metadata format "pt" as transformers
/// expects) into `dir`, creating it; each file is written atomically.
pub fn save_model<F: Real>(model: &Model<F>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })?;
    let mut file = TensorFile::default();
    for (spec, p) in model.layout.specs.iter().zip(&model.params) {
        file.tensors.insert(spec.name.clone(), p.cast());
    }
    file.metadata.insert("format".into(), "pt".into());
    write_safetensors(&dir.join("model.safetensors"), &file)?;
    write_atomic(&dir.join("config.json"), model.config.to_json().as_bytes())
}
