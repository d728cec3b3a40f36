//! Throughput of `try_small_m`, the weight product of a generation step, on SmolLM2-135M's
//! shapes (one decoding step's worth of weights: 30 layers of qkv, o, gate, up, down and the
//! unembedding), at each number of rows, with the weights as stored (`try_small_m`) and packed
//! (`PackedWeight`). Prints one JSON line per row count with the weight
//! bytes read per second (the bound at few rows) and GFLOP/s.
//!
//! `cargo run --release -p cpu-blas --example bench_small_m`

use candle_core::{Device, Result, Tensor};
use std::time::Instant;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (d, ff, vocab, layers) = (576usize, 1536usize, 49152usize, 30usize);
    // [out, in] per product of one layer; each layer gets its own copies so that nothing stays
    // in cache between layers, as in the model.
    let shapes = [(3 * d - 2 * 384, d), (d, d), (ff, d), (ff, d), (d, ff)];
    let mut ws = Vec::new();
    for _ in 0..layers {
        for &(o, i) in &shapes {
            ws.push(Tensor::randn(0f32, 1.0, (o, i), &dev)?);
        }
    }
    ws.push(Tensor::randn(0f32, 1.0, (vocab, d), &dev)?);
    let bytes: usize = ws.iter().map(|w| w.elem_count() * 4).sum();
    let packed: Vec<Option<cpu_blas::PackedWeight>> = ws
        .iter()
        .map(cpu_blas::PackedWeight::new)
        .collect::<Result<_>>()?;
    for m in [1usize, 2, 4, 8] {
        let xs: Vec<Tensor> = [d, ff]
            .iter()
            .map(|&k| Tensor::randn(0f32, 1.0, (m, k), &dev))
            .collect::<Result<_>>()?;
        for layout in ["rows", "packed"] {
            let step = || -> Result<()> {
                for (w, p) in ws.iter().zip(&packed) {
                    let x = if w.dim(1)? == d { &xs[0] } else { &xs[1] };
                    let y = match (layout, p) {
                        ("packed", Some(p)) => p.matmul_t(x)?,
                        ("packed", None) => return Ok(()),
                        _ => cpu_blas::try_small_m(x, w)?,
                    };
                    std::hint::black_box(y.expect("applies"));
                }
                Ok(())
            };
            if layout == "packed" && packed.iter().any(Option::is_none) {
                println!(
                    "{{\"bench\":\"small_m\",\"layout\":\"packed\",\"skipped\":\"no AVX-512\"}}"
                );
                continue;
            }
            step()?;
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                step()?;
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{{\"bench\":\"small_m\",\"layout\":\"{layout}\",\"rows\":{m},\"ms_per_step\":{:.2},\"weight_gb_per_s\":{:.1},\"gflop_per_s\":{:.1}}}",
                s * 1e3,
                bytes as f64 / s / 1e9,
                (2 * m * bytes / 4) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
