//! Client LLM requests: authenticate, price, hold, forward, measure, settle — for both the
//! OpenAI and the Anthropic protocol, streaming or not.
//!
//! The forward-and-settle part runs in a tracked task, not in the handler: if the client goes
//! away, hyper drops the handler, but the upstream call still completes and is settled (the
//! client pays for what was generated) or voided, so no hold is left behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tollgate_core::tokens;
use tollgate_core::{Usage, UsageSource};
use tollgate_store::clock::Clock;
use tollgate_store::hot::AuthorizeRequest;
use tollgate_protocol::{EventAction, ParsedRequest, Protocol, SseSplitter, StreamInspector, UrlFacts};
use tollgate_store::model::{ATTEMPTS_PER_REQUEST_MAX, PriceRow, RequestStatus, StoredResponse, UpstreamAttempt, UsageEvent};

use crate::auth::{Caller, authenticate};
use crate::charge::{self, Authorized};
use crate::context::BillingContext;
use crate::error::{ApiError, ErrorShape};
use crate::request_id::{REQUEST_ID_HEADER, RequestId, request_fingerprint};
use crate::routes::read_limited_body;
use crate::state::AppState;
use crate::config::SessionLockMode;
use crate::routing::session_lock::{self, SessionLockGuard};
use crate::routing::{Channel, Health, Lease, Route, Verdict, classify};
use crate::upstream_errors;

/// Largest single server-sent event accepted from an upstream.
const SSE_EVENT_BYTES_MAX: usize = 1024 * 1024;
/// Events buffered between the upstream reader and a slow client.
const STREAM_CHANNEL_EVENTS: usize = 64;

/// One request's billing facts, fixed before forwarding.
struct Billing {
    context: Arc<BillingContext>,
    request_id: String,
    route: Arc<Route>,
    price: PriceRow,
    parsed: ParsedRequest,
    /// The output cap, all choices together: the upstream was sent it (I7), and a stream whose
    /// visible output runs past it is cut.
    output_tokens_max: u64,
    /// Thinking the hold covers beyond the output cap, all choices together (Gemini; 0 where
    /// the cap bounds thinking too). No charge counts more output than the two together.
    thinking_tokens_max: u64,
    /// The amount held for this request, which its charge should not exceed (I7).
    hold: tollgate_core::Money,
    /// What the request id is bound to with the key ([`request_fingerprint`]).
    request_fingerprint: String,
    started: Instant,
    /// The gateway's calendar ([`crate::state::Shared::clock`]): the usage event's time, and so
    /// the day and month the ledger counts the charge in.
    clock: Clock,
    /// The upstream attempts so far, recorded with the request's usage row.
    attempts: Vec<UpstreamAttempt>,
    /// The channel whose answer the client is getting: its request slot, and its breaker to
    /// tell how a stream ended.
    serving: Option<Lease>,
    /// The request's session, when routing affinity applies to it.
    affinity: Option<Affinity>,
    /// The session's lock, held until this request is settled (dropped with it).
    session_lock: Option<SessionLockGuard>,
}

/// A request's routing affinity: its session (model and digest of the session key, as the hot
/// store keys pins) and the channel it was pinned to when it arrived.
struct Affinity {
    session: String,
    pinned: Option<String>,
    ttl_ms: u64,
}

impl Billing {
    fn event(&self, usage: Usage, usage_source: UsageSource, cost: tollgate_core::Money, status: RequestStatus) -> UsageEvent {
        UsageEvent {
            request_id: self.request_id.clone(),
            account_id: self.context.account.id.clone(),
            api_key_id: self.context.key.id.clone(),
            provider: self.route.provider.name.clone(),
            model: self.route.model.clone(),
            customer_type: self.context.account.customer_type.clone(),
            price_id: Some(self.price.id),
            usage,
            usage_source,
            cost,
            status,
            latency_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            created_at_ms: (self.clock)(),
            hot_balance_after: tollgate_core::Money::ZERO,
            stored_response: None,
            request_fingerprint: Some(self.request_fingerprint.clone()),
            attempts: self.attempts.clone(),
            pin: None,
        }
    }

    /// The usage the serving channel reported, kept with its attempt.
    fn note_served_usage(&mut self, reported: Option<Usage>) {
        if let Some(attempt) = self.attempts.last_mut().filter(|attempt| attempt.served) {
            attempt.upstream_usage = reported;
        }
    }

    /// The pin a success writes with its charge: the session now goes to the channel that
    /// served it (moved if another channel served, refreshed if the same).
    fn pin_for_success(&self) -> Option<tollgate_store::hot::SessionPin> {
        let affinity = self.affinity.as_ref()?;
        let channel = self.serving.as_ref()?.channel.spec.name.clone();
        Some(tollgate_store::hot::SessionPin { session: affinity.session.clone(), channel, ttl_ms: affinity.ttl_ms })
    }

    /// Counts the prompt tokens of a session's request by whether its pinned channel served it
    /// and whether the provider's cache did (the point of pinning).
    fn count_cached_share(&self, usage: &Usage) {
        let Some(affinity) = &self.affinity else { return };
        let served_pinned = affinity.pinned.is_some() && affinity.pinned.as_deref() == self.serving.as_ref().map(|lease| lease.channel.spec.name.as_str());
        let pinned = if served_pinned { "true" } else { "false" };
        metrics::counter!("tollgate_affinity_prompt_tokens_total", "pinned" => pinned, "cache" => "read").increment(usage.cached_input_tokens);
        metrics::counter!("tollgate_affinity_prompt_tokens_total", "pinned" => pinned, "cache" => "none").increment(usage.input_tokens.saturating_add(usage.cache_write_tokens));
    }

    /// Counts what the serving channel processed against its tokens-per-minute limit.
    fn count_channel_tokens(&self, usage: &Usage, now_ms: i64) {
        if let Some(lease) = &self.serving {
            let tokens = [usage.cached_input_tokens, usage.cache_write_tokens, usage.output_tokens].into_iter().fold(usage.input_tokens, u64::saturating_add);
            lease.channel.count_tokens(now_ms, tokens);
        }
    }

    /// Tells the serving channel's breaker how its answer went.
    async fn report_serving(&mut self, health: Health, now_ms: i64) {
        if let Some(lease) = self.serving.as_mut() {
            lease.report(health, now_ms).await;
        }
    }

    fn failed_event(&self) -> UsageEvent {
        let mut event = self.event(Usage::default(), UsageSource::Estimate, tollgate_core::Money::ZERO, RequestStatus::Failed);
        event.price_id = None;
        event
    }

    /// Usage measured by the tokenizer: the prompt estimated from above (media at their
    /// ceilings, I7) plus the generated text.
    fn counted_usage(&self, output_text: &str) -> Usage {
        Usage {
            input_tokens: self.parsed.prompt_tokens,
            output_tokens: tokens::count_text(self.parsed.encoding, output_text),
            ..Usage::default()
        }
    }

    /// The usage to charge, best source first: the upstream's report checked against the
    /// tokenizer's count (and corrected, flagged, when it is absurd), else that count. Either
    /// way the output charged stays within the cap the hold was sized for and the upstream was
    /// sent (I7): more is an upstream that ignored the cap, counted as an anomaly.
    fn usage_to_charge(&self, reported: Option<Usage>, output_text: &str) -> (Usage, UsageSource) {
        let mut counted = self.counted_usage(output_text);
        let Some(reported) = reported else {
            if counted.output_tokens > self.output_tokens_max {
                self.record_anomaly(tollgate_core::UsageAnomaly::OverCap, &counted);
                counted.output_tokens = self.output_tokens_max;
            }
            return (counted, UsageSource::Tokenizer);
        };
        let output_cap = self.output_tokens_max.saturating_add(self.thinking_tokens_max);
        // A report is checked against the text the tokenizer read, not the media ceilings: a
        // provider counting an image below its ceiling is not under-reporting.
        let measured = Usage { input_tokens: self.parsed.prompt_text_tokens, ..counted };
        let checked = tollgate_core::check_reported(reported, measured, Some(output_cap));
        for anomaly in &checked.anomalies {
            self.record_anomaly(*anomaly, &reported);
        }
        (checked.usage, checked.source())
    }

    /// The usage of a stream: its full report when it came; else, for a stream cut before it,
    /// the input counts the upstream already sent (Anthropic's `message_start`, Gemini's latest
    /// `usageMetadata`) with the tokenizer's count of the output relayed (within the cap, as
    /// any output); else the tokenizer's count of both.
    fn stream_usage_to_charge(&self, inspector: &StreamInspector) -> (Usage, UsageSource) {
        let output_text = inspector.output_text();
        match (inspector.usage(), inspector.input_usage()) {
            (None, Some(input)) => {
                let output_tokens = tokens::count_text(self.parsed.encoding, output_text);
                let (usage, _) = self.usage_to_charge(Some(Usage { output_tokens, ..input }), output_text);
                (usage, UsageSource::Tokenizer)
            }
            (reported, _) => self.usage_to_charge(reported, output_text),
        }
    }

    /// Counts and logs a charge above its hold (I7: input estimated from above, any excess
    /// counted): a provider counting media above the gateway's ceilings, an unsized part above
    /// `limits.unsized_media_part_tokens`, or a provider's tokenizer counting text above
    /// tiktoken's. The charge itself stands; the overrun is bounded by one request (DESIGN,
    /// settle).
    fn record_hold_excess(&self, cost: tollgate_core::Money) {
        let Some(excess) = cost.checked_sub(self.hold).filter(|excess| excess.is_positive()) else {
            return;
        };
        metrics::counter!("tollgate_hold_exceeded_total").increment(1);
        metrics::counter!("tollgate_hold_exceeded_nanos_total").increment(excess.nanos().unsigned_abs());
        tracing::warn!(request_id = self.request_id, provider = self.route.provider.name, model = self.route.model, hold = %self.hold, %cost, %excess, "charge exceeds its hold");
    }

    fn record_anomaly(&self, anomaly: tollgate_core::UsageAnomaly, measured: &Usage) {
        metrics::counter!("tollgate_usage_anomalies_total", "kind" => anomaly.as_str()).increment(1);
        tracing::warn!(request_id = self.request_id, provider = self.route.provider.name, anomaly = anomaly.as_str(), ?measured, output_tokens_max = self.output_tokens_max, "implausible usage corrected");
    }
}

/// Handles one LLM request of the given protocol.
pub async fn handle(state: AppState, protocol: Protocol, request_id: RequestId, caller: Caller, body: Body) -> Response {
    handle_at(state, protocol, UrlFacts::default(), request_id, caller, body).await
}

/// [`handle`], for a protocol whose URL carries request facts (Gemini: the model, streaming).
pub async fn handle_at(state: AppState, protocol: Protocol, url: UrlFacts, request_id: RequestId, caller: Caller, body: Body) -> Response {
    let started = Instant::now();
    let response = match handle_request(&state, protocol, &url, request_id, &caller, body).await {
        Ok(response) => response,
        Err(error) => {
            metrics::counter!("tollgate_requests_total", "outcome" => error.status_and_code().1).increment(1);
            error.into_response_shaped(ErrorShape::for_protocol(protocol))
        }
    };
    // Up to the response's head: a stream's body is not in it (its first chunk is).
    let stream = response.headers().get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    metrics::histogram!("tollgate_request_duration_seconds", "stream" => if stream { "true" } else { "false" }).record(started.elapsed().as_secs_f64());
    response
}

async fn handle_request(
    state: &AppState,
    protocol: Protocol,
    url: &UrlFacts,
    RequestId { id: request_id, presented }: RequestId,
    caller: &Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let context = authenticate(state, caller).await?;
    let headers = &caller.headers;
    let bytes = read_limited_body(&state.config.limits, headers, body).await?;
    // Everything cheap is checked before the tokenizer runs (and the body's JSON is parsed off
    // the async workers when it is large): a stranger's key naming a model it may not use
    // costs no counting. So a large body takes two trips to the pool, parse then count, with
    // the route, key and price checks between them.
    let body_bytes = bytes.len();
    let json = bytes.clone();
    let body: Map<String, Value> = state
        .tokenizer
        .run(body_bytes, move || serde_json::from_slice(&json))
        .await?
        .map_err(|error| ApiError::InvalidRequest(format!("request body is not a valid JSON object: {error}")))?;
    let model = protocol.requested_model(&body, url)?;
    let route = state
        .upstreams
        .route(&model)
        .filter(|route| route.provider.serves(protocol))
        .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    if let Some(allowed) = &context.key.allowed_models
        && !allowed.iter().any(|allowed| allowed == &model) {
            return Err(ApiError::ModelNotAllowed(model));
        }
    let price = state
        .prices
        .get(&route.provider.name, &route.model, &context.account.customer_type)
        .ok_or_else(|| ApiError::PriceNotConfigured {
            provider: route.provider.name.clone(),
            model: route.model.clone(),
            customer_type: context.account.customer_type.clone(),
        })?;
    // Lossy, not to_str: a header with one odd byte must not slip a beta past the check.
    let anthropic_beta = headers.get("anthropic-beta").map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    if let Some(feature) = protocol.unpriced_feature(&body, anthropic_beta.as_deref()) {
        return Err(ApiError::FeatureNotPriced { feature, provider: route.provider.name.clone(), model: route.model.clone() });
    }
    let url_facts = url.clone();
    let (body, parsed) = state
        .tokenizer
        .run(body_bytes, move || {
            let parsed = protocol.parse_at(&body, &url_facts);
            (body, parsed)
        })
        .await?;
    let mut parsed = parsed?;
    // The channels that may serve it: the media walk that counts the prompt also listed what
    // it points to outside the request, which each channel's provider allows or refuses.
    let mut refusal = None;
    let candidates: Vec<usize> = route
        .channels
        .iter()
        .enumerate()
        .filter(|(_, channel)| channel.spec.provider.serves(protocol))
        .filter(|(_, channel)| match crate::passthrough::check(&channel.spec.provider, &parsed.media_references) {
            Ok(()) => true,
            Err(error) => {
                refusal.get_or_insert(error);
                false
            }
        })
        .map(|(index, _)| index)
        .collect();
    if candidates.is_empty() {
        return Err(refusal.unwrap_or_else(|| ApiError::ModelNotFound(model.clone())));
    }
    // Nothing is held for a request no channel could take now.
    no_channel_available(state, &route, &candidates)?;
    let fingerprint = request_fingerprint(protocol, url, &body);
    // A file sent by id or URL shows no size: held at the operator's default (I7).
    let unsized_tokens = parsed.unsized_media_parts.saturating_mul(state.config.limits.unsized_media_part_tokens);
    parsed.prompt_tokens = parsed.prompt_tokens.saturating_add(unsized_tokens);
    // I7: the cap that sizes the hold is the one the upstream gets — the client's, or the
    // default, added to the body for each channel.
    let output_tokens_max_per_choice = parsed.output_tokens_max.unwrap_or(state.config.limits.default_max_output_tokens);
    let cap_to_add = parsed.output_tokens_max.is_none().then_some(output_tokens_max_per_choice);
    let output_tokens_max = output_tokens_max_per_choice.saturating_mul(parsed.choices);
    // Gemini reports thinking on top of maxOutputTokens: the hold covers the request's thinking
    // budget too, or the default where it sets none (I7).
    let thinking_tokens_max = if protocol.reasoning_outside_output_cap() {
        parsed.thinking_budget.unwrap_or(state.config.limits.default_thinking_tokens).saturating_mul(parsed.choices)
    } else {
        0
    };
    let held_output_tokens = output_tokens_max.saturating_add(thinking_tokens_max);
    let hold = tollgate_core::hold_estimate(&price.price, parsed.prompt_tokens, held_output_tokens)
        .map_err(|error| ApiError::InvalidRequest(format!("the request cannot be priced: {error}")))?;
    let authorize_request = AuthorizeRequest {
        account_id: context.account.id.clone(),
        api_key_id: context.key.id.clone(),
        request_id: request_id.clone(),
        hold,
        hold_tokens: parsed.prompt_tokens.saturating_add(held_output_tokens),
        limits: charge::limits(&context),
        hold_ttl_ms: state.config.limits.hold_ttl_ms,
    };
    // Affinity matters only where there is a choice of channel; the lock, where configured.
    let affinity_applies = state.config.routing.affinity_ttl_ms > 0 && candidates.len() > 1;
    // The key's own lock setting, else the model's.
    let lock_mode = context.key.session_lock.unwrap_or(route.session_lock);
    let key_of_session = if affinity_applies || lock_mode != SessionLockMode::Off { session_key(protocol, headers, &body)? } else { None };
    let session = key_of_session.as_deref().filter(|_| affinity_applies).map(|key| pin_session(&route.model, key));
    let stream = parsed.stream;
    let call = UpstreamCall {
        protocol,
        headers: forwarded_headers(protocol, headers),
        json: Some(body),
        bytes,
        cap_to_add,
        stream,
        candidates,
        client_wants_usage: false,
    };
    // One request of a session at a time, where the key or the model asks for it. Taken here, in the
    // handler, before the hold: a refused request holds nothing, and a client that leaves while
    // it waits for the lock leaves nothing behind to be charged later. Held until the request
    // is settled (it moves into the task with the request).
    let locks_session = key_of_session.is_some() && lock_mode != SessionLockMode::Off;
    // A retry of a request already charged gets its replay, not a refusal because another
    // request of its session is running: so it is looked up before the lock is.
    let charged_checked = presented && locks_session;
    if charged_checked && charge::request_charged(state, &authorize_request).await {
        return replay(state, &context, &request_id, &fingerprint, parsed.stream).await;
    }
    let session_lock = match &key_of_session {
        Some(key) => session_lock::acquire(state, lock_mode, &context.account.id, key).await?,
        None => None,
    };
    let task_state = state.clone();
    // From the hold on, the work runs in a tracked task: if the client leaves, hyper drops this
    // handler, but the hold is still settled or voided (see the module doc).
    let task = state.tasks.spawn(async move {
        let state = &task_state;
        // The hot store remembers charged ids for a window; a client's id may be older.
        if presented && !charged_checked && charge::charged_in_ledger(state, &authorize_request).await {
            return replay(state, &context, &request_id, &fingerprint, parsed.stream).await;
        }
        let pinned = match charge::authorize(state, &authorize_request, session.as_deref()).await? {
            Authorized::Held { pinned } => pinned,
            Authorized::AlreadyCharged => return replay(state, &context, &request_id, &fingerprint, parsed.stream).await,
        };
        let affinity = session.map(|session| Affinity { session, pinned, ttl_ms: state.config.routing.affinity_ttl_ms });
        let billing = Billing {
            context,
            request_id,
            route,
            price,
            parsed,
            output_tokens_max,
            thinking_tokens_max,
            hold,
            request_fingerprint: fingerprint,
            started: Instant::now(),
            clock: std::sync::Arc::clone(&state.clock),
            attempts: Vec::new(),
            serving: None,
            affinity,
            session_lock,
        };
        forward(state, billing, call).await
    });
    let response = task.await.map_err(|error| ApiError::Internal(format!("forward task failed: {error}")))??;
    metrics::counter!("tollgate_requests_total", "outcome" => if stream { "stream" } else { "success" }).increment(1);
    Ok(response)
}

/// Headers a provider's SDK semantics depend on, passed through as sent.
fn forwarded_headers(protocol: Protocol, headers: &HeaderMap) -> HeaderMap {
    let mut forwarded = HeaderMap::new();
    let names: &[&str] = match protocol {
        Protocol::OpenAiChat | Protocol::OpenAiEmbeddings => &["openai-organization", "openai-project"],
        Protocol::AnthropicMessages => &["anthropic-version", "anthropic-beta"],
        Protocol::GeminiGenerate => &[],
    };
    for name in names {
        if let Some(value) = headers.get(*name) {
            forwarded.insert(*name, value.clone());
        }
    }
    if protocol == Protocol::AnthropicMessages && !forwarded.contains_key("anthropic-version") {
        forwarded.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    }
    forwarded
}

/// Answers a retry of an already charged request without forwarding or charging it — only if it
/// is the same request from the same key: an id is bound to both when first charged.
async fn replay(state: &AppState, context: &BillingContext, request_id: &str, fingerprint: &str, stream: bool) -> Result<Response, ApiError> {
    let account_id = &context.account.id;
    let duplicate = |why| ApiError::DuplicateRequest(request_id.to_string(), why);
    // The hot store keeps the record while the ledger may not have the row yet (services mode).
    let (record, from_hot) = match state.hot.charged_request(account_id, request_id).await? {
        Some(record) => (Some(record), true),
        None => (state.ledger.charged_request(account_id, request_id).await?, false),
    };
    // Charged, but neither store can show the record yet: nothing to check it against, so
    // nothing is replayed.
    let record = record.ok_or_else(|| duplicate(charge::NOT_REPLAYABLE))?;
    // Rows from before fingerprints were kept are bound to their key alone.
    let same_request = record.api_key_id == context.key.id
        && record.request_fingerprint.as_deref().is_none_or(|bound| bound == fingerprint);
    if !same_request {
        return Err(ApiError::RequestIdReused(request_id.to_string()));
    }
    if stream {
        return Err(duplicate("streaming responses are not replayed"));
    }
    // Past the window the body is not replayed, whether or not the prune job has deleted it
    // yet: what a retry gets depends on its charge's age, not on when the job last ran.
    let window_ms = i64::try_from(state.config.limits.replay_window_ms).unwrap_or(i64::MAX);
    if state.now_ms().saturating_sub(record.charged_at_ms) >= window_ms {
        return Err(duplicate("its response is replayed only within the replay window after the charge, which has passed"));
    }
    let stored = match record.response {
        Some(stored) => stored,
        // A body the hot store could not keep (not UTF-8) is in the ledger once its row is.
        None if from_hot => state.ledger.charged_request(account_id, request_id).await?.and_then(|record| record.response).ok_or_else(|| duplicate(charge::NOT_REPLAYABLE))?,
        None => return Err(duplicate(charge::NOT_REPLAYABLE)),
    };
    metrics::counter!("tollgate_idempotent_replays_total").increment(1);
    let balance = state.hot.balance(&context.account.id, &context.key.id).await?.map(|view| view.balance);
    let mut response = stored_response(stored);
    let headers = response.headers_mut();
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    headers.insert("x-tollgate-cost", HeaderValue::from_static("0"));
    if let Some(balance) = balance.and_then(|balance| HeaderValue::from_str(&balance.to_string()).ok()) {
        headers.insert("x-tollgate-balance", balance);
    }
    Ok(response)
}

fn stored_response(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, stored.body).into_response();
    if let Ok(content_type) = HeaderValue::from_str(&stored.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    }
    response
}

/// What a request sends upstream, prepared for one channel at a time.
struct UpstreamCall {
    protocol: Protocol,
    /// The client's headers a provider's SDK semantics depend on.
    headers: HeaderMap,
    /// The client's body; taken by the last attempt that may be made, cloned before.
    json: Option<Map<String, Value>>,
    /// The body as the client sent it, sent as is when a channel needs no change to it.
    bytes: Bytes,
    /// The output cap to add when the client set none (I7), in each channel's field.
    cap_to_add: Option<u64>,
    stream: bool,
    /// Indices of the route's channels that may serve this request.
    candidates: Vec<usize>,
    /// Whether the client asked for a stream's usage itself (else the gateway's request for it
    /// is stripped from the stream).
    client_wants_usage: bool,
}

impl UpstreamCall {
    /// The body for `channel`: its upstream model name and its provider's output cap field.
    fn body_for(&mut self, channel: &Channel, last: bool) -> Result<Bytes, ApiError> {
        let mut json = if last { self.json.take() } else { self.json.clone() }
            .ok_or_else(|| ApiError::Internal("the request body was already sent on its last attempt".into()))?;
        let cap_added = self.cap_to_add.is_some_and(|cap| self.protocol.insert_output_cap(&mut json, cap, channel.spec.provider.openai_cap_field));
        let prepared = self.protocol.prepare_upstream_body(&mut json, &channel.spec.upstream_model, self.stream);
        self.client_wants_usage = prepared.client_wants_usage;
        // Most bodies go upstream as the client sent them: no second serialization.
        if !prepared.rewritten && !cap_added {
            return Ok(self.bytes.clone());
        }
        serde_json::to_vec(&json).map(Bytes::from).map_err(|error| ApiError::Internal(format!("serializing the upstream body: {error}")))
    }
}

/// 502 with the time the first channel could be chosen again, when none of the request's
/// channels can be now.
fn no_channel_available(state: &AppState, route: &Route, candidates: &[usize]) -> Result<(), ApiError> {
    let now_ms = state.now_ms();
    if route.any_available(candidates, now_ms, state.upstreams.policy()) {
        return Ok(());
    }
    metrics::counter!("tollgate_no_channel_available_total", "model" => route.model.clone()).increment(1);
    let retry_after_secs = route
        .next_available_ms(candidates, now_ms, state.upstreams.policy())
        .map(|at_ms| u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0).div_ceil(1_000).max(1));
    Err(ApiError::NoChannelAvailable { model: route.model.clone(), retry_after_secs })
}

/// An upstream answer that nothing of has reached the client yet.
enum Answer {
    /// A non-streaming response, read whole.
    Whole { headers: HeaderMap, body: Bytes, json: Value },
    /// A stream whose first chunk came (it is the first item of `chunks`).
    Stream { headers: HeaderMap, chunks: UpstreamChunks },
}

type UpstreamChunks = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Why an attempt failed, and what that means.
struct AttemptFailure {
    error: ApiError,
    /// One word for the attempt's record.
    kind: &'static str,
    verdict: Verdict,
    /// An upstream's `Retry-After`, in ms.
    retry_after_ms: Option<u64>,
}

impl AttemptFailure {
    fn no_answer(error: ApiError, kind: &'static str) -> AttemptFailure {
        AttemptFailure { error, kind, verdict: classify(None), retry_after_ms: None }
    }
}

/// How one attempt went, for its record.
struct AttemptFacts {
    status: Option<u16>,
    first_byte: Option<Duration>,
}

/// Sends the request upstream, on one channel after another until one answers, then settles
/// or voids it. Always ends the hold one way or another. All attempts share the request's
/// `upstream_timeout_ms` and its stream deadline, so the hold's lifetime check still holds; a
/// failed attempt is retried on another channel only while nothing has reached the client.
async fn forward(state: &AppState, mut billing: Billing, mut call: UpstreamCall) -> Result<Response, ApiError> {
    let request_deadline = tokio::time::Instant::from_std(billing.started) + Duration::from_millis(state.config.limits.upstream_timeout_ms);
    let attempts_max = usize::try_from(state.config.routing.attempts_max)
        .unwrap_or(usize::MAX)
        .min(ATTEMPTS_PER_REQUEST_MAX)
        .min(call.candidates.len())
        .max(1);
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = None;
    while tried.len() < attempts_max && tokio::time::Instant::now() < request_deadline {
        // The first attempt goes to the session's pinned channel if it can take it; a pin
        // never holds a request back (failover goes on by priority, the pinned channel tried).
        let preferred = if tried.is_empty() { pinned_candidate(&billing, &call.candidates) } else { None };
        let Some(mut lease) = billing.route.select(&call.candidates, &tried, preferred, state.now_ms(), state.upstreams.policy()).await else {
            break;
        };
        if tried.is_empty()
            && let Some(affinity) = &billing.affinity
        {
            let result = match (&affinity.pinned, preferred) {
                (None, _) => "miss",
                (Some(pinned), Some(_)) if *pinned == lease.channel.spec.name => "hit",
                (Some(_), _) => "pinned_unavailable",
            };
            metrics::counter!("tollgate_affinity_total", "model" => billing.route.model.clone(), "result" => result).increment(1);
        }
        tried.extend(billing.route.index_of(&lease.channel));
        let body = match call.body_for(&lease.channel, tried.len() >= attempts_max) {
            Ok(body) => body,
            Err(error) => return void_with(state, &billing, error).await,
        };
        let started = Instant::now();
        let (outcome, facts) = try_channel(state, &call, &lease.channel, body, request_deadline).await;
        let channel = &lease.channel;
        if let Some(first_byte) = facts.first_byte {
            channel.first_byte_seconds.record(first_byte.as_secs_f64());
        }
        let mut record = UpstreamAttempt {
            channel: channel.spec.name.clone(),
            provider: channel.spec.provider.name.clone(),
            upstream_model: channel.spec.upstream_model.clone(),
            status_code: facts.status,
            served: false,
            error: None,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            first_byte_ms: facts.first_byte.map(|first_byte| u64::try_from(first_byte.as_millis()).unwrap_or(u64::MAX)),
            upstream_usage: None,
        };
        match outcome {
            Ok(answer) => {
                record.served = true;
                billing.attempts.push(record);
                channel.attempts_counted.increment(1);
                if tried.len() > 1 {
                    metrics::counter!("tollgate_failovers_total", "model" => billing.route.model.clone()).increment(1);
                    tracing::info!(request_id = billing.request_id, model = billing.route.model, channel = lease.channel.spec.name, attempts = tried.len(), "served after failover");
                }
                billing.serving = Some(lease);
                return serve(state, billing, call.protocol, call.client_wants_usage, answer).await;
            }
            Err(failure) => {
                record.error = Some(failure.kind.to_string());
                billing.attempts.push(record);
                channel.attempt_failures_counted.increment(1);
                let now_ms = state.now_ms();
                lease.report(failure.verdict.health, now_ms).await;
                if let Some(retry_after_ms) = failure.retry_after_ms {
                    let retry_after_ms = retry_after_ms.min(state.config.routing.retry_after_ms_max);
                    lease.cool_until(now_ms.saturating_add(i64::try_from(retry_after_ms).unwrap_or(i64::MAX)));
                }
                tracing::warn!(request_id = billing.request_id, model = billing.route.model, channel = lease.channel.spec.name, kind = failure.kind, retry = failure.verdict.retry, error = %failure.error, "upstream attempt failed");
                if !failure.verdict.retry {
                    return void_with(state, &billing, failure.error).await;
                }
                last_error = Some(failure.error);
            }
        }
    }
    let error = match last_error {
        Some(error) => error,
        None => match no_channel_available(state, &billing.route, &call.candidates) {
            Err(error) => error,
            Ok(()) => ApiError::UpstreamTimeout(state.config.limits.upstream_timeout_ms),
        },
    };
    void_with(state, &billing, error).await
}

/// The index among `candidates` of the channel the session is pinned to, if any.
fn pinned_candidate(billing: &Billing, candidates: &[usize]) -> Option<usize> {
    let pinned = billing.affinity.as_ref()?.pinned.as_deref()?;
    candidates.iter().copied().find(|index| billing.route.channels.get(*index).is_some_and(|channel| channel.spec.name == pinned))
}

/// Longest `X-Session-ID` accepted.
const SESSION_ID_BYTES_MAX: usize = 256;

/// The request's session key, the first of: the `X-Session-ID` header; OpenAI's
/// `prompt_cache_key` or `previous_response_id`; Anthropic's `metadata.user_id`.
fn session_key(protocol: Protocol, headers: &HeaderMap, body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers.get("x-session-id") {
        let text = value.to_str().map_err(|_| ApiError::InvalidRequest("X-Session-ID must be visible ASCII".into()))?;
        if text.is_empty() || text.len() > SESSION_ID_BYTES_MAX {
            return Err(ApiError::InvalidRequest(format!("X-Session-ID must be 1 to {SESSION_ID_BYTES_MAX} bytes")));
        }
        return Ok(Some(text.to_string()));
    }
    let text = |value: Option<&Value>| value.and_then(Value::as_str).filter(|text| !text.is_empty()).map(str::to_string);
    Ok(match protocol {
        Protocol::OpenAiChat => text(body.get("prompt_cache_key")).or_else(|| text(body.get("previous_response_id"))),
        Protocol::AnthropicMessages => text(body.get("metadata").and_then(|metadata| metadata.get("user_id"))),
        Protocol::OpenAiEmbeddings | Protocol::GeminiGenerate => None,
    })
}

/// How the hot store keys a session's pin: the model, and a digest of the key (any length,
/// any bytes, never stored as sent).
fn pin_session(model: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    format!("{model}:{}", hex::encode(&digest[..16]))
}

/// One attempt on one channel, up to its first byte (a stream) or its whole answer.
async fn try_channel(
    state: &AppState,
    call: &UpstreamCall,
    channel: &Channel,
    body: Bytes,
    request_deadline: tokio::time::Instant,
) -> (Result<Answer, AttemptFailure>, AttemptFacts) {
    let started = tokio::time::Instant::now();
    let mut facts = AttemptFacts { status: None, first_byte: None };
    let first_byte_deadline = match state.config.routing.attempt_first_byte_timeout_ms {
        Some(ms) => request_deadline.min(started + Duration::from_millis(ms)),
        None => request_deadline,
    };
    let timeout_ms = |deadline: tokio::time::Instant| u64::try_from(deadline.saturating_duration_since(started).as_millis()).unwrap_or(u64::MAX);
    let provider = &channel.spec.provider;
    let url = format!("{}{}", provider.base_url, call.protocol.upstream_path(&channel.spec.upstream_model, call.stream));
    let request = state.http.post(url).headers(call.headers.clone()).header(header::CONTENT_TYPE, "application/json").body(body);
    let request = provider.authorize(request, call.protocol);
    let response = match tokio::time::timeout_at(first_byte_deadline, request.send()).await {
        Err(_) => return (Err(AttemptFailure::no_answer(ApiError::UpstreamTimeout(timeout_ms(first_byte_deadline)), "timeout")), facts),
        Ok(Err(error)) => {
            let kind = if error.is_connect() { "connect" } else { "request" };
            return (Err(AttemptFailure::no_answer(ApiError::Upstream(error.without_url().to_string()), kind)), facts);
        }
        Ok(Ok(response)) => response,
    };
    facts.first_byte = Some(started.elapsed());
    let status = response.status();
    facts.status = Some(status.as_u16());
    if !status.is_success() {
        let retry_after_ms = retry_after_ms(response.headers());
        let body = upstream_errors::read_error_body(response, Duration::from_secs(5)).await;
        let refusal = upstream_errors::refusal(status.as_u16(), &body);
        tracing::warn!(channel = channel.spec.name, status = status.as_u16(), upstream_said = refusal.logged, "upstream refused the request");
        let error = ApiError::UpstreamStatus { status: status.as_u16(), message: refusal.client_message };
        return (Err(AttemptFailure { error, kind: "status", verdict: classify(Some(status.as_u16())), retry_after_ms }), facts);
    }
    let headers = passthrough_response_headers(response.headers());
    if call.stream {
        // Nothing is the client's until the first chunk: a stream that fails before it is
        // tried elsewhere.
        let mut chunks = response.bytes_stream();
        let first = match tokio::time::timeout_at(first_byte_deadline, chunks.next()).await {
            Err(_) => return (Err(AttemptFailure::no_answer(ApiError::UpstreamTimeout(timeout_ms(first_byte_deadline)), "timeout")), facts),
            Ok(None) => {
                let error = ApiError::Upstream("the upstream ended the stream before sending anything".into());
                return (Err(AttemptFailure::no_answer(error, "stream_ended")), facts);
            }
            Ok(Some(Err(error))) => return (Err(AttemptFailure::no_answer(ApiError::Upstream(error.without_url().to_string()), "body")), facts),
            Ok(Some(Ok(first))) => first,
        };
        facts.first_byte = Some(started.elapsed());
        let chunks: UpstreamChunks = Box::pin(futures_util::stream::once(std::future::ready(Ok(first))).chain(chunks));
        return (Ok(Answer::Stream { headers, chunks }), facts);
    }
    let bytes_max = state.config.limits.upstream_response_bytes_max;
    let mut body = Vec::new();
    let bytes = match tokio::time::timeout_at(request_deadline, upstream_errors::read_body_at_most(response, bytes_max, &mut body)).await {
        Err(_) => return (Err(AttemptFailure::no_answer(ApiError::UpstreamTimeout(timeout_ms(request_deadline)), "timeout")), facts),
        Ok(Err(error)) => return (Err(AttemptFailure::no_answer(ApiError::Upstream(error.without_url().to_string()), "body")), facts),
        // Not charged, as any 502 (CONTRACT): the client got none of it, and its usage report
        // is at the end the gateway did not read. Like a stream cut before any output reached
        // the client, what the upstream generated is the operator's cost — at most the output
        // cap it was sent (I7). Not retried: another channel would answer as long.
        Ok(Ok(false)) => {
            let error = ApiError::Upstream(format!("the response exceeded {bytes_max} bytes, the gateway's limit; nothing was charged"));
            return (Err(AttemptFailure { error, kind: "too_large", verdict: Verdict { retry: false, health: Health::Good }, retry_after_ms: None }), facts);
        }
        Ok(Ok(true)) => Bytes::from(body),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(json) => (Ok(Answer::Whole { headers, body: bytes, json }), facts),
        Err(_) => (Err(AttemptFailure::no_answer(ApiError::Upstream("upstream sent a response that is not JSON".into()), "not_json")), facts),
    }
}

/// An upstream's `retry-after-ms`, else its `Retry-After` — a delay in seconds or an HTTP date
/// (RFC 9110 §10.2.3; measured on the wall clock, which the date is on) — in ms from now. A
/// date already past means no wait.
fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|value| value.parse::<u64>().ok()) {
        return Some(ms);
    }
    let value = text(header::RETRY_AFTER.as_str())?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1_000));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).map_or(0, |wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)))
}

/// Charges an answer and hands it to the client.
async fn serve(state: &AppState, mut billing: Billing, protocol: Protocol, client_wants_usage: bool, answer: Answer) -> Result<Response, ApiError> {
    let (upstream_headers, bytes, json) = match answer {
        Answer::Stream { headers, chunks } => {
            let inspector = protocol.stream_inspector(client_wants_usage);
            return Ok(start_stream(state, billing, chunks, inspector, headers));
        }
        Answer::Whole { headers, body, json } => (headers, body, json),
    };
    billing.report_serving(Health::Good, state.now_ms()).await;
    let reported = protocol.response_usage(&json);
    billing.note_served_usage(reported);
    let (usage, source) = billing.usage_to_charge(reported, &protocol.response_output_text(&json));
    billing.count_channel_tokens(&usage, state.now_ms());
    let cost = match charge::price_usage(&billing.price.price, &usage) {
        Ok(cost) => cost,
        Err(error) => return void_with(state, &billing, error).await,
    };
    billing.record_hold_excess(cost);
    billing.count_cached_share(&usage);
    let mut event = billing.event(usage, source, cost, RequestStatus::Success);
    event.pin = billing.pin_for_success();
    if state.config.limits.replay_window_ms > 0 {
        event.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: bytes.to_vec() });
    }
    let settlement = charge::settle(state, event).await?;
    tracing::info!(request_id = billing.request_id, account_id = billing.context.account.id, model = billing.route.model, %cost, usage_source = source.as_str(), "charged");
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.extend(upstream_headers);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    insert_money_header(headers, "x-tollgate-cost", cost);
    insert_money_header(headers, "x-tollgate-balance", settlement.balance_after);
    insert_fence_header(headers, &billing);
    Ok(response)
}

/// The session lock's fencing number, for a request that holds one.
fn insert_fence_header(headers: &mut HeaderMap, billing: &Billing) {
    if let Some(lock) = &billing.session_lock {
        headers.insert("x-tollgate-session-fence", HeaderValue::from(lock.fence));
    }
}

fn insert_money_header(headers: &mut HeaderMap, name: &'static str, amount: tollgate_core::Money) {
    if let Ok(value) = HeaderValue::from_str(&amount.to_string()) {
        headers.insert(name, value);
    }
}

/// Upstream response headers SDKs read (rate limits, request ids), passed through.
fn passthrough_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in upstream {
        let name_text = name.as_str();
        if name_text.starts_with("x-ratelimit-") || name_text.starts_with("anthropic-ratelimit-") || name_text == "openai-processing-ms" {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

async fn void_with(state: &AppState, billing: &Billing, error: ApiError) -> Result<Response, ApiError> {
    tracing::warn!(request_id = billing.request_id, %error, "upstream failed; hold voided, nothing charged");
    charge::void(state, billing.failed_event()).await;
    Err(error)
}

/// How a stream ended, which decides what is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamEnd {
    /// The terminal event arrived.
    Completed,
    ClientGone,
    /// The client read nothing for `stream_idle_timeout_ms`.
    ClientStalled,
    UpstreamCut,
    UpstreamIdle,
    DurationExceeded,
    /// The upstream went on past the output cap it was sent ([`OutputWatch`]).
    OutputCapExceeded,
}

/// Hands one event to the client within the stream's limits, whatever the client does: a
/// client that stops reading fills the channel, and a send that waited for it without bound
/// would outlive the stream's deadline and its hold (issue 19 item 4) — the hold would expire
/// under a live request and its funds, request slot and id be spent again.
async fn deliver(
    sender: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    event: Bytes,
    deadline: tokio::time::Instant,
    stall: Duration,
) -> Result<(), StreamEnd> {
    tokio::select! {
        sent = sender.send(Ok(event)) => sent.map_err(|_| StreamEnd::ClientGone),
        () = tokio::time::sleep_until(deadline) => Err(StreamEnd::DurationExceeded),
        () = tokio::time::sleep(stall) => Err(StreamEnd::ClientStalled),
    }
}

/// Output tokens an upstream may go past its cap, by the gateway's count, before the stream is
/// cut: the gateway's tokenizer is exact for OpenAI models only, so an honest upstream that
/// stopped at the cap by its own count must never be cut (a quarter more, plus this).
const OUTPUT_CAP_SLACK_TOKENS: u64 = 64;
/// Tokens counted piece by piece between two exact counts of the whole output.
const OUTPUT_RECOUNT_TOKENS: u64 = 256;

/// Watches the output relayed so far against the cap the upstream was sent (I7). An upstream
/// that ignores the cap is cut once clearly past it; what it generated beyond the cap is the
/// operator's cost, at most a quarter of the cap plus [`OUTPUT_CAP_SLACK_TOKENS`] per request,
/// never the customer's (the charge stops at the cap). Each event's text is counted on its own
/// (cheap, and a little above the exact count); only past the cutoff is the whole counted.
struct OutputWatch {
    encoding: tokens::Encoding,
    cutoff: u64,
    counted_bytes: usize,
    tokens: u64,
    recount_at: u64,
}

impl OutputWatch {
    fn new(encoding: tokens::Encoding, output_tokens_max: u64) -> OutputWatch {
        let cutoff = output_tokens_max.saturating_add(output_tokens_max / 4).saturating_add(OUTPUT_CAP_SLACK_TOKENS);
        OutputWatch { encoding, cutoff, counted_bytes: 0, tokens: 0, recount_at: cutoff.saturating_add(1) }
    }

    /// Whether `output_text` (the whole output so far, only ever appended to) is past the cutoff.
    fn exceeded(&mut self, output_text: &str) -> bool {
        // A token is at least one byte: until the text is longer than the cutoff, nothing needs
        // counting (most streams never get there).
        if output_text.len() as u64 <= self.cutoff {
            return false;
        }
        if let Some(new_text) = output_text.get(self.counted_bytes..).filter(|text| !text.is_empty()) {
            self.tokens = self.tokens.saturating_add(tokens::count_text(self.encoding, new_text));
            self.counted_bytes = output_text.len();
        }
        if self.tokens < self.recount_at {
            return false;
        }
        self.tokens = tokens::count_text(self.encoding, output_text);
        self.recount_at = self.tokens.max(self.cutoff).saturating_add(OUTPUT_RECOUNT_TOKENS);
        self.tokens > self.cutoff
    }
}

fn start_stream(
    state: &AppState,
    billing: Billing,
    upstream: UpstreamChunks,
    inspector: StreamInspector,
    upstream_headers: HeaderMap,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_CHANNEL_EVENTS);
    let mut fence = HeaderMap::new();
    insert_fence_header(&mut fence, &billing);
    let task_state = state.clone();
    state.tasks.spawn(async move { pump(&task_state, billing, upstream, inspector, sender).await });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.extend(upstream_headers);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.extend(fence);
    response
}

/// Moves a stream from upstream to client, event by event, holding back the terminal event
/// until the charge is settled (so the charge is durable before the last byte leaves, I1).
async fn pump(
    state: &AppState,
    mut billing: Billing,
    upstream: UpstreamChunks,
    mut inspector: StreamInspector,
    sender: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let limits = &state.config.limits;
    let idle = Duration::from_millis(limits.stream_idle_timeout_ms);
    let deadline = tokio::time::Instant::from_std(billing.started) + Duration::from_millis(limits.stream_duration_ms_max);
    let mut chunks = upstream;
    let mut splitter = SseSplitter::new(SSE_EVENT_BYTES_MAX);
    let mut terminal: Option<Bytes> = None;
    // An event that may be the stream's last (`EventAction::MaybeTerminal`), until the next one.
    let mut kept_back: Option<Bytes> = None;
    let mut forwarded_events = 0u64;
    let mut watch = OutputWatch::new(billing.parsed.encoding, billing.output_tokens_max);
    let end = 'stream: loop {
        let next = tokio::select! {
            next = tokio::time::timeout(idle, chunks.next()) => next,
            () = tokio::time::sleep_until(deadline) => break StreamEnd::DurationExceeded,
            () = sender.closed() => break StreamEnd::ClientGone,
        };
        let chunk = match next {
            Err(_) => break StreamEnd::UpstreamIdle,
            // A protocol without a terminal event ends by closing: its kept-back event is the last.
            Ok(None) if inspector.completed_at_end_of_stream() => {
                terminal = kept_back.take();
                break StreamEnd::Completed;
            }
            Ok(None) | Ok(Some(Err(_))) => break StreamEnd::UpstreamCut,
            Ok(Some(Ok(chunk))) => chunk,
        };
        let Ok(events) = splitter.push(&chunk) else { break StreamEnd::UpstreamCut };
        for event in events {
            let action = inspector.inspect(&event);
            if watch.exceeded(inspector.output_text()) {
                break 'stream StreamEnd::OutputCapExceeded;
            }
            if action != EventAction::Strip
                && let Some(previous) = kept_back.take() {
                    if let Err(end) = deliver(&sender, previous, deadline, idle).await {
                        break 'stream end;
                    }
                    forwarded_events += 1;
                }
            match action {
                EventAction::Strip => {}
                EventAction::MaybeTerminal => kept_back = Some(event.raw),
                EventAction::Terminal => {
                    terminal = Some(event.raw);
                    break 'stream StreamEnd::Completed;
                }
                EventAction::Forward => {
                    if let Err(end) = deliver(&sender, event.raw, deadline, idle).await {
                        break 'stream end;
                    }
                    forwarded_events += 1;
                }
            }
        }
    };
    // A stream that did not complete still delivers, once charged, the event it kept back.
    let terminal = terminal.or(kept_back);
    metrics::counter!("tollgate_stream_ends_total", "end" => stream_end_label(end)).increment(1);
    let health = if matches!(end, StreamEnd::UpstreamCut | StreamEnd::UpstreamIdle) { Health::Bad } else { Health::Good };
    billing.report_serving(health, state.now_ms()).await;
    billing.note_served_usage(inspector.usage());
    let (usage, source) = billing.stream_usage_to_charge(&inspector);
    billing.count_channel_tokens(&usage, state.now_ms());
    if end != StreamEnd::Completed && inspector.output_text().is_empty() && inspector.usage().is_none() {
        tracing::warn!(request_id = billing.request_id, ?end, forwarded_events, "stream ended before any output; voided");
        charge::void(state, billing.failed_event()).await;
        return;
    }
    let status = match end {
        StreamEnd::Completed => RequestStatus::Success,
        StreamEnd::ClientGone | StreamEnd::ClientStalled => RequestStatus::ClientDisconnected,
        StreamEnd::UpstreamCut | StreamEnd::UpstreamIdle | StreamEnd::DurationExceeded | StreamEnd::OutputCapExceeded => {
            RequestStatus::UpstreamInterrupted
        }
    };
    let settled = match charge::price_usage(&billing.price.price, &usage) {
        Ok(cost) => {
            billing.record_hold_excess(cost);
            billing.count_cached_share(&usage);
            let mut event = billing.event(usage, source, cost, status);
            if status == RequestStatus::Success {
                event.pin = billing.pin_for_success();
            }
            charge::settle(state, event).await.map(|settlement| (cost, settlement))
        }
        Err(error) => Err(error),
    };
    match settled {
        Ok((cost, settlement)) => {
            tracing::info!(request_id = billing.request_id, account_id = billing.context.account.id, model = billing.route.model, %cost, balance_after = %settlement.balance_after, usage_source = source.as_str(), status = status.as_str(), "stream charged");
            if let Some(terminal) = terminal {
                // Charged already; a client that does not read it only keeps this task a while.
                let _ = tokio::time::timeout(idle, sender.send(Ok(terminal))).await;
            }
        }
        Err(error) => {
            // The client must not see a complete stream that was not charged durably.
            tracing::error!(request_id = billing.request_id, %error, "stream settle failed; terminal event withheld");
            let _ = sender.send(Err(std::io::Error::other("billing unavailable"))).await;
        }
    }
}

fn stream_end_label(end: StreamEnd) -> &'static str {
    match end {
        StreamEnd::Completed => "completed",
        StreamEnd::ClientGone => "client_gone",
        StreamEnd::ClientStalled => "client_stalled",
        StreamEnd::UpstreamCut => "upstream_cut",
        StreamEnd::UpstreamIdle => "upstream_idle",
        StreamEnd::DurationExceeded => "duration_exceeded",
        StreamEnd::OutputCapExceeded => "output_cap_exceeded",
    }
}

/// The request id header value of a response.
pub fn set_request_id(response: &mut Response, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        pairs.iter().map(|(name, value)| (header::HeaderName::from_static(name), HeaderValue::from_str(value).unwrap())).collect()
    }

    #[test]
    fn retry_after_is_read_in_every_spelling_an_upstream_uses() {
        assert_eq!(retry_after_ms(&headers(&[("retry-after", "7".into())])), Some(7_000));
        assert_eq!(retry_after_ms(&headers(&[("retry-after-ms", "250".into()), ("retry-after", "7".into())])), Some(250), "the finer one first");
        let in_ten_seconds = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        let waited = retry_after_ms(&headers(&[("retry-after", httpdate::fmt_http_date(in_ten_seconds))])).unwrap();
        // An HTTP date has whole seconds: up to one less than asked.
        assert!((8_900..=10_000).contains(&waited), "{waited}");
        assert_eq!(retry_after_ms(&headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".into())])), Some(0), "a date past: no wait");
        for unreadable in ["soon", "-1", "1.5", ""] {
            assert_eq!(retry_after_ms(&headers(&[("retry-after", unreadable.into())])), None, "{unreadable:?}");
        }
        assert_eq!(retry_after_ms(&HeaderMap::new()), None);
    }
}
