//! The shared state every handler gets: stores, caches, routes, the upstream client, and the
//! task tracker that shutdown waits on.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::clock::Clock;
use tollgate_store::{HotStore, Ledger};

use crate::config::GatewayConfig;
use crate::context::{CacheLifetimes, ContextCache, PriceTable};
use crate::tokenizer_pool::TokenizerPool;
use crate::throttle::FailureThrottle;
use crate::upstream::Upstreams;

/// Cheap to clone; everything inside is shared.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

pub struct Shared {
    pub config: GatewayConfig,
    pub hot: Arc<dyn HotStore>,
    pub ledger: Arc<dyn Ledger>,
    pub contexts: ContextCache,
    /// Where large request bodies are parsed and tokenized.
    pub tokenizer: TokenizerPool,
    /// Accounts whose fund change the hot store could not take yet (retried).
    pub unapplied_funds: crate::charge::UnappliedFunds,
    pub prices: PriceTable,
    pub upstreams: Upstreams,
    /// One pooled client for every upstream.
    pub http: reqwest::Client,
    pub metrics: PrometheusHandle,
    /// Streams and upstream calls outlive their handler (a client may leave); shutdown waits
    /// for them here.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Until when (ms since the epoch) ledger lookups of request ids are skipped after one failed.
    pub ledger_lookups_paused_until_ms: std::sync::atomic::AtomicI64,
    /// The calendar charges are dated by — a usage event's time (the ledger's day and month of
    /// the charge), a cold load's counter periods: the system clock, or the clock a test gave
    /// the gateway and its hot store together ([`crate::server::Gateway::start_with_clock`]).
    /// Timers (pauses, backoffs, deadlines) measure real time and do not read it.
    pub clock: Clock,
    /// Wrong operator tokens per source address ([`crate::throttle`]).
    pub operator_auth_failures: FailureThrottle,
    /// Refused client keys per source address: each unknown key costs a ledger query.
    pub key_auth_failures: FailureThrottle,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Builds the state and loads the price table.
    ///
    /// # Errors
    /// Invalid routes, a missing provider key variable, or a ledger that cannot be read.
    pub async fn new(
        config: GatewayConfig,
        hot: Arc<dyn HotStore>,
        ledger: Arc<dyn Ledger>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        clock: Clock,
        shared_channels: Option<crate::routing::SharedChannels>,
    ) -> Result<AppState, String> {
        config.validate()?;
        // The recorder first: channels register their counters as they are built.
        let metrics = crate::metrics::handle();
        let upstreams = Upstreams::from_config(&config, shared_channels)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.limits.upstream_connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            // A redirect is not followed: reqwest's default would carry x-api-key and
            // x-goog-api-key (it strips only Authorization) to whatever host it names. An
            // upstream answering 3xx is an upstream error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("building the upstream client: {error}"))?;
        let prices = PriceTable::default();
        let price_rows = ledger.current_prices().await.map_err(|error| format!("loading prices: {error}"))?;
        upstreams.reload(&*ledger).await.map_err(|error| format!("loading the channels operators added or set: {error}"))?;
        crate::metrics::register_families(&upstreams.models(), &price_rows);
        prices.replace(price_rows);
        let contexts = ContextCache::new(CacheLifetimes {
            fresh: Duration::from_millis(config.limits.context_cache_ttl_ms),
            stale_if_error: Duration::from_millis(config.limits.context_stale_if_error_ms.max(config.limits.context_cache_ttl_ms)),
            unknown_key: Duration::from_millis(config.limits.unknown_key_cache_ms),
        });
        let tokenizer = TokenizerPool::new(match config.limits.tokenizer_threads {
            0 => crate::tokenizer_pool::default_threads(),
            threads => threads,
        });
        let auth_failures_per_minute = config.limits.auth_failures_per_address_per_minute;
        Ok(AppState(Arc::new(Shared {
            operator_auth_failures: FailureThrottle::new(auth_failures_per_minute),
            key_auth_failures: FailureThrottle::new(auth_failures_per_minute),
            config,
            hot,
            ledger,
            contexts,
            tokenizer,
            unapplied_funds: crate::charge::UnappliedFunds::default(),
            prices,
            upstreams,
            http,
            metrics,
            tasks,
            shutdown,
            ledger_lookups_paused_until_ms: std::sync::atomic::AtomicI64::new(0),
            clock,
        })))
    }

    /// Now, in ms since the epoch, on the gateway's calendar ([`Shared::clock`]).
    pub fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Now on the gateway's calendar, as a time (the system's if the clock is out of range).
    pub fn now(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.now_ms()) * 1_000_000).unwrap_or_else(|_| time::OffsetDateTime::now_utc())
    }

    /// Re-reads the price table after a change.
    ///
    /// # Errors
    /// The ledger could not be read; the old table stays.
    pub async fn reload_prices(&self) -> Result<(), tollgate_store::StoreError> {
        let rows = self.ledger.current_prices().await?;
        crate::metrics::register_spend(&rows);
        self.prices.replace(rows);
        Ok(())
    }

    /// Re-reads the channels operators added, disabled or enabled (`/internal/channels`).
    ///
    /// # Errors
    /// The ledger could not be read; the channels stay as they are.
    pub async fn reload_channels(&self) -> Result<(), tollgate_store::StoreError> {
        self.upstreams.reload(&*self.ledger).await
    }
}
