//! The data-parallel collective over NCCL (feature `nccl`): one process per GPU, each holding one
//! [`Nccl`] member, joined through NCCL's unique id, which rank 0 writes to a file the others read
//! (a shared filesystem, as `torchrun`'s file store does). NCCL moves the data (NVLink,
//! InfiniBand); nothing here touches the network.
//!
//! [`Collective::all_reduce_sum`] runs as a candle custom op on the tensor's CUDA buffer, queued
//! on the device's stream like any other kernel, so the step never waits on the host for it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};

use crate::device::Collective;
use crate::error::{Result, SaeError};

/// One member of an NCCL group: this process's rank on its GPU.
pub struct Nccl {
    comm: Arc<Mutex<Comm>>,
    rank: usize,
    world_size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// every call goes through the mutex.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl Nccl {
    /// Joins the group of `world_size` processes as `rank` on `device` (a CUDA device). Rank 0
    /// creates NCCL's unique id and writes it to `id_file` (atomically); the others wait for the
    /// file, up to `wait`. Remove the file between runs: a stale id hangs the group.
    ///
    /// # Errors
    /// A configuration error for a rank outside the group or a device that is not CUDA; the
    /// id file unreadable or absent after `wait`; NCCL's errors.
    pub fn join(
        device: &Device,
        rank: usize,
        world_size: usize,
        id_file: &Path,
        wait: Duration,
    ) -> Result<Self> {
        if rank >= world_size {
            return Err(SaeError::config(
                "nccl",
                format!("rank {rank} is outside a group of {world_size}"),
            ));
        }
        let cuda = device
            .as_cuda_device()
            .map_err(|_| SaeError::config("nccl", "the collective needs a CUDA device"))?;
        let nccl = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
            SaeError::config("nccl", format!("{e:?}"))
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(nccl)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            let tmp = id_file.with_extension("tmp");
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::rename(&tmp, id_file))
                .map_err(|e| SaeError::io(id_file, e))?;
            id
        } else {
            let start = Instant::now();
            let bytes = loop {
                match std::fs::read(id_file) {
                    Ok(b) if b.len() == 128 => break b,
                    Ok(b) => {
                        return Err(SaeError::config(
                            "nccl",
                            format!(
                                "{}: {} bytes, expected NCCL's 128-byte id",
                                id_file.display(),
                                b.len()
                            ),
                        ));
                    }
                    Err(_) if start.elapsed() < wait => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => return Err(SaeError::io(id_file, e)),
                }
            };
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, b) in internal.iter_mut().zip(bytes) {
                *d = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id).map_err(nccl)?;
        // Shared with the all-reduce ops; `Nccl` itself is Send and Sync (above).
        #[allow(clippy::arc_with_non_send_sync)]
        let comm = Arc::new(Mutex::new(comm));
        Ok(Nccl {
            comm,
            rank,
            world_size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
}

impl Collective for Nccl {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, false)
    }

    fn all_reduce_min(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, true)
    }
}

impl Nccl {
    fn reduce(&self, t: &Tensor, min: bool) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return Err(SaeError::config(
                "nccl",
                "all-reduce of a tensor that is not on a CUDA device",
            ));
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce {
            comm: self.comm.clone(),
            min,
        })?)
    }
}

/// The sum (or minimum) over the group as a custom op, so that it runs on the tensor's own buffer
/// and stream.
struct AllReduce {
    comm: Arc<Mutex<Comm>>,
    min: bool,
}

impl candle_core::CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = l.shape().elem_count();
        if l.contiguous_offsets() != Some((0, n)) {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor from offset 0");
        }
        let dev = s.device().clone();
        let op = if self.min {
            ReduceOp::Min
        } else {
            ReduceOp::Sum
        };
        let comm = self.comm.lock().map_err(|_| {
            candle_core::Error::Msg("the NCCL communicator's lock is poisoned".into())
        })?;
        let out = match s.dtype() {
            DType::F32 => {
                let src = s.as_cuda_slice::<f32>()?;
                // SAFETY: every element is written by the all-reduce before it is read.
                let mut dst = unsafe { dev.alloc::<f32>(n) }?;
                comm.all_reduce(src, &mut dst, &op)
                    .map_err(candle_core::Error::debug)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::F64 => {
                let src = s.as_cuda_slice::<f64>()?;
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<f64>(n) }?;
                comm.all_reduce(src, &mut dst, &op)
                    .map_err(candle_core::Error::debug)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            other => candle_core::bail!("the NCCL all-reduce sums f32 or f64, not {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
