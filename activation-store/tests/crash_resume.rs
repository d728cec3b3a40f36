//! kill -9 a harvest at random moments, run it again each time, and check that the cache ends
//! up byte-identical to an uninterrupted harvest: no lost, duplicated or torn row.
//!
//! The harvest runs in a child process: this test binary itself, started with `--exact
//! crash_child --ignored` and an environment variable naming the cache folder.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use activation_store::{ActivationStore, harvest};
use common::*;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "ACTIVATION_STORE_CRASH_CHILD_DIR";
const DOCS: usize = 150;

fn child_config() -> activation_store::HarvestConfig {
    let mut cfg = config(60);
    cfg.dtype = activation_store::StoreDtype::Bf16;
    cfg
}

#[test]
#[ignore = "child process of killed_harvest_resumes_exactly; does nothing on its own"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let plan = plan(DOCS, 16);
    let mut src = source(Duration::from_millis(2));
    harvest(
        dir.as_ref(),
        &plan,
        &model(),
        &mut src,
        &child_config(),
        None,
    )
    .unwrap();
}

#[test]
fn killed_harvest_resumes_exactly() {
    let reference = tempfile::tempdir().unwrap();
    let plan = plan(DOCS, 16);
    run(reference.path(), &plan, &child_config());
    let want = snapshot(reference.path());
    let n_shards = ActivationStore::open(reference.path())
        .unwrap()
        .manifest()
        .shards
        .len();
    assert!(n_shards > 20, "{n_shards} shards");

    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut kills = 0;
    let mut kills_mid_run = 0;
    let t0 = Instant::now();
    for attempt in 0.. {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "harvest never finished"
        );
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--ignored", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(rng.random_range(5..40 + 10 * attempt as u64));
        std::thread::sleep(wait);
        if let Some(status) = child.try_wait().unwrap() {
            // The harness prints a failing test's panic on stdout.
            let mut err = String::new();
            if let Some(mut e) = child.stdout.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            assert!(status.success(), "child failed: {status}\n{err}");
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // The cache as a killed run left it must open, and every listed shard must verify.
        if let Ok(c) = ActivationStore::open(dir.path()) {
            c.verify(None).unwrap();
            let s = c.manifest().shards.len();
            if s > 0 && s < n_shards {
                kills_mid_run += 1;
            }
        }
    }
    assert!(
        kills >= 5 && kills_mid_run >= 3,
        "{kills} kills, {kills_mid_run} mid-run"
    );
    let got = snapshot(dir.path());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "file sets differ"
    );
    for (name, bytes) in &want {
        if got[name] != *bytes && name.ends_with(".json") {
            let (g, w) = (
                String::from_utf8_lossy(&got[name]),
                String::from_utf8_lossy(bytes),
            );
            for (a, b) in g.lines().zip(w.lines()) {
                if a != b {
                    eprintln!("got  {a}\nwant {b}");
                }
            }
        }
        assert!(
            got[name] == *bytes,
            "{name} differs from the uninterrupted run"
        );
    }
    eprintln!("{kills} kills ({kills_mid_run} mid-run), cache identical to an uninterrupted run");
}
