//! The Gated Linear Attention Transformer as fla 0.6.0 defines it (`GLAForCausalLM`):
//! config.json and model.safetensors with fla's names, the forward and every parameter's
//! gradient on the CPU.

pub mod checkpoint;
pub mod config;
pub mod data_parallel;
pub mod dist;
pub mod generate;
pub mod gpu;
pub mod gpu_data_parallel;
pub mod layout;
pub mod learner;
pub mod model;
pub mod mqar;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod text;
pub mod train;

pub use config::GlaConfig;
pub use generate::{generate, Sampling};
pub use layout::{Layout, Role};
pub use model::{Cache, LossOut, Model, Tape};
pub use rng::Rng;
