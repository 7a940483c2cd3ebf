//! The gateway's typed configuration: parsed once (TOML file, then `TOLLGATE_*` variables over
//! it, in the binary), validated once here, then read-only.

use serde::Deserialize;

/// Every limit of the gateway, with its unit last.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Request bodies above this are refused with 413 before anything is held.
    pub request_body_bytes_max: usize,
    /// A request body must arrive within this (from the end of the headers); else 408 and the
    /// connection is closed — a client that stalls mid-body holds nothing, but would hold a
    /// connection.
    pub request_body_timeout_ms: u64,
    /// Request headers (names and values, all together) above this are refused with 431.
    pub header_bytes_max: usize,
    /// A connection with no request in flight this long is closed: one still sending its
    /// request head (or nothing), and one idle between requests (keep-alive) alike.
    pub header_read_timeout_ms: u64,
    /// Open client connections per listener; past it a new connection is closed at once,
    /// unanswered (`tollgate_connections_refused_total{reason="connections_max"}`).
    pub connections_max: usize,
    /// Open connections per client IP address per listener; 0: no such bound. For clients that
    /// connect directly: behind a proxy or load balancer every client shares its address.
    pub connections_per_address_max: usize,
    /// Connecting to an upstream.
    pub upstream_connect_timeout_ms: u64,
    /// A non-streaming upstream response, or a stream's first byte.
    pub upstream_timeout_ms: u64,
    /// The most of a non-streaming upstream answer read: past it the request ends with 502
    /// `upstream_error`, not charged (the contract's 502; the client got nothing), and the rest
    /// is not read. Above every legitimate answer: chat output is bounded by its cap (128
    /// choices of 32k tokens is some 16 MiB of text), generated images and audio come as base64
    /// of a few MiB each, and the largest answer is an embeddings batch — 2,048 inputs of 3,072
    /// dimensions is 32 MiB as base64 (what OpenAI's SDKs ask for) but some 190 MB as JSON
    /// floats (about 30 bytes each, indented). The gateway holds up to this much per request.
    pub upstream_response_bytes_max: usize,
    /// Longest silence between two chunks of a stream.
    pub stream_idle_timeout_ms: u64,
    /// Longest a stream may run; then it is cut and billed for what was generated.
    pub stream_duration_ms_max: u64,
    /// An unsettled hold is released after this long; longer than any request may run.
    pub hold_ttl_ms: u64,
    /// Output tokens assumed for the hold when a request sets no maximum.
    pub default_max_output_tokens: u64,
    /// Input tokens held for each media part whose size the request does not show (a file by
    /// id or URL: OpenAI `file_id`, Anthropic `url`/`file` documents, Gemini `fileData` that is
    /// not an image). An estimate, not a bound: a charge above its hold is counted
    /// (`tollgate_hold_exceeded_total`).
    pub unsized_media_part_tokens: u64,
    /// Thinking tokens held per choice, on top of the output cap, for a Gemini request that sets
    /// no `thinkingConfig.thinkingBudget` (Gemini reports thinking outside `maxOutputTokens`).
    /// The default covers the Gemini 2.5 models' own maximum (Pro 32,768, Flash 24,576); below
    /// it, thinking past it is charged at most this (I7) and the rest is the operator's cost.
    pub default_thinking_tokens: u64,
    /// Billing contexts are re-read after this long even without an invalidation.
    pub context_cache_ttl_ms: u64,
    /// Past its TTL, a billing context is still used for this long (from its load) when the
    /// ledger cannot be read (PostgreSQL away); 0 refuses instead. Invalidations (a key revoked,
    /// an account suspended) drop contexts at once, stale or not.
    pub context_stale_if_error_ms: u64,
    /// Longest a request waits for the ledger to read a key and its account; past it, the
    /// stale context or 503 `billing_unavailable`.
    pub context_lookup_timeout_ms: u64,
    /// A key the ledger does not know is refused without asking again for this long (any key
    /// created meanwhile invalidates the cache, so a new key works at once).
    pub unknown_key_cache_ms: u64,
    /// Request bodies above 16 KiB are parsed and tokenized on this many blocking threads at
    /// most (0: every core but one), never on the async workers.
    pub tokenizer_threads: usize,
    /// Usage events per ledger transaction.
    pub usage_batch_events_max: usize,
    /// Services mode: how long the usage writer waits to fill a short batch before writing it
    /// (the events are durable in Redis meanwhile; the ledger lags by this much more at most).
    pub usage_batch_linger_ms: u64,
    /// Embedded usage log capacity; settles wait when the worker is this far behind.
    pub usage_log_events_max: usize,
    /// How often the hold sweeper runs.
    pub hold_sweep_interval_ms: u64,
    /// Longest a settle waits for its charge to become durable.
    pub settle_timeout_ms: u64,
    /// Longest the ledger may take to say whether a request id the client sent was charged
    /// before; past it (the ledger away or slow) the hot store's window decides.
    pub ledger_lookup_timeout_ms: u64,
    /// How long after its settle the hot store remembers a charged request id (the ledger
    /// remembers it for good). It must exceed `hold_ttl_ms + settle_timeout_ms`, within which a
    /// second settle of one id can come; each id costs memory for this long (docs/RETENTION.md:
    /// bytes per id and the ceiling at 1,000 charges a second). Every gateway and worker
    /// sharing a Redis should use one value.
    pub recent_charge_ms: u64,
    /// On SIGTERM, how long in-flight requests and streams may run on before the process gives
    /// up on them (their holds then expire).
    pub shutdown_drain_ms: u64,
    /// At start-up, how long to wait for Redis and PostgreSQL to answer (a process started
    /// while one restarts waits for it) before exiting; 0 gives up at the first failure.
    pub startup_wait_ms: u64,
    /// Failed authentications one source address may make per minute, counted apart for the
    /// operator token and for client keys; past it the address gets 429 `rate_limited` for the
    /// rest of the minute without its credential being checked (client keys the ledger has
    /// confirmed to exist still work). 0 turns it off. See [`crate::throttle`].
    pub auth_failures_per_address_per_minute: u32,
    /// How long after its charge a retry of a non-streaming request id is answered with the
    /// stored response; after it, 409 `duplicate_request` (never a second charge), and the `prune`
    /// job deletes the body. Decided by the charge's time when the retry arrives. 0 keeps no
    /// bodies at all.
    pub replay_window_ms: u64,
}

/// What a request does besides waiting for its upstream and its settle (authorize, reading the
/// body, counting its output), with room to spare, for the hold's lifetime check.
const HOLD_MARGIN_MS: u64 = 1_000;

/// The longest `limits.recent_charge_ms`: past a week the ledger, which remembers every charge,
/// is the better memory.
const RECENT_CHARGE_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;

/// The longest a services-mode writer may wait to fill a batch (the stream lag target is 1 s).
const USAGE_BATCH_LINGER_MS_MAX: u64 = 500;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            request_body_bytes_max: 4 * 1024 * 1024,
            header_bytes_max: 32 * 1024,
            request_body_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            connections_max: 10_000,
            connections_per_address_max: 0,
            upstream_connect_timeout_ms: 10_000,
            upstream_timeout_ms: 120_000,
            upstream_response_bytes_max: 256 * 1024 * 1024,
            stream_idle_timeout_ms: 120_000,
            stream_duration_ms_max: 600_000,
            hold_ttl_ms: 900_000,
            default_max_output_tokens: 4_096,
            unsized_media_part_tokens: 32_768,
            default_thinking_tokens: 32_768,
            context_cache_ttl_ms: 300_000,
            context_stale_if_error_ms: 3_600_000,
            context_lookup_timeout_ms: 2_000,
            unknown_key_cache_ms: 10_000,
            tokenizer_threads: 0,
            usage_batch_events_max: 500,
            usage_batch_linger_ms: 20,
            usage_log_events_max: 65_536,
            hold_sweep_interval_ms: 10_000,
            settle_timeout_ms: 30_000,
            ledger_lookup_timeout_ms: 250,
            recent_charge_ms: tollgate_store::hot::RECENT_CHARGE_MS.unsigned_abs(),
            shutdown_drain_ms: 30_000,
            startup_wait_ms: 60_000,
            auth_failures_per_address_per_minute: 60,
            replay_window_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// The periodic jobs (see `tollgate_worker::jobs`): each runs on one instance per period,
/// under a lease. A period of 0 turns a job off.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Reconciliation of every account (ledger rows, account_balance, hot store).
    pub reconcile_interval_ms: u64,
    /// Whether the periodic reconciliation repairs what it finds (`tollgate reconcile --fix`
    /// and `POST /internal/reconcile` always may). Off by default: drift is a bug to look at.
    pub reconcile_fix: bool,
    /// The usage streams' backlog check (services mode).
    pub stream_lag_interval_ms: u64,
    /// A backlog above this many entries is logged as a warning at every check.
    pub stream_lag_warn_entries: u64,
    /// Deleting stored responses past `limits.replay_window_ms` (`tollgate_worker::retention`).
    pub prune_interval_ms: u64,
    /// Rows deleted per batch (one short transaction each).
    pub prune_batch_rows: u32,
    /// Pause between two batches, so a backlog is worked off without crowding the writers.
    pub prune_pause_ms: u64,
    /// At most this many stored responses deleted a second (0: no bound but the pause). Keep it
    /// above the rate of charged non-streaming requests.
    pub prune_rows_per_second: u32,
    /// How long the `prune` job keeps each request's upstream attempts (which channels it
    /// tried, for reconciling a provider's bill); 0: until their month is archived.
    pub upstream_attempts_retention_ms: u64,
    /// Making the usage log's monthly partitions ahead of time (PostgreSQL ledger).
    pub partitions_interval_ms: u64,
    /// How many months after the current one get their partition in advance (1–24).
    pub partitions_ahead_months: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            reconcile_interval_ms: 300_000,
            reconcile_fix: false,
            stream_lag_interval_ms: 10_000,
            stream_lag_warn_entries: 10_000,
            prune_interval_ms: 60_000,
            prune_batch_rows: 1_000,
            prune_pause_ms: 50,
            prune_rows_per_second: 2_000,
            upstream_attempts_retention_ms: 90 * 24 * 60 * 60 * 1000,
            partitions_interval_ms: 3_600_000,
            partitions_ahead_months: 3,
        }
    }
}

/// Alerts (`balance.low`, `key.budget`, `fund.posted`) sent as signed webhooks from the outbox.
/// Its `Debug` leaves the secret and the URL (which may carry a token) out.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Where events are POSTed; none: events stay listable at `/internal/alerts`, unsent.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key of the `X-Tollgate-Signature` header (required with a URL).
    pub webhook_secret: Option<String>,
    /// How often the outbox is drained.
    pub deliver_interval_ms: u64,
    /// One delivery attempt, connect to last byte.
    pub timeout_ms: u64,
    /// Wait after the first failed attempt; doubled after each further one, up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Attempts before an event is given up (status `failed`).
    pub attempts_max: u64,
    /// An event older than this is given up unsent (a long outage must not replay stale alerts).
    pub max_age_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_url: None,
            webhook_secret: None,
            deliver_interval_ms: 1_000,
            timeout_ms: 10_000,
            retry_base_ms: 1_000,
            retry_max_ms: 3_600_000,
            attempts_max: 12,
            max_age_ms: 86_400_000,
        }
    }
}

/// What the gateway does when a store fails (README "Failure modes").
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DegradationConfig {
    /// The hot store (Redis) unreachable: `refuse` (default; 503 `billing_unavailable`, never
    /// serve unbilled) or `charge_ledger` (authorize, settle and void in PostgreSQL until Redis
    /// is back and resynchronised; services mode only).
    pub hot_store_down: HotStoreDown,
}

/// See [`GatewayConfig::billing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Billing {
    #[default]
    On,
    /// Forward without holds, charges or usage rows: the benchmark suite's baseline.
    Off,
}

/// See [`DegradationConfig::hot_store_down`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotStoreDown {
    #[default]
    Refuse,
    ChargeLedger,
}

/// Shortest webhook secret accepted.
const WEBHOOK_SECRET_CHARS_MIN: usize = 16;
/// Shortest admin token accepted: guessing it must stay hopeless (32 random characters).
pub const ADMIN_TOKEN_CHARS_MIN: usize = 32;

/// The wire protocol an upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI, OpenRouter, vLLM, Ollama, DeepSeek, … (`/chat/completions` under `base_url`).
    Openai,
    /// Anthropic (`/messages` under `base_url`).
    Anthropic,
    /// Google AI Studio's Gemini API (`/models/{model}:generateContent` under `base_url`, e.g.
    /// `https://generativelanguage.googleapis.com/v1beta`); the key goes in `x-goog-api-key`.
    Gemini,
    /// Vertex AI's Gemini API (the same paths under a base URL such as
    /// `https://us-central1-aiplatform.googleapis.com/v1/projects/PROJECT/locations/us-central1/publishers/google`);
    /// the key variable holds an access token, sent as `Authorization: Bearer`.
    Vertex,
    /// The built-in mock upstream (`tollgate mock-upstream`), which speaks every protocol.
    Mock,
}

/// What `serve` does when a routed model has no price for a tier in use (see
/// [`crate::pricing`]). Requests for such a model are refused either way (`price_not_configured`,
/// I5); this decides whether the gap is found at start-up or by the first customer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PricingCheck {
    /// Log each missing (model, tier) as a warning and start.
    #[default]
    Warn,
    /// Refuse to start, naming each missing (model, tier).
    Refuse,
}

impl std::str::FromStr for PricingCheck {
    type Err = String;

    /// `warn` or `refuse`, as in the file (for `TOLLGATE_PRICING_CHECK`).
    fn from_str(text: &str) -> Result<PricingCheck, String> {
        match text {
            "warn" => Ok(PricingCheck::Warn),
            "refuse" => Ok(PricingCheck::Refuse),
            other => Err(format!("pricing_check must be \"warn\" or \"refuse\", not {other:?}")),
        }
    }
}

/// An upstream provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The name prices and usage rows use (e.g. `openai`, `mock`).
    pub name: String,
    pub kind: ProviderKind,
    /// Including the version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The environment variable holding the upstream API key (never the key itself).
    pub api_key_env: Option<String>,
    /// OpenAI protocol: the field that carries the output cap the gateway adds to a request
    /// without one (I7), `max_tokens` or `max_completion_tokens`. Default: `max_completion_tokens`
    /// for `api.openai.com` (its reasoning models refuse `max_tokens`), `max_tokens` elsewhere
    /// (what OpenAI-compatible servers read).
    #[serde(default)]
    pub output_cap_field: Option<OutputCapField>,
    /// Files a client names in the provider account (OpenAI and Anthropic `file_id`, Gemini
    /// `gs://` and Files API URIs): `refuse` (default) or `allow`. See [`ClientFileReferences`].
    #[serde(default)]
    pub client_file_references: ClientFileReferences,
    /// URLs in a client's media parts, which the upstream fetches: `public_only` (default),
    /// `allow` or `refuse`. See [`ClientUrls`].
    #[serde(default)]
    pub client_urls: ClientUrls,
}

/// Whether a client may name files in the operator's provider account. Tollgate does not pass
/// the providers' file APIs through, so no client put a file there through it: an id or a
/// `gs://` URI a client sends names the operator's own files (batch and fine-tuning data, any
/// bucket the project's account reads — names that can be guessed) or another customer's.
/// Refused by default; `allow` for an operator who shares files with its clients on purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientFileReferences {
    #[default]
    Refuse,
    Allow,
}

/// Which URLs a client may have the upstream fetch (`image_url`, an Anthropic `url` source, a
/// Gemini `fileUri`): a self-hosted server fetches them from the operator's network, next to
/// its metadata service and databases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientUrls {
    /// http(s) URLs whose host is not an address of this machine or of a private network (as
    /// written, IPv4 in any form a URL parser accepts, IPv6, IPv4-mapped IPv6), nor
    /// `localhost`, a single-label name or a local-only domain (`.internal`, `.local`, …). A
    /// name that resolves to a private address cannot be judged without DNS: the operator's
    /// egress policy must cover that.
    #[default]
    PublicOnly,
    Allow,
    Refuse,
}

/// The configuration's name for [`tollgate_protocol::OpenAiCapField`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputCapField {
    MaxTokens,
    MaxCompletionTokens,
}

impl ProviderConfig {
    /// The output cap field this provider's OpenAI-protocol requests get (see the field).
    pub fn openai_cap_field(&self) -> tollgate_protocol::OpenAiCapField {
        use tollgate_protocol::OpenAiCapField;
        match self.output_cap_field {
            Some(OutputCapField::MaxTokens) => OpenAiCapField::MaxTokens,
            Some(OutputCapField::MaxCompletionTokens) => OpenAiCapField::MaxCompletionTokens,
            None if self.base_url.contains("://api.openai.com") => OpenAiCapField::MaxCompletionTokens,
            None => OpenAiCapField::MaxTokens,
        }
    }
}

/// A model clients may ask for, and where it goes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRoute {
    /// The name clients use.
    pub model: String,
    /// A `ProviderConfig::name`: the provider the model's prices name (the customer pays them
    /// whichever channel serves), and its only channel when `channels` is empty.
    pub provider: String,
    /// The name the upstream knows it by; default the same.
    pub upstream_model: Option<String>,
    /// The upstream channels that serve the model (see [`crate::routing`]); none: one channel,
    /// `provider` with `upstream_model`.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    /// Whether two requests of one session may run at once ([`crate::routing::session_lock`]).
    #[serde(default)]
    pub session_lock: SessionLockMode,
}

/// The session lock of a model's requests (a key may set its own over it).
pub use tollgate_store::model::SessionLockMode;

/// One upstream channel of a model: a provider (speaking the model's protocol), the name it
/// knows the model by, where it stands in the order of trial, and its own limit.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Unique within the model (1 to 64 of `A-Z a-z 0-9 - _ . :`); default the provider's name,
    /// so two channels on one provider must be named.
    pub name: Option<String>,
    /// A `ProviderConfig::name` of the same kind as the model's provider.
    pub provider: String,
    /// Default: the model's `upstream_model`, else its name.
    pub upstream_model: Option<String>,
    /// Channels of the highest priority are tried first; lower ones when those are open,
    /// disabled or already tried in the request. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Share of the requests among channels of one priority. Default 1; at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Requests this gateway sends the channel at once; past it the channel is skipped (as if
    /// open) until one ends. Default: no limit.
    pub concurrent_requests_max: Option<u32>,
    /// Requests a minute the upstream allows the channel's credentials: past it, over the last
    /// 60 s and across the gateways of a deployment, the channel is skipped until the minute
    /// has room ([`crate::routing::rate`]). Default: no limit.
    pub requests_per_minute_max: Option<u32>,
    /// Tokens a minute (input, cached, cache writes and output, counted when a request's usage
    /// is known), kept as `requests_per_minute_max` is. Default: no limit.
    pub tokens_per_minute_max: Option<u64>,
    /// Configured but not used until enabled through `/internal/channels`.
    #[serde(default)]
    pub disabled: bool,
}

fn default_weight() -> u32 {
    1
}

/// Failover, circuit breakers and affinity (see [`crate::routing`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Attempts per request, on distinct channels, before its error is the client's.
    pub attempts_max: u32,
    /// Longest one attempt may wait for its upstream's first byte (response head, and a
    /// stream's first event) before the next channel is tried. Unset: the request's whole
    /// `limits.upstream_timeout_ms`, which bounds all its attempts together either way.
    pub attempt_first_byte_timeout_ms: Option<u64>,
    /// Longest a `Retry-After` from an upstream keeps its channel out of selection.
    pub retry_after_ms_max: u64,
    /// Consecutive failures of a channel (for a model), within `breaker_window_ms`, that open
    /// its breaker.
    pub breaker_failures: u32,
    pub breaker_window_ms: u64,
    /// How long an open breaker keeps its channel out before one request probes it.
    pub breaker_open_ms: u64,
    /// Services mode: how often each gateway reads the breakers the others changed.
    pub breaker_sync_ms: u64,
    /// How long a session stays pinned to the channel that last served it (routing affinity;
    /// renewed by each success). 0: no affinity.
    pub affinity_ttl_ms: u64,
    /// How long a session lock lasts unless its request renews it (a third of it apart); a
    /// gateway that dies holding one leaves it this long.
    pub session_lock_ttl_ms: u64,
    /// Longest a request of a model with `session_lock = "wait"` waits for its session's lock.
    pub session_lock_wait_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            attempts_max: 3,
            attempt_first_byte_timeout_ms: None,
            retry_after_ms_max: 60_000,
            breaker_failures: 5,
            breaker_window_ms: 30_000,
            breaker_open_ms: 30_000,
            breaker_sync_ms: 500,
            affinity_ttl_ms: 3_600_000,
            session_lock_ttl_ms: 30_000,
            session_lock_wait_ms: 10_000,
        }
    }
}

/// The gateway's configuration. Its `Debug` leaves the admin token out, and the password of
/// each store URL (see [`redact_url_password`]).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: String,
    /// When set, the operator API (`/internal`) and `/metrics` are served on this address
    /// only, and not on `listen`: operators keep them off the network clients reach.
    pub internal_listen: Option<String>,
    /// Bearer token of the operator API; without it `/internal` answers 401 to everyone.
    pub admin_token: Option<String>,
    /// `sqlite://PATH` (default `sqlite://tollgate.db`) or, with the production backends,
    /// `postgres://…`.
    pub database_url: String,
    /// Absent: embedded hot store. `redis://host:port` or `redis+cluster://host:port,host:port,…`.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several deployments may share one Redis).
    pub redis_prefix: String,
    /// Usage stream shards (and hash tags); every gateway and worker of a deployment must agree.
    pub redis_shards: u16,
    /// This process's consumer name in the workers' group; keep it stable across restarts and
    /// unique per instance, so a restarted worker finds the batch it did not acknowledge.
    pub worker_name: String,
    /// Run the usage writer and periodic jobs in this process (`serve --no-worker` turns it off
    /// when `tollgate worker` processes do it; embedded mode always runs them).
    pub run_worker: bool,
    /// At start-up, a routed model without a price for a tier in use: `warn` (default) or
    /// `refuse` to start.
    pub pricing_check: PricingCheck,
    /// `on` (default). `off` forwards requests without holding, charging or recording them —
    /// only for measuring what billing costs (`scripts/bench`); embedded mode only, and every
    /// start says so in a warning.
    pub billing: Billing,
    pub limits: LimitsConfig,
    pub jobs: JobsConfig,
    pub alerts: AlertsConfig,
    pub degradation: DegradationConfig,
    pub routing: RoutingConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelRoute>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            internal_listen: None,
            admin_token: None,
            database_url: "sqlite://tollgate.db".into(),
            redis_url: None,
            redis_prefix: "tg".into(),
            redis_shards: 16,
            worker_name: format!("worker-{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into())),
            run_worker: true,
            pricing_check: PricingCheck::Warn,
            billing: Billing::On,
            limits: LimitsConfig::default(),
            jobs: JobsConfig::default(),
            alerts: AlertsConfig::default(),
            degradation: DegradationConfig::default(),
            routing: RoutingConfig::default(),
            providers: Vec::new(),
            models: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// Checks what serde cannot: routes name known providers, names are unique, limits positive.
    ///
    /// # Errors
    /// A message naming the offending entry.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(token) = self.admin_token.as_deref().filter(|token| !token.is_empty())
            && token.chars().count() < ADMIN_TOKEN_CHARS_MIN
        {
            return Err(format!("admin_token (TOLLGATE_ADMIN_TOKEN) must be at least {ADMIN_TOKEN_CHARS_MIN} characters; it has {}: generate one, e.g. `openssl rand -hex 32`", token.chars().count()));
        }
        if self.billing == Billing::Off && self.redis_url.is_some() {
            return Err("billing = \"off\" is for benchmarks of embedded mode only; remove redis_url or billing".into());
        }
        let mut provider_names = std::collections::HashSet::new();
        for provider in &self.providers {
            if !provider_names.insert(provider.name.as_str()) {
                return Err(format!("provider {} is configured twice", provider.name));
            }
            if !(provider.base_url.starts_with("http://") || provider.base_url.starts_with("https://")) {
                return Err(format!("provider {}: base_url must start with http:// or https://", provider.name));
            }
        }
        let mut model_names = std::collections::HashSet::new();
        for route in &self.models {
            if !provider_names.contains(route.provider.as_str()) {
                return Err(format!("model {} routes to unknown provider {}", route.model, route.provider));
            }
            if !model_names.insert(route.model.as_str()) {
                return Err(format!("model {} is routed twice", route.model));
            }
            self.validate_channels(route)?;
        }
        let routing = &self.routing;
        if routing.attempts_max == 0 || routing.breaker_failures == 0 || routing.breaker_window_ms == 0 || routing.breaker_open_ms == 0 || routing.breaker_sync_ms == 0 {
            return Err("routing.attempts_max, breaker_failures, breaker_window_ms, breaker_open_ms and breaker_sync_ms must be positive".into());
        }
        if routing.session_lock_ttl_ms < 3 {
            return Err("routing.session_lock_ttl_ms must be at least 3 (it is renewed a third of it apart)".into());
        }
        if routing.attempt_first_byte_timeout_ms == Some(0) {
            return Err("routing.attempt_first_byte_timeout_ms must be positive when set".into());
        }
        let limits = &self.limits;
        let positive = [
            ("request_body_bytes_max", limits.request_body_bytes_max as u64),
            ("header_bytes_max", limits.header_bytes_max as u64),
            ("request_body_timeout_ms", limits.request_body_timeout_ms),
            ("header_read_timeout_ms", limits.header_read_timeout_ms),
            ("connections_max", limits.connections_max as u64),
            ("shutdown_drain_ms", limits.shutdown_drain_ms),
            ("upstream_timeout_ms", limits.upstream_timeout_ms),
            ("upstream_response_bytes_max", limits.upstream_response_bytes_max as u64),
            ("stream_idle_timeout_ms", limits.stream_idle_timeout_ms),
            ("stream_duration_ms_max", limits.stream_duration_ms_max),
            ("hold_ttl_ms", limits.hold_ttl_ms),
            ("usage_batch_events_max", limits.usage_batch_events_max as u64),
            ("usage_log_events_max", limits.usage_log_events_max as u64),
            ("hold_sweep_interval_ms", limits.hold_sweep_interval_ms),
            ("settle_timeout_ms", limits.settle_timeout_ms),
            ("ledger_lookup_timeout_ms", limits.ledger_lookup_timeout_ms),
            ("context_lookup_timeout_ms", limits.context_lookup_timeout_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("limits.{name} must be positive"));
        }
        if self.jobs.prune_interval_ms > 0 && self.jobs.prune_batch_rows == 0 {
            return Err("jobs.prune_batch_rows must be positive while the prune job runs".into());
        }
        if !(1..=24).contains(&self.jobs.partitions_ahead_months) {
            return Err("jobs.partitions_ahead_months must be between 1 and 24".into());
        }
        let alerts = &self.alerts;
        if let Some(url) = &alerts.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err("alerts.webhook_url must start with http:// or https://".into());
            }
            if alerts.webhook_secret.as_deref().is_none_or(|secret| secret.chars().count() < WEBHOOK_SECRET_CHARS_MIN) {
                return Err(format!("alerts.webhook_secret of at least {WEBHOOK_SECRET_CHARS_MIN} characters is required with alerts.webhook_url: webhooks are always signed"));
            }
            let positive = [("deliver_interval_ms", alerts.deliver_interval_ms), ("timeout_ms", alerts.timeout_ms), ("retry_base_ms", alerts.retry_base_ms), ("attempts_max", alerts.attempts_max)];
            if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
                return Err(format!("alerts.{name} must be positive"));
            }
        }
        if self.degradation.hot_store_down == HotStoreDown::ChargeLedger
            && (self.redis_url.is_none() || !(self.database_url.starts_with("postgres://") || self.database_url.starts_with("postgresql://")))
        {
            return Err("degradation.hot_store_down = \"charge_ledger\" needs the production backends: redis_url and a postgres:// database_url".into());
        }
        if limits.usage_batch_linger_ms > USAGE_BATCH_LINGER_MS_MAX {
            return Err(format!("limits.usage_batch_linger_ms must be at most {USAGE_BATCH_LINGER_MS_MAX}: the ledger would lag the hot store by that much"));
        }
        // A hold must outlive the longest request: its answer (upstream_timeout_ms) or stream
        // (stream_duration_ms_max, which also bounds a client that stops reading), then its
        // settle; else it expires under a live request, whose funds, request slot and id are
        // then spent again.
        let request_ms_max = limits.upstream_timeout_ms.max(limits.stream_duration_ms_max).saturating_add(limits.settle_timeout_ms).saturating_add(HOLD_MARGIN_MS);
        if limits.hold_ttl_ms < request_ms_max {
            return Err(format!(
                "limits.hold_ttl_ms must be at least max(upstream_timeout_ms, stream_duration_ms_max) + settle_timeout_ms + {HOLD_MARGIN_MS} = {request_ms_max}, or a hold could expire under a live request"
            ));
        }
        // A second settle of one request id comes within this of the first; the hot store
        // remembers a charge that long (tollgate_store::hot::RECENT_CHARGE_MS says why).
        let second_settle_ms = limits.hold_ttl_ms.saturating_add(limits.settle_timeout_ms);
        if limits.recent_charge_ms <= second_settle_ms {
            return Err(format!(
                "limits.recent_charge_ms ({}) must exceed limits.hold_ttl_ms + limits.settle_timeout_ms = {second_settle_ms}: a second settle of one request id can come that late, and the hot store must still know the first",
                limits.recent_charge_ms
            ));
        }
        if limits.recent_charge_ms > RECENT_CHARGE_MS_MAX {
            return Err(format!("limits.recent_charge_ms must be at most {RECENT_CHARGE_MS_MAX} (7 days)"));
        }
        Ok(())
    }
}

impl GatewayConfig {
    fn validate_channels(&self, route: &ModelRoute) -> Result<(), String> {
        let kind_of = |name: &str| self.providers.iter().find(|provider| provider.name == name).map(|provider| provider.kind);
        let mut names = std::collections::HashSet::new();
        for channel in &route.channels {
            let model = &route.model;
            let Some(kind) = kind_of(&channel.provider) else {
                return Err(format!("model {model}: channel routes to unknown provider {}", channel.provider));
            };
            if Some(kind) != kind_of(&route.provider) {
                return Err(format!("model {model}: channel on provider {} speaks another protocol than the model's provider {}", channel.provider, route.provider));
            }
            let name = channel.name.as_deref().unwrap_or(&channel.provider);
            check_channel(name, channel.upstream_model.as_deref(), channel.weight, channel.limits())
                .map_err(|error| format!("model {model}: channel {name:?}: {error}"))?;
            if !names.insert(name) {
                return Err(format!("model {model}: two channels are named {name}: name them (channels.name)"));
            }
        }
        Ok(())
    }
}

impl ChannelConfig {
    pub fn limits(&self) -> ChannelLimits {
        ChannelLimits {
            concurrent_requests_max: self.concurrent_requests_max,
            requests_per_minute_max: self.requests_per_minute_max,
            tokens_per_minute_max: self.tokens_per_minute_max,
        }
    }
}

/// A channel's own limits (`None`: none), wherever the channel comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelLimits {
    pub concurrent_requests_max: Option<u32>,
    pub requests_per_minute_max: Option<u32>,
    pub tokens_per_minute_max: Option<u64>,
}

impl ChannelLimits {
    pub fn rates(&self) -> crate::routing::rate::RateLimits {
        crate::routing::rate::RateLimits { requests_per_minute: self.requests_per_minute_max.map(u64::from), tokens_per_minute: self.tokens_per_minute_max }
    }
}

/// Most tokens a minute a channel's limit may name (far past any upstream's; the ledger keeps
/// it in a signed 64-bit column).
pub const TOKENS_PER_MINUTE_MAX: u64 = 1_000_000_000_000;

/// Longest upstream model name a channel may give.
pub const UPSTREAM_MODEL_CHARS_MAX: usize = 256;

/// The checks a channel's own fields pass wherever it comes from, the configuration or an
/// operator's call: its name (1 to 64 of `A-Z a-z 0-9 - _ . :`, since it appears in URLs and
/// metric labels), its upstream model name, its weight and its limits.
///
/// # Errors
/// What is wrong, for the operator.
pub fn check_channel(name: &str, upstream_model: Option<&str>, weight: u32, limits: ChannelLimits) -> Result<(), String> {
    let name_valid = !name.is_empty() && name.len() <= 64 && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_.:".contains(&byte));
    if !name_valid {
        return Err("name must be 1 to 64 of A-Z a-z 0-9 - _ . :".into());
    }
    if upstream_model.is_some_and(|upstream| upstream.is_empty() || upstream.chars().count() > UPSTREAM_MODEL_CHARS_MAX) {
        return Err(format!("upstream_model must be 1 to {UPSTREAM_MODEL_CHARS_MAX} characters"));
    }
    if weight == 0 {
        return Err("weight must be at least 1".into());
    }
    if limits.concurrent_requests_max == Some(0) {
        return Err("concurrent_requests_max must be positive".into());
    }
    if limits.requests_per_minute_max == Some(0) {
        return Err("requests_per_minute_max must be positive".into());
    }
    if limits.tokens_per_minute_max.is_some_and(|max| max == 0 || max > TOKENS_PER_MINUTE_MAX) {
        return Err(format!("tokens_per_minute_max must be 1 to {TOKENS_PER_MINUTE_MAX}"));
    }
    Ok(())
}

/// What `Debug` prints instead of a secret.
const REDACTED: &str = "[redacted]";

/// The URL with the password of its user part, and a `password=` query value, replaced by
/// `***`: for logs and messages (`postgres://user:***@host/db`).
pub fn redact_url_password(url: &str) -> String {
    let mut redacted = url.to_string();
    if let Some(scheme_end) = url.find("://") {
        let authority_start = scheme_end + 3;
        let authority_len = url[authority_start..].find(['/', '?', '#']).unwrap_or(url.len() - authority_start);
        let authority = &url[authority_start..authority_start + authority_len];
        if let Some(user_end) = authority.rfind('@')
            && let Some(colon) = authority[..user_end].find(':')
        {
            redacted = format!("{}***{}", &url[..authority_start + colon + 1], &url[authority_start + user_end..]);
        }
    }
    if let Some(query_start) = redacted.find('?') {
        let (base, query) = redacted.split_at(query_start + 1);
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        redacted = format!("{base}{}", pairs.join("&"));
    }
    redacted
}

impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let AlertsConfig { webhook_url, webhook_secret, deliver_interval_ms, timeout_ms, retry_base_ms, retry_max_ms, attempts_max, max_age_ms } = self;
        formatter
            .debug_struct("AlertsConfig")
            .field("webhook_url", &webhook_url.as_ref().map(|_| REDACTED))
            .field("webhook_secret", &webhook_secret.as_ref().map(|_| REDACTED))
            .field("deliver_interval_ms", deliver_interval_ms)
            .field("timeout_ms", timeout_ms)
            .field("retry_base_ms", retry_base_ms)
            .field("retry_max_ms", retry_max_ms)
            .field("attempts_max", attempts_max)
            .field("max_age_ms", max_age_ms)
            .finish()
    }
}

impl std::fmt::Debug for GatewayConfig {
    /// Every field, by destructuring: a field added later must be placed here, redacted or not.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let GatewayConfig {
            listen,
            internal_listen,
            admin_token,
            database_url,
            redis_url,
            redis_prefix,
            redis_shards,
            worker_name,
            run_worker,
            pricing_check,
            billing,
            limits,
            jobs,
            alerts,
            degradation,
            routing,
            providers,
            models,
        } = self;
        formatter
            .debug_struct("GatewayConfig")
            .field("listen", listen)
            .field("internal_listen", internal_listen)
            .field("admin_token", &admin_token.as_ref().map(|_| REDACTED))
            .field("database_url", &redact_url_password(database_url))
            .field("redis_url", &redis_url.as_deref().map(redact_url_password))
            .field("redis_prefix", redis_prefix)
            .field("redis_shards", redis_shards)
            .field("worker_name", worker_name)
            .field("run_worker", run_worker)
            .field("pricing_check", pricing_check)
            .field("billing", billing)
            .field("limits", limits)
            .field("jobs", jobs)
            .field("alerts", alerts)
            .field("degradation", degradation)
            .field("routing", routing)
            .field("providers", providers)
            .field("models", models)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 4: a configuration printed with `{:?}` (a log line, a panic) shows no
    /// secret.
    #[test]
    fn debug_shows_no_token_secret_or_password() {
        let mut config = GatewayConfig {
            admin_token: Some("admin-token-0123456789-abcdefghijkl".into()),
            database_url: "postgres://tollgate:pg-pass-42@db.internal:5432/tollgate".into(),
            redis_url: Some("redis://:redis-pass-42@cache.internal:6379".into()),
            ..GatewayConfig::default()
        };
        config.alerts.webhook_url = Some("https://hooks.example.com/services/hook-token-42".into());
        config.alerts.webhook_secret = Some("webhook-secret-0123456789".into());
        let printed = format!("{config:?}");
        for secret in ["admin-token-0123456789", "pg-pass-42", "redis-pass-42", "hook-token-42", "webhook-secret-0123456789"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("postgres://tollgate:***@db.internal:5432/tollgate"), "{printed}");
        assert!(printed.contains("redis://:***@cache.internal:6379"), "{printed}");
        assert!(printed.contains("listen: \"127.0.0.1:8080\""), "the rest is shown: {printed}");
    }

    #[test]
    fn a_url_keeps_everything_but_its_password() {
        assert_eq!(redact_url_password("postgres://user:secret@host:5432/db?sslmode=require"), "postgres://user:***@host:5432/db?sslmode=require");
        assert_eq!(redact_url_password("postgresql://user:p%40ss@host/db"), "postgresql://user:***@host/db");
        assert_eq!(redact_url_password("postgres://host/db?user=u&password=secret&x=1"), "postgres://host/db?user=u&password=***&x=1");
        assert_eq!(redact_url_password("redis+cluster://:secret@h1:7000,h2:7001"), "redis+cluster://:***@h1:7000,h2:7001");
        assert_eq!(redact_url_password("postgres://user@host/db"), "postgres://user@host/db");
        assert_eq!(redact_url_password("sqlite://tollgate.db"), "sqlite://tollgate.db");
        assert_eq!(redact_url_password("sqlite:///var/lib/a@b/ledger.db"), "sqlite:///var/lib/a@b/ledger.db");
    }

    /// Issue 21 item 7: a short admin token is refused, naming the variable.
    #[test]
    fn an_admin_token_shorter_than_32_characters_is_refused() {
        let mut config = GatewayConfig { admin_token: Some("0123456789".into()), ..GatewayConfig::default() };
        assert!(config.validate().is_err_and(|error| error.contains("TOLLGATE_ADMIN_TOKEN") && error.contains("32")));
        config.admin_token = Some("x".repeat(ADMIN_TOKEN_CHARS_MIN - 1));
        assert!(config.validate().is_err());
        config.admin_token = Some("x".repeat(ADMIN_TOKEN_CHARS_MIN));
        assert_eq!(config.validate(), Ok(()));
        config.admin_token = None;
        assert_eq!(config.validate(), Ok(()), "no token: no operator API, nothing to guess");
    }

    #[test]
    fn billing_off_is_accepted_only_in_embedded_mode() {
        let parse = |text: &str| toml::from_str::<GatewayConfig>(text).map_err(|error| error.to_string());
        let embedded = parse("billing = \"off\"").unwrap_or_default();
        assert_eq!(embedded.billing, Billing::Off);
        assert_eq!(embedded.validate(), Ok(()));
        let services = parse("billing = \"off\"\nredis_url = \"redis://127.0.0.1:6379\"").unwrap_or_default();
        assert!(services.validate().is_err_and(|error| error.contains("embedded mode only")));
        assert_eq!(GatewayConfig::default().billing, Billing::On);
        assert!(parse("billing = \"maybe\"").is_err());
    }

    #[test]
    fn holds_must_end_before_the_hot_store_forgets_a_charge() {
        let mut config = GatewayConfig::default();
        assert_eq!(config.validate(), Ok(()));
        // 15 min holds + 30 s settles < 20 min remembered.
        config.limits.hold_ttl_ms = 1_169_999;
        assert_eq!(config.validate(), Ok(()));
        config.limits.hold_ttl_ms = 1_170_000;
        assert!(config.validate().is_err_and(|error| error.contains("limits.recent_charge_ms (1200000) must exceed limits.hold_ttl_ms + limits.settle_timeout_ms = 1200000")));
        config.limits.recent_charge_ms = 3_600_000;
        assert_eq!(config.validate(), Ok(()), "remembering longer lets holds live longer");
        config.limits.recent_charge_ms = 8 * 24 * 3_600_000;
        assert!(config.validate().is_err_and(|error| error.contains("at most 604800000")));
        let parsed = toml::from_str::<GatewayConfig>("[limits]\nrecent_charge_ms = 1800000").map(|parsed| parsed.limits.recent_charge_ms);
        assert_eq!(parsed, Ok(1_800_000));
    }

    /// Issue 19 item 10: the hold outlives a non-streaming request as well as a stream, each
    /// with its settle (only the stream's duration was checked).
    #[test]
    fn a_hold_outlives_the_longest_request_and_its_settle() {
        let mut config = GatewayConfig::default();
        config.limits.stream_duration_ms_max = 60_000;
        config.limits.upstream_timeout_ms = 120_000;
        config.limits.settle_timeout_ms = 30_000;
        config.limits.hold_ttl_ms = 151_000;
        assert_eq!(config.validate(), Ok(()));
        config.limits.hold_ttl_ms = 150_999;
        assert!(config.validate().is_err_and(|error| error.contains("151000")), "upstream_timeout_ms + settle_timeout_ms");
        config.limits.hold_ttl_ms = 900_000;
        config.limits.stream_duration_ms_max = 870_000;
        assert!(config.validate().is_err_and(|error| error.contains("901000")), "stream_duration_ms_max + settle_timeout_ms");
    }

    #[test]
    fn connections_are_bounded_and_timed() {
        for set in [|limits: &mut LimitsConfig| limits.header_read_timeout_ms = 0, |limits: &mut LimitsConfig| limits.connections_max = 0] {
            let mut config = GatewayConfig::default();
            set(&mut config.limits);
            assert!(config.validate().is_err_and(|error| error.contains("must be positive")));
        }
        let mut config = GatewayConfig::default();
        config.limits.connections_per_address_max = 0;
        assert_eq!(config.validate(), Ok(()), "no per-address bound is the default");
    }

    #[test]
    fn partitions_are_made_one_to_24_months_ahead() {
        let mut config = GatewayConfig::default();
        assert_eq!((config.jobs.partitions_ahead_months, config.validate()), (3, Ok(())));
        for (months, valid) in [(0, false), (1, true), (24, true), (25, false)] {
            config.jobs.partitions_ahead_months = months;
            assert_eq!(config.validate().is_ok(), valid, "{months} months ahead");
        }
    }

    #[test]
    fn the_writer_lingers_half_a_second_at_most() {
        let mut config = GatewayConfig::default();
        config.limits.usage_batch_linger_ms = 500;
        assert_eq!(config.validate(), Ok(()));
        config.limits.usage_batch_linger_ms = 501;
        assert!(config.validate().is_err_and(|error| error.contains("usage_batch_linger_ms")));
    }
}
