//! On a GPU (a build with `--features cuda`, run by `scripts/gpu_check.sh` on the GPU machine):
//! activations to and from the device through pinned host buffers (`src/pinned.rs`) are what the
//! CPU paths give, bit for bit. Without the feature this file has no tests.
#![cfg(feature = "cuda")]

mod common;

use activation_store::{ActivationStore, HarvestConfig, Shuffle, StoreDtype, StreamConfig};
use candle_core::{Device, Tensor};
use common::*;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// Rows as bit patterns.
fn bits(batches: &[Tensor], width: usize) -> Vec<Vec<u32>> {
    let mut rows = Vec::new();
    for b in batches {
        let v = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        rows.extend(
            v.chunks(width)
                .map(|r| r.iter().map(|x| x.to_bits()).collect()),
        );
    }
    rows
}

/// Training batches uploaded through the two staging buffers are the CPU stream's, in every
/// mode and with a short last batch. Every batch of two epochs is held on the device before any
/// is read back, so that a staging buffer refilled before its copy had ended would show.
#[test]
fn on_the_gpu_pinned_batches_are_the_cpu_streams() {
    let tmp = tempfile::tempdir().unwrap();
    run(tmp.path(), &plan(20, 16), &config(100));
    let cache = ActivationStore::open(tmp.path()).unwrap();
    let acts = cache.hook(HOOKS[0]).unwrap();
    for shuffle in [
        Shuffle::Sequential,
        Shuffle::Buffer {
            buffer_bytes: 4096,
            chunk_rows: 16,
        },
    ] {
        let cfg = StreamConfig {
            epochs: Some(2),
            shuffle,
            ..StreamConfig::new(37)
        };
        let take = |device: Device| -> Vec<Tensor> {
            let cfg = StreamConfig {
                device,
                ..cfg.clone()
            };
            acts.batches(cfg).unwrap().map(|b| b.unwrap()).collect()
        };
        let on_gpu = take(gpu());
        assert!(on_gpu.iter().all(|b| b.device().is_cuda()));
        assert!(on_gpu.len() > 4, "too few batches to cycle the buffers");
        let d = acts.width();
        assert_eq!(bits(&on_gpu, d), bits(&take(Device::Cpu), d));
    }
}

/// A harvest on the GPU (forward passes queued ahead of their copies into pooled pinned
/// buffers) writes the same cache, byte for byte, as one on the CPU, in f32 and in f16, with
/// batches of 3 windows so that the last batch is short and the pool hands out larger buffers.
#[test]
fn on_the_gpu_a_harvest_writes_the_cpu_harvests_cache() {
    for dtype in [StoreDtype::F32, StoreDtype::F16] {
        let on = |device: Device| {
            let tmp = tempfile::tempdir().unwrap();
            let cfg = HarvestConfig {
                device,
                dtype,
                batch_windows: 3,
                ..config(64)
            };
            let summary = run(tmp.path(), &plan(23, 16), &cfg);
            (snapshot(tmp.path()), summary.tokens)
        };
        let (gpu_files, gpu_rows) = on(gpu());
        let (cpu_files, cpu_rows) = on(Device::Cpu);
        assert!(gpu_rows > 0);
        assert_eq!(gpu_rows, cpu_rows);
        assert_eq!(gpu_files, cpu_files, "{dtype:?}");
    }
}

/// The trainer's thread reads a batch the moment it has it, on its own CUDA stream (candle uses
/// CUDA's per-thread default stream), which does not wait for the prefetch thread's: an upload
/// must have ended before the batch is handed over. Batches of 32 MiB, a prefetch of one, and
/// each read back at once, so that a copy still in flight would be read half-written.
#[test]
fn on_the_gpu_a_batch_is_whole_when_the_trainer_takes_it() {
    const HOOK: &str = "blocks.0.hook_resid_post";
    const WIDTH: usize = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let mut source = activation_store::SyntheticSource {
        widths: vec![(HOOK.to_string(), WIDTH)],
        delay: std::time::Duration::ZERO,
    };
    let mut cfg = HarvestConfig::new(vec![HOOK.to_string()]);
    cfg.shard_rows = 4096;
    activation_store::harvest(
        tmp.path(),
        &plan(400, 64),
        &model(),
        &mut source,
        &cfg,
        None,
    )
    .unwrap();
    let cache = ActivationStore::open(tmp.path()).unwrap();
    let acts = cache.hook(HOOK).unwrap();
    let cfg = |device: Device| StreamConfig {
        epochs: Some(1),
        shuffle: Shuffle::Sequential,
        prefetch: 1,
        device,
        ..StreamConfig::new(2048)
    };
    let cpu: Vec<Tensor> = acts
        .batches(cfg(Device::Cpu))
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert!(cpu.len() >= 4, "{} batches: too few to race", cpu.len());
    let mut taken = 0;
    for (i, b) in acts.batches(cfg(gpu())).unwrap().enumerate() {
        let b = b.unwrap();
        assert_eq!(
            bits(std::slice::from_ref(&b), WIDTH),
            bits(&cpu[i..=i], WIDTH),
            "batch {i} differs from the CPU stream's"
        );
        taken += 1;
    }
    assert_eq!(taken, cpu.len());
}
