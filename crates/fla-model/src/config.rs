//! config.json of a GLA model, with fla 0.6.0's field names and defaults (`GLAConfig`).
//!
//! Every field read is kept, unknown ones included, and written back on save, so a
//! directory passes through this crate without losing what another tool put there.

use fla_tensor::{Error, Result};
use serde_json::{Map, Value};

/// The low-rank width of the key-gate projection `gk_proj` (fla's `gate_low_rank_dim`).
pub const GATE_LOW_RANK: usize = 16;
/// Log gates are `logsigmoid(gk_proj(x)) / 16` (fla's `gate_logit_normalizer`).
pub const GATE_LOGIT_NORMALIZER: f64 = 16.0;

#[derive(Clone, Debug)]
pub struct GlaConfig {
    pub hidden_size: usize,
    pub expand_k: f64,
    pub expand_v: f64,
    pub hidden_ratio: Option<f64>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: Option<usize>,
    pub attn_mode: String,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub use_output_gate: bool,
    pub clamp_min: Option<f64>,
    pub hidden_act: String,
    pub elementwise_affine: bool,
    pub norm_eps: f64,
    pub fuse_norm: bool,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub initializer_range: f64,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    /// The whole object as read, unknown fields included; known fields are rewritten on save.
    raw: Map<String, Value>,
}

impl Default for GlaConfig {
    /// fla's defaults (`GLAConfig()`): the 1.3B-class shape, 24 layers of width 2048.
    fn default() -> Self {
        GlaConfig {
            hidden_size: 2048,
            expand_k: 0.5,
            expand_v: 1.0,
            hidden_ratio: Some(4.0),
            intermediate_size: None,
            num_hidden_layers: 24,
            num_heads: 4,
            num_kv_heads: None,
            attn_mode: "chunk".into(),
            use_short_conv: false,
            conv_size: 4,
            use_output_gate: true,
            clamp_min: None,
            hidden_act: "swish".into(),
            elementwise_affine: true,
            norm_eps: 1e-6,
            fuse_norm: true,
            tie_word_embeddings: false,
            vocab_size: 32000,
            initializer_range: 0.02,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
            raw: Map::new(),
        }
    }
}

/// Two configs are equal when they would write the same config.json.
impl PartialEq for GlaConfig {
    fn eq(&self, other: &Self) -> bool {
        self.to_json() == other.to_json()
    }
}

fn bad(field: &str, want: &str, got: &Value) -> Error {
    Error::Invalid(format!("config.json: `{field}` must be {want}, got {got}"))
}

/// Typed access to the fields of a JSON object; absent or null fields give `None`.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, f: &str) -> Option<&Value> {
        self.0.get(f).filter(|v| !v.is_null())
    }
    fn usize(&self, f: &str) -> Result<Option<usize>> {
        self.get(f)
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad(f, "a non-negative integer", v))
            })
            .transpose()
    }
    fn i64(&self, f: &str) -> Result<Option<i64>> {
        self.get(f)
            .map(|v| v.as_i64().ok_or_else(|| bad(f, "an integer", v)))
            .transpose()
    }
    fn f64(&self, f: &str) -> Result<Option<f64>> {
        self.get(f)
            .map(|v| v.as_f64().ok_or_else(|| bad(f, "a number", v)))
            .transpose()
    }
    fn bool(&self, f: &str) -> Result<Option<bool>> {
        self.get(f)
            .map(|v| v.as_bool().ok_or_else(|| bad(f, "true or false", v)))
            .transpose()
    }
    fn string(&self, f: &str) -> Result<Option<String>> {
        self.get(f)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(f, "a string", v))
            })
            .transpose()
    }
}

impl GlaConfig {
    /// Parses and checks config.json's text. Fields fla has but this crate cannot honour
    /// (feature maps, hybrid attention layers, ...) are errors naming the field.
    pub fn from_json(text: &str) -> Result<GlaConfig> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("config.json is not valid JSON ({e})")))?;
        let Value::Object(raw) = value else {
            return Err(Error::Invalid("config.json must hold a JSON object".into()));
        };
        let f = Fields(&raw);
        match f.string("model_type")?.as_deref() {
            Some("gla") => {}
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "config.json: unknown architecture model_type `{other}` (this reads \"gla\" models)"
                )))
            }
            None => {
                return Err(Error::Invalid(
                    "config.json has no model_type (expected \"gla\")".into(),
                ))
            }
        }
        let d = GlaConfig::default();
        let cfg = GlaConfig {
            hidden_size: f.usize("hidden_size")?.unwrap_or(d.hidden_size),
            expand_k: f.f64("expand_k")?.unwrap_or(d.expand_k),
            expand_v: f.f64("expand_v")?.unwrap_or(d.expand_v),
            // fla treats a null hidden_ratio as 4 (GatedMLP); an absent one is its default 4.
            hidden_ratio: f.f64("hidden_ratio")?.or(d.hidden_ratio),
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?.unwrap_or(d.num_hidden_layers),
            num_heads: f.usize("num_heads")?.unwrap_or(d.num_heads),
            num_kv_heads: f.usize("num_kv_heads")?,
            attn_mode: f.string("attn_mode")?.unwrap_or(d.attn_mode),
            use_short_conv: f.bool("use_short_conv")?.unwrap_or(d.use_short_conv),
            conv_size: f.usize("conv_size")?.unwrap_or(d.conv_size),
            use_output_gate: f.bool("use_output_gate")?.unwrap_or(d.use_output_gate),
            clamp_min: f.f64("clamp_min")?,
            hidden_act: f.string("hidden_act")?.unwrap_or(d.hidden_act),
            // fla passes a null elementwise_affine on to the norm, which then has no weight.
            elementwise_affine: match raw.get("elementwise_affine") {
                Some(Value::Null) => false,
                _ => f.bool("elementwise_affine")?.unwrap_or(true),
            },
            norm_eps: f.f64("norm_eps")?.unwrap_or(d.norm_eps),
            fuse_norm: f.bool("fuse_norm")?.unwrap_or(d.fuse_norm),
            tie_word_embeddings: f
                .bool("tie_word_embeddings")?
                .unwrap_or(d.tie_word_embeddings),
            vocab_size: f.usize("vocab_size")?.unwrap_or(d.vocab_size),
            initializer_range: f.f64("initializer_range")?.unwrap_or(d.initializer_range),
            bos_token_id: match raw.get("bos_token_id") {
                None => d.bos_token_id,
                Some(_) => f.i64("bos_token_id")?,
            },
            eos_token_id: match raw.get("eos_token_id") {
                None => d.eos_token_id,
                Some(_) => f.i64("eos_token_id")?,
            },
            pad_token_id: f.i64("pad_token_id")?,
            raw: raw.clone(),
        };
        if let Some(m) = f.string("feature_map")? {
            return Err(Error::Invalid(format!(
                "config.json: feature_map `{m}` is not supported (only null)"
            )));
        }
        if f.get("attn").is_some() {
            return Err(Error::Invalid(
                "config.json: `attn` (standard attention in some layers) is not supported; set it to null".into(),
            ));
        }
        if f.get("attnres_block_size").is_some() {
            return Err(Error::Invalid(
                "config.json: `attnres_block_size` (attention residuals) is not supported; set it to null".into(),
            ));
        }
        if f.bool("use_l2warp")? == Some(true) {
            return Err(Error::Invalid(
                "config.json: `use_l2warp` is not supported; set it to false".into(),
            ));
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads a config.json file (or the config.json of a model directory); errors name it.
    pub fn from_file(path: &std::path::Path) -> Result<GlaConfig> {
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        GlaConfig::from_json(&text).map_err(|e| Error::Format {
            path,
            message: e.to_string(),
        })
    }

    /// Checks the sizes fit together as fla requires; the error names the field.
    pub fn check(&self) -> Result<()> {
        let inv = |m: String| Err(Error::Invalid(format!("config.json: {m}")));
        if self.hidden_size == 0 || self.num_heads == 0 || self.vocab_size == 0 {
            return inv("hidden_size, num_heads and vocab_size must be positive".into());
        }
        if self.hidden_act != "swish" {
            return inv(format!(
                "hidden_act `{}` is not supported (only \"swish\")",
                self.hidden_act
            ));
        }
        if !["chunk", "fused_chunk", "fused_recurrent"].contains(&self.attn_mode.as_str()) {
            return inv(format!(
                "attn_mode `{}` is not one of chunk, fused_chunk, fused_recurrent",
                self.attn_mode
            ));
        }
        for (name, expand) in [("expand_k", self.expand_k), ("expand_v", self.expand_v)] {
            let dim = self.hidden_size as f64 * expand;
            if dim.is_nan() || dim < 1.0 || (dim - dim.round()).abs() > 1e-9 {
                return inv(format!(
                    "hidden_size * {name} = {dim} must be a positive integer"
                ));
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_heads.is_multiple_of(kv) {
            return inv(format!(
                "num_heads {} must be a multiple of num_kv_heads {kv}",
                self.num_heads
            ));
        }
        if !self.key_dim().is_multiple_of(self.num_heads)
            || !self.value_dim().is_multiple_of(self.num_heads)
        {
            return inv(format!(
                "key dim {} and value dim {} must be multiples of num_heads {}",
                self.key_dim(),
                self.value_dim(),
                self.num_heads
            ));
        }
        if self.use_short_conv && self.conv_size == 0 {
            return inv("conv_size must be at least 1".into());
        }
        if self.norm_eps.is_nan() || self.norm_eps < 0.0 {
            return inv(format!("norm_eps must be >= 0, got {}", self.norm_eps));
        }
        if let Some(c) = self.clamp_min {
            if c.is_nan() || c >= 0.0 {
                return inv(format!("clamp_min must be negative (a log gate), got {c}"));
            }
        }
        if self.intermediate_size == Some(0) {
            return inv("intermediate_size must be positive".into());
        }
        Ok(())
    }

    /// The text of config.json: every field read, with the known ones as they are now.
    pub fn to_json(&self) -> String {
        let mut m = self.raw.clone();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_type", "gla".into());
        put("hidden_size", self.hidden_size.into());
        put("expand_k", self.expand_k.into());
        put("expand_v", self.expand_v.into());
        put("hidden_ratio", opt(self.hidden_ratio));
        put("intermediate_size", opt(self.intermediate_size));
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_heads", self.num_heads.into());
        put("num_kv_heads", opt(self.num_kv_heads));
        put("attn_mode", self.attn_mode.clone().into());
        put("use_short_conv", self.use_short_conv.into());
        put("conv_size", self.conv_size.into());
        put("use_output_gate", self.use_output_gate.into());
        put("clamp_min", opt(self.clamp_min));
        put("hidden_act", self.hidden_act.clone().into());
        put("elementwise_affine", self.elementwise_affine.into());
        put("norm_eps", self.norm_eps.into());
        put("fuse_norm", self.fuse_norm.into());
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        put("vocab_size", self.vocab_size.into());
        put("initializer_range", self.initializer_range.into());
        put("bos_token_id", opt(self.bos_token_id));
        put("eos_token_id", opt(self.eos_token_id));
        put("pad_token_id", opt(self.pad_token_id));
        if !m.contains_key("architectures") {
            m.insert("architectures".into(), vec!["GLAForCausalLM"].into());
        }
        for (k, v) in [
            ("feature_map", Value::Null),
            ("use_gk", true.into()),
            ("use_gv", false.into()),
        ] {
            m.entry(k).or_insert(v);
        }
        serde_json::to_string_pretty(&Value::Object(m)).expect("a JSON object serialises") + "\n"
    }

    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.kv_heads()
    }
    pub fn key_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_k).round() as usize
    }
    pub fn value_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_v).round() as usize
    }
    pub fn head_k_dim(&self) -> usize {
        self.key_dim() / self.num_heads
    }
    pub fn head_v_dim(&self) -> usize {
        self.value_dim() / self.num_heads
    }
    /// Width of k, v and the key gate as projected (before repeating over the groups).
    pub fn key_dim_per_group(&self) -> usize {
        self.key_dim() / self.kv_groups()
    }
    pub fn value_dim_per_group(&self) -> usize {
        self.value_dim() / self.kv_groups()
    }
    /// The MLP width: as given, else fla's rule, 2/3 of hidden_size * hidden_ratio rounded
    /// up to a multiple of 256 (fla.modules.GatedMLP).
    pub fn intermediate(&self) -> usize {
        self.intermediate_size.unwrap_or_else(|| {
            let ratio = self.hidden_ratio.unwrap_or(4.0);
            let size = (self.hidden_size as f64 * ratio * 2.0 / 3.0) as usize;
            size.div_ceil(256) * 256
        })
    }
    /// The name fla gives the per-head norm of the attention output.
    pub fn g_norm_name(&self) -> &'static str {
        if self.use_output_gate && self.fuse_norm {
            "g_norm_swish_gate"
        } else {
            "g_norm"
        }
    }
}

fn opt<T: Into<Value>>(x: Option<T>) -> Value {
    x.map_or(Value::Null, Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_rounding_follow_fla() {
        let c = GlaConfig::from_json(r#"{"model_type": "gla"}"#).unwrap();
        assert_eq!(c, GlaConfig::default());
        assert_eq!(
            (c.key_dim(), c.value_dim(), c.head_k_dim()),
            (1024, 2048, 256)
        );
        // int(2048 * 4 * 2/3) = 5461, rounded up to 5632.
        assert_eq!(c.intermediate(), 5632);
        let small = GlaConfig::from_json(r#"{"model_type":"gla","hidden_size":1024}"#).unwrap();
        assert_eq!(small.intermediate(), 2816);
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let text = r#"{"model_type":"gla","hidden_size":64,"num_heads":2,"my_field":[1,2]}"#;
        let c = GlaConfig::from_json(text).unwrap();
        let again: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(again["my_field"], serde_json::json!([1, 2]));
        assert_eq!(GlaConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |t: &str| GlaConfig::from_json(t).unwrap_err().to_string();
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"model_type":"llama"}"#).contains("unknown architecture"));
        assert!(err(r#"{"hidden_size":64}"#).contains("no model_type"));
        assert!(err(r#"{"model_type":"gla","hidden_size":"big"}"#).contains("`hidden_size`"));
        assert!(
            err(r#"{"model_type":"gla","hidden_size":64,"num_heads":3}"#).contains("num_heads 3")
        );
        assert!(err(r#"{"model_type":"gla","feature_map":"relu"}"#).contains("feature_map"));
        assert!(err(r#"{"model_type":"gla","hidden_act":"gelu"}"#).contains("hidden_act"));
        assert!(
            err(r#"{"model_type":"gla","num_heads":4,"num_kv_heads":3}"#).contains("num_kv_heads")
        );
    }
}
