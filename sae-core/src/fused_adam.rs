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

/// `w = w - (m / (sqrt(v) · inv_sqrt_bc2 + eps)) · step_size`, in place. `w`: f32, or bf16
/// (computed in f32 and rounded back stochastically: [`bf16_stochastic`] with `seed`); `m`,
/// `v`: f32 or bf16, both the same, of `w`'s shape.
pub(crate) fn update_weights(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step_size: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
    seed: u64,
) -> Result<()> {
    w.inplace_op3(
        &m.contiguous()?,
        &v.contiguous()?,
        &Update {
            step_size: step_size as f32,
            inv_sqrt_bc2: inv_sqrt_bc2 as f32,
            eps: eps as f32,
            seed,
        },
    )?;
    Ok(())
}

/// splitmix64's finaliser: the random bits of stochastic rounding.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x` as bf16, rounded stochastically: up in magnitude with the probability of the fraction
/// bf16 drops (16 random bits, from `seed` and the element's index `i`, added below the kept
/// bits), so that the rounding is right on average and an update far below bf16's resolution
/// (an Adam step of `lr` = 1e-4 on a weight of 0.03 is about a third of one bf16 step there)
/// still moves the weight in expectation, where rounding to nearest would drop it every time.
/// NaN and infinity stay what they are. The CUDA kernels compute the same bits.
pub(crate) fn bf16_stochastic(x: f32, seed: u64, i: u64) -> half::bf16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff >= 0x7f80_0000 {
        // NaN (kept a quiet NaN) or infinity.
        let quiet = if u & 0x7fff_ffff > 0x7f80_0000 {
            0x40
        } else {
            0
        };
        return half::bf16::from_bits((u >> 16) as u16 | quiet);
    }
    let r = (mix64(seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 48) as u32;
    half::bf16::from_bits((u.wrapping_add(r) >> 16) as u16)
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
    /// Stochastic rounding's seed, for bf16 weights.
    seed: u64,
}

impl Update {
    fn of(&self, w: f32, m: f32, v: f32) -> f32 {
        let denom = v.sqrt() * self.inv_sqrt_bc2 + self.eps;
        w - (m / denom) * self.step_size
    }

    /// The update over every element, whatever the weights' and moments' types.
    fn apply<W: Weight, M: Copy + Into<f32>>(&self, w: &mut [W], m: &[M], v: &[M]) {
        for (i, ((w, &m), &v)) in w.iter_mut().zip(m).zip(v).enumerate() {
            *w = W::store(self.of(w.load(), m.into(), v.into()), self.seed, i as u64);
        }
    }
}

/// A stored weight: f32 as it is, bf16 rounded stochastically.
trait Weight: Copy {
    fn load(self) -> f32;
    fn store(x: f32, seed: u64, i: u64) -> Self;
}

impl Weight for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(x: f32, _: u64, _: u64) -> Self {
        x
    }
}

impl Weight for half::bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(x: f32, seed: u64, i: u64) -> Self {
        bf16_stochastic(x, seed, i)
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
        let n = w_l.shape().elem_count();
        same_len(n, m_l.shape().elem_count(), "m")?;
        same_len(n, v_l.shape().elem_count(), "v")?;
        match (w, m, v) {
            (CpuStorage::F32(w), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                self.apply(part_mut(w, w_l, OP, "the weights")?, m, v);
            }
            (CpuStorage::F32(w), CpuStorage::BF16(m), CpuStorage::BF16(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                self.apply(part_mut(w, w_l, OP, "the weights")?, m, v);
            }
            (CpuStorage::BF16(w), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                self.apply(part_mut(w, w_l, OP, "the weights")?, m, v);
            }
            (CpuStorage::BF16(w), CpuStorage::BF16(m), CpuStorage::BF16(v)) => {
                let (m, v) = (part(m, m_l, OP, "m")?, part(v, v_l, OP, "v")?);
                self.apply(part_mut(w, w_l, OP, "the weights")?, m, v);
            }
            _ => candle_core::bail!(
                "adam: the weights must be f32 or bf16, and m and v both f32 or both bf16"
            ),
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
        let wide = match w.dtype() {
            DType::F32 => true,
            DType::BF16 => false,
            other => candle_core::bail!("adam: weights in {other:?}"),
        };
        let name = match (m.dtype(), v.dtype(), wide) {
            (DType::F32, DType::F32, true) => "adam_update_f32",
            (DType::BF16, DType::BF16, true) => "adam_update_bf16",
            (DType::F32, DType::F32, false) => "adam_update_f32_w16",
            (DType::BF16, DType::BF16, false) => "adam_update_bf16_w16",
            _ => candle_core::bail!("adam: m and v must both be f32 or both bf16"),
        };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let mut b = func.builder();
        // bf16 weights go to the kernel as their raw 16-bit words.
        let (mut w32, mut w16);
        if wide {
            w32 = view_mut::<f32>(w, w_l, OP, "the weights")?;
            b.arg(&mut w32);
        } else {
            w16 = view_mut::<half::bf16>(w, w_l, OP, "the weights")?;
            b.arg(&mut w16);
        }
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
        if !wide {
            b.arg(&op.seed);
        }
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
            update_weights(&pw, &pm, &pv, step, inv, eps, 0).unwrap();
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

    /// Stochastic rounding is right on average: values a third and two thirds of a bf16 step
    /// above one (either sign) round to the two neighbours in those proportions, where rounding
    /// to nearest would give one neighbour every time; bf16 values, NaN and infinity stay.
    #[test]
    fn stochastic_rounding_is_right_on_average() {
        let n = 100_000u64;
        for base in [1.0f32, -0.03] {
            let lo = half::bf16::from_f32(base);
            let step = half::bf16::from_bits(lo.to_bits() + 1).to_f32() - lo.to_f32();
            for frac in [1.0 / 3.0, 2.0 / 3.0] {
                let x = lo.to_f32() + step * frac;
                let mean = (0..n)
                    .map(|i| f64::from(super::bf16_stochastic(x, 7, i).to_f32()))
                    .sum::<f64>()
                    / n as f64;
                let err = (mean - f64::from(x)).abs() / f64::from(step.abs());
                assert!(err < 0.01, "{x}: mean {mean}, {err} of a step off");
                let nearest = half::bf16::from_f32(x).to_f32();
                assert!((f64::from(nearest) - f64::from(x)).abs() > 0.3 * f64::from(step.abs()));
            }
            assert_eq!(super::bf16_stochastic(lo.to_f32(), 7, 3), lo);
        }
        assert!(super::bf16_stochastic(f32::NAN, 7, 3).is_nan());
        assert_eq!(
            super::bf16_stochastic(f32::NEG_INFINITY, 7, 3).to_f32(),
            f32::NEG_INFINITY
        );
        // The largest finite value rounds up to infinity with the dropped fraction's chance,
        // never past it to NaN.
        let top = f32::from_bits(0x7f7f_ffff);
        assert!((0..1000).all(|i| !super::bf16_stochastic(top, 7, i).is_nan()));
    }

    /// bf16 weights under updates far below their resolution: a thousand Adam steps that each
    /// move a weight of 0.03 by 1e-5 (a twelfth of a bf16 step there) take it to 0.02 on
    /// average over a thousand weights, where rounding to nearest would leave it at 0.03.
    #[test]
    fn small_updates_to_bf16_weights_add_up() {
        let dev = Device::Cpu;
        let n = 1000;
        let w = Tensor::full(0.03f32, n, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w0 = w.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
        // m / sqrt(v) = 1 with eps 0: each step subtracts step_size.
        let m = Tensor::full(1.0f32, n, &dev).unwrap();
        let v = Tensor::full(1.0f32, n, &dev).unwrap();
        for step in 0..1000u64 {
            update_weights(&w, &m, &v, 1e-5, 1.0, 0.0, step).unwrap();
        }
        let after = w.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let mean = after.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let want = f64::from(w0) - 1000.0 * 1e-5;
        assert!(
            (mean - want).abs() < 0.02 * 1000.0 * 1e-5,
            "mean {mean}, expected {want}"
        );
    }

    /// The bf16-weight kernels (`adam_update_*_w16`), built for the CPU as above on a wrapping
    /// grid: the CPU pass's bits, f32 and bf16 moments, a NaN and an infinity among the
    /// updates.
    #[test]
    fn the_cuda_bf16_weight_kernels_round_as_the_cpu_pass_does() {
        let Some(harness) = crate::custom_ops::emulation::Harness::build(
            "fused_adam.cu",
            r#"
  unsigned long long n, seed; float step, inv, eps;
  if (scanf("%llu %llu %a %a %a", &n, &seed, &step, &inv, &eps) != 5) return 2;
  unsigned short *w = new unsigned short[n], *w2 = new unsigned short[n];
  float *m = new float[n], *v = new float[n];
  unsigned short *m16 = new unsigned short[n], *v16 = new unsigned short[n];
  for (unsigned long long i = 0; i < n; i++) { unsigned x; scanf("%x", &x); w[i] = x; w2[i] = x; }
  for (unsigned long long i = 0; i < n; i++) scanf("%a", &m[i]);
  for (unsigned long long i = 0; i < n; i++) scanf("%a", &v[i]);
  for (unsigned long long i = 0; i < n; i++) { unsigned x; scanf("%x", &x); m16[i] = x; }
  for (unsigned long long i = 0; i < n; i++) { unsigned x; scanf("%x", &x); v16[i] = x; }
  launch_all(2, 3, [&] { adam_update_f32_w16(w, m, v, step, inv, eps, seed, n); });
  launch_all(2, 3, [&] { adam_update_bf16_w16(w2, m16, v16, step, inv, eps, seed, n); });
  for (unsigned long long i = 0; i < n; i++) printf("%04x %04x\n", w[i], w2[i]);
  return 0;"#,
        ) else {
            return;
        };
        let dev = Device::Cpu;
        let n = 29;
        let (step, inv, eps, seed) = (3e-3f64, 1.7f64, 1e-8f64, 0xDEAD_BEEF_u64);
        let mut m = values(n, 3.0);
        let v: Vec<f32> = values(n, 4.0).iter().map(|x| x.abs()).collect();
        m[0] = f32::NAN;
        m[1] = f32::INFINITY;
        let w: Vec<f32> = values(n, 2.0);
        let t = |x: &[f32], dtype| {
            Tensor::from_slice(x, n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let words = |x: &Tensor| -> Vec<u16> {
            x.to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect()
        };
        let mut want = Vec::new();
        for moments in [DType::F32, DType::BF16] {
            let pw = t(&w, DType::BF16);
            update_weights(&pw, &t(&m, moments), &t(&v, moments), step, inv, eps, seed).unwrap();
            want.push(words(&pw));
        }
        let hex = |x: &[u16]| x.iter().map(|h| format!("{h:x} ")).collect::<String>();
        let input = format!(
            "{n} {seed} {:e} {:e} {:e}\n{}\n{}\n{}\n{}\n{}\n",
            step as f32,
            inv as f32,
            eps as f32,
            hex(&words(&t(&w, DType::BF16))),
            floats(&m),
            floats(&v),
            hex(&words(&t(&m, DType::BF16))),
            hex(&words(&t(&v, DType::BF16))),
        );
        let got: Vec<Vec<u16>> = harness
            .run(&input)
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .map(|h| u16::from_str_radix(h, 16).unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(got.len(), n);
        for (i, g) in got.iter().enumerate() {
            for (j, want) in want.iter().enumerate() {
                let same = g[j] == want[i]
                    || (half::bf16::from_bits(g[j]).is_nan()
                        && half::bf16::from_bits(want[i]).is_nan());
                assert!(
                    same,
                    "element {i}, moments {j}: kernel {:x}, CPU {:x}",
                    g[j], want[i]
                );
            }
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
            update_weights(&pw, &pm, &pv, step, inv, eps, 0).unwrap();
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
