//! The (token, feature) pairs of a TopK step, worked on where their decoder rows are:
//!
//! - [`decode_pairs`]: each token's reconstruction, `Σ_j a_j · W_dec[f_j]`;
//! - [`pair_dots`]: the reconstruction's gradient taken back to each pair, `d · W_dec[f_j]`;
//! - [`add_pair_rows`]: `acc[f, :] += a · rows[t, :]`, how the pairs' gradients reach `W_enc`,
//!   `W_dec` and `b_enc`, and how their firing counts are made.
//!
//! candle's way gathers the pairs' rows into a `[pairs, width]` matrix and multiplies it out into
//! another, and its `scatter_add` needs the pairs' index broadcast to `[pairs, width]` and their
//! outer products written out: temporaries of 1 GiB each at 4,096 tokens x 32 pairs x 2,048. Its
//! CUDA scatter also runs one thread per column that walks every pair in turn. Here the CPU runs
//! loops, and CUDA kernels (`pairs.cu`, compiled by NVRTC the first time they are used) run a
//! thread per (token, column), per pair, and per (pair, column). The first two add in a fixed
//! order, so every run gives the same bits; the third adds with atomics, fully parallel, but the
//! additions into one row land in no fixed order, so a CUDA run through it is not
//! bit-reproducible, where the dense products (cuBLAS) are.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::custom_ops::{part, part_mut};
use crate::error::Result;

/// The op's name in errors.
const OP: &str = "pair rows";

/// Whether the pair kernels can run on `device` (always, but on CUDA where NVRTC cannot compile
/// them).
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

/// The pairs' features (`[tokens · k]` u32, row-major: pair `p` is token `p / k`'s); applied
/// with [`add_pair_rows`].
struct PairRowsAdd<'a> {
    features: &'a Tensor,
    k: usize,
}

/// Adds `coef[t, j] · rows[t, :]` into `acc[features[t·k + j], :]` for every pair, in place.
/// `acc`: `[d_sae, width]` f32; `coef`: `[tokens, k]` f32; `rows`: `[tokens, width]` f32;
/// `features`: `[tokens · k]` u32, each below `d_sae`. Pairs whose coefficient is zero add
/// nothing.
///
/// # Errors
/// Shapes, dtypes or devices that do not match, a feature out of range, layouts that are not
/// contiguous.
pub(crate) fn add_pair_rows(
    acc: &Tensor,
    features: &Tensor,
    coef: &Tensor,
    rows: &Tensor,
) -> Result<()> {
    let (tokens, k) = coef.dims2()?;
    let (_, width) = acc.dims2()?;
    if rows.dims() != [tokens, width] || features.dims() != [tokens * k] {
        return Err(crate::SaeError::config(
            "pair rows",
            format!(
                "rows {:?} and features {:?} for {tokens} tokens of {k} pairs into rows of {width}",
                rows.dims(),
                features.dims()
            ),
        ));
    }
    let coef = coef.contiguous()?;
    let rows = rows.contiguous()?;
    let features = features.contiguous()?;
    acc.inplace_op3(
        &coef,
        &rows,
        &PairRowsAdd {
            features: &features,
            k,
        },
    )?;
    Ok(())
}

/// `Σ_j coef[t, j] · w[features[t·k + j], :]` for every token `t`, as `[tokens, width]`: the
/// decode of TopK's pairs without their rows gathered into a `[tokens · k, width]` matrix (and
/// multiplied into another). The pairs add in order, zero coefficients skipped, on every device.
///
/// # Errors
/// Shapes, dtypes or devices that do not match; a feature past `w`'s rows.
pub(crate) fn decode_pairs(features: &Tensor, coef: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (tokens, k) = coef.dims2()?;
    check_features(features, tokens * k)?;
    Ok(features.contiguous()?.apply_op3_no_bwd(
        &coef.contiguous()?,
        &w.contiguous()?,
        &Gathered {
            k,
            way: Way::Decode,
        },
    )?)
}

/// `d[t, :] · w[features[t·k + j], :]` for every pair, as `[tokens, k]`: the gradient that
/// reaches each pair's code from the reconstruction's (`d`), without the pairs' rows gathered.
///
/// # Errors
/// As [`decode_pairs`].
pub(crate) fn pair_dots(features: &Tensor, d: &Tensor, w: &Tensor, k: usize) -> Result<Tensor> {
    check_features(features, d.dim(0)? * k)?;
    Ok(features.contiguous()?.apply_op3_no_bwd(
        &d.contiguous()?,
        &w.contiguous()?,
        &Gathered { k, way: Way::Dots },
    )?)
}

fn check_features(features: &Tensor, pairs: usize) -> Result<()> {
    if features.dims() != [pairs] {
        return Err(crate::SaeError::config(
            OP,
            format!("features {:?} for {pairs} pairs", features.dims()),
        ));
    }
    Ok(())
}

/// [`decode_pairs`] and [`pair_dots`]: reads of the pairs' rows of `w`.
struct Gathered {
    k: usize,
    way: Way,
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Decode,
    Dots,
}

impl Gathered {
    fn cpu<W: Copy + Into<f32> + Sync>(
        &self,
        features: &[u32],
        x: &[f32],
        w: &[W],
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (d_sae, width) = w_l.shape().dims2()?;
        let k = self.k;
        if let Some(&f) = features.iter().find(|&&f| f as usize >= d_sae) {
            candle_core::bail!("pair rows: feature {f} of a dictionary of {d_sae}");
        }
        let row = |f: u32| &w[f as usize * width..][..width];
        match self.way {
            Way::Decode => {
                let tokens = features.len() / k.max(1);
                let mut out = vec![0f32; tokens * width];
                out.par_chunks_mut(width.max(1))
                    .enumerate()
                    .for_each(|(t, out)| {
                        for j in 0..k {
                            let a = x[t * k + j];
                            if a != 0.0 {
                                for (o, &v) in out.iter_mut().zip(row(features[t * k + j])) {
                                    *o += a * v.into();
                                }
                            }
                        }
                    });
                Ok((CpuStorage::F32(out), (tokens, width).into()))
            }
            Way::Dots => {
                let out: Vec<f32> = features
                    .par_iter()
                    .enumerate()
                    .map(|(p, &f)| {
                        let d = &x[(p / k) * width..][..width];
                        d.iter()
                            .zip(row(f))
                            .fold(0f32, |s, (&a, &b)| s + a * b.into())
                    })
                    .collect();
                let tokens = features.len() / k.max(1);
                Ok((CpuStorage::F32(out), (tokens, k).into()))
            }
        }
    }
}

impl candle_core::CustomOp3 for Gathered {
    fn name(&self) -> &'static str {
        match self.way {
            Way::Decode => "pair-decode",
            Way::Dots => "pair-dots",
        }
    }

    fn cpu_fwd(
        &self,
        features: &CpuStorage,
        features_l: &Layout,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (CpuStorage::U32(features), CpuStorage::F32(x)) = (features, x) else {
            candle_core::bail!("pair rows: expected u32 features and f32 values");
        };
        let features = part(features, features_l, OP, "features")?;
        let x = part(x, x_l, OP, "values")?;
        // bf16 rows (`DeviceOptions::weights`) are widened exactly as they are read.
        match w {
            CpuStorage::F32(w) => self.cpu(features, x, part(w, w_l, OP, "rows")?, w_l),
            CpuStorage::BF16(w) => self.cpu(features, x, part(w, w_l, OP, "rows")?, w_l),
            _ => candle_core::bail!("pair rows: expected f32 or bf16 rows"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        features: &candle_core::cuda_backend::CudaStorage,
        features_l: &Layout,
        x: &candle_core::cuda_backend::CudaStorage,
        x_l: &Layout,
        w: &candle_core::cuda_backend::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::cuda_backend::CudaStorage, candle_core::Shape)> {
        cuda::gathered(self, features, features_l, x, x_l, w, w_l)
    }
}

impl candle_core::InplaceOp3 for PairRowsAdd<'_> {
    fn name(&self) -> &'static str {
        "pair-rows-add"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        acc_l: &Layout,
        coef: &CpuStorage,
        coef_l: &Layout,
        rows: &CpuStorage,
        rows_l: &Layout,
    ) -> candle_core::Result<()> {
        let (guard, features_l) = self.features.storage_and_layout();
        let (Storage::Cpu(CpuStorage::U32(features)), CpuStorage::F32(coef), CpuStorage::F32(rows)) =
            (&*guard, coef, rows)
        else {
            candle_core::bail!("pair rows: expected u32 features and f32 coefficients and rows");
        };
        let CpuStorage::F32(acc) = acc else {
            candle_core::bail!("pair rows: expected an f32 accumulator");
        };
        let acc = part_mut(acc, acc_l, OP, "the accumulator")?;
        let features = part(features, features_l, OP, "features")?;
        let coef = part(coef, coef_l, OP, "coefficients")?;
        let rows = part(rows, rows_l, OP, "rows")?;
        let width = acc_l.dims()[1];
        let d_sae = acc_l.dims()[0];
        for (p, (&f, &a)) in features.iter().zip(coef).enumerate() {
            if a == 0.0 {
                continue;
            }
            let f = f as usize;
            if f >= d_sae {
                candle_core::bail!("pair rows: feature {f} of a dictionary of {d_sae}");
            }
            let src = &rows[(p / self.k) * width..][..width];
            for (d, x) in acc[f * width..][..width].iter_mut().zip(src) {
                *d += a * x;
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::cuda_backend::CudaStorage,
        acc_l: &Layout,
        coef: &candle_core::cuda_backend::CudaStorage,
        coef_l: &Layout,
        rows: &candle_core::cuda_backend::CudaStorage,
        rows_l: &Layout,
    ) -> candle_core::Result<()> {
        cuda::launch(self, acc, acc_l, coef, coef_l, rows, rows_l)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{DType, Layout, Storage};

    use super::{Gathered, OP, PairRowsAdd, Way};
    use crate::custom_ops::cuda::{launch as launch_kernel, ptx, view, view_mut};

    const SOURCE: &str = include_str!("pairs.cu");
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();

    pub(super) fn launch(
        op: &PairRowsAdd<'_>,
        acc: &mut CudaStorage,
        acc_l: &Layout,
        coef: &CudaStorage,
        coef_l: &Layout,
        rows: &CudaStorage,
        rows_l: &Layout,
    ) -> candle_core::Result<()> {
        let (guard, features_l) = op.features.storage_and_layout();
        let Storage::Cuda(features) = &*guard else {
            candle_core::bail!("pair rows: the features are not on the GPU");
        };
        let dev = acc.device.clone();
        let features = view::<u32>(features, features_l, OP, "features")?;
        let coef_v = view::<f32>(coef, coef_l, OP, "coefficients")?;
        let rows_v = view::<f32>(rows, rows_l, OP, "rows")?;
        let mut acc_v = view_mut::<f32>(acc, acc_l, OP, "the accumulator")?;
        let pairs = coef_l.shape().elem_count() as u64;
        let width = acc_l.dims()[1] as u64;
        let k = op.k as u64;
        let total = pairs * width;
        if total == 0 {
            return Ok(());
        }
        let source = ptx(&PTX, SOURCE, "pair-rows kernel")?;
        let func = dev.get_or_load_custom_func("pair_rows_add", "sae_core_pair_rows", source)?;
        let mut b = func.builder();
        // The kernel reads `pairs` coefficients and features and `rows` up to its `tokens x
        // width`, and writes `acc` at rows below `d_sae` (the features come from the top-k over
        // `d_sae` columns).
        b.arg(&mut acc_v);
        b.arg(&features);
        b.arg(&coef_v);
        b.arg(&rows_v);
        b.arg(&pairs);
        b.arg(&k);
        b.arg(&width);
        launch_kernel(b, "pair_rows_add", total)
    }

    pub(super) fn gathered(
        op: &Gathered,
        features: &CudaStorage,
        features_l: &Layout,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let dev = w.device.clone();
        let pairs = features_l.shape().elem_count();
        let k = op.k;
        let tokens = pairs / k.max(1);
        let width = w_l.dims()[1];
        let features = view::<u32>(features, features_l, OP, "features")?;
        let x = view::<f32>(x, x_l, OP, "values")?;
        // bf16 rows go to the kernels as their raw 16-bit words.
        let wide = match w.dtype() {
            DType::F32 => true,
            DType::BF16 => false,
            other => candle_core::bail!("pair rows: rows in {other:?}"),
        };
        // One thread an output element; the kernel's count is of tokens or of pairs.
        let (name, shape, count): (&str, candle_core::Shape, usize) = match (op.way, wide) {
            (Way::Decode, true) => ("pair_decode", (tokens, width).into(), tokens),
            (Way::Decode, false) => ("pair_decode_w16", (tokens, width).into(), tokens),
            (Way::Dots, true) => ("pair_dots", (tokens, k).into(), pairs),
            (Way::Dots, false) => ("pair_dots_w16", (tokens, k).into(), pairs),
        };
        let len = shape.elem_count();
        let mut out = dev.alloc_zeros::<f32>(len)?;
        if len > 0 {
            let source = ptx(&PTX, SOURCE, "pair kernels")?;
            let func = dev.get_or_load_custom_func(name, "sae_core_pair_rows", source)?;
            let mut b = func.builder();
            let (count, k64, width64) = (count as u64, k as u64, width as u64);
            b.arg(&mut out);
            b.arg(&features);
            b.arg(&x);
            let (w32, w16);
            if wide {
                w32 = view::<f32>(w, w_l, OP, "rows")?;
                b.arg(&w32);
            } else {
                w16 = view::<half::bf16>(w, w_l, OP, "rows")?;
                b.arg(&w16);
            }
            b.arg(&count);
            b.arg(&k64);
            b.arg(&width64);
            launch_kernel(b, name, len as u64)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }

    /// Whether NVRTC compiles the pair kernels and the device loads them.
    pub(super) fn ready(dev: &candle_core::CudaDevice) -> crate::error::Result<()> {
        let source = ptx(&PTX, SOURCE, "pair kernels")?;
        dev.get_or_load_custom_func("pair_decode", "sae_core_pair_rows", source)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{add_pair_rows, decode_pairs, pair_dots};
    use crate::custom_ops::emulation::floats;

    fn largest_difference(a: Tensor, b: Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Pairs of `tokens` tokens with `k` features each (repeated across tokens) in a dictionary
    /// of `d_sae` rows of `width`; every fifth coefficient is zero, which adds nothing. `rows`:
    /// `[tokens, width]` (the rows added, or the gradients dotted); `w`: `[d_sae, width]`.
    struct Case {
        tokens: usize,
        k: usize,
        width: usize,
        d_sae: usize,
        features: Vec<u32>,
        coef: Vec<f32>,
        rows: Vec<f32>,
        w: Vec<f32>,
    }

    impl Case {
        fn new(tokens: usize, k: usize, width: usize, d_sae: usize) -> Case {
            let pairs = tokens * k;
            Case {
                tokens,
                k,
                width,
                d_sae,
                features: (0..pairs).map(|i| ((i * 5 + 3) % d_sae) as u32).collect(),
                coef: (0..pairs)
                    .map(|i| {
                        if i % 5 == 0 {
                            0.0
                        } else {
                            (i as f32 * 0.37).cos()
                        }
                    })
                    .collect(),
                rows: (0..tokens * width)
                    .map(|i| (i as f32 * 0.11).sin())
                    .collect(),
                w: (0..d_sae * width)
                    .map(|i| (i as f32 * 0.29).sin())
                    .collect(),
            }
        }

        /// Features, coefficients `[tokens, k]`, rows and `w` as tensors on the CPU.
        fn tensors(&self) -> (Tensor, Tensor, Tensor, Tensor) {
            let dev = Device::Cpu;
            (
                Tensor::new(self.features.as_slice(), &dev).unwrap(),
                Tensor::from_slice(&self.coef, (self.tokens, self.k), &dev).unwrap(),
                Tensor::from_slice(&self.rows, (self.tokens, self.width), &dev).unwrap(),
                Tensor::from_slice(&self.w, (self.d_sae, self.width), &dev).unwrap(),
            )
        }
    }

    /// Against candle's `scatter_add` of the outer products, repeated features included, and a
    /// pair with a zero coefficient.
    #[test]
    fn pair_rows_are_the_scattered_outer_products() {
        let dev = Device::Cpu;
        let (tokens, k, width, d_sae) = (5, 3, 4, 6);
        let features: Vec<u32> = vec![0, 5, 2, 5, 1, 0, 3, 3, 4, 2, 2, 1, 0, 5, 4];
        let coef: Vec<f32> = (0..tokens * k).map(|i| (i as f32 - 6.0) * 0.25).collect();
        let rows: Vec<f32> = (0..tokens * width).map(|i| (i as f32).sin()).collect();
        let f = Tensor::new(features.as_slice(), &dev).unwrap();
        let a = Tensor::from_vec(coef, (tokens, k), &dev).unwrap();
        let r = Tensor::from_vec(rows, (tokens, width), &dev).unwrap();
        let start = Tensor::arange(0f32, (d_sae * width) as f32, &dev)
            .unwrap()
            .reshape((d_sae, width))
            .unwrap();
        let acc = start.copy().unwrap();
        add_pair_rows(&acc, &f, &a, &r).unwrap();
        let outer = a
            .unsqueeze(2)
            .unwrap()
            .broadcast_mul(&r.unsqueeze(1).unwrap())
            .unwrap()
            .reshape((tokens * k, width))
            .unwrap();
        let idx = f
            .unsqueeze(1)
            .unwrap()
            .broadcast_as((tokens * k, width))
            .unwrap()
            .contiguous()
            .unwrap();
        let want = start.scatter_add(&idx, &outer, 0).unwrap();
        let diff = largest_difference(acc, want);
        assert!(diff < 1e-5, "largest difference {diff}");
        assert_eq!(a.dtype(), DType::F32);
    }

    /// The CUDA kernel's own source (`pairs.cu`), built for the CPU by the host's C++ compiler
    /// with stand-ins for CUDA's thread indices and `atomicAdd`, and launched thread by thread
    /// on grids too small for one pass (so the grid-stride loop wraps) and on the grid the
    /// launcher picks: its sums are the CPU op's. This checks the kernel's arithmetic and
    /// indexing where no GPU is at hand; the GPU check runs it for real. Skipped, saying so,
    /// without a C++ compiler.
    #[test]
    fn the_cuda_kernel_source_adds_what_the_cpu_op_adds() {
        let Some(harness) = crate::custom_ops::emulation::Harness::build(
            "pairs.cu",
            r#"
  unsigned long long pairs, k, width, d_sae, grid, block;
  if (scanf("%llu %llu %llu %llu %llu %llu", &pairs, &k, &width, &d_sae, &grid, &block) != 6) return 2;
  unsigned tokens = pairs / k;
  unsigned *features = new unsigned[pairs];
  float *coef = new float[pairs], *rows = new float[tokens * width], *acc = new float[d_sae * width];
  for (unsigned long long i = 0; i < pairs; i++) scanf("%u", &features[i]);
  for (unsigned long long i = 0; i < pairs; i++) scanf("%f", &coef[i]);
  for (unsigned long long i = 0; i < tokens * width; i++) scanf("%f", &rows[i]);
  for (unsigned long long i = 0; i < d_sae * width; i++) acc[i] = 0;
  launch_all(grid, block, [&] { pair_rows_add(acc, features, coef, rows, pairs, k, width); });
  for (unsigned long long i = 0; i < d_sae * width; i++) printf("%.9g\n", acc[i]);
  return 0;"#,
        ) else {
            return;
        };

        let c = Case::new(7, 3, 5, 4);
        let (tokens, k, width, d_sae) = (c.tokens, c.k, c.width, c.d_sae);
        let acc = Tensor::zeros((d_sae, width), DType::F32, &Device::Cpu).unwrap();
        let (f, a, r, _) = c.tensors();
        add_pair_rows(&acc, &f, &a, &r).unwrap();
        let want = acc.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let total = tokens * k * width;
        // One thread, a grid that wraps several times, and the launcher's (256 a block).
        for (grid, block) in [(1, 1), (2, 3), (total.div_ceil(256), 256)] {
            let mut input = format!("{} {k} {width} {d_sae} {grid} {block}\n", tokens * k);
            for v in &c.features {
                input += &format!("{v} ");
            }
            input += &floats(&c.coef);
            input += &floats(&c.rows);
            let got: Vec<f32> = harness
                .run(&input)
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "grid {grid} x {block}: element {i}: kernel {g}, CPU op {w}"
                );
            }
        }
    }

    /// The pairs' decode and dot products against the gathered rows' products they replace
    /// (a zero coefficient and repeated features among the pairs).
    #[test]
    fn decode_and_dots_are_the_gathered_rows_products() {
        let dev = Device::Cpu;
        let c = Case::new(6, 3, 5, 7);
        let (tokens, k, width) = (c.tokens, c.k, c.width);
        let (f, a, d, w) = c.tensors();
        let rows = w
            .index_select(&f, 0)
            .unwrap()
            .reshape((tokens, k, width))
            .unwrap();
        let close = |got: Tensor, want: Tensor, what: &str| {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let diff = largest_difference(got, want);
            assert!(diff < 1e-5, "{what}: largest difference {diff}");
        };
        close(
            decode_pairs(&f, &a, &w).unwrap(),
            rows.broadcast_mul(&a.unsqueeze(2).unwrap())
                .unwrap()
                .sum(1)
                .unwrap(),
            "decode",
        );
        close(
            pair_dots(&f, &d, &w, k).unwrap(),
            rows.broadcast_mul(&d.unsqueeze(1).unwrap())
                .unwrap()
                .sum(2)
                .unwrap(),
            "dot products",
        );
        let e = decode_pairs(&Tensor::new(&[9u32; 18], &dev).unwrap(), &a, &w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature 9 of a dictionary of 7"), "{e}");
    }

    /// With bf16 rows (`DeviceOptions::weights`) the ops compute what they compute on the same
    /// rows widened to f32, bit for bit: the widening is exact and the order the same.
    #[test]
    fn bf16_rows_are_read_as_their_f32_values() {
        let c = Case::new(6, 3, 5, 7);
        let (f, a, d, w) = c.tensors();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let wide = w16.to_dtype(DType::F32).unwrap();
        let bits = |t: Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(
            bits(decode_pairs(&f, &a, &w16).unwrap()),
            bits(decode_pairs(&f, &a, &wide).unwrap())
        );
        assert_eq!(
            bits(pair_dots(&f, &d, &w16, c.k).unwrap()),
            bits(pair_dots(&f, &d, &wide, c.k).unwrap())
        );
        // And bf16 is not f32 here: the rows did round.
        assert_ne!(bits(wide), bits(w));
    }

    /// The CUDA source's decode and dot-product kernels, built for the CPU as above, on a
    /// wrapping grid: the CPU ops' results bit for bit (both add in the same order), with f32
    /// rows and with bf16 ones (the `_w16` kernels).
    #[test]
    fn the_cuda_decode_and_dots_source_computes_what_the_cpu_ops_compute() {
        let Some(harness) = crate::custom_ops::emulation::Harness::build(
            "pairs.cu",
            r#"
  unsigned long long tokens, k, width, d_sae;
  if (scanf("%llu %llu %llu %llu", &tokens, &k, &width, &d_sae) != 4) return 2;
  unsigned long long pairs = tokens * k;
  unsigned *features = new unsigned[pairs];
  float *coef = new float[pairs], *d = new float[tokens * width], *w = new float[d_sae * width];
  float *decoded = new float[tokens * width], *dots = new float[pairs];
  for (unsigned long long i = 0; i < pairs; i++) scanf("%u", &features[i]);
  for (unsigned long long i = 0; i < pairs; i++) scanf("%a", &coef[i]);
  for (unsigned long long i = 0; i < tokens * width; i++) scanf("%a", &d[i]);
  for (unsigned long long i = 0; i < d_sae * width; i++) scanf("%a", &w[i]);
  unsigned short *w16 = new unsigned short[d_sae * width];
  for (unsigned long long i = 0; i < d_sae * width; i++) { unsigned x; scanf("%x", &x); w16[i] = x; }
  launch_all(2, 3, [&] { pair_decode(decoded, features, coef, w, tokens, k, width); });
  launch_all(2, 3, [&] { pair_dots(dots, features, d, w, pairs, k, width); });
  for (unsigned long long i = 0; i < tokens * width; i++) printf("%08x\n", __float_as_uint(decoded[i]));
  for (unsigned long long i = 0; i < pairs; i++) printf("%08x\n", __float_as_uint(dots[i]));
  launch_all(2, 3, [&] { pair_decode_w16(decoded, features, coef, w16, tokens, k, width); });
  launch_all(2, 3, [&] { pair_dots_w16(dots, features, d, w16, pairs, k, width); });
  for (unsigned long long i = 0; i < tokens * width; i++) printf("%08x\n", __float_as_uint(decoded[i]));
  for (unsigned long long i = 0; i < pairs; i++) printf("%08x\n", __float_as_uint(dots[i]));
  return 0;"#,
        ) else {
            return;
        };
        let c = Case::new(5, 4, 9, 6);
        let (f, a, d, w) = c.tensors();
        let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w16 = w.to_dtype(DType::BF16).unwrap();
        let mut want = Vec::new();
        for w in [&w, &w16] {
            let decoded = values(decode_pairs(&f, &a, w).unwrap());
            let dots = values(pair_dots(&f, &d, w, c.k).unwrap());
            want.extend(decoded.iter().chain(&dots).map(|v| v.to_bits()));
        }
        let words: String = w16
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|h| format!("{:x} ", h.to_bits()))
            .collect();
        let input = format!(
            "{} {} {} {}\n{}\n{}\n{}\n{}\n{}\n",
            c.tokens,
            c.k,
            c.width,
            c.d_sae,
            c.features
                .iter()
                .map(|f| format!("{f} "))
                .collect::<String>(),
            floats(&c.coef),
            floats(&c.rows),
            floats(&c.w),
            words,
        );
        let got: Vec<u32> = harness
            .run(&input)
            .lines()
            .map(|l| u32::from_str_radix(l, 16).unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_feature_past_the_dictionary_is_an_error() {
        let dev = Device::Cpu;
        let acc = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let f = Tensor::new(&[0u32, 2], &dev).unwrap();
        let a = Tensor::ones((1, 2), DType::F32, &dev).unwrap();
        let r = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
        let e = add_pair_rows(&acc, &f, &a, &r).unwrap_err().to_string();
        assert!(e.contains("feature 2 of a dictionary of 2"), "{e}");
        let short = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let e = add_pair_rows(&acc, &f, &a, &short).unwrap_err().to_string();
        assert!(e.contains("rows [2, 3]"), "{e}");
    }
}
