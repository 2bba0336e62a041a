//! What data- and sequence-parallel training ask of the ranks' communicator (issue 5,
//! docs/DISTRIBUTED.md). [`crate::NcclGroup`] is the one between GPUs; a group whose ranks
//! share one GPU can stage through the host instead (fla-model's `HostStagedGroup`, for tests).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use fla_tensor::{Error, Result};

use crate::device::Gpu;
use crate::gla::uninit;

/// The collectives over f32 device buffers. Every rank calls them in the same order with
/// buffers of the same lengths. Each runs after the work already queued on `gpu`'s stream, and
/// may still be running when it returns: the stream sees the results once [`DeviceGroup::join`]
/// has been called, so a caller can go on queueing work that does not touch the buffers (the
/// backward's other layers) while the ranks communicate.
pub trait DeviceGroup {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `buf` on every rank replaced by the sum over the ranks, element by element.
    fn all_reduce_sum(&self, gpu: &Gpu, buf: &mut CudaViewMut<'_, f32>) -> Result<()>;
    /// `recv` (n elements) gets the sum over the ranks of piece `rank` of `send` (world x n).
    fn reduce_scatter_sum(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()>;
    /// Every rank's `send` side by side in `recv` (world x its length), rank order.
    fn all_gather(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()>;
    /// `gpu`'s stream waits for every collective issued so far.
    fn join(&self, gpu: &Gpu) -> Result<()>;
    /// The sum over the ranks of one host number (the ranks' losses), waited for.
    fn sum_f64(&self, gpu: &Gpu, x: f64) -> Result<f64>;

    /// Every rank's `mine` side by side in a new buffer, rank order, waited for.
    fn gathered(&self, gpu: &Gpu, mine: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut all = uninit::<f32>(gpu, mine.len() * self.world())?;
        self.all_gather(gpu, &mine.as_view(), &mut all.as_view_mut())?;
        self.join(gpu)?;
        Ok(all)
    }
}

/// The length check every implementation makes: `what` of `each` floats per rank, over
/// `world` ranks, into or out of a buffer of `total`.
pub fn check_pieces(what: &str, each: usize, world: usize, total: usize) -> Result<()> {
    if each * world != total {
        return Err(Error::Invalid(format!(
            "{what} of {each} floats from each of {world} ranks into {total}"
        )));
    }
    Ok(())
}
