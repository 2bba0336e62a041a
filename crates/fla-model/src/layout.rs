//! The parameters of a GLA model: fla's names and shapes, in one list that the model, the
//! checkpoints and the optimizer share. The model reaches a parameter through the slot
//! numbers of [`Layout`]; gradients are a list of the same shapes in the same order.

use fla_tensor::{Real, Tensor};

use crate::config::{GlaConfig, GATE_LOW_RANK};
use crate::rng::Rng;

/// What a parameter is, for initialisation and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A linear or convolution weight: normal(0, initializer_range), decayed.
    Matrix,
    /// The token embeddings: normal(0, initializer_range), not decayed by default.
    Embedding,
    /// A norm's scale: ones, not decayed.
    Norm,
    /// A bias: zeros, not decayed.
    Bias,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

/// Slots of one block's parameters in [`Layout::specs`].
#[derive(Clone, Debug)]
pub struct LayerSlots {
    pub attn_norm: usize,
    pub q_proj: usize,
    pub k_proj: usize,
    pub v_proj: usize,
    pub g_proj: Option<usize>,
    /// Depthwise short convolutions [C, 1, conv_size] of q, k, v (use_short_conv).
    pub convs: Option<[usize; 3]>,
    /// The key gate's low-rank pair: [16, hidden] without bias, then [K, 16] with bias.
    pub gk_proj0: usize,
    pub gk_proj1: usize,
    pub gk_bias: usize,
    /// The per-head RMSNorm weight of the attention output (elementwise_affine).
    pub g_norm: Option<usize>,
    pub o_proj: usize,
    pub mlp_norm: usize,
    pub gate_proj: usize,
    pub up_proj: usize,
    pub down_proj: usize,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub embeddings: usize,
    pub layers: Vec<LayerSlots>,
    pub norm: usize,
    /// None when the output projection is the embedding matrix (tie_word_embeddings).
    pub lm_head: Option<usize>,
}

impl Layout {
    pub fn new(c: &GlaConfig) -> Layout {
        let mut specs = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, role: Role| {
            specs.push(ParamSpec { name, shape, role });
            specs.len() - 1
        };
        let (d, kd, vd) = (c.hidden_size, c.key_dim(), c.value_dim());
        let (kg, vg, inter) = (
            c.key_dim_per_group(),
            c.value_dim_per_group(),
            c.intermediate(),
        );
        let embeddings = add(
            "model.embeddings.weight".into(),
            vec![c.vocab_size, d],
            Role::Embedding,
        );
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn_norm = add(format!("{p}.attn_norm.weight"), vec![d], Role::Norm);
            let q_proj = add(format!("{p}.attn.q_proj.weight"), vec![kd, d], Role::Matrix);
            let k_proj = add(format!("{p}.attn.k_proj.weight"), vec![kg, d], Role::Matrix);
            let v_proj = add(format!("{p}.attn.v_proj.weight"), vec![vg, d], Role::Matrix);
            let g_proj = c
                .use_output_gate
                .then(|| add(format!("{p}.attn.g_proj.weight"), vec![vd, d], Role::Matrix));
            let convs = c.use_short_conv.then(|| {
                [("q", kd), ("k", kg), ("v", vg)].map(|(x, width)| {
                    add(
                        format!("{p}.attn.{x}_conv1d.weight"),
                        vec![width, 1, c.conv_size],
                        Role::Matrix,
                    )
                })
            });
            let gk_proj0 = add(
                format!("{p}.attn.gk_proj.0.weight"),
                vec![GATE_LOW_RANK, d],
                Role::Matrix,
            );
            let gk_proj1 = add(
                format!("{p}.attn.gk_proj.1.weight"),
                vec![kg, GATE_LOW_RANK],
                Role::Matrix,
            );
            let gk_bias = add(format!("{p}.attn.gk_proj.1.bias"), vec![kg], Role::Bias);
            let o_proj = add(format!("{p}.attn.o_proj.weight"), vec![d, vd], Role::Matrix);
            let g_norm = c.elementwise_affine.then(|| {
                add(
                    format!("{p}.attn.{}.weight", c.g_norm_name()),
                    vec![c.head_v_dim()],
                    Role::Norm,
                )
            });
            let mlp_norm = add(format!("{p}.mlp_norm.weight"), vec![d], Role::Norm);
            let gate_proj = add(
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, d],
                Role::Matrix,
            );
            let up_proj = add(
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, d],
                Role::Matrix,
            );
            let down_proj = add(
                format!("{p}.mlp.down_proj.weight"),
                vec![d, inter],
                Role::Matrix,
            );
            layers.push(LayerSlots {
                attn_norm,
                q_proj,
                k_proj,
                v_proj,
                g_proj,
                convs,
                gk_proj0,
                gk_proj1,
                gk_bias,
                g_norm,
                o_proj,
                mlp_norm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = add("model.norm.weight".into(), vec![d], Role::Norm);
        let lm_head = (!c.tie_word_embeddings)
            .then(|| add("lm_head.weight".into(), vec![c.vocab_size, d], Role::Matrix));
        Layout {
            specs,
            embeddings,
            layers,
            norm,
            lm_head,
        }
    }

    /// The slot of the output projection: lm_head, or the embeddings when tied.
    pub fn output_slot(&self) -> usize {
        self.lm_head.unwrap_or(self.embeddings)
    }

    /// Zeros of every parameter's shape (gradient accumulators, optimizer moments).
    pub fn zeros<F: Real>(&self) -> Vec<Tensor<F>> {
        self.specs.iter().map(|s| Tensor::zeros(&s.shape)).collect()
    }

    /// fla's initialisation (FLAPreTrainedModel._init_weights): weights and embeddings
    /// normal(0, initializer_range), biases zero, norms one; seeded.
    pub fn init<F: Real>(&self, c: &GlaConfig, seed: u64) -> Vec<Tensor<F>> {
        let mut rng = Rng::new(seed);
        self.specs
            .iter()
            .map(|s| {
                let mut t = Tensor::zeros(&s.shape);
                match s.role {
                    Role::Matrix | Role::Embedding => t
                        .data_mut()
                        .iter_mut()
                        .for_each(|x| *x = F::from_f64(c.initializer_range * rng.normal())),
                    Role::Norm => t.data_mut().fill(F::ONE),
                    Role::Bias => {}
                }
                t
            })
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }
}
