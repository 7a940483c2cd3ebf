//! Running the gateway: build the stores, start the worker tasks, serve, shut down in order.
//!
//! Shutdown phases (one cancellation token starts them):
//! 1. stop accepting connections; in-flight handlers finish (graceful shutdown, [`crate::listener`]);
//! 2. wait, bounded, for forward/stream tasks — each ends by settling or voiding its hold;
//! 3. stop the hold sweeper and the usage writer, which commits the batch it holds first.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::clock::{Clock, system_clock};
use tollgate_store::memory::MemoryHotStore;
use tollgate_store::unbilled::UnbilledHotStore;
use tollgate_store::ledger_charging::LedgerCharging;
use tollgate_store::queue::channel_log;
use tollgate_store::redis_store::{CountsOfMinutes, RedisHotStore, RedisLog, RedisLogConfig, VersionedValues};
use tollgate_store::postgres::PgLedger;
use tollgate_store::sqlite::SqliteLedger;
use tollgate_store::{HotStore, Ledger};
use tollgate_worker::usage_writer::{UsageWriterConfig, run_usage_writer};

use crate::config::{Billing, GatewayConfig, HotStoreDown, PricingCheck};
use crate::fallback::LedgerFallback;
use crate::jobs::JobStores;
use crate::state::AppState;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Store(#[from] tollgate_store::StoreError),
    #[error("listening on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
}

/// A running gateway's parts, for the binary and for tests that start one in-process.
pub struct Gateway {
    pub state: AppState,
    /// Stops the worker tasks (after the server's own tasks are done).
    worker_shutdown: CancellationToken,
    worker_tasks: TaskTracker,
}

impl Gateway {
    /// Opens the stores and starts the in-process worker tasks: embedded (in-process hot store,
    /// always with its worker) or services (Redis hot store; worker unless `run_worker` is off).
    /// Time is the system's (Redis: the server's `TIME`).
    ///
    /// # Errors
    /// Bad configuration or a store that cannot be opened.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, ServerError> {
        Gateway::start_on_clock(config, None).await
    }

    /// [`Gateway::start`] on a clock of the caller's: the gateway dates its charges by it and
    /// its hot store counts periods and expires holds by it, in-process or Redis alike. For
    /// tests that put requests on both sides of a day's or a month's end; a deployment has no
    /// way to set it (it is not configuration). The ledger still dates what it writes itself
    /// (fund transactions, job runs) and what it charges while Redis is down
    /// (`hot_store_down = "charge_ledger"`) by the system clock, and a key's `expires_at` is
    /// judged by it.
    ///
    /// # Errors
    /// As [`Gateway::start`].
    pub async fn start_with_clock(config: GatewayConfig, clock: Clock) -> Result<Gateway, ServerError> {
        Gateway::start_on_clock(config, Some(clock)).await
    }

    async fn start_on_clock(config: GatewayConfig, clock: Option<Clock>) -> Result<Gateway, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        // The recorder before anything records: what the worker and the jobs register as they
        // start would otherwise go nowhere.
        crate::metrics::handle();
        let wait = Duration::from_millis(config.limits.startup_wait_ms);
        let (ledger, postgres_pool) = until_available("the ledger", wait, || open_ledger(&config.database_url)).await?;
        let worker_shutdown = CancellationToken::new();
        let worker_tasks = TaskTracker::new();
        let mut redis_parts = None;
        let hot: Arc<dyn HotStore> = match &config.redis_url {
            None if config.billing == Billing::Off => {
                tracing::warn!("billing is OFF: requests are forwarded without holds, charges or usage rows (benchmarks only)");
                Arc::new(UnbilledHotStore)
            }
            None => {
                let (log_sender, log) = channel_log(config.limits.usage_log_events_max);
                worker_tasks.spawn(run_usage_writer(log, Arc::clone(&ledger), writer_config(&config), worker_shutdown.clone()));
                Arc::new(MemoryHotStore::new(log_sender, clock.clone().unwrap_or_else(system_clock)).remembering_charges_for(recent_charge_ms(&config)))
            }
            Some(url) => {
                let mut redis = connect_redis(url, &config).await?;
                if let Some(clock) = &clock {
                    redis = redis.with_clock(Arc::clone(clock));
                }
                if config.run_worker {
                    let log = until_available("redis", wait, || redis_log(&redis, &config, worker_shutdown.clone())).await?;
                    worker_tasks.spawn(run_usage_writer(log, Arc::clone(&ledger), writer_config(&config), worker_shutdown.clone()));
                }
                redis_parts = Some((redis.connection(), redis.keys().clone()));
                match (&postgres_pool, config.degradation.hot_store_down) {
                    (Some(pool), HotStoreDown::ChargeLedger) => {
                        let fallback = Arc::new(LedgerFallback::new(Arc::new(redis), LedgerCharging::new(pool.clone())));
                        // Accounts left stale by an earlier outage are unloaded before serving.
                        if let Err(error) = fallback.resync_step().await {
                            tracing::warn!(%error, "resynchronising at start failed; the resync task retries");
                        }
                        worker_tasks.spawn(crate::fallback::run_resync(Arc::clone(&fallback), worker_shutdown.clone()));
                        fallback
                    }
                    _ => Arc::new(redis),
                }
            }
        };
        // Services mode: the gateways keep their channels' breakers and rate counts together in Redis.
        let shared_channels = redis_parts
            .as_ref()
            .map(|(connection, _)| crate::routing::SharedChannels {
                breakers: VersionedValues::new(connection.clone(), &config.redis_prefix),
                counts: CountsOfMinutes::new(connection.clone(), &config.redis_prefix),
            });
        if config.run_worker || config.redis_url.is_none() {
            let stores = JobStores { ledger: Arc::clone(&ledger), hot: Arc::clone(&hot), redis: redis_parts, clock: clock.clone().unwrap_or_else(system_clock) };
            crate::jobs::spawn(&worker_tasks, &stores, &config, &worker_shutdown);
        }
        let breaker_sync = Duration::from_millis(config.routing.breaker_sync_ms);
        let state = AppState::new(config, hot, ledger, TaskTracker::new(), CancellationToken::new(), clock.unwrap_or_else(system_clock), shared_channels)
            .await
            .map_err(ServerError::Config)?;
        let routed = state.clone();
        let clocked = state.clone();
        worker_tasks.spawn(crate::routing::run_channel_sync(move || routed.upstreams.channels(), move || clocked.now_ms(), breaker_sync, worker_shutdown.clone()));
        worker_tasks.spawn(crate::charge::run_fund_retries(state.clone(), worker_shutdown.clone()));
        if let Some(pool) = postgres_pool {
            worker_tasks.spawn(crate::notifications::run_listener(state.clone(), pool, worker_shutdown.clone()));
        }
        Ok(Gateway { state, worker_shutdown, worker_tasks })
    }

    /// The start-up price check (`pricing_check`): every routed model priced for every tier in
    /// use ([`crate::pricing::missing_prices`]). `tollgate serve` runs it after anything that
    /// seeds prices (the demo) and before serving; each gap is logged as a warning, or, with
    /// `pricing_check = "refuse"`, returned as the reason not to start.
    ///
    /// # Errors
    /// `Config` naming every gap under `refuse`; `Store` when the ledger cannot be read.
    pub async fn check_prices(&self) -> Result<Vec<crate::pricing::MissingPrice>, ServerError> {
        let tiers = crate::pricing::tiers_in_use(&*self.state.ledger).await?;
        let missing = crate::pricing::missing_prices(&self.state.config.models, &self.state.prices.all(), &tiers);
        if missing.is_empty() {
            return Ok(missing);
        }
        match self.state.config.pricing_check {
            PricingCheck::Warn => {
                for gap in &missing {
                    tracing::warn!(provider = %gap.provider, model = %gap.model, customer_type = %gap.customer_type, "routed model has no price for this customer type: its requests will be refused with price_not_configured (tollgate prices check lists all)");
                }
                Ok(missing)
            }
            PricingCheck::Refuse => Err(ServerError::Config(crate::pricing::refusal_message(&missing))),
        }
    }

    /// Serves on `listener` until `shutdown` fires, then shuts down in order (module doc).
    ///
    /// # Errors
    /// None today: accept errors are logged and retried ([`crate::listener::serve`]).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        self.serve_split(listener, None, shutdown).await
    }

    /// Serves the client API on `public` and, when given, the operator API and `/metrics` on
    /// `internal` only (`internal_listen`); shuts down as [`Gateway::serve`] does. Each listener
    /// keeps the connection bounds of `[limits]` ([`crate::listener`]).
    ///
    /// # Errors
    /// None today, as [`Gateway::serve`].
    pub async fn serve_split(self, public: TcpListener, internal: Option<TcpListener>, shutdown: CancellationToken) -> std::io::Result<()> {
        let limits = crate::listener::ConnectionLimits::from(&self.state.config.limits);
        let serve = |listener, router| crate::listener::serve(listener, router, limits, shutdown.clone());
        let serving = async {
            match internal {
                None => serve(public, crate::app(self.state.clone())).await,
                Some(internal) => {
                    // Each listener has its own connection cap: a flood on the client API does
                    // not lock the operator out.
                    tokio::join!(serve(public, crate::app::public_app(self.state.clone())), serve(internal, crate::app::internal_app(self.state.clone())));
                }
            }
        };
        // Graceful shutdown waits for every open connection; a stream may run for
        // `stream_duration_ms_max`, so one deadline, `shutdown_drain_ms` after the signal,
        // bounds both that wait and the in-flight tasks' after it. Connections still open at
        // the deadline are closed: their streams are charged for what was generated.
        let drain = Duration::from_millis(self.state.config.limits.shutdown_drain_ms);
        let signalled_at = std::sync::OnceLock::new();
        let deadline = async {
            shutdown.cancelled().await;
            let at = *signalled_at.get_or_init(tokio::time::Instant::now);
            tokio::time::sleep_until(at + drain).await;
        };
        tokio::select! {
            () = serving => {}
            () = deadline => {
                tracing::warn!(drain_ms = drain.as_millis() as u64, "connections still open after the shutdown drain; closing them");
            }
        }
        // Serving can end before the deadline branch has seen the signal: start the clock now.
        let deadline = *signalled_at.get_or_init(tokio::time::Instant::now) + drain;
        self.shutdown_until(deadline).await;
        Ok(())
    }

    /// Phases 2 and 3 of shutdown, with `shutdown_drain_ms` for in-flight requests.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.state.config.limits.shutdown_drain_ms);
        self.shutdown_until(deadline).await;
    }

    /// Phases 2 and 3 of shutdown: in-flight requests may run until `deadline`.
    async fn shutdown_until(self, deadline: tokio::time::Instant) {
        self.state.shutdown.cancel();
        self.state.tasks.close();
        if tokio::time::timeout_at(deadline, self.state.tasks.wait()).await.is_err() {
            tracing::warn!("in-flight requests did not finish in time; their holds will expire");
        }
        self.worker_shutdown.cancel();
        self.worker_tasks.close();
        self.worker_tasks.wait().await;
        tracing::info!("gateway stopped");
    }
}

/// Retries `open` while its store is unavailable, for at most `wait` (`limits.startup_wait_ms`):
/// a process started while Redis or PostgreSQL restarts (or loads its data) waits for it
/// rather than exiting. Any other error, or the deadline, ends the wait.
async fn until_available<T, Opening>(what: &str, wait: Duration, mut open: impl FnMut() -> Opening) -> Result<T, ServerError>
where
    Opening: std::future::Future<Output = Result<T, ServerError>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(100);
    loop {
        match open().await {
            Err(ServerError::Store(tollgate_store::StoreError::Unavailable(reason))) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(what, reason, "not reachable yet; waiting (limits.startup_wait_ms)");
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn connect_redis(url: &str, config: &GatewayConfig) -> Result<RedisHotStore, ServerError> {
    let wait = Duration::from_millis(config.limits.startup_wait_ms);
    let redis = until_available("redis", wait, || async { Ok(RedisHotStore::connect(url, &config.redis_prefix, config.redis_shards).await?) }).await?;
    Ok(redis.remembering_charges_for(recent_charge_ms(config)))
}

/// `limits.recent_charge_ms` as the stores take it (the configuration bounds it to a week).
fn recent_charge_ms(config: &GatewayConfig) -> i64 {
    i64::try_from(config.limits.recent_charge_ms).unwrap_or(i64::MAX)
}

/// The usage streams, read as this process's consumer.
async fn redis_log(redis: &RedisHotStore, config: &GatewayConfig, shutdown: CancellationToken) -> Result<RedisLog, ServerError> {
    let log_config = RedisLogConfig { consumer: config.worker_name.clone(), recent_charge_ms: recent_charge_ms(config), ..RedisLogConfig::default() };
    Ok(RedisLog::new(redis.connection(), redis.keys().clone(), log_config, shutdown).await?)
}

/// `tollgate worker`: the usage writer and the periodic jobs without HTTP, for deployments where
/// gateways run `serve --no-worker`. Runs until `shutdown`, then commits what it holds.
///
/// # Errors
/// Embedded configuration (nothing to share) or a store that cannot be opened.
pub async fn run_worker(config: GatewayConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let Some(url) = &config.redis_url else {
        return Err(ServerError::Config("`tollgate worker` needs TOLLGATE_REDIS_URL: in embedded mode `tollgate serve` runs the worker itself".into()));
    };
    config.validate().map_err(ServerError::Config)?;
    let wait = Duration::from_millis(config.limits.startup_wait_ms);
    let (ledger, _) = until_available("the ledger", wait, || open_ledger(&config.database_url)).await?;
    let redis = connect_redis(url, &config).await?;
    let log = until_available("redis", wait, || redis_log(&redis, &config, shutdown.clone())).await?;
    let tasks = TaskTracker::new();
    tasks.spawn(run_usage_writer(log, Arc::clone(&ledger), writer_config(&config), shutdown.clone()));
    let stores = JobStores { ledger, redis: Some((redis.connection(), redis.keys().clone())), hot: Arc::new(redis), clock: system_clock() };
    crate::jobs::spawn(&tasks, &stores, &config, &shutdown);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The usage writer's limits, the same for every log (the writer lingers only on a durable one).
fn writer_config(config: &GatewayConfig) -> UsageWriterConfig {
    UsageWriterConfig {
        batch_events_max: config.limits.usage_batch_events_max,
        batch_linger_ms: config.limits.usage_batch_linger_ms,
        ..UsageWriterConfig::default()
    }
}

/// Connections the PostgreSQL ledger pool keeps at most.
const POSTGRES_POOL_CONNECTIONS_MAX: u32 = 16;
/// Connections the SQLite ledger pool keeps at most (writes serialise anyway).
const SQLITE_POOL_CONNECTIONS_MAX: u32 = 8;

/// Opens the ledger the URL names; for PostgreSQL also returns the pool the notification
/// listener uses.
///
/// # Errors
/// An unsupported scheme, or a database that cannot be opened and migrated.
pub async fn open_ledger(url: &str) -> Result<(Arc<dyn Ledger>, Option<sqlx::PgPool>), ServerError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let ledger = PgLedger::connect(url, POSTGRES_POOL_CONNECTIONS_MAX).await?;
        let pool = ledger.pool().clone();
        return Ok((Arc::new(ledger), Some(pool)));
    }
    if url.starts_with("sqlite:") {
        return Ok((Arc::new(SqliteLedger::connect(url, SQLITE_POOL_CONNECTIONS_MAX).await?), None));
    }
    Err(ServerError::Config(format!("unsupported database URL {:?}: use sqlite://PATH or postgres://…", crate::config::redact_url_password(url))))
}

/// Applies the migrations of the ledger the URL names.
///
/// # Errors
/// As `open_ledger`.
pub async fn migrate(url: &str) -> Result<(), ServerError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(tollgate_store::postgres::migrate(url).await?);
    }
    if url.starts_with("sqlite:") {
        return Ok(tollgate_store::sqlite::migrate(url).await?);
    }
    Err(ServerError::Config(format!("unsupported database URL {:?}: use sqlite://PATH or postgres://…", crate::config::redact_url_password(url))))
}

/// Binds the configured address.
///
/// # Errors
/// The address is taken or invalid.
pub async fn bind(address: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(address).await.map_err(|source| ServerError::Listen { address: address.to_string(), source })
}

/// `tollgate reconcile`: one reconciliation run from the command line. In services mode it
/// compares the ledger with Redis; in embedded mode the hot store is the serving process's
/// memory, which only `POST /internal/reconcile` can see, so it compares the ledger alone.
///
/// # Errors
/// A store that cannot be opened or read.
pub async fn reconcile(config: &GatewayConfig, fix: bool) -> Result<tollgate_store::operations::ReconciliationRun, ServerError> {
    let (ledger, redis) = open_stores(config).await?;
    let hot_store_name = if redis.is_some() { "redis" } else { "none (embedded: the serving process holds it; use POST /internal/reconcile)" };
    let hot = redis.as_ref().map(|redis| redis as &dyn HotStore);
    Ok(tollgate_worker::reconcile::Reconciler { ledger: &*ledger, hot, hot_store_name }.run(fix).await?)
}

/// `tollgate verify`: the read-only proof of I1–I4 (see [`tollgate_worker::verify`]). In
/// services mode it reads Redis too; in embedded mode the hot store is the serving process's
/// memory, so the ledger alone is checked.
///
/// # Errors
/// A store that cannot be opened or read.
pub async fn verify(config: &GatewayConfig, served: Option<&[tollgate_worker::verify::ServedRequest]>) -> Result<tollgate_worker::verify::VerifyReport, ServerError> {
    let (ledger, redis) = open_stores(config).await?;
    let hot = redis.as_ref().map(|redis| redis as &dyn HotStore);
    Ok(tollgate_worker::verify::verify(&*ledger, hot, served).await?)
}

/// `tollgate archive`: every month of usage rows before `before` (`YYYY-MM`) to files in `dir`,
/// verified, then dropped from the ledger ([`tollgate_store::archive`]). A month must have ended
/// at least `limits.replay_window_ms` ago.
///
/// # Errors
/// A month too recent, a store or file failure, or an export that does not match the ledger.
pub async fn archive(config: &GatewayConfig, before: &str, dir: &std::path::Path) -> Result<Vec<tollgate_store::archive::MonthArchived>, ServerError> {
    let (ledger, _) = open_ledger(&config.database_url).await?;
    Ok(tollgate_store::archive::archive_before(&*ledger, before, dir, tollgate_store::clock::now_ms(), replay_window_ms(config)).await?)
}

/// `tollgate archive --dry-run`: what [`archive`] would take, touching nothing.
///
/// # Errors
/// As [`archive`] before it writes anything.
pub async fn archive_plan(config: &GatewayConfig, before: &str) -> Result<Vec<tollgate_store::archive::MonthPlanned>, ServerError> {
    let (ledger, _) = open_ledger(&config.database_url).await?;
    Ok(tollgate_store::archive::archive_plan(&*ledger, before, tollgate_store::clock::now_ms(), replay_window_ms(config)).await?)
}

fn replay_window_ms(config: &GatewayConfig) -> i64 {
    i64::try_from(config.limits.replay_window_ms).unwrap_or(i64::MAX)
}

/// The stores a command-line check reads: the ledger and, in services mode, Redis.
async fn open_stores(config: &GatewayConfig) -> Result<(Arc<dyn Ledger>, Option<RedisHotStore>), ServerError> {
    let (ledger, _) = open_ledger(&config.database_url).await?;
    let redis = match &config.redis_url {
        Some(url) => Some(RedisHotStore::connect(url, &config.redis_prefix, config.redis_shards).await?.remembering_charges_for(recent_charge_ms(config))),
        None => None,
    };
    Ok((ledger, redis))
}
