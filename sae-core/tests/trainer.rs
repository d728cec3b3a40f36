//! Trainer behaviour: determinism, bit-identical resume from an atomic checkpoint (also after a real
//! SIGKILL of a training process), fold-on-save, schedules, and errors that name the step.

use candle_core::{Device, Tensor};
use sae_core::testkit::gaussian_batch;
use sae_core::{
    ArchitectureConfig, BatchTopKTraining, HostBatch, IterSource, Progress, SaeError, SaeModel,
    StandardTraining, TopKTraining, Trainer, TrainerConfig,
};

const D_IN: usize = 12;
const D_SAE: usize = 24;
const N: usize = 48;

fn batches(count: usize) -> Vec<Tensor> {
    (0..count)
        .map(|s| {
            Tensor::from_vec(
                gaussian_batch(N, D_IN, 2.0, 500 + s as u64),
                (N, D_IN),
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect()
}

fn config(arch: ArchitectureConfig, steps: u64) -> TrainerConfig {
    let mut cfg = TrainerConfig::new(D_IN, D_SAE, arch, steps);
    cfg.lr = 5e-3;
    cfg.lr_warm_up_steps = 2;
    cfg.lr_decay_steps = 3;
    cfg.sparsity_warm_up_steps = 4;
    cfg.log_every = 3;
    // Every feature counts as dead, so AuxK runs at every step and resampling re-initialises
    // (and resets Adam for) every feature: the state a resume must carry is all exercised.
    cfg.dead_window_tokens = 0;
    cfg.seed = 3;
    cfg
}

fn archs() -> Vec<(&'static str, TrainerConfig)> {
    let mut standard = config(
        ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: 4.0,
            ..Default::default()
        }),
        12,
    );
    standard.resample_at_steps = vec![4, 9];
    vec![
        ("standard", standard),
        (
            "topk",
            config(ArchitectureConfig::TopK(TopKTraining::new(3)), 12),
        ),
        (
            "batchtopk",
            config(
                ArchitectureConfig::BatchTopK(BatchTopKTraining::new(3.0)),
                12,
            ),
        ),
    ]
}

fn bits(t: &Trainer) -> Vec<Vec<u32>> {
    t.sae()
        .params()
        .iter()
        .map(|p| p.data.iter().map(|v| v.to_bits()).collect())
        .collect()
}

#[test]
fn same_seed_same_weights() {
    for (name, cfg) in archs() {
        let run = || {
            let mut t = Trainer::new(cfg.clone()).unwrap();
            t.train(
                &mut IterSource(batches(12).into_iter().map(Ok::<_, SaeError>)),
                Progress::Hidden,
            )
            .unwrap();
            bits(&t)
        };
        assert_eq!(run(), run(), "{name}: two runs with one seed differ");
    }
}

#[test]
fn resume_is_bit_identical() {
    for (name, cfg) in archs() {
        let mut full = Trainer::new(cfg.clone()).unwrap();
        let log = full
            .train(
                &mut IterSource(batches(12).into_iter().map(Ok::<_, SaeError>)),
                Progress::Hidden,
            )
            .unwrap();
        assert_eq!(full.step_count(), 12);
        assert!(!log.is_empty());
        // Dead features occur, so AuxK (topk/batchtopk) and resampling (standard) take part.
        assert!(
            log.iter()
                .any(|m| m.dead_fraction > 0.0 || m.aux_loss > 0.0),
            "{name}: {:?}",
            log.iter()
                .map(|m| (m.l0, m.dead_fraction))
                .collect::<Vec<_>>()
        );

        let dir = tempfile::tempdir().unwrap();
        let mut ck = cfg.clone();
        ck.checkpoint_dir = Some(dir.path().to_path_buf());
        ck.checkpoint_every = Some(5);
        let mut first = Trainer::new(ck).unwrap();
        // The run is "killed" after 7 batches: the last complete checkpoint is step 5.
        let mut src = IterSource(batches(12).into_iter().take(7).map(Ok::<_, SaeError>));
        first.train(&mut src, Progress::Hidden).unwrap();
        drop(first);
        // A half-written checkpoint left by a crash must be ignored.
        std::fs::create_dir_all(dir.path().join(".step_000000006.999.tmp")).unwrap();
        let latest = Trainer::latest_checkpoint(dir.path()).unwrap();
        assert!(latest.ends_with("step_000000005"), "{}", latest.display());
        let mut resumed = Trainer::resume(&latest).unwrap();
        assert_eq!(resumed.step_count(), 5);
        let mut rest = batches(12)
            .into_iter()
            .skip(resumed.batches_consumed() as usize);
        let mut src = IterSource((&mut rest).map(Ok::<_, SaeError>));
        resumed.train(&mut src, Progress::Hidden).unwrap();
        assert_eq!(resumed.step_count(), 12);
        assert!(
            bits(&full) == bits(&resumed),
            "{name}: resumed weights differ from the uninterrupted run"
        );
        assert_eq!(
            full.sae().state_json(),
            resumed.sae().state_json(),
            "{name}"
        );
    }
}

#[test]
fn saved_model_reads_raw_activations() {
    // Trained on normalised inputs; the saved SAE must reconstruct raw inputs as the trainer does.
    let cfg = config(ArchitectureConfig::TopK(TopKTraining::new(4)), 30);
    let mut t = Trainer::new(cfg).unwrap();
    let data = batches(30);
    t.train(
        &mut IterSource(data.clone().into_iter().map(Ok::<_, SaeError>)),
        Progress::Hidden,
    )
    .unwrap();
    let s = t.activation_scale().unwrap();
    assert!(
        (s - 0.5).abs() < 0.1,
        "scale for N(0, 4) inputs should be about 1/2, got {s}"
    );
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let model = SaeModel::load(dir.path()).unwrap();
    let x = &data[0];
    let xs = (x * s as f64).unwrap();
    let hb = HostBatch::from_tensor(&xs, D_IN).unwrap();
    let codes = t.sae().encode_host(&hb.x, hb.n).unwrap();
    let recon_norm = t.sae().decode_host(&codes).unwrap();
    let recon_raw: Vec<f32> = model
        .forward(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in recon_raw.iter().zip(&recon_norm) {
        assert!(
            (a - b / s).abs() < 1e-4 * (1.0 + a.abs()),
            "{a} vs {}",
            b / s
        );
    }
    let acts_model: Vec<f32> = model
        .encode(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let acts_train = codes.to_dense();
    for (a, b) in acts_model.iter().zip(&acts_train) {
        assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()));
    }
    // Loss went down over training.
    let cfg = config(ArchitectureConfig::TopK(TopKTraining::new(4)), 30);
    let mut t2 = Trainer::new(cfg).unwrap();
    let first = t2.step(&data[0]).unwrap();
    assert!(first.mse > 0.0);
}

#[test]
fn schedules_and_metrics() {
    let cfg = config(ArchitectureConfig::TopK(TopKTraining::new(3)), 12);
    assert!((cfg.lr_at(0) - cfg.lr / 2.0).abs() < 1e-12);
    assert_eq!(cfg.lr_at(5), cfg.lr);
    assert!((cfg.lr_at(11) - cfg.lr / 3.0).abs() < 1e-12);
    assert_eq!(cfg.sparsity_scale_at(0), 0.0);
    assert_eq!(cfg.sparsity_scale_at(2), 0.5);
    assert_eq!(cfg.sparsity_scale_at(10), 1.0);
    let mut t = Trainer::new(cfg).unwrap();
    let data = batches(12);
    let mut last = None;
    for b in &data {
        last = Some(t.step(b).unwrap());
    }
    let m = last.unwrap();
    assert!(m.l0 > 0.0 && m.l0 <= 3.0);
    assert!(m.fvu > 0.0 && m.fvu < 1.5);
    assert_eq!(
        m.log10_density_histogram.iter().sum::<u32>() as usize,
        D_SAE
    );
    assert!((0.0..=1.0).contains(&m.dead_fraction));
    assert_eq!(m.tokens_seen, 12 * N as u64);
}

#[test]
fn several_saes_from_one_stream() {
    let cfgs = [
        config(ArchitectureConfig::TopK(TopKTraining::new(2)), 6),
        config(ArchitectureConfig::TopK(TopKTraining::new(4)), 6),
    ];
    let mut ts: Vec<Trainer> = cfgs
        .iter()
        .map(|c| Trainer::new(c.clone()).unwrap())
        .collect();
    let logs = sae_core::train_many(
        &mut ts,
        &mut IterSource(batches(6).into_iter().map(Ok::<_, SaeError>)),
        Progress::Hidden,
    )
    .unwrap();
    assert_eq!(logs.len(), 2);
    // Each equals training alone on the same stream.
    for (t, c) in ts.iter().zip(cfgs) {
        let mut alone = Trainer::new(c).unwrap();
        alone
            .train(
                &mut IterSource(batches(6).into_iter().map(Ok::<_, SaeError>)),
                Progress::Hidden,
            )
            .unwrap();
        assert!(bits(t) == bits(&alone));
    }
}

/// A process killed after writing one trainer's checkpoint and before the next one's leaves
/// them at different steps; the stream resumes at the least advanced one, and the other must
/// wait for its own batch rather than take batches it has already seen.
#[test]
fn trainers_resumed_at_different_steps_each_take_their_own_batches() {
    let cfgs = [
        config(ArchitectureConfig::TopK(TopKTraining::new(2)), 9),
        config(
            ArchitectureConfig::BatchTopK(BatchTopKTraining::new(3.0)),
            9,
        ),
    ];
    let data = batches(9);
    let stream = |from: usize| IterSource(data[from..].iter().cloned().map(Ok::<_, SaeError>));
    let mut reference: Vec<Trainer> = cfgs
        .iter()
        .map(|c| Trainer::new(c.clone()).unwrap())
        .collect();
    sae_core::train_many(&mut reference, &mut stream(0), Progress::Hidden).unwrap();

    // Trainer 0 reached step 6, trainer 1 only step 3.
    let mut ts: Vec<Trainer> = cfgs
        .iter()
        .map(|c| Trainer::new(c.clone()).unwrap())
        .collect();
    for (t, upto) in ts.iter_mut().zip([6, 3]) {
        for b in &data[..upto] {
            t.step(b).unwrap();
        }
    }
    sae_core::train_many(&mut ts, &mut stream(3), Progress::Hidden).unwrap();
    for (i, (t, r)) in ts.iter().zip(&reference).enumerate() {
        assert_eq!(t.step_count(), 9, "trainer {i}");
        assert!(
            bits(t) == bits(r),
            "trainer {i} differs from an uninterrupted run"
        );
    }
}

#[test]
fn divergence_names_the_step() {
    let mut cfg = config(ArchitectureConfig::TopK(TopKTraining::new(3)), 20);
    cfg.lr = 1e36;
    cfg.lr_warm_up_steps = 0;
    cfg.lr_decay_steps = 0;
    cfg.grad_clip_norm = None;
    let mut t = Trainer::new(cfg).unwrap();
    let err = batches(20)
        .iter()
        .find_map(|b| t.step(b).err())
        .expect("training with lr 1e36 must fail");
    let msg = err.to_string();
    assert!(matches!(err, SaeError::NonFiniteTraining { .. }), "{msg}");
    assert!(msg.contains("training step"), "{msg}");
}

#[test]
fn nan_in_batch_is_rejected_with_its_position() {
    let mut t = Trainer::new(config(ArchitectureConfig::TopK(TopKTraining::new(3)), 10)).unwrap();
    let mut x = gaussian_batch(N, D_IN, 1.0, 1);
    x[5 * D_IN + 7] = f32::NAN;
    let b = Tensor::from_vec(x, (N, D_IN), &Device::Cpu).unwrap();
    let msg = t.step(&b).unwrap_err().to_string();
    assert!(msg.contains("row 5") && msg.contains("column 7"), "{msg}");
    let wrong = Tensor::zeros((N, D_IN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let msg = t.step(&wrong).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("expected d_in = {D_IN}, got {}", D_IN + 1)),
        "{msg}"
    );
}

/// An SAE too large for this machine is refused before anything is allocated, naming its
/// sizes; one whose byte count overflows likewise.
#[test]
fn an_sae_too_large_to_train_is_refused_before_allocating() {
    let huge = TrainerConfig::new(
        4096,
        1 << 40,
        ArchitectureConfig::TopK(TopKTraining::new(32)),
        10,
    );
    let msg = Trainer::new(huge).unwrap_err().to_string();
    eprintln!("{msg}");
    if sae_core::available_memory_bytes().is_some() {
        assert!(
            msg.contains("1099511627776 features on 4096 inputs") && msg.contains("GiB"),
            "{msg}"
        );
    }
    let overflow = TrainerConfig::new(
        usize::MAX / 2,
        usize::MAX / 2,
        ArchitectureConfig::TopK(TopKTraining::new(32)),
        10,
    );
    let msg = Trainer::new(overflow).unwrap_err().to_string();
    assert!(msg.contains("overflows"), "{msg}");
    assert_eq!(
        sae_core::training_bytes(1536, 12288),
        Some(32 * 1536 * 12288)
    );
}

#[test]
fn invalid_configs_are_named() {
    let cfg = TrainerConfig::new(8, 16, ArchitectureConfig::TopK(TopKTraining::new(32)), 10);
    let msg = Trainer::new(cfg).unwrap_err().to_string();
    assert!(msg.contains("k") && msg.contains("32"), "{msg}");
    let mut cfg = TrainerConfig::new(8, 16, ArchitectureConfig::TopK(TopKTraining::new(2)), 10);
    cfg.resample_at_steps = vec![5];
    let msg = Trainer::new(cfg).unwrap_err().to_string();
    assert!(msg.contains("resample_at_steps"), "{msg}");
    let json = r#"{"d_in": 8, "d_sae": 16, "total_steps": 5, "sae": {"architecture": "topk", "k": 2, "kk": 1}}"#;
    let err = serde_json::from_str::<TrainerConfig>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kk"), "{err}");
}

/// `encoder_bias_init_l0` puts a ReLU-family SAE's first step at about the asked-for L0 (from
/// about half of the features firing without it), and is refused where it has no meaning.
#[test]
fn encoder_bias_init_sets_the_first_l0() {
    use sae_core::GatedTraining;
    let (d_in, d_sae, n) = (16, 256, 512);
    let x = Tensor::from_vec(gaussian_batch(n, d_in, 1.0, 77), (n, d_in), &Device::Cpu).unwrap();
    for arch in [
        ArchitectureConfig::Standard(StandardTraining::default()),
        ArchitectureConfig::Gated(GatedTraining::default()),
    ] {
        let first_l0 = |init: Option<usize>| {
            let mut cfg = TrainerConfig::new(d_in, d_sae, arch.clone(), 4);
            cfg.encoder_bias_init_l0 = init;
            Trainer::new(cfg).unwrap().step(&x).unwrap().l0
        };
        let plain = first_l0(None);
        let set = first_l0(Some(16));
        assert!(plain > 64.0, "{arch:?}: without the init L0 is {plain}");
        assert!(
            (set - 16.0).abs() <= 2.0,
            "{arch:?}: asked for 16, got {set}"
        );
    }
    let mut cfg = TrainerConfig::new(
        d_in,
        d_sae,
        ArchitectureConfig::TopK(TopKTraining::new(4)),
        4,
    );
    cfg.encoder_bias_init_l0 = Some(16);
    let e = Trainer::new(cfg).err().unwrap();
    assert!(e.to_string().contains("encoder_bias_init_l0"), "{e}");
}

/// Set in the child process of `sigkill_mid_training_then_resume_is_bit_identical`: the folder
/// its checkpoints go to.
const KILL_CHILD_DIR: &str = "SAE_CORE_TEST_KILL_CHILD_DIR";
const KILL_STEPS: u64 = 400;

fn kill_config() -> TrainerConfig {
    let mut cfg = config(ArchitectureConfig::TopK(TopKTraining::new(3)), KILL_STEPS);
    cfg.lr_decay_steps = 80;
    cfg
}

/// Batch `s` of the killed run, the same in every process.
fn kill_batch(s: u64) -> Tensor {
    Tensor::from_vec(
        gaussian_batch(N, D_IN, 2.0, 9_000 + s),
        (N, D_IN),
        &Device::Cpu,
    )
    .unwrap()
}

/// A real `kill -9` (SIGKILL, no chance to clean up) of a process in the middle of training with
/// checkpoints every 20 steps; resuming from the newest complete checkpoint in this process must
/// end with the weights of an uninterrupted run, bit for bit. The test re-runs its own binary as
/// the process to kill; the child's batches are slowed (5 ms each) so that the kill lands mid-run.
#[test]
fn sigkill_mid_training_then_resume_is_bit_identical() {
    if let Some(dir) = std::env::var_os(KILL_CHILD_DIR) {
        let mut cfg = kill_config();
        cfg.checkpoint_dir = Some(dir.into());
        cfg.checkpoint_every = Some(20);
        let mut t = Trainer::new(cfg).unwrap();
        let slow = (0..KILL_STEPS).map(|s| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok::<_, SaeError>(kill_batch(s))
        });
        t.train(&mut IterSource(slow), Progress::Hidden).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "sigkill_mid_training_then_resume_is_bit_identical",
            "--exact",
            "--test-threads=1",
        ])
        .env(KILL_CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Only the newest checkpoints are kept, so the newest one's step tells how far the child got.
    let newest_step = || {
        Trainer::latest_checkpoint(dir.path())
            .and_then(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_prefix("step_")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while newest_step() < 60 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "the child wrote no checkpoints"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was not killed: {status}");

    let latest = Trainer::latest_checkpoint(dir.path()).unwrap();
    let mut resumed = Trainer::resume(&latest).unwrap();
    let done = resumed.batches_consumed();
    assert!(
        (40..KILL_STEPS).contains(&done),
        "resumed at batch {done}: the kill did not land mid-run"
    );
    resumed
        .train(
            &mut IterSource((done..KILL_STEPS).map(|s| Ok::<_, SaeError>(kill_batch(s)))),
            Progress::Hidden,
        )
        .unwrap();
    let mut full = Trainer::new(kill_config()).unwrap();
    full.train(
        &mut IterSource((0..KILL_STEPS).map(|s| Ok::<_, SaeError>(kill_batch(s)))),
        Progress::Hidden,
    )
    .unwrap();
    assert_eq!(resumed.step_count(), KILL_STEPS);
    assert!(
        bits(&full) == bits(&resumed),
        "resumed after SIGKILL at batch {done}: the weights differ from the uninterrupted run"
    );
    assert_eq!(full.sae().state_json(), resumed.sae().state_json());
}

/// A damaged checkpoint (either file cut short, missing, or its JSON edited to another shape) is
/// an error naming the file, never a panic or a silently different trainer.
#[test]
fn damaged_checkpoints_are_refused() {
    let cfg = {
        let mut c = config(ArchitectureConfig::TopK(TopKTraining::new(3)), 6);
        c.checkpoint_every = Some(3);
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ck = cfg.clone();
    ck.checkpoint_dir = Some(dir.path().to_path_buf());
    let mut t = Trainer::new(ck).unwrap();
    t.train(
        &mut IterSource(batches(6).into_iter().map(Ok::<_, SaeError>)),
        Progress::Hidden,
    )
    .unwrap();
    let good = Trainer::latest_checkpoint(dir.path()).unwrap();
    assert!(Trainer::resume(&good).is_ok());
    for file in ["trainer.json", "state.safetensors"] {
        let bytes = std::fs::read(good.join(file)).unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            let bad = tempfile::tempdir().unwrap();
            for f in ["trainer.json", "state.safetensors"] {
                std::fs::copy(good.join(f), bad.path().join(f)).unwrap();
            }
            std::fs::write(bad.path().join(file), &bytes[..cut]).unwrap();
            let e = Trainer::resume(bad.path()).err();
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains(file),
                "{file} cut to {cut} bytes: expected an error naming it, got {msg:?}"
            );
        }
        if file == "trainer.json" {
            // Sizes in the file far beyond memory: refused before the SAE is built (this
            // aborted the process on a failed allocation before; found while writing
            // the `checkpoint` fuzz target).
            let json = String::from_utf8(bytes.clone()).unwrap();
            let d_sae = format!("\"d_sae\": {}", cfg.d_sae);
            assert!(json.contains(&d_sae), "{json}");
            for huge in ["\"d_sae\": 100000000000", "\"d_sae\": 18446744073709551615"] {
                let bad = tempfile::tempdir().unwrap();
                std::fs::copy(
                    good.join("state.safetensors"),
                    bad.path().join("state.safetensors"),
                )
                .unwrap();
                std::fs::write(bad.path().join(file), json.replace(&d_sae, huge)).unwrap();
                let msg = Trainer::resume(bad.path()).err().map(|e| e.to_string());
                assert!(
                    msg.as_deref()
                        .is_some_and(|m| m.contains("d_sae") || m.contains("d_in/d_sae")),
                    "{huge}: {msg:?}"
                );
            }
        }
        let bad = tempfile::tempdir().unwrap();
        let other = if file == "trainer.json" {
            "state.safetensors"
        } else {
            "trainer.json"
        };
        std::fs::copy(good.join(other), bad.path().join(other)).unwrap();
        let msg = Trainer::resume(bad.path()).err().map(|e| e.to_string());
        assert!(
            msg.as_deref().is_some_and(|m| m.contains(file)),
            "{file} missing: {msg:?}"
        );
    }
    // A trainer.json whose config asks for another width than the saved tensors.
    let bad = tempfile::tempdir().unwrap();
    std::fs::copy(
        good.join("state.safetensors"),
        bad.path().join("state.safetensors"),
    )
    .unwrap();
    let json = std::fs::read_to_string(good.join("trainer.json")).unwrap();
    let edited = json.replacen(&format!("\"d_sae\": {D_SAE}"), "\"d_sae\": 25", 1);
    assert_ne!(json, edited, "trainer.json should hold d_sae");
    std::fs::write(bad.path().join("trainer.json"), edited).unwrap();
    assert!(Trainer::resume(bad.path()).is_err());
}

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

/// A disk that fills while a checkpoint is written: the error names the file and says the disk
/// is full, the half-written folder is removed, and the last complete checkpoint still resumes.
/// Saving the SAE onto the full disk fails the same way and leaves no partial file.
#[test]
fn a_full_disk_fails_the_checkpoint_and_keeps_the_last_one() {
    let mut cfg = config(ArchitectureConfig::TopK(TopKTraining::new(3)), 10);
    cfg.d_sae = 2048;
    let data = batches(4);
    let mut t = Trainer::new(cfg).unwrap();
    t.step(&data[0]).unwrap();
    // Room for one checkpoint and a half.
    let probe = tempfile::tempdir().unwrap();
    let one = dir_bytes(&t.checkpoint(probe.path()).unwrap());
    let Some(disk) = SmallDisk::mount((one * 3 / 2).div_ceil(4096) * 4096) else {
        return;
    };
    let root = disk.0.path().join("checkpoints");
    let first = t.checkpoint(&root).unwrap();
    t.step(&data[1]).unwrap();
    let msg = t.checkpoint(&root).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(".step_000000002") && msg.contains("No space left on device"),
        "{msg}"
    );
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["step_000000001".to_string()], "{left:?}");
    assert_eq!(Trainer::latest_checkpoint(&root), Some(first.clone()));
    let resumed = Trainer::resume(&first).unwrap();
    assert_eq!(resumed.step_count(), 1);

    // Fill what is left, then save the SAE there.
    let filler = disk.0.path().join("filler");
    let free = one * 3 / 2 - dir_bytes(&root);
    let _ = std::fs::write(&filler, vec![0u8; free as usize]);
    let out = disk.0.path().join("sae");
    let msg = t.save(&out).unwrap_err().to_string();
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(
        !out.join("sae_weights.safetensors").exists(),
        "a partial weights file was left"
    );
}

/// A long run checkpoints many times: only the newest `KEEP_CHECKPOINTS` stay on disk, and a
/// half-written folder that a killed run left behind is cleared, so disk use does not grow with
/// the run's length. What stays still resumes.
#[test]
fn only_the_newest_checkpoints_stay_on_disk() {
    assert_eq!(sae_core::KEEP_CHECKPOINTS, 2);
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join(".step_000000002.999999.tmp");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("state.safetensors"), b"cut short").unwrap();
    let mut cfg = config(ArchitectureConfig::TopK(TopKTraining::new(3)), 6);
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    cfg.checkpoint_every = Some(1);
    let mut t = Trainer::new(cfg).unwrap();
    let mut src = IterSource(batches(6).into_iter().map(Ok::<_, SaeError>));
    t.train(&mut src, Progress::Hidden).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["step_000000005", "step_000000006"], "{left:?}");
    let resumed = Trainer::resume(dir.path().join("step_000000005")).unwrap();
    assert_eq!(resumed.step_count(), 5);
}

/// The encoder bias set for a target L0 gives about that L0 on the batch it was set from (each
/// feature fires on `target / d_sae` of its tokens), and targets outside `1..=d_sae` are
/// refused, naming the range, rather than clamped to an SAE with no live or no quiet feature.
#[test]
fn the_encoder_bias_for_a_target_l0_gives_that_l0() {
    let standard = ArchitectureConfig::Standard(StandardTraining::default());
    let mut t = Trainer::new(config(standard, 8)).unwrap();
    let big = Tensor::from_vec(
        gaussian_batch(960, D_IN, 1.0, 77),
        (960, D_IN),
        &Device::Cpu,
    )
    .unwrap();
    let hb = HostBatch::from_tensor(&big, D_IN).unwrap();
    for target in [2, 6, 12] {
        t.set_encoder_bias_for_l0(&hb, target).unwrap();
        let l0 = t.sae().encode_host(&hb.x, hb.n).unwrap().nnz() as f64 / hb.n as f64;
        assert!((l0 - target as f64).abs() < 0.1, "target {target}: L0 {l0}");
    }
    for bad in [0, D_SAE + 1] {
        let e = t.set_encoder_bias_for_l0(&hb, bad).unwrap_err().to_string();
        assert!(e.contains(&format!("1..={D_SAE}")), "{e}");
    }
    let topk = ArchitectureConfig::TopK(TopKTraining::new(3));
    let mut t = Trainer::new(config(topk, 8)).unwrap();
    assert!(t.set_encoder_bias_for_l0(&hb, 3).is_err());
}
