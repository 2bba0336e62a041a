//! NCCL between GPUs (issue 5, docs/DISTRIBUTED.md): one communicator per rank, through
//! cudarc's bindings. libnccl is loaded at run time like the driver, so building needs no
//! NCCL; a machine without it gets a one-line error. NVLink multicast (NVLS) stays off: the
//! first call here sets NCCL_NVLS_ENABLE=0 before any communicator exists.

use std::sync::Once;

use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use fla_tensor::{Error, Result};

use crate::device::Gpu;

/// Bytes of a communicator's unique id, as ranks hand it to each other.
pub const ID_BYTES: usize = 128;

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| Error::Device(format!("NCCL: {what}: {:?}", e.0))
}

/// Checks that libnccl loads, and turns NVLink multicast off for every communicator this
/// process makes. Call it before starting the threads that make communicators (the
/// environment is written once, here).
pub fn nccl_ready() -> Result<()> {
    static NO_MULTICAST: Once = Once::new();
    NO_MULTICAST.call_once(|| std::env::set_var("NCCL_NVLS_ENABLE", "0"));
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(Error::Device(
            "NCCL: no libnccl.so found: install NCCL, or put a libnccl.so link to PyTorch's \
             nvidia/nccl/lib/libnccl.so.2 on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// A new communicator id (rank 0 makes it and hands it to the others).
pub fn new_id() -> Result<[u8; ID_BYTES]> {
    nccl_ready()?;
    let id = Id::new().map_err(nccl_err("cannot make a unique id"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// This rank's member of a communicator of `world` ranks, on `gpu`'s stream: collectives are
/// queued on that stream behind the kernels before them.
pub struct NcclGroup {
    comm: Comm,
}

impl NcclGroup {
    /// Joins the communicator `id` as `rank` of `world`; blocks until every rank has joined.
    pub fn new(gpu: &Gpu, rank: usize, world: usize, id: [u8; ID_BYTES]) -> Result<NcclGroup> {
        nccl_ready()?;
        if rank >= world {
            return Err(Error::Invalid(format!("rank {rank} of a group of {world}")));
        }
        // ncclCommInitRank takes the calling thread's current device.
        gpu.ctx.bind_to_thread().map_err(crate::device::device_err(
            "cannot bind the GPU to this thread",
        ))?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(gpu.stream.clone(), rank, world, id)
            .map_err(nccl_err("cannot join the communicator"))?;
        Ok(NcclGroup { comm })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Replaces `buf` on every rank by the sum over the ranks, element by element (f32
    /// gradients, or an f64 loss).
    pub fn all_reduce_sum<T: NcclType>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        Ok(())
    }

    /// Every rank's `send` side by side in `recv` (world x send's length), rank order.
    pub fn all_gather(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<()> {
        if recv.len() != send.len() * self.world() {
            return Err(Error::Invalid(format!(
                "all-gather of {} floats from each of {} ranks into {}",
                send.len(),
                self.world(),
                recv.len()
            )));
        }
        self.comm
            .all_gather(send, recv)
            .map_err(nccl_err("all-gather"))?;
        Ok(())
    }

    /// The sum over the ranks of every buffer of `bufs`, in place, as one NCCL group (NCCL
    /// fuses the small ones).
    pub fn all_reduce_sum_all(&self, bufs: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        cudarc::nccl::safe::group_start().map_err(nccl_err("group start"))?;
        let queued: Result<()> = bufs.iter_mut().try_for_each(|b| self.all_reduce_sum(b));
        cudarc::nccl::safe::group_end().map_err(nccl_err("group end"))?;
        queued
    }
}
