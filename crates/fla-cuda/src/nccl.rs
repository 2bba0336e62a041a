//! NCCL between GPUs (issue 5, docs/DISTRIBUTED.md): one communicator per rank, through
//! cudarc's bindings. libnccl is loaded at run time like the driver, so building needs no
//! NCCL; a machine without it gets a one-line error. NVLink multicast (NVLS) stays off: the
//! first call here sets NCCL_NVLS_ENABLE=0 before any communicator exists.

use std::sync::{Arc, Once};

use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use fla_tensor::{Error, Result};

use crate::device::{device_err, Gpu};
use crate::group::{check_pieces, DeviceGroup};

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

/// This rank's member of a communicator of `world` ranks. Its collectives run on a stream of
/// their own, each after an event on the compute stream, so that they overlap the kernels
/// queued after them; [`DeviceGroup::join`] makes the compute stream wait for them.
pub struct NcclGroup {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl NcclGroup {
    /// Joins the communicator `id` as `rank` of `world` on `gpu`; blocks until every rank has
    /// joined.
    pub fn new(gpu: &Gpu, rank: usize, world: usize, id: [u8; ID_BYTES]) -> Result<NcclGroup> {
        nccl_ready()?;
        if rank >= world {
            return Err(Error::Invalid(format!("rank {rank} of a group of {world}")));
        }
        // ncclCommInitRank takes the calling thread's current device.
        gpu.ctx
            .bind_to_thread()
            .map_err(device_err("cannot bind the GPU to this thread"))?;
        let stream = gpu
            .ctx
            .new_stream()
            .map_err(device_err("cannot make the communicator's stream"))?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(nccl_err("cannot join the communicator"))?;
        Ok(NcclGroup { comm, stream })
    }

    /// The communicator's stream waits for the work queued on `gpu`'s so far.
    fn after(&self, gpu: &Gpu) -> Result<()> {
        self.stream
            .join(gpu.stream())
            .map_err(device_err("cannot order the collective after the kernels"))
    }
}

impl DeviceGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, gpu: &Gpu, buf: &mut CudaViewMut<'_, f32>) -> Result<()> {
        self.after(gpu)?;
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        Ok(())
    }

    fn reduce_scatter_sum(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_pieces("reduce-scatter", recv.len(), self.world(), send.len())?;
        self.after(gpu)?;
        self.comm
            .reduce_scatter(send, recv, &ReduceOp::Sum)
            .map_err(nccl_err("reduce-scatter"))?;
        Ok(())
    }

    fn all_gather(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_pieces("all-gather", send.len(), self.world(), recv.len())?;
        self.after(gpu)?;
        self.comm
            .all_gather(send, recv)
            .map_err(nccl_err("all-gather"))?;
        Ok(())
    }

    fn join(&self, gpu: &Gpu) -> Result<()> {
        gpu.stream()
            .join(&self.stream)
            .map_err(device_err("cannot wait for the collectives"))
    }

    fn sum_f64(&self, gpu: &Gpu, x: f64) -> Result<f64> {
        let s = gpu.stream();
        let dev = device_err("the sum's buffer");
        let mut buf = s.clone_htod(&[x]).map_err(&dev)?;
        self.after(gpu)?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        self.join(gpu)?;
        Ok(s.clone_dtoh(&buf).map_err(&dev)?[0])
    }
}
