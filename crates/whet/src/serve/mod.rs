//! `whet serve`: an OpenAI-compatible HTTP server (axum on tokio) over one base model and any
//! number of LoRA adapters on it, each served under its own `model` name.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: streaming (server-sent events, ending
//!   with `data: [DONE]`) or not; `temperature`, `top_p`, `max_tokens`, `seed`, `stop`, `n = 1`.
//! - `GET /v1/models`, `GET /v1/models/{id}`.
//!
//! The async handlers only parse, tokenize, and await text: every generation runs on the one
//! worker thread of `worker.rs`, in arrival order, behind a queue of bounded length (`--queue`);
//! a request that finds it full is answered 429 at once, and 503 once the worker has stopped.
//! Adapters share the base's weights ([`whet_model::Model::with_adapter`]). Errors are OpenAI's
//! body, `{"error": {"message", "type", "param", "code"}}` (`api.rs`).

mod api;
mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use whet_model::{GenerationConfig, Model};
use whet_tokenize::Tokenizer;

use crate::prompt::{chat_ids, stop_tokens};
use api::{ApiError, ChatRequest, CompletionRequest, Kind, Prompt, Reply, Sampling};
pub use worker::Hold;
use worker::{Event, Job, Queue, Refused};

/// How the server listens and queues.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// Requests that may wait behind the running one; more are answered 429.
    pub queue: usize,
    /// `max_tokens` when a request gives none (always capped by the model's context).
    pub default_max_tokens: usize,
}

/// A running server; dropping it stops it (after the running generation).
pub struct Server {
    addr: SocketAddr,
    queue: Option<Queue>,
    shutdown: Option<oneshot::Sender<()>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    worker: Option<JoinHandle<()>>,
}

struct AppState {
    /// Served names; index i runs `models[i]` on the worker (0: the base).
    names: Vec<String>,
    tok: Arc<Tokenizer>,
    queue: Queue,
    /// The model's context length (`max_position_embeddings`).
    context: usize,
    stop_ids: Vec<u32>,
    default_max_tokens: usize,
    created: u64,
    next_id: AtomicU64,
}

impl Server {
    /// Binds `host:port` and starts serving `models`: (name, model), the base first, then its
    /// adapters. Returns once the socket is bound.
    pub fn start(
        models: Vec<(String, Model)>,
        tok: Tokenizer,
        opts: &ServeOptions,
    ) -> Result<Self> {
        let base = &models.first().context("no model to serve")?.1;
        let context = base.config().max_position_embeddings;
        let stop_ids = stop_tokens(base, &tok);
        let listener = std::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .with_context(|| format!("binding {}:{}", opts.host, opts.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tok = Arc::new(tok);
        let (names, models): (Vec<String>, Vec<Model>) = models.into_iter().unzip();
        let (queue, worker) = worker::spawn(models, tok.clone(), opts.queue)?;
        let state = Arc::new(AppState {
            names,
            tok,
            queue: queue.clone(),
            context,
            stop_ids,
            default_max_tokens: opts.default_max_tokens,
            created: unix_now(),
            next_id: AtomicU64::new(1),
        });
        let app = router(state);
        let (shutdown, stopped) = oneshot::channel::<()>();
        let http = std::thread::Builder::new()
            .name("whet-serve-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await
                })
            })?;
        Ok(Server {
            addr,
            queue: Some(queue),
            shutdown: Some(shutdown),
            http: Some(http),
            worker: Some(worker),
        })
    }

    /// The bound address (with the port picked when `port` was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Occupies the worker and one queue slot until the guard drops: requests beyond the
    /// queue's bound are refused meanwhile. `None` when the queue is full.
    pub fn hold_worker(&self) -> Option<Hold> {
        self.queue.as_ref()?.hold().ok()
    }

    /// Serves until the HTTP server fails (or the process is stopped).
    pub fn wait(mut self) -> Result<()> {
        let http = self.http.take().context("the server was stopped")?;
        http.join()
            .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
            .context("serving HTTP")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        // The HTTP side held the other queue senders; with ours gone the worker ends.
        self.queue = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(one_model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid(format!("unknown request URL: {method} {uri}"), None)
        .status(StatusCode::NOT_FOUND)
        .with_code("unknown_url")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid(format!("method {method} not allowed on {uri}"), None)
        .status(StatusCode::METHOD_NOT_ALLOWED)
}

fn model_json(state: &AppState, name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": state.created, "owned_by": "whet" })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state.names.iter().map(|n| model_json(&state, n)).collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn one_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.model_index(&id) {
        Ok(_) => axum::Json(model_json(&state, &id)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let run = async {
        let req: ChatRequest = parse(body)?;
        let model = state.model_index(&req.sampling.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages: expected at least one message",
                Some("messages"),
            ));
        }
        let messages = req
            .messages
            .iter()
            .map(|m| m.to_message())
            .collect::<Result<Vec<_>, _>>()?;
        let prompt = chat_ids(&state.tok, &messages).map_err(|e| {
            ApiError::invalid(
                format!("{e:#}; use /v1/completions for plain text"),
                Some("messages"),
            )
        })?;
        state
            .generate(Kind::Chat, model, prompt, req.sampling)
            .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let run = async {
        let req: CompletionRequest = parse(body)?;
        let model = state.model_index(&req.sampling.model)?;
        let text = match req.prompt {
            Prompt::One(s) => s,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(_) => {
                return Err(ApiError::invalid(
                    "prompt: one string per request (a list of prompts is not supported)",
                    Some("prompt"),
                ));
            }
        };
        let mut prompt = Vec::new();
        if state.tok.adds_bos() {
            prompt.extend(state.tok.bos_id());
        }
        prompt.extend(
            state
                .tok
                .encode_ids(&text)
                .map_err(|e| ApiError::invalid(format!("prompt: {e}"), Some("prompt")))?,
        );
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "prompt: empty (and the tokenizer adds no BOS)",
                Some("prompt"),
            ));
        }
        state
            .generate(Kind::Text, model, prompt, req.sampling)
            .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// A request body, or why it could not be read (too large: 413).
type Body = Result<Bytes, BytesRejection>;

/// The JSON body; any content type is read as JSON, as OpenAI does.
fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::invalid(e.body_text(), None).status(e.status()))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            format!("could not parse the JSON body of your request: {e}"),
            None,
        )
    })
}

impl AppState {
    fn model_index(&self, name: &str) -> Result<usize, ApiError> {
        self.names.iter().position(|n| n == name).ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "the model `{name}` does not exist; this server has {}",
                    self.names.join(", ")
                ),
                Some("model"),
            )
            .status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")
        })
    }

    /// Checks the sampling fields, queues the job and answers (streamed or whole).
    async fn generate(
        &self,
        kind: Kind,
        model: usize,
        prompt: Vec<u32>,
        s: Sampling,
    ) -> Result<Response, ApiError> {
        if s.n.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("n: only n = 1 is supported", Some("n")));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature {temperature}: expected a number in [0, 2]"),
                Some("temperature"),
            ));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p {top_p}: expected a number in (0, 1]"),
                Some("top_p"),
            ));
        }
        let room = self.context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError::invalid(
                format!(
                    "the prompt is {} tokens; this model's context is {} tokens",
                    prompt.len(),
                    self.context
                ),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
        let max_tokens = s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(self.default_max_tokens);
        if max_tokens == 0 {
            return Err(ApiError::invalid(
                "max_tokens: expected at least 1",
                Some("max_tokens"),
            ));
        }
        let stops = s.stop.map(api::Stop::into_vec).unwrap_or_default();
        if stops.len() > 4 {
            return Err(ApiError::invalid("stop: at most 4 sequences", Some("stop")));
        }
        let cfg = GenerationConfig {
            max_new_tokens: max_tokens.min(room),
            temperature,
            top_k: 0,
            top_p,
            repetition_penalty: 1.0,
            seed: s.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }),
            eos_token_ids: Some(self.stop_ids.clone()),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        self.queue
            .submit(Job {
                model,
                prompt,
                cfg,
                stops,
                events: tx,
            })
            .map_err(refused)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reply = Reply {
            kind,
            id: match kind {
                Kind::Chat => format!("chatcmpl-whet-{n}"),
                Kind::Text => format!("cmpl-whet-{n}"),
            },
            created: unix_now(),
            model: self.names[model].clone(),
        };
        if s.stream {
            let usage = s
                .stream_options
                .is_some_and(|o| o.include_usage)
                .then_some(prompt_tokens);
            return Ok(sse(reply, rx, usage).into_response());
        }
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Done {
                    finish,
                    completion_tokens,
                } => {
                    let body = reply.full(&text, finish, prompt_tokens, completion_tokens);
                    return Ok(axum::Json(body).into_response());
                }
                Event::Failed(e) => return Err(ApiError::server(e)),
            }
        }
        Err(ApiError::server("the worker stopped").status(StatusCode::SERVICE_UNAVAILABLE))
    }
}

fn refused(r: Refused) -> ApiError {
    match r {
        Refused::Full { limit } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server is busy: {limit} request(s) are already running or queued (--queue); retry later"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        },
        Refused::Closed => {
            ApiError::server("the server is shutting down").status(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// Where the stream is: the chat's opening chunk, text chunks, the usage chunk, `[DONE]`, the
/// end.
enum Phase {
    Opening,
    Body,
    Usage(Value),
    Done,
    End,
}

/// The answer as server-sent events; `usage`: the prompt's tokens, when the client asked for
/// the usage chunk.
fn sse(
    reply: Reply,
    rx: mpsc::UnboundedReceiver<Event>,
    usage: Option<usize>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let phase = match reply.kind {
        Kind::Chat => Phase::Opening,
        Kind::Text => Phase::Body,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let stream = futures_util::stream::unfold(
        (reply, rx, phase),
        move |(reply, mut rx, phase)| async move {
            let event = match phase {
                Phase::Opening => {
                    let e = data(reply.chunk(None, true, None));
                    return Some((Ok(e), (reply, rx, Phase::Body)));
                }
                Phase::Body => rx.recv().await,
                Phase::Usage(chunk) => {
                    return Some((Ok(data(chunk)), (reply, rx, Phase::Done)));
                }
                Phase::Done => {
                    let e = SseEvent::default().data("[DONE]");
                    return Some((Ok(e), (reply, rx, Phase::End)));
                }
                Phase::End => return None,
            };
            let (e, next) = match event {
                Some(Event::Text(t)) => (data(reply.chunk(Some(&t), false, None)), Phase::Body),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                }) => {
                    let next = match usage {
                        Some(p) => Phase::Usage(reply.usage_chunk(p, completion_tokens)),
                        None => Phase::Done,
                    };
                    (data(reply.chunk(None, false, Some(finish))), next)
                }
                Some(Event::Failed(m)) => (data(ApiError::server(m).body()), Phase::Done),
                None => (
                    data(ApiError::server("the worker stopped").body()),
                    Phase::Done,
                ),
            };
            Some((Ok(e), (reply, rx, next)))
        },
    );
    Sse::new(stream)
}
