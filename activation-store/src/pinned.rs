//! Activations between the host and a CUDA device through page-locked (pinned) host buffers.
//!
//! Up, for training ([`Uploader`]): rows are copied into one of two pinned buffers and sent with
//! an asynchronous copy on the device's stream. The store's prefetch thread goes back to the
//! disk as soon as the copy is queued, where a copy from ordinary (pageable) memory returns only
//! once the driver has staged it through its own pinned buffer, and pinned copies run at the
//! bus's full rate. Two buffers, so that filling one never waits for the copy out of the other.
//!
//! Down, for harvesting ([`Downloader`]): the forward thread queues each batch's copy into a
//! pinned buffer and goes on to the next forward pass; the writing thread waits for the copy
//! when it takes the batch ([`Fetched::finish`]) and hands the buffer back for reuse. A copy to
//! pageable memory would hold the forward thread until the device had finished the pass.
//!
//! Copies are queued on the device's one stream, so stream order puts an upload before any use
//! of the batch and a download after the pass that made it. A second stream would let copies
//! overlap kernels too, but cudarc then records and waits on an event at every use of every
//! tensor (its multi-stream mode), a cost on each of a step's hundreds of kernel launches that
//! outweighs a copy of about 1.3 ms (`4096 x 2048` f32 at 25 GB/s).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Makes `[rows, width]` tensors on one device from host rows.
pub(crate) struct Uploader {
    device: Device,
    #[cfg(feature = "cuda")]
    pinned: Option<cuda::Staging>,
}

impl Uploader {
    pub(crate) fn new(device: &Device) -> Self {
        Uploader {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            pinned: match device {
                Device::Cuda(dev) => Some(cuda::Staging::new(dev)),
                _ => None,
            },
        }
    }

    pub(crate) fn tensor(&mut self, rows: Vec<f32>, shape: (usize, usize)) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.pinned.as_mut()
            && !rows.is_empty()
        {
            return p.upload(&rows, shape);
        }
        Ok(Tensor::from_vec(rows, shape, &self.device)?)
    }
}

/// Starts copies of activations to the host, as f32.
pub(crate) struct Downloader {
    #[cfg(feature = "cuda")]
    pool: Option<cuda::Pool>,
}

/// A batch's activations on their way to the host.
pub(crate) enum Fetched {
    Host(Vec<f32>),
    #[cfg(feature = "cuda")]
    Pinned(cuda::Pending),
}

impl Downloader {
    /// Copies from `device` (only CUDA devices take the pinned path).
    pub(crate) fn new(device: &Device) -> Self {
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Downloader {
            #[cfg(feature = "cuda")]
            pool: match device {
                Device::Cuda(dev) => Some(cuda::Pool::new(dev)),
                _ => None,
            },
        }
    }

    /// Starts copying `t` (any float dtype, any device) to the host as f32 values in row-major
    /// order; from a CUDA device the copy is queued and this returns at once.
    pub(crate) fn start(&self, t: &Tensor) -> Result<Fetched> {
        let t = t.to_dtype(DType::F32)?;
        #[cfg(feature = "cuda")]
        if let (Some(pool), Device::Cuda(_)) = (&self.pool, t.device())
            && t.elem_count() > 0
        {
            return Ok(Fetched::Pinned(pool.start(&t.contiguous()?)?));
        }
        Ok(Fetched::Host(
            t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
        ))
    }
}

impl Fetched {
    /// The values, once the copy has ended.
    pub(crate) fn finish(self) -> Result<Vec<f32>> {
        match self {
            Fetched::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Fetched::Pinned(p) => p.finish(),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{CudaStream, PinnedHostSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

    use crate::error::{Error, Result};

    /// The two staging buffers of uploads.
    pub(super) struct Staging {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        buffers: [Option<PinnedHostSlice<f32>>; 2],
        next: usize,
    }

    impl Staging {
        pub(super) fn new(device: &CudaDevice) -> Self {
            Staging {
                device: device.clone(),
                stream: device.cuda_stream(),
                buffers: [None, None],
                next: 0,
            }
        }

        pub(super) fn upload(&mut self, rows: &[f32], shape: (usize, usize)) -> Result<Tensor> {
            let slot = &mut self.buffers[self.next];
            self.next ^= 1;
            // Every batch but the last has the same size, so a buffer is made once (twice in
            // all) and again only for a short last batch.
            if slot.as_ref().is_none_or(|s| s.len() != rows.len()) {
                // SAFETY: every element is written below before the copy reads any.
                let fresh = unsafe { self.stream.context().alloc_pinned::<f32>(rows.len()) };
                *slot = Some(fresh.w()?);
            }
            let Some(staging) = slot.as_mut() else {
                unreachable!("the buffer was made above")
            };
            // Waits for the copy out of this buffer two batches ago, then fills it.
            staging.as_mut_slice().w()?.copy_from_slice(rows);
            // SAFETY: the copy below writes every element before the tensor is used: both are
            // ordered on this stream.
            let mut dst = unsafe { self.stream.alloc::<f32>(rows.len()) }.w()?;
            self.stream.memcpy_htod(&*staging, &mut dst).w()?;
            let storage = CudaStorage::wrap_cuda_slice(dst, self.device.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }
    }

    /// Pinned buffers free for the next downloads (a handful: the batches in flight, per hook).
    type Free = Arc<Mutex<Vec<PinnedHostSlice<f32>>>>;

    pub(super) struct Pool {
        stream: Arc<CudaStream>,
        free: Free,
    }

    /// A queued copy of `len` values into `buf`.
    pub(crate) struct Pending {
        buf: PinnedHostSlice<f32>,
        len: usize,
        free: Free,
    }

    impl Pool {
        pub(super) fn new(device: &CudaDevice) -> Self {
            Pool {
                stream: device.cuda_stream(),
                free: Arc::default(),
            }
        }

        /// Queues the copy of `t` (f32, contiguous, on this pool's device).
        pub(super) fn start(&self, t: &Tensor) -> Result<Pending> {
            let len = t.elem_count();
            let reused = {
                let mut free = self.free.lock().map_err(|_| poisoned())?;
                let fits = free.iter().position(|b| b.len() >= len);
                fits.map(|i| free.swap_remove(i))
            };
            let mut buf = match reused {
                Some(b) => b,
                // SAFETY: the copy below writes the first `len` values before any is read, and
                // only those are read (`Pending::finish`).
                None => unsafe { self.stream.context().alloc_pinned::<f32>(len) }.w()?,
            };
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(Error::Candle(candle_core::Error::Msg(
                    "a pinned download of a tensor that is not on a CUDA device".into(),
                )));
            };
            let from = layout.start_offset();
            let src = storage.as_cuda_slice::<f32>()?.slice(from..from + len);
            self.stream.memcpy_dtoh(&src, &mut buf).w()?;
            Ok(Pending {
                buf,
                len,
                free: self.free.clone(),
            })
        }
    }

    impl Pending {
        pub(super) fn finish(self) -> Result<Vec<f32>> {
            let Pending { buf, len, free } = self;
            // The writing thread may never have used the device: the buffer's context is made
            // current for the wait (and for freeing the buffer, should it be dropped here).
            buf.context().bind_to_thread().w()?;
            let v = buf.as_slice().w()?[..len].to_vec();
            free.lock().map_err(|_| poisoned())?.push(buf);
            Ok(v)
        }
    }

    fn poisoned() -> Error {
        Error::Candle(candle_core::Error::Msg(
            "the pinned buffer pool's lock was poisoned by a panic".into(),
        ))
    }
}
