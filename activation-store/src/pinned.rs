//! Activations between the host and a CUDA device through page-locked (pinned) host buffers.
//!
//! Up, for training ([`Uploader`]): the store's prefetch thread copies rows into a pinned buffer
//! and sends them with an asynchronous copy. candle's CUDA device issues work on CUDA's
//! per-thread default stream, so that copy runs on the prefetch thread's own stream, beside the
//! training thread's kernels: the upload overlaps the step. The two streams are not ordered
//! with each other, so the prefetch thread waits for the copy's end (an event, a blocking wait)
//! before it hands the batch over; the trainer's kernels then never read a batch still in
//! flight, and the prefetch thread, a few batches ahead, is the only one that waits. A copy from
//! ordinary (pageable) memory would also be staged through the driver's own buffer, at a
//! fraction of the bus's rate.
//!
//! Down, for harvesting ([`Downloader`]): the forward thread queues each batch's copy into a
//! pinned buffer, on its stream right after the pass that made the batch, and goes on to the
//! next forward pass; the writing thread waits for the copy when it takes the batch
//! ([`Fetched::finish`]) and hands the buffer back for reuse. A copy to pageable memory would
//! hold the forward thread until the device had finished the pass.

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
    use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda::cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

    use crate::error::{Error, Result};

    /// The staging buffer of uploads and the event that marks the end of its copy.
    pub(super) struct Staging {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        buffer: Option<PinnedHostSlice<f32>>,
        copied: Option<CudaEvent>,
    }

    impl Staging {
        pub(super) fn new(device: &CudaDevice) -> Self {
            Staging {
                device: device.clone(),
                stream: device.cuda_stream(),
                buffer: None,
                copied: None,
            }
        }

        pub(super) fn upload(&mut self, rows: &[f32], shape: (usize, usize)) -> Result<Tensor> {
            // Every batch but the last has the same size, so the buffer is made once, and again
            // only for a short last batch.
            if self.buffer.as_ref().is_none_or(|b| b.len() != rows.len()) {
                // SAFETY: every element is written below before the copy reads any.
                let fresh = unsafe { self.stream.context().alloc_pinned::<f32>(rows.len()) };
                self.buffer = Some(fresh.w()?);
            }
            let Some(staging) = self.buffer.as_mut() else {
                unreachable!("the buffer was made above")
            };
            staging.as_mut_slice().w()?.copy_from_slice(rows);
            // SAFETY: the copy below writes every element, and the wait after it ends before the
            // tensor leaves this thread.
            let mut dst = unsafe { self.stream.alloc::<f32>(rows.len()) }.w()?;
            self.stream.memcpy_htod(&*staging, &mut dst).w()?;
            // The stream is this thread's (CUDA's per-thread default stream): the trainer's
            // thread would not wait for it. A blocking event, so the wait sleeps, not spins.
            let copied = match self.copied.take() {
                Some(e) => e,
                None => self
                    .stream
                    .context()
                    .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                    .w()?,
            };
            copied.record(&self.stream).w()?;
            copied.synchronize().w()?;
            self.copied = Some(copied);
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
