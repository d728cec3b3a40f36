//! A local web page to steer a chat model by SAE features while talking to it.
//!
//! One page, served on 127.0.0.1: chat with the model (tokens streamed as they are chosen),
//! every answer followed by its traits (`steering::traits`), a slider per listed feature to
//! clamp it (in multiples of its maximum activation) and regenerate the answer, feature search
//! by label, and "adjust my prompt" (`steering::cue::adjust`) for a feature the prompt should not
//! trigger. A generation can be stopped from the page; closing the tab stops it too.
//!
//! The JSON API under `/api` is the page's and anyone's:
//!
//! | route | |
//! |---|---|
//! | `GET /api/info` | model, SAE, hook, device, number of features, limits |
//! | `GET /api/features?q=sea` | features whose label or top contexts mention `q` (or feature `q` itself) |
//! | `POST /api/chat` | `{messages, clamps, max_new_tokens, temperature, seed}` → NDJSON stream of `token` events, then `done` with the response, why it stopped and its traits |
//! | `POST /api/adjust` | `{prompt, feature}` → the adjusted cue, activation before/after, meaning score |
//! | `GET /api/status` | generations running now |
//!
//! A bad request (unknown feature, a clamp past [`Limits::max_clamp`], malformed JSON, a prompt
//! that leaves no room in the context) gets a 4xx with `{"error": "..."}` naming what was wrong;
//! more than [`Limits::max_concurrent`] jobs at once get a 503. Generations run on Tokio's
//! blocking pool, so several tabs are served at once.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = steer_chat::ChatApp::load(
//!     std::path::Path::new("assets/models/SmolLM2-135M-Instruct"),
//!     std::path::Path::new("runs/steer_sae/saes/topk_9216"),
//!     steer_chat::Limits::default(),
//! )?;
//! steer_chat::serve_blocking(app, "127.0.0.1:7878".parse()?)?;
//! # Ok(()) }
//! ```

mod api;
mod error;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sae_core::SaeModel;
use steering::cue::{Synonyms, Thesaurus};
use steering::{FeatureStats, TraitOptions, sae_hook_in};
use transformer_hooks::candle_core::Device;
use transformer_hooks::{HookPoint, Model};

pub use api::{ChatMessageIn, ChatRequest, Clamp};
pub use error::{ChatError, Result};

/// What one request may ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Most tokens one answer may have.
    pub max_new_tokens: usize,
    /// Largest clamp, in multiples of a feature's maximum activation (either sign). Past about
    /// 10x a topic feature's answers degenerate into repetition; 100x is nonsense.
    pub max_clamp: f32,
    /// Jobs (generations, cue adjustments) running at once; more get a 503.
    pub max_concurrent: usize,
    /// Rephrasings the model is asked for per cue adjustment.
    pub rephrasings: usize,
    /// Traits listed under each answer, and the firing rate above which a feature is not one
    /// (`steering::TraitOptions`).
    pub traits: TraitOptions,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_new_tokens: 512,
            max_clamp: 100.0,
            max_concurrent: 4,
            rephrasings: 2,
            traits: TraitOptions {
                top: 8,
                ..TraitOptions::default()
            },
        }
    }
}

/// The model, the SAE and its feature statistics, shared by every request.
pub struct ChatApp {
    model: Model,
    sae: SaeModel,
    hook: HookPoint,
    stats: FeatureStats,
    synonyms: Synonyms,
    /// Near-synonyms of each prompt's words (WordNet's), added to `synonyms` per request.
    thesaurus: Option<Thesaurus>,
    limits: Limits,
    /// Names shown on the page.
    model_name: String,
    sae_name: String,
    jobs: Arc<tokio::sync::Semaphore>,
    running: AtomicUsize,
}

impl ChatApp {
    /// Loads the model (GGUF or HF folder) on the CPU and the SAE with its `feature_stats.json`.
    ///
    /// # Errors
    /// Unreadable model or SAE, missing feature statistics, an SAE whose hook or width the model
    /// does not have.
    pub fn load(model: &Path, sae: &Path, limits: Limits) -> Result<Self> {
        Self::load_on(model, sae, limits, &Device::Cpu)
    }

    /// [`ChatApp::load`] with the model on `device` (a GPU: `Device::new_cuda(0)` in a build with
    /// candle's `cuda` feature). Each request's generation runs on a worker thread of its own;
    /// the model's weights are on the device before any starts (`Model::load` waits for their
    /// copies).
    ///
    /// # Errors
    /// Those of [`ChatApp::load`].
    pub fn load_on(model: &Path, sae: &Path, limits: Limits, device: &Device) -> Result<Self> {
        let m = Model::load(model, device)?;
        let s = SaeModel::load(sae)?;
        let stats = FeatureStats::load(sae)?;
        let mut app = Self::new(m, s, stats, limits)?;
        app.model_name = model.file_name().map_or_else(
            || model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        app.sae_name = sae.display().to_string();
        Ok(app)
    }

    /// Wraps what is already loaded.
    ///
    /// # Errors
    /// Statistics of another dictionary size, an SAE without a hook name, a hook the model lacks
    /// or of another width than the SAE's `d_in`,
    /// limits of zero.
    pub fn new(model: Model, sae: SaeModel, stats: FeatureStats, limits: Limits) -> Result<Self> {
        let hook = sae_hook_in(&sae, &model)?;
        if stats.d_sae() != sae.d_sae() {
            return Err(ChatError::Setup(format!(
                "the feature statistics cover {} features, the SAE has {}",
                stats.d_sae(),
                sae.d_sae()
            )));
        }
        if limits.max_new_tokens == 0
            || limits.max_concurrent == 0
            || limits.traits.top == 0
            || limits.traits.max_firing_rate.is_nan()
            || limits.traits.max_firing_rate <= 0.0
            || !(limits.max_clamp.is_finite() && limits.max_clamp > 0.0)
        {
            return Err(ChatError::Setup(format!(
                "limits must be positive: {limits:?}"
            )));
        }
        model.tokenizer()?.chat_template().ok_or_else(|| {
            ChatError::Setup(format!(
                "{}: the tokenizer has no chat template, so there is no chat to steer",
                model.path().display()
            ))
        })?;
        Ok(Self {
            model_name: model.path().display().to_string(),
            sae_name: String::from("(in memory)"),
            jobs: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
            model,
            sae,
            hook,
            stats,
            synonyms: Vec::new(),
            thesaurus: None,
            limits,
            running: AtomicUsize::new(0),
        })
    }

    /// Near-synonyms for cue adjustment (`steering::cue::parse_synonyms`).
    pub fn with_synonyms(mut self, synonyms: Synonyms) -> Self {
        self.synonyms = synonyms;
        self
    }

    /// A thesaurus (e.g. `sae_workbench::wordnet::thesaurus`) whose synonyms of each prompt's
    /// words and phrases cue adjustment tries too (each word's first sense per part of speech,
    /// eight at most, as `adjust_cue` does by default).
    pub fn with_thesaurus(mut self, thesaurus: Thesaurus) -> Self {
        self.thesaurus = Some(thesaurus);
        self
    }

    /// Generations and cue adjustments running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// The page and the API.
pub fn router(app: Arc<ChatApp>) -> axum::Router {
    api::router(app)
}

/// Serves on `listener` until `shutdown` resolves.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: ChatApp,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(Arc::new(app)))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ChatError::Io {
            what: "serving".into(),
            source: e,
        })
}

/// Binds `addr` and serves until Ctrl-C, on a runtime of its own (for callers without Tokio).
///
/// # Errors
/// The address cannot be bound (in use, not local), I/O errors.
pub fn serve_blocking(app: ChatApp, addr: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ChatError::Io {
            what: "starting the runtime".into(),
            source: e,
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ChatError::Io {
                what: format!("binding {addr}"),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| ChatError::Io {
            what: "reading the bound address".into(),
            source: e,
        })?;
        eprintln!("steer_chat: open http://{addr}/ (Ctrl-C stops)");
        serve(listener, app, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
