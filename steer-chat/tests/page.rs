//! The chat page in headless Chromium against a live server: SmolLM2-135M-Instruct (the real
//! model and tokenizer, fetched by `scripts/fetch_assets.py smollm2`) with a random TopK SAE on
//! its residual stream, whose feature statistics are measured on real text here.
//!
//! A user types a prompt and sees an answer with traits; clicks a trait and moves its slider, and
//! the answer changes; two tabs chat at once; a long generation is stopped from the page and the
//! server's generation ends with it. Bad requests get 4xx answers that name the problem, and the
//! server keeps serving.
//!
//! Skips (saying so) without Chromium (`/usr/bin/chromium` or `$CHROMIUM`) or the model.
//! `STEER_CHAT_SCREENSHOT=FILE` saves a screenshot of the page at the end.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use sae_core::TopKConfig;
use sae_core::{CommonConfig, SaeConfig, SaeModel, TopKSae, TopKTraining};
use steer_chat::{ChatApp, Limits};
use steering::FeatureStats;
use steering::activations;
use transformer_hooks::candle_core::Device;
use transformer_hooks::{HookPoint, Model, assets};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TEXT: &str = "The harbour was quiet in the early morning. Fishing boats rocked against the \
    pier while gulls circled above the water. Anna walked down to the market, bought bread and \
    apples, and sat on a bench to watch the ships leave for the open sea. Later she wrote a \
    letter to her brother, who worked as a teacher in the city, about the weather and the price \
    of coal.";

fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    p.exists().then_some(p)
}

/// A random TopK SAE on `blocks.L.hook_resid_post`, with statistics (maximum, firing rate, a
/// label from the token it fires hardest on) measured on `TEXT`.
fn random_sae(model: &Model, layer: usize) -> (SaeModel, FeatureStats) {
    let d_in = model.config().d_model;
    let d_sae = 1024;
    let hook = HookPoint::resid_post(layer);
    let sae = topk_sae(d_in, d_sae, hook);
    let tok = model.tokenizer().unwrap();
    let ids = tok.encode(TEXT, true).unwrap();
    let acts = activations(model, &sae, hook, &ids).unwrap();
    let rows = (acts.len() - 1) as f64;
    let mut stats = FeatureStats {
        hook: hook.to_string(),
        rows: acts.len() as u64 - 1,
        max_activation: vec![0.0; d_sae],
        firing_rate: vec![0.0; d_sae],
        labels: vec![String::new(); d_sae],
        top_contexts: vec![Vec::new(); d_sae],
    };
    for f in 0..d_sae {
        let mut best = (0.0f32, 0usize);
        for (p, row) in acts.iter().enumerate().skip(1) {
            if row[f] > 0.0 {
                stats.firing_rate[f] += 1.0 / rows;
            }
            if row[f] > best.0 {
                best = (row[f], p);
            }
        }
        stats.max_activation[f] = best.0;
        stats.labels[f] = tok
            .decode(&ids[best.1..=best.1])
            .unwrap()
            .trim()
            .to_string();
    }
    (sae, stats)
}

/// A random TopK SAE (k = 16) reading `hook`.
fn topk_sae(d_in: usize, d_sae: usize, hook: HookPoint) -> SaeModel {
    let k = 16;
    let mut common = CommonConfig::new(d_in, d_sae);
    common.metadata.hook_name = Some(hook.to_string());
    let cfg = TopKConfig {
        k,
        rescale_acts_by_decoder_norm: false,
        common,
    };
    SaeModel::from_parts(
        SaeConfig::TopK(cfg),
        Box::new(TopKSae::init(d_in, d_sae, TopKTraining::new(k), 5).unwrap()),
        None,
    )
}

/// One HTTP/1.1 request; the status and the body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

fn running(addr: SocketAddr) -> u64 {
    let (_, body) = request(addr, "GET", "/api/status", "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["running"].as_u64().unwrap()
}

fn js(tab: &Tab, expr: &str) -> serde_json::Value {
    tab.evaluate(expr, false)
        .unwrap()
        .value
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `expr` is true in the page.
fn wait_for(tab: &Tab, expr: &str, within: Duration) {
    let t = Instant::now();
    while js(tab, expr) != serde_json::Value::Bool(true) {
        assert!(t.elapsed() < within, "waited {within:?} for `{expr}`");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_answer(tab: &Tab) -> String {
    js(
        tab,
        "[...document.querySelectorAll('#log .msg.assistant .text')].pop().textContent",
    )
    .as_str()
    .unwrap_or_default()
    .to_string()
}

fn ask(tab: &Tab, prompt: &str) {
    eprintln!("asking {prompt:?}");
    tab.bring_to_front().unwrap();
    tab.wait_for_element("#prompt").unwrap().click().unwrap();
    tab.type_str(prompt).unwrap().press_key("Enter").unwrap();
}

fn generations(n: usize) -> String {
    format!("document.body.dataset.generations === '{n}'")
}

/// A live server on a free port, and how to stop it.
struct Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<steer_chat::Result<()>>,
    /// One server at a time: the checks below are about generations overlapping and being
    /// stopped, and two servers generating on two cores starve the browser and each other.
    _turn: MutexGuard<'static, ()>,
}

static ONE_SERVER: Mutex<()> = Mutex::new(());

impl Server {
    /// SmolLM2 with a random SAE at layer 15; `None` (saying why) without the model.
    fn start() -> Option<Self> {
        let turn = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
        let path = assets::asset_path(assets::SMOLLM2);
        if !path.exists() {
            eprintln!(
                "skipping: {} missing (python3 scripts/fetch_assets.py smollm2)",
                path.display()
            );
            return None;
        }
        let model = Model::load(&path, &Device::Cpu).unwrap();
        let (sae, stats) = random_sae(&model, 15);
        let limits = Limits {
            max_new_tokens: 400,
            max_concurrent: 3,
            // The statistics cover ~80 tokens: a feature that fires once has a rate of 1/80.
            traits: steering::TraitOptions {
                top: 8,
                max_firing_rate: 0.2,
                ..Default::default()
            },
            ..Limits::default()
        };
        let app = ChatApp::new(model, sae, stats, limits).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(steer_chat::serve(listener, app, async {
            let _ = stop_rx.await;
        }));
        Some(Self {
            rt,
            addr,
            stop,
            handle,
            _turn: turn,
        })
    }

    /// Stops it, and checks that it ended without error.
    fn stop(self) {
        let _ = self.stop.send(());
        self.rt.block_on(self.handle).unwrap().unwrap();
    }
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let Some(server) = Server::start() else {
        return;
    };
    let addr = server.addr;
    // Bad requests: a 4xx naming the problem.
    let chat = |clamps: &str, content: &str| {
        request(
            addr,
            "POST",
            "/api/chat",
            &format!(
                r#"{{"messages":[{{"role":"user","content":"{content}"}}],"clamps":[{clamps}],"max_new_tokens":4}}"#
            ),
        )
    };
    let (s, b) = chat(r#"{"feature":5000,"value":2}"#, "Hi");
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("feature 5000") && b.contains("1024 features"),
        "{b}"
    );
    let (s, b) = chat(r#"{"feature":3,"value":1e9}"#, "Hi");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("within ±100"), "{b}");
    let (s, b) = request(addr, "POST", "/api/chat", r#"{"messages":[{"role":"user""#);
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("JSON"), "{b}");
    let (s, b) = chat("", &"word ".repeat(9000));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("context of 8192"), "{b}");
    let (s, b) = request(
        addr,
        "POST",
        "/api/adjust",
        r#"{"prompt":"Hi","feature":99999}"#,
    );
    assert_eq!(s, 400, "{b}");
    for (body, says) in [
        (
            r#"{"messages":[{"role":"robot","content":"Hi"}]}"#,
            "role `robot`",
        ),
        (
            r#"{"messages":[{"role":"user","content":"Hi"}],"clamps":[{"feature":3,"value":1},{"feature":3,"value":2}]}"#,
            "clamped twice",
        ),
        (
            r#"{"messages":[{"role":"user","content":"Hi"}],"temperature":9}"#,
            "temperature 9",
        ),
        (
            r#"{"messages":[{"role":"assistant","content":"Hi"}]}"#,
            "last message must be the user's",
        ),
    ] {
        let (s, b) = request(addr, "POST", "/api/chat", body);
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b.contains(says), "{body}: {b}");
    }
    let (s, b) = request(
        addr,
        "POST",
        "/api/adjust",
        r#"{"prompt":"  ","feature":3}"#,
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("nothing to adjust"), "{b}");
    let (s, b) = request(addr, "GET", "/api/features?q=", "");
    assert_eq!(s, 400, "{b}");
    let many: Vec<String> = (0..33)
        .map(|f| format!(r#"{{"feature":{f},"value":1}}"#))
        .collect();
    let (s, b) = chat(&many.join(","), "Hi");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("clamps: 33 given, at most 32"), "{b}");

    // Busy: with `max_concurrent` (3) long generations streaming, a fourth job gets a 503 naming
    // the limit; once their readers hang up the generations stop and the server serves again.
    let long_chat = r#"{"messages":[{"role":"user","content":"Write a long story about the sea."}],"max_new_tokens":400}"#;
    let streams: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST /api/chat HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{long_chat}",
                long_chat.len()
            )
            .unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    while running(addr) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the three generations never ran at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, b) = chat("", "Hi");
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("busy") && b.contains("at most 3"), "{b}");
    drop(streams);
    let t = Instant::now();
    while running(addr) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "generations kept running after their readers hung up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, b) = request(addr, "GET", "/api/info", "");
    assert_eq!(s, 200, "the server stopped serving after bad requests: {b}");
    assert!(b.contains(r#""device":"cpu""#), "{b}");

    server.stop();
}

#[test]
fn chat_page_in_headless_chromium() -> TestResult {
    let Some(chromium) = chromium() else {
        eprintln!("skipping: no Chromium (install Debian's chromium, or set CHROMIUM)");
        return Ok(());
    };
    let Some(server) = Server::start() else {
        return Ok(());
    };
    let addr = server.addr;

    let browser = Browser::new(
        LaunchOptions::default_builder()
            .path(Some(chromium))
            .sandbox(false)
            .headless(true)
            .window_size(Some((1280, 900)))
            .idle_browser_timeout(Duration::from_secs(600))
            .args(vec![
                OsStr::new("--disable-gpu"),
                OsStr::new("--disable-quic"),
            ])
            .build()?,
    )?;
    let url = format!("http://{addr}/");
    let tab = browser.new_tab()?;
    tab.set_default_timeout(Duration::from_secs(120));
    tab.navigate_to(&url)?.wait_until_navigated()?;
    tab.wait_for_element("#info")?;
    let long = Duration::from_secs(300);

    // A prompt, an answer with traits.
    js(&tab, "document.querySelector('#max-tokens').value = 24");
    ask(&tab, "What do you like to do on a sunny day?");
    wait_for(&tab, &generations(1), long);
    let plain = last_answer(&tab);
    assert!(!plain.trim().is_empty(), "no answer");
    let shown = js(
        &tab,
        "document.querySelector('#error').textContent + ' | ' + document.querySelector('#log').innerHTML",
    );
    assert!(
        js(
            &tab,
            "document.querySelectorAll('#log .msg.assistant .trait').length > 0"
        ) == serde_json::json!(true),
        "no traits under the answer: {shown}"
    );
    let traits = tab.find_elements("#log .msg.assistant .trait")?;

    // The strongest trait, clamped hard with its slider (End: the slider's maximum, 10x):
    // the answer is regenerated, and changes.
    let feature = traits[0]
        .get_attribute_value("data-feature")?
        .unwrap_or_default();
    traits[0].click()?;
    let slider = tab.wait_for_element(&format!(
        "#features .feature[data-feature='{feature}'] input[type=range]"
    ))?;
    slider.focus()?;
    tab.press_key("End")?;
    wait_for(&tab, &generations(2), long);
    let steered = last_answer(&tab);
    let meta = js(
        &tab,
        "[...document.querySelectorAll('#log .msg.assistant .meta')].pop().textContent",
    );
    assert!(
        meta.as_str()
            .unwrap_or_default()
            .contains(&format!("#{feature} ")),
        "the regenerated answer does not say it was clamped: {meta}"
    );
    assert_ne!(
        steered, plain,
        "clamping feature {feature} at 10x changed nothing"
    );
    assert_eq!(
        js(
            &tab,
            "document.querySelectorAll('#log .msg.assistant').length"
        ),
        serde_json::json!(1),
        "regenerating replaces the last answer"
    );

    // A request the server refuses shows its message on the page.
    js(&tab, "document.querySelector('#max-tokens').value = 100000");
    ask(&tab, "Hello?");
    wait_for(&tab, &generations(3), long);
    let err = js(&tab, "document.querySelector('#error').textContent");
    assert!(
        err.as_str()
            .unwrap_or_default()
            .contains("max_new_tokens 100000"),
        "{err}"
    );

    // Two tabs at once.
    let tab2 = browser.new_tab()?;
    tab2.set_default_timeout(Duration::from_secs(120));
    tab2.navigate_to(&url)?.wait_until_navigated()?;
    tab2.wait_for_element("#info")?;
    // The second tab asks while the first one's answer (long: the 10x clamp is still set there)
    // is being written, so the two must overlap however slow the machine.
    js(
        &tab,
        "document.querySelector('#new-chat').click(); document.querySelector('#max-tokens').value = 300",
    );
    js(&tab2, "document.querySelector('#max-tokens').value = 150");
    ask(&tab, "Name a fruit.");
    wait_for(
        &tab,
        "(document.querySelector('#log .msg.assistant.running .text')||{}).textContent?.length > 0",
        long,
    );
    ask(&tab2, "Name a city.");
    let t = Instant::now();
    let mut both = false;
    while t.elapsed() < long {
        if running(addr) == 2 {
            both = true;
        }
        if js(&tab, &generations(4)) == serde_json::json!(true)
            && js(&tab2, &generations(1)) == serde_json::json!(true)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        both,
        "the two tabs' generations never ran at the same time: {:?} / {:?}",
        last_answer(&tab),
        last_answer(&tab2)
    );
    for t in [&tab, &tab2] {
        wait_for(
            t,
            "document.querySelectorAll('#log .trait').length > 0",
            long,
        );
    }

    // Stop: a long answer, stopped from the page once it has started; the server's generation
    // ends with it.
    js(
        &tab,
        "document.querySelector('#new-chat').click(); document.querySelector('#max-tokens').value = 400",
    );
    ask(&tab, "Write a long story about a lighthouse keeper.");
    wait_for(
        &tab,
        "(document.querySelector('#log .msg.assistant.running .text')||{}).textContent?.length > 20",
        long,
    );
    tab.find_element("#stop")?.click()?;
    wait_for(
        &tab,
        "!document.querySelector('#log .msg.assistant.running')",
        long,
    );
    let state = js(
        &tab,
        "[...document.querySelectorAll('#log .msg.assistant')].pop().innerText",
    );
    assert_eq!(
        js(&tab, "!!document.querySelector('#log .stopped')"),
        serde_json::json!(true),
        "the answer was not marked stopped: {state}"
    );
    let t = Instant::now();
    while running(addr) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the generation kept running after stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let words = last_answer(&tab).split_whitespace().count();
    assert!(words < 200, "{words} words: stop did not stop the answer");

    // Still serving.
    let (s, _) = request(addr, "GET", "/api/info", "");
    assert_eq!(s, 200);
    if let Some(out) = std::env::var_os("STEER_CHAT_SCREENSHOT") {
        std::fs::write(
            out,
            tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)?,
        )?;
    }
    server.stop();
    Ok(())
}

/// Not a check: drives a server started by hand to take the README's screenshot.
///
/// ```text
/// cargo run --release --example steer_chat -- --sae runs/steer_sae/saes/topk_9216 &
/// STEER_CHAT_URL=http://127.0.0.1:7878/ STEER_CHAT_SCREENSHOT=docs/steering/steer_chat.png \
///     cargo test -p steer-chat --test page -- --ignored screenshot
/// ```
#[test]
#[ignore = "needs a running server: STEER_CHAT_URL"]
fn screenshot_of_a_running_server() -> TestResult {
    let (Some(url), Some(out), Some(chromium)) = (
        std::env::var("STEER_CHAT_URL").ok(),
        std::env::var_os("STEER_CHAT_SCREENSHOT"),
        chromium(),
    ) else {
        return Err("set STEER_CHAT_URL and STEER_CHAT_SCREENSHOT, and install Chromium".into());
    };
    let word = std::env::var("STEER_CHAT_SEARCH").unwrap_or_else(|_| "sea".into());
    let browser = Browser::new(
        LaunchOptions::default_builder()
            .path(Some(chromium))
            .sandbox(false)
            .window_size(Some((1280, 1000)))
            .idle_browser_timeout(Duration::from_secs(600))
            .args(vec![OsStr::new("--disable-gpu")])
            .build()?,
    )?;
    let tab = browser.new_tab()?;
    tab.set_default_timeout(Duration::from_secs(120));
    tab.navigate_to(&url)?.wait_until_navigated()?;
    let long = Duration::from_secs(300);
    js(&tab, "document.querySelector('#max-tokens').value = 48");
    ask(&tab, "Describe your ideal morning.");
    wait_for(&tab, &generations(1), long);
    tab.find_element("#search")?.click()?;
    tab.type_str(&word)?.press_key("Enter")?;
    tab.wait_for_element("#results .hit button.add")?.click()?;
    let slider = tab.wait_for_element("#features .feature input[type=range]")?;
    slider.focus()?;
    for _ in 0..4 {
        tab.press_key("ArrowRight")?;
    }
    wait_for(
        &tab,
        "!document.querySelector('#log .running') && \
         [...document.querySelectorAll('#log .msg.assistant')].pop().querySelector('.traits') !== null \
         && document.querySelectorAll('#log .msg.assistant').length === 1 \
         && [...document.querySelectorAll('#log .meta')].pop().textContent.includes('clamped')",
        long,
    );
    tab.find_element("#prompt")?.click()?;
    tab.type_str("I feel all at sea with my chemistry homework. Can you help?")?;
    tab.find_element("#features .feature button.avoid")?
        .click()?;
    wait_for(
        &tab,
        "!!document.querySelector('#adjust .proposed, #adjust .none')",
        long,
    );
    std::fs::write(
        out,
        tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)?,
    )?;
    Ok(())
}

/// Model, SAE, statistics and limits that do not go together: the server refuses to start,
/// naming what disagrees.
#[test]
fn setup_errors_are_named() {
    let path = assets::asset_path(assets::SMOLLM2);
    if !path.exists() {
        eprintln!("skipping: {} missing", path.display());
        return;
    }
    let load = || Model::load(&path, &Device::Cpu).unwrap();
    let (_, stats) = random_sae(&load(), 15);
    let d_in = load().config().d_model;
    let sae = || topk_sae(d_in, 1024, HookPoint::resid_post(15));
    let err = |model: Model, sae: SaeModel, stats: FeatureStats, limits: Limits| {
        let e = ChatApp::new(model, sae, stats, limits)
            .err()
            .expect("a bad setup was accepted");
        eprintln!("{e}");
        e.to_string()
    };

    let mut short = stats.clone();
    short.max_activation.pop();
    short.firing_rate.pop();
    short.labels.pop();
    short.top_contexts.pop();
    let msg = err(load(), sae(), short, Limits::default());
    assert!(
        msg.starts_with("cannot serve:") && msg.contains("cover 1023 features, the SAE has 1024"),
        "{msg}"
    );

    let limits = Limits {
        max_concurrent: 0,
        ..Limits::default()
    };
    let msg = err(load(), sae(), stats.clone(), limits);
    assert!(msg.contains("limits must be positive"), "{msg}");

    // An SAE for a layer SmolLM2 (30 layers) does not have.
    let far = topk_sae(d_in, 1024, HookPoint::resid_post(99));
    let msg = err(load(), far, stats, Limits::default());
    assert!(msg.contains("99"), "{msg}");
}
