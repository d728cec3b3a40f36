//! Adam's update for the device path in three element-wise passes, in place: the first moment
//! from the gradient and the clip factor, the second likewise, then the weights from both. As
//! tensor ops the same update took about seventeen passes over each matrix, each writing a
//! temporary (about 170 bytes of traffic an element against 40 here: at 65,536 x 2,048 and two
//! matrices, some 45 GB a step, about 14 ms at an H100's 3.35 TB/s, against 11 GB). The
//! arithmetic is the tensor ops', in their order and rounding (the moments in f32 or bf16,
//! rounded to nearest even); on CUDA a kernel per pass (`fused_adam.cu`, compiled by NVRTC when
//! first used), on the CPU a loop.

use candle_core::{CpuStorage, Layout, Tensor};

use crate::custom_ops::{part, part_mut};
use crate::error::Result;

/// The ops' name in errors.
const OP: &str = "adam";

/// `moment = moment · beta + g · (1 - beta)`, `g = grad · clip` (squared for the second
/// moment), in place. `moment`: f32 or bf16; `grad`: f32 of the same shape; `clip`: one f32.
pub(crate) fn update_moment(
    moment: &Tensor,
    grad: &Tensor,
    clip: &Tensor,
    beta: f64,
    square: bool,
) -> Result<()> {
    let grad = grad.contiguous()?;
    let clip = clip.reshape(1)?.contiguous()?;
    moment.inplace_op3(
        &grad,
        &clip,
        &Moment {
            beta: beta as f32,
            one_minus: (1.0 - beta) as f32,
            square,
        },
    )?;
    Ok(())
}

/// `w = w - (m / (sqrt(v) · inv_sqrt_bc2 + eps)) · step_size`, in place. `w`: f32; `m`, `v`:
/// f32 or bf16, both the same, of `w`'s shape.
pub(crate) fn update_weights(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step_size: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
) -> Result<()> {
    w.inplace_op3(
        &m.contiguous()?,
        &v.contiguous()?,
        &Update {
            step_size: step_size as f32,
            inv_sqrt_bc2: inv_sqrt_bc2 as f32,
            eps: eps as f32,
        },
    )?;
    Ok(())
}

/// Whether the passes can run on `device`: on CUDA, whether NVRTC compiled their kernels and
/// the device loaded them (once per process and device); elsewhere always. The device path
/// falls back to tensor ops where they cannot, so that a machine without NVRTC still trains.
///
/// # Errors
/// What NVRTC or the driver said.
pub(crate) fn ready_on(device: &candle_core::Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::ready(dev),
        _ => Ok(()),
    }
}

struct Moment {
    beta: f32,
    one_minus: f32,
    square: bool,
}

impl Moment {
    fn of(&self, old: f32, grad: f32, clip: f32) -> f32 {
        let g = grad * clip;
        let g = if self.square { g * g } else { g };
        old * self.beta + g * self.one_minus
    }
}

struct Update {
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

impl Update {
    fn of(&self, w: f32, m: f32, v: f32) -> f32 {
        let denom = v.sqrt() * self.inv_sqrt_bc2 + self.eps;
        w - (m / denom) * self.step_size
    }
}

fn same_len(a: usize, b: usize, what: &str) -> candle_core::Result<()> {
    if a != b {
        candle_core::bail!("adam: {what} has {b} elements, expected {a}");
    }
    Ok(())
}

impl candle_core::InplaceOp3 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        m_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
        clip: &CpuStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(grad), CpuStorage::F32(clip)) = (grad, clip) else {
            candle_core::bail!("adam: expected an f32 gradient and clip factor");
        };
        let grad = part(grad, grad_l, OP, "the gradient")?;
        let clip = part(clip, clip_l, OP, "the clip factor")?[0];
        match m {
            CpuStorage::F32(m) => {
                let m = part_mut(m, m_l, OP, "the moment")?;
                same_len(m.len(), grad.len(), "the gradient")?;
                for (m, &g) in m.iter_mut().zip(grad) {
                    *m = self.of(*m, g, clip);
                }
            }
            CpuStorage::BF16(m) => {
                let m = part_mut(m, m_l, OP, "the moment")?;
                same_len(m.len(), grad.len(), "the gradient")?;
                for (m, &g) in m.iter_mut().zip(grad) {
                    *m = half::bf16::from_f32(self.of(m.to_f32(), g, clip));
                }
            }
            _ => candle_core::bail!("adam: moments must be f32 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::cuda_backend::CudaStorage,
        m_l: &Layout,
        grad: &candle_core::cuda_backend::CudaStorage,
        grad_l: &Layout,
        clip: &candle_core::cuda_backend::CudaStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<()> {
        cuda::moment(self, m, m_l, grad, grad_l, clip, clip_l)
    }
}

impl candle_core::InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        w_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let CpuStorage::F32(w) = w else {
            candle_core::bail!("adam: the weights must be f32");
        };
        let w = part_mut(w, w_l, OP, "the weights")?;
        match (m, v) {
            (CpuStorage::F32(m), CpuStorage::F32(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                same_len(w.len(), m.len(), "m")?;
                same_len(w.len(), v.len(), "v")?;
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    *w = self.of(*w, m, v);
                }
            }
            (CpuStorage::BF16(m), CpuStorage::BF16(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                same_len(w.len(), m.len(), "m")?;
                same_len(w.len(), v.len(), "v")?;
                for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                    *w = self.of(*w, m.to_f32(), v.to_f32());
                }
            }
            _ => candle_core::bail!("adam: m and v must both be f32 or both bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::cuda_backend::CudaStorage,
        w_l: &Layout,
        m: &candle_core::cuda_backend::CudaStorage,
        m_l: &Layout,
        v: &candle_core::cuda_backend::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        cuda::update(self, w, w_l, m, m_l, v, v_l)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{DType, Layout};

    use super::{Moment, OP, Update};
    use crate::custom_ops::cuda::{launch, view, view_mut};

    const SOURCE: &str = include_str!("fused_adam.cu");
    /// The name the compiled module is cached under on each device.
    const MODULE: &str = "sae_core_fused_adam";

    static PTX: OnceLock<Result<String, String>> = OnceLock::new();

    fn ptx() -> candle_core::Result<&'static str> {
        crate::custom_ops::cuda::ptx(&PTX, SOURCE, "Adam kernels")
    }

    pub(super) fn ready(dev: &candle_core::CudaDevice) -> crate::error::Result<()> {
        dev.get_or_load_custom_func("adam_update_f32", MODULE, ptx()?)?;
        Ok(())
    }

    pub(super) fn moment(
        op: &Moment,
        m: &mut CudaStorage,
        m_l: &Layout,
        grad: &CudaStorage,
        grad_l: &Layout,
        clip: &CudaStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<()> {
        let n = m_l.shape().elem_count() as u64;
        if grad_l.shape().elem_count() as u64 != n {
            candle_core::bail!("adam: the gradient's shape is not the moment's");
        }
        if n == 0 {
            return Ok(());
        }
        let dev = m.device.clone();
        let grad = view::<f32>(grad, grad_l, OP, "the gradient")?;
        let clip = view::<f32>(clip, clip_l, OP, "the clip factor")?;
        let square = i32::from(op.square);
        let name = match m.dtype() {
            DType::F32 => "adam_moment_f32",
            DType::BF16 => "adam_moment_bf16",
            other => candle_core::bail!("adam: moments in {other:?}"),
        };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let mut b = func.builder();
        // bf16 moments go to the kernel as their raw 16-bit words.
        let mut m32;
        let mut m16;
        if m.dtype() == DType::F32 {
            m32 = view_mut::<f32>(m, m_l, OP, "the moment")?;
            b.arg(&mut m32);
        } else {
            m16 = view_mut::<half::bf16>(m, m_l, OP, "the moment")?;
            b.arg(&mut m16);
        }
        b.arg(&grad);
        b.arg(&clip);
        b.arg(&op.beta);
        b.arg(&op.one_minus);
        b.arg(&square);
        b.arg(&n);
        launch(b, name, n)
    }

    pub(super) fn update(
        op: &Update,
        w: &mut CudaStorage,
        w_l: &Layout,
        m: &CudaStorage,
        m_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let n = w_l.shape().elem_count() as u64;
        if m_l.shape().elem_count() as u64 != n || v_l.shape().elem_count() as u64 != n {
            candle_core::bail!("adam: the moments' shapes are not the weights'");
        }
        if n == 0 {
            return Ok(());
        }
        let dev = w.device.clone();
        let mut w = view_mut::<f32>(w, w_l, OP, "the weights")?;
        let name = match (m.dtype(), v.dtype()) {
            (DType::F32, DType::F32) => "adam_update_f32",
            (DType::BF16, DType::BF16) => "adam_update_bf16",
            _ => candle_core::bail!("adam: m and v must both be f32 or both bf16"),
        };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let mut b = func.builder();
        b.arg(&mut w);
        let (m32, v32, m16, v16);
        if m.dtype() == DType::F32 {
            m32 = view::<f32>(m, m_l, OP, "m")?;
            v32 = view::<f32>(v, v_l, OP, "v")?;
            b.arg(&m32);
            b.arg(&v32);
        } else {
            m16 = view::<half::bf16>(m, m_l, OP, "m")?;
            v16 = view::<half::bf16>(v, v_l, OP, "v")?;
            b.arg(&m16);
            b.arg(&v16);
        }
        b.arg(&op.step_size);
        b.arg(&op.inv_sqrt_bc2);
        b.arg(&op.eps);
        b.arg(&n);
        launch(b, name, n)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{update_moment, update_weights};
    use crate::custom_ops::emulation::floats;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + i as f32 * 0.01))
            .collect()
    }

    /// The three passes against the tensor ops they replace (the device path's former update),
    /// bit for bit, with f32 and with bf16 moments.
    #[test]
    fn the_passes_are_the_tensor_ops_bit_for_bit() {
        let dev = Device::Cpu;
        let n = 257;
        let (b1, b2, step, inv, eps) = (0.9, 0.999, 3e-3, 1.7, 1e-8);
        let t = |v: Vec<f32>| Tensor::from_vec(v, n, &dev).unwrap();
        let clip = Tensor::new(0.75f32, &dev).unwrap();
        for moments in [DType::F32, DType::BF16] {
            let (g, w0) = (t(values(n, 1.0)), t(values(n, 2.0)));
            let m0 = t(values(n, 3.0)).to_dtype(moments).unwrap();
            let v0 = t(values(n, 4.0)).abs().unwrap().to_dtype(moments).unwrap();
            // The tensor ops.
            let gc = g.broadcast_mul(&clip).unwrap();
            let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let m = ((f32_of(&m0) * b1).unwrap() + (&gc * (1.0 - b1)).unwrap())
                .unwrap()
                .to_dtype(moments)
                .unwrap();
            let v = ((f32_of(&v0) * b2).unwrap() + (gc.sqr().unwrap() * (1.0 - b2)).unwrap())
                .unwrap()
                .to_dtype(moments)
                .unwrap();
            let denom = ((f32_of(&v).sqrt().unwrap() * inv).unwrap() + eps).unwrap();
            let w = (&w0 - ((f32_of(&m) / denom).unwrap() * step).unwrap()).unwrap();
            // The passes, in place on copies.
            let (pm, pv, pw) = (m0.copy().unwrap(), v0.copy().unwrap(), w0.copy().unwrap());
            update_moment(&pm, &g, &clip, b1, false).unwrap();
            update_moment(&pv, &g, &clip, b2, true).unwrap();
            update_weights(&pw, &pm, &pv, step, inv, eps).unwrap();
            let bits = |x: &Tensor| -> Vec<u32> {
                f32_of(x)
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&pm), bits(&m), "{moments:?} m");
            assert_eq!(bits(&pv), bits(&v), "{moments:?} v");
            assert_eq!(bits(&pw), bits(&w), "{moments:?} w");
        }
    }

    /// The CUDA kernels' own source (`fused_adam.cu`), built for the CPU by the host's C++
    /// compiler with stand-ins for CUDA's thread indices and bit casts, launched thread by
    /// thread on a grid that wraps: their results are the CPU passes', bit for bit, with f32
    /// and bf16 moments (a NaN and halfway cases of bf16's rounding among the values). Skipped,
    /// saying so, without a C++ compiler.
    #[test]
    fn the_cuda_kernels_source_computes_what_the_cpu_passes_compute() {
        let Some(harness) = crate::custom_ops::emulation::Harness::build(
            "fused_adam.cu",
            r#"
  unsigned long long n; float clip, b1, omb1, b2, omb2, step, inv, eps;
  if (scanf("%llu %a %a %a %a %a %a %a %a", &n, &clip, &b1, &omb1, &b2, &omb2, &step, &inv, &eps) != 9) return 2;
  float *g = new float[n], *w = new float[n], *m = new float[n], *v = new float[n];
  float *w2 = new float[n];
  unsigned short *m16 = new unsigned short[n], *v16 = new unsigned short[n];
  for (unsigned long long i = 0; i < n; i++) scanf("%a", &g[i]);
  for (unsigned long long i = 0; i < n; i++) { scanf("%a", &w[i]); w2[i] = w[i]; }
  for (unsigned long long i = 0; i < n; i++) scanf("%a", &m[i]);
  for (unsigned long long i = 0; i < n; i++) scanf("%a", &v[i]);
  for (unsigned long long i = 0; i < n; i++) { unsigned x; scanf("%x", &x); m16[i] = x; }
  for (unsigned long long i = 0; i < n; i++) { unsigned x; scanf("%x", &x); v16[i] = x; }
  launch_all(2, 3, [&] { adam_moment_f32(m, g, &clip, b1, omb1, 0, n); });
  launch_all(2, 3, [&] { adam_moment_f32(v, g, &clip, b2, omb2, 1, n); });
  launch_all(2, 3, [&] { adam_update_f32(w, m, v, step, inv, eps, n); });
  launch_all(2, 3, [&] { adam_moment_bf16(m16, g, &clip, b1, omb1, 0, n); });
  launch_all(2, 3, [&] { adam_moment_bf16(v16, g, &clip, b2, omb2, 1, n); });
  launch_all(2, 3, [&] { adam_update_bf16(w2, m16, v16, step, inv, eps, n); });
  for (unsigned long long i = 0; i < n; i++)
    printf("%08x %08x %08x %04x %04x %08x\n", __float_as_uint(m[i]), __float_as_uint(v[i]),
           __float_as_uint(w[i]), m16[i], v16[i], __float_as_uint(w2[i]));
  return 0;"#,
        ) else {
            return;
        };
        // Adam's usual betas with an epsilon large enough to matter; and betas of 0 with no
        // clipping, so that the moments are the gradient and its square exactly, where
        // gradients halfway between two bf16 values test the rounding.
        for (b1, b2, eps, clip) in [(0.9f64, 0.999f64, 1e-2f64, 0.75f32), (0.0, 0.0, 1e-8, 1.0)] {
            run_harness(&harness, b1, b2, eps, clip);
        }
    }

    fn run_harness(
        harness: &crate::custom_ops::emulation::Harness,
        b1: f64,
        b2: f64,
        eps: f64,
        clip: f32,
    ) {
        let dev = Device::Cpu;
        let n = 29;
        let (step, inv) = (3e-3f64, 1.7f64);
        let mut g = values(n, 1.0);
        let w = values(n, 2.0);
        let m = values(n, 3.0);
        let v: Vec<f32> = values(n, 4.0).iter().map(|x| x.abs()).collect();
        // bf16's rounding at its edges: halfway cases either way, and a NaN.
        g[0] = f32::from_bits(0x3f80_8000);
        g[1] = f32::from_bits(0x3f81_8000);
        g[2] = f32::NAN;
        let t = |v: &[f32]| Tensor::from_slice(v, n, &dev).unwrap();
        let clip_t = Tensor::new(clip, &dev).unwrap();
        let mut want: Vec<[u32; 6]> = vec![[0; 6]; n];
        for moments in [DType::F32, DType::BF16] {
            let (pm, pv, pw) = (
                t(&m).to_dtype(moments).unwrap(),
                t(&v).to_dtype(moments).unwrap(),
                t(&w),
            );
            update_moment(&pm, &t(&g), &clip_t, b1, false).unwrap();
            update_moment(&pv, &t(&g), &clip_t, b2, true).unwrap();
            update_weights(&pw, &pm, &pv, step, inv, eps).unwrap();
            let word = |x: &Tensor| -> Vec<u32> {
                match moments {
                    DType::F32 => x
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                    _ => x
                        .to_vec1::<half::bf16>()
                        .unwrap()
                        .iter()
                        .map(|v| u32::from(v.to_bits()))
                        .collect(),
                }
            };
            let at = if moments == DType::F32 { 0 } else { 3 };
            let weights = pw.to_vec1::<f32>().unwrap();
            for (i, ((a, b), x)) in word(&pm)
                .into_iter()
                .zip(word(&pv))
                .zip(weights)
                .enumerate()
            {
                want[i][at..at + 3].copy_from_slice(&[a, b, x.to_bits()]);
            }
        }
        let hexf = |x: f32| format!("{:e}", x);
        let bf = |v: &[f32]| {
            v.iter()
                .map(|&x| format!("{:x} ", half::bf16::from_f32(x).to_bits()))
                .collect::<String>()
        };
        let input = format!(
            "{n} {} {} {} {} {} {} {} {}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            hexf(clip),
            hexf(b1 as f32),
            hexf((1.0 - b1) as f32),
            hexf(b2 as f32),
            hexf((1.0 - b2) as f32),
            hexf(step as f32),
            hexf(inv as f32),
            hexf(eps as f32),
            floats(&g),
            floats(&w),
            floats(&m),
            floats(&v),
            bf(&m),
            bf(&v),
        );
        let got: Vec<Vec<u32>> = harness
            .run(&input)
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .map(|h| u32::from_str_radix(h, 16).unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(got.len(), n);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // NaN moments: both NaN, whatever their payload.
            let same = |a: u32, b: u32, wide: bool| {
                let nan = |x: u32| {
                    if wide {
                        f32::from_bits(x).is_nan()
                    } else {
                        half::bf16::from_bits(x as u16).is_nan()
                    }
                };
                a == b || (nan(a) && nan(b))
            };
            for j in 0..6 {
                let wide = !matches!(j, 3 | 4);
                assert!(
                    same(g[j], w[j], wide),
                    "element {i}, output {j}: kernel {:x}, CPU {:x}",
                    g[j],
                    w[j]
                );
            }
        }
    }
}
