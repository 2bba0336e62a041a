//! Tensors, the error type and safetensors I/O shared by every fla crate.

mod error;
mod io;
mod real;
mod tensor;

pub use error::{Error, Result};
pub use io::{read_int_tensor, read_safetensors, write_atomic, write_safetensors, TensorFile};
pub use real::Real;
pub use tensor::Tensor;
