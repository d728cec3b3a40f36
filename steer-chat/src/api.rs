//! The page and the JSON API: requests checked before any work starts, work on the blocking
//! pool, answers streamed as NDJSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use steering::cue::AdjustOptions;
use steering::{FeatureEdit, Steering, SteeringError};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use transformer_hooks::{ChatMessage, GenerateOptions, Hooks, Sampling, StopReason};

use crate::ChatApp;

const PAGE: &str = include_str!("page.html");

/// Most messages in one conversation, and most clamps in one request.
const MAX_MESSAGES: usize = 256;
const MAX_CLAMPS: usize = 32;

pub(crate) fn router(app: Arc<ChatApp>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/info", get(info))
        .route("/api/status", get(status))
        .route("/api/features", get(features))
        .route("/api/chat", post(chat))
        .route("/api/adjust", post(adjust))
        .with_state(app)
}

/// A request that cannot be served, as `{"error": message}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self {
            status: r.status(),
            message: r.body_text(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self {
            status: r.status(),
            message: r.body_text(),
        }
    }
}

/// The caller's mistakes are 400s; the rest is the server's.
impl From<SteeringError> for ApiError {
    fn from(e: SteeringError) -> Self {
        match e {
            SteeringError::NoSuchFeature { .. } | SteeringError::Invalid { .. } => {
                Self::bad(e.to_string())
            }
            _ => Self::internal(e.to_string()),
        }
    }
}

impl From<transformer_hooks::Error> for ApiError {
    fn from(e: transformer_hooks::Error) -> Self {
        Self::internal(e.to_string())
    }
}

/// One turn of the conversation sent by the page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// Feature `feature` held at `value` times its maximum activation while the answer is generated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clamp {
    pub feature: usize,
    pub value: f32,
}

/// `POST /api/chat`: continue the conversation, whose last turn is the user's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub clamps: Vec<Clamp>,
    /// Default 128.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// 0 (the default): greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
}

/// A request, checked and turned into what generation needs.
struct ChatJob {
    prompt: Vec<u32>,
    edits: Vec<FeatureEdit>,
    clamps: Vec<Value>,
    opts: GenerateOptions,
}

impl ChatJob {
    fn prepare(app: &ChatApp, req: &ChatRequest) -> Result<Self, ApiError> {
        if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
            return Err(ApiError::bad(format!(
                "messages: {} given; send 1 to {MAX_MESSAGES}, the last one the user's",
                req.messages.len()
            )));
        }
        let mut turns = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            turns.push(match m.role.as_str() {
                "system" => ChatMessage::system(&m.content),
                "user" => ChatMessage::user(&m.content),
                "assistant" => ChatMessage::assistant(&m.content),
                other => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}].role `{other}`: expected system, user or assistant"
                    )));
                }
            });
        }
        let last = &req.messages[req.messages.len() - 1];
        if last.role != "user" || last.content.trim().is_empty() {
            return Err(ApiError::bad(
                "the last message must be the user's, and not empty",
            ));
        }
        if req.clamps.len() > MAX_CLAMPS {
            return Err(ApiError::bad(format!(
                "clamps: {} given, at most {MAX_CLAMPS}",
                req.clamps.len()
            )));
        }
        let max_clamp = app.limits.max_clamp;
        let mut edits = Vec::with_capacity(req.clamps.len());
        let mut clamps = Vec::with_capacity(req.clamps.len());
        for c in &req.clamps {
            if !(c.value.is_finite() && c.value.abs() <= max_clamp) {
                return Err(ApiError::bad(format!(
                    "clamp of feature {} to {}x its maximum: the value must be within \
                     ±{max_clamp}",
                    c.feature, c.value
                )));
            }
            if req.clamps.iter().filter(|d| d.feature == c.feature).count() > 1 {
                return Err(ApiError::bad(format!(
                    "feature {} is clamped twice",
                    c.feature
                )));
            }
            let max = app.stats.max_of(c.feature)?;
            edits.push(FeatureEdit::clamp(c.feature, c.value * max));
            clamps.push(json!({
                "feature": c.feature,
                "value": c.value,
                "label": app.stats.labels[c.feature],
            }));
        }
        let max_new = req.max_new_tokens.unwrap_or(128);
        if max_new == 0 || max_new > app.limits.max_new_tokens {
            return Err(ApiError::bad(format!(
                "max_new_tokens {max_new}: must be 1 to {}",
                app.limits.max_new_tokens
            )));
        }
        if !(req.temperature >= 0.0 && req.temperature <= 5.0) {
            return Err(ApiError::bad(format!(
                "temperature {}: must be 0 (greedy) to 5",
                req.temperature
            )));
        }
        let sampling = Sampling::at_temperature(req.temperature, 0.95, req.seed);
        let tok = app.model.tokenizer()?;
        let prompt = tok
            .encode_chat(&turns, true)
            .map_err(|e| ApiError::bad(format!("the conversation cannot be encoded: {e}")))?;
        let n_ctx = app.model.config().n_ctx;
        if prompt.len() + max_new > n_ctx {
            return Err(ApiError::bad(format!(
                "the conversation is {} tokens; with max_new_tokens {max_new} it needs {}, past \
                 the model's context of {n_ctx} tokens: shorten it or start a new chat",
                prompt.len(),
                prompt.len() + max_new
            )));
        }
        let opts = GenerateOptions {
            sampling,
            ..GenerateOptions::greedy(max_new)
        }
        .stop_at(tok.stop_tokens());
        Ok(Self {
            prompt,
            edits,
            clamps,
            opts,
        })
    }
}

/// Counts a job as running while it lives.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn start(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn busy(app: &ChatApp) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "busy: {} jobs are running (at most {}); try again when one ends",
            app.running(),
            app.limits.max_concurrent
        ),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn info(State(app): State<Arc<ChatApp>>) -> Json<Value> {
    Json(json!({
        "model": app.model_name,
        "sae": app.sae_name,
        "hook": app.hook.to_string(),
        "device": if app.model.device().is_cuda() { "cuda" } else { "cpu" },
        "d_sae": app.sae.d_sae(),
        "n_ctx": app.model.config().n_ctx,
        "max_new_tokens": app.limits.max_new_tokens,
        "max_clamp": app.limits.max_clamp,
        "running": app.running(),
    }))
}

async fn status(State(app): State<Arc<ChatApp>>) -> Json<Value> {
    Json(json!({ "running": app.running() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureQuery {
    q: String,
    limit: Option<usize>,
}

/// Features whose label or top contexts mention `q`, or feature number `q` itself.
async fn features(
    State(app): State<Arc<ChatApp>>,
    query: Result<Query<FeatureQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let word = q.q.trim();
    if word.is_empty() {
        return Err(ApiError::bad(
            "q: give a word to search the labels for, or a feature number",
        ));
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 200);
    let stats = &app.stats;
    let describe = |f: usize| {
        json!({
            "feature": f,
            "label": stats.labels[f],
            "max_activation": stats.max_activation[f],
            "firing_rate": stats.firing_rate[f],
            "contexts": stats.top_contexts[f].iter().take(2).map(|c| &c.text).collect::<Vec<_>>(),
        })
    };
    let hits: Vec<Value> = match word.parse::<usize>() {
        Ok(f) if f < stats.d_sae() => vec![describe(f)],
        Ok(f) => {
            return Err(SteeringError::NoSuchFeature {
                feature: f,
                d_sae: stats.d_sae(),
            }
            .into());
        }
        Err(_) => stats
            .search(word, 0.1)
            .iter()
            .take(limit)
            .map(|h| describe(h.feature))
            .collect(),
    };
    Ok(Json(json!({ "query": word, "features": hits })))
}

/// Streams the answer as NDJSON: `{"event":"token","text":...}` per piece of text, then
/// `{"event":"done",...}` (or `{"event":"error","message":...}`).
async fn chat(
    State(app): State<Arc<ChatApp>>,
    payload: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = payload?;
    let job = ChatJob::prepare(&app, &req)?;
    let permit = app
        .jobs
        .clone()
        .try_acquire_owned()
        .map_err(|_| busy(&app))?;
    let (tx, rx) = mpsc::channel::<String>(256);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = Running::start(&app.running);
        if let Err(e) = answer(&app, job, &tx) {
            let _ = tx.blocking_send(line(&json!({"event": "error", "message": e.message})));
        }
    });
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

fn line(v: &Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// Generates, sending text as it comes; stops as soon as nobody is listening.
fn answer(app: &ChatApp, job: ChatJob, tx: &mpsc::Sender<String>) -> Result<(), ApiError> {
    let steering = if job.edits.is_empty() {
        None
    } else {
        Some(Steering::new(&app.sae, app.hook, job.edits)?)
    };
    let mut hooks = steering.as_ref().map_or_else(Hooks::new, |s| s.hooks());
    let tok = app.model.tokenizer()?;
    let stops = &job.opts.stop_tokens;
    let mut kept: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let start = Instant::now();
    let generation =
        app.model
            .generate_streaming(&job.prompt, &job.opts, &mut hooks, &mut |t| {
                if stops.contains(&t) {
                    return !tx.is_closed();
                }
                kept.push(t);
                let Ok(text) = tok.decode(&kept) else {
                    return !tx.is_closed();
                };
                // Half a multi-byte character: wait for the rest.
                if text.ends_with('\u{FFFD}') {
                    return !tx.is_closed();
                }
                let event = match text.strip_prefix(shown.as_str()) {
                    Some("") => return !tx.is_closed(),
                    Some(new) => json!({"event": "token", "text": new}),
                    None => json!({"event": "text", "text": text}),
                };
                shown = text;
                tx.blocking_send(line(&event)).is_ok()
            })?;
    let seconds = start.elapsed().as_secs_f64();
    if generation.stop == StopReason::Cancelled {
        tracing::info!("generation stopped after {} tokens", kept.len());
        return Ok(());
    }
    let response = tok.decode(&kept)?;
    let traits = if kept.is_empty() {
        Vec::new()
    } else {
        let full: Vec<u32> = job.prompt.iter().chain(&kept).copied().collect();
        steering::traits(
            &app.model,
            &app.sae,
            app.hook,
            &app.stats,
            &full,
            job.prompt.len()..full.len(),
            app.limits.traits,
        )?
    };
    let stop = match generation.stop {
        StopReason::StopToken(_) => "end_of_turn",
        StopReason::MaxTokens => "max_new_tokens",
        StopReason::ContextFull => "context_full",
        _ => "other",
    };
    let _ = tx.blocking_send(line(&json!({
        "event": "done",
        "response": response,
        "stop": stop,
        "new_tokens": generation.tokens.len(),
        "seconds": seconds,
        "tokens_per_s": generation.tokens.len() as f64 / seconds.max(1e-9),
        "clamps": job.clamps,
        "traits": traits,
    })));
    Ok(())
}

/// `POST /api/adjust`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustRequest {
    prompt: String,
    feature: usize,
}

async fn adjust(
    State(app): State<Arc<ChatApp>>,
    payload: Result<Json<AdjustRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = payload?;
    if req.feature >= app.sae.d_sae() {
        return Err(SteeringError::NoSuchFeature {
            feature: req.feature,
            d_sae: app.sae.d_sae(),
        }
        .into());
    }
    if req.prompt.trim().is_empty() {
        return Err(ApiError::bad("prompt: empty; there is nothing to adjust"));
    }
    let tok = app.model.tokenizer()?;
    let n = tok
        .encode_chat(&[ChatMessage::user(&req.prompt)], true)
        .map_err(|e| ApiError::bad(format!("the prompt cannot be encoded: {e}")))?
        .len();
    // The rephrasing request wraps the prompt, and the answer follows it.
    let room = app.model.config().n_ctx / 2;
    if n > room {
        return Err(ApiError::bad(format!(
            "the prompt is {n} tokens; cue adjustment takes prompts of at most {room} (half the \
             model's context)"
        )));
    }
    let permit = app
        .jobs
        .clone()
        .try_acquire_owned()
        .map_err(|_| busy(&app))?;
    let worker = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = Running::start(&worker.running);
        let mut synonyms = worker.synonyms.clone();
        if let Some(t) = &worker.thesaurus {
            synonyms.extend(t.synonyms_for(&req.prompt, 1, 8));
        }
        let opts = AdjustOptions {
            synonyms,
            rephrasings: worker.limits.rephrasings,
            ..AdjustOptions::default()
        };
        steering::cue::adjust(
            &worker.model,
            &worker.sae,
            worker.hook,
            &req.prompt,
            req.feature,
            &opts,
        )
        .map(|a| (a, opts))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the adjustment failed: {e}")))?;
    let (adjustment, opts) = result?;
    let mut v = serde_json::to_value(&adjustment).map_err(|e| ApiError::internal(e.to_string()))?;
    v["label"] = json!(app.stats.labels[adjustment.feature]);
    v["threshold"] = json!(opts.threshold);
    v["min_meaning"] = json!(opts.min_meaning);
    v["max_fluency_cost"] = json!(opts.max_fluency_cost);
    Ok(Json(v))
}
