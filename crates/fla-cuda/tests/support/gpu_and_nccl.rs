//! The GPU and NCCL checks of the NCCL tests (here and in fla-model's), included by path.

use fla_cuda::{nccl_ready, Gpu};

fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

/// GPU 0 when one is usable; otherwise prints that the test skipped, or fails under
/// FLA_REQUIRE_CUDA=1.
pub fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) if required("FLA_REQUIRE_CUDA") => {
            panic!("FLA_REQUIRE_CUDA=1 but no usable GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

/// GPU 0 when a GPU and libnccl are usable; otherwise prints that the test skipped, or fails
/// under FLA_REQUIRE_CUDA=1 / FLA_REQUIRE_NCCL=1.
pub fn gpu_and_nccl() -> Option<Gpu> {
    let gpu = gpu()?;
    match nccl_ready() {
        Ok(()) => Some(gpu),
        Err(e) if required("FLA_REQUIRE_NCCL") => panic!("FLA_REQUIRE_NCCL=1 but {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}
