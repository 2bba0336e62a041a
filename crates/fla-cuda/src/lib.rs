//! The CUDA back end: the project's own kernels (kernels/*.cu), compiled at first use by
//! NVRTC for the GPU's architecture and cached on disk, launched through the driver API.
//! Nothing of CUDA is needed to build: the driver and NVRTC libraries are loaded at run time,
//! and a machine without them gets a one-line error naming what is missing.

mod blas;
mod device;
mod gla;
mod gla_bwd;
mod gla_chunk;
mod gla_rec;
mod group;
pub mod layers;
mod nccl;
mod nvrtc;
mod seq_parallel;

pub use blas::{Blas, Operand};
/// The CUDA bindings these types are built on, for callers that hold device buffers.
pub use cudarc;
pub use device::{open, DeviceChoice, Gpu};
pub use gla::{check_head_sizes, gla_forward, Buf, DType, DeviceGla};
pub use gla_bwd::{gla_backward, DeviceUpstream};
pub use gla_rec::{Decoder, StepInputs};
pub use group::{check_pieces, DeviceGroup};
pub use nccl::{nccl_ready, new_id, NcclGroup, ID_BYTES};
pub use seq_parallel::gather_in_turn;
