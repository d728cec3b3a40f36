//! Batches onto the training device. On a CUDA device the rows are copied into one of two
//! page-locked (pinned) host buffers and sent with an asynchronous copy on the device's stream:
//! the prefetch thread goes back to the disk as soon as the copy is queued, where a copy from
//! ordinary (pageable) memory returns only once the driver has staged it through its own pinned
//! buffer, and pinned copies run at the bus's full rate. Two buffers, so that filling one never
//! waits for the copy out of the other.
//!
//! The copy is queued on the device's one stream, so stream order puts it before any use of the
//! batch. A second stream would let the copy overlap the step's kernels too, but cudarc then
//! records and waits on an event at every use of every tensor (its multi-stream mode), a cost
//! on each of a step's hundreds of kernel launches that outweighs a copy of about 1.3 ms
//! (`4096 x 2048` f32 at 25 GB/s).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Makes `[rows, width]` tensors on one device from host rows.
pub(crate) struct Uploader {
    device: Device,
    #[cfg(feature = "cuda")]
    pinned: Option<cuda::Pinned>,
}

impl Uploader {
    pub(crate) fn new(device: &Device) -> Result<Self> {
        Ok(Uploader {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            pinned: match device {
                Device::Cuda(dev) => Some(cuda::Pinned::new(dev)),
                _ => None,
            },
        })
    }

    pub(crate) fn tensor(&mut self, rows: Vec<f32>, shape: (usize, usize)) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.pinned.as_mut() {
            if !rows.is_empty() {
                return p.upload(&rows, shape);
            }
        }
        Ok(Tensor::from_vec(rows, shape, &self.device)?)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{CudaStream, PinnedHostSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

    use crate::Result;

    pub(super) struct Pinned {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        staging: [Option<PinnedHostSlice<f32>>; 2],
        next: usize,
    }

    impl Pinned {
        pub(super) fn new(device: &CudaDevice) -> Self {
            Pinned {
                device: device.clone(),
                stream: device.cuda_stream(),
                staging: [None, None],
                next: 0,
            }
        }

        pub(super) fn upload(&mut self, rows: &[f32], shape: (usize, usize)) -> Result<Tensor> {
            let slot = &mut self.staging[self.next];
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
            self.stream.memcpy_htod(staging, &mut dst).w()?;
            let storage = CudaStorage::wrap_cuda_slice(dst, self.device.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }
    }
}
