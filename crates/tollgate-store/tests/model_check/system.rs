//! The system under test: one hot store + ledger pair, driven only through the stores' public
//! API, with a worker of our own that writes the usage log into the ledger by the usage
//! writer's rules (batch, isolate and park what the ledger refuses, acknowledge after commit).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_core::{Money, Usage, UsageSource};
use tollgate_store::operations::load_snapshot;
use tollgate_store::memory::MemoryHotStore;
use tollgate_store::model::{AccountKind, NewAccount, NewApiKey, RequestStatus, UsageEvent};
use tollgate_store::queue::{ChannelLog, Delivery, EventLog, channel_log};
use tollgate_store::redis_store::{KeySpace, RedisHotStore, RedisLog, RedisLogConfig};
use tollgate_store::{HotStore, Ledger, StoreError};

/// A price id no ledger has: an event naming it is refused for good, and dead-lettered.
pub const UNKNOWN_PRICE_ID: i64 = 987_654_321;
/// A moment in the middle of a UTC day (2026-02-01 12:00): every hot store's clock, still, so a
/// run never crosses a day's or a month's end (the model counts one period of each).
const FIXED_CLOCK_MS: i64 = 1_769_947_200_000;
/// Holds that must not expire during a run.
pub const LONG_TTL_MS: u64 = 3_600_000;

/// Which hot store the pair has.
pub enum Hot {
    /// In-process: the usage log is a channel the driver pumps while a settle waits.
    Memory { store: Arc<MemoryHotStore>, log: Arc<ChannelLog> },
    Redis { store: Arc<RedisHotStore>, url: String, prefix: String, shards: u16 },
}

/// One run's pair, its ids (unique per run: the ledger is shared by the runs of a test).
pub struct System {
    pub hot: Hot,
    pub ledger: Arc<dyn Ledger>,
    pub tag: String,
    fund_references: u64,
}

impl System {
    pub async fn memory(ledger: Arc<dyn Ledger>, tag: String) -> System {
        System { hot: memory_hot(), ledger, tag, fund_references: 0 }
    }

    pub async fn redis(ledger: Arc<dyn Ledger>, tag: String, url: &str) -> System {
        let prefix = format!("mc{tag}");
        let shards = 4;
        let store = redis_hot(url, &prefix, shards).await;
        System { hot: Hot::Redis { store: Arc::new(store), url: url.to_string(), prefix, shards }, ledger, tag, fund_references: 0 }
    }

    pub fn store(&self) -> Arc<dyn HotStore> {
        match &self.hot {
            Hot::Memory { store, .. } => Arc::clone(store) as Arc<dyn HotStore>,
            Hot::Redis { store, .. } => Arc::clone(store) as Arc<dyn HotStore>,
        }
    }

    pub fn is_memory(&self) -> bool {
        matches!(self.hot, Hot::Memory { .. })
    }

    /// Now, as the hot store counts periods.
    pub fn now_ms(&self) -> i64 {
        FIXED_CLOCK_MS
    }

    pub fn account_id(&self, account: &str) -> String {
        format!("{}-{account}", self.tag)
    }

    pub fn key_id(&self, account: &str, key: &str) -> String {
        format!("{}-{account}-{key}", self.tag)
    }

    pub fn request_id(&self, request: &str) -> String {
        format!("{}-{request}", self.tag)
    }

    pub fn next_reference(&mut self) -> String {
        self.fund_references += 1;
        format!("{}-fund-{}", self.tag, self.fund_references)
    }

    /// The run's accounts and keys in the ledger, with nothing in them.
    pub async fn create(&self, accounts: &[String], keys: &[String]) -> Result<(), StoreError> {
        for account in accounts {
            let id = self.account_id(account);
            self.ledger
                .create_account(NewAccount { id: id.clone(), kind: AccountKind::User, name: id.clone(), customer_type: "standard".into(), credit_limit: Money::ZERO, daily_request_quota: None, monthly_request_quota: None, low_balance_threshold: None })
                .await?;
            for key in keys {
                let key_id = self.key_id(account, key);
                self.ledger
                    .create_key(NewApiKey { id: key_id.clone(), account_id: id.clone(), name: key_id.clone(), key_hash: key_id.clone(), prefix: "tg".into(), budget_daily: None, budget_monthly: None, budget_total: None, rpm: None, tpm: None, allowed_models: None, session_lock: None, expires_at: None })
                    .await?;
            }
        }
        Ok(())
    }

    pub fn event(&self, account: &str, key: &str, request: &str, cost: i64, status: RequestStatus, poison: bool) -> UsageEvent {
        UsageEvent {
            request_id: self.request_id(request),
            account_id: self.account_id(account),
            api_key_id: self.key_id(account, key),
            provider: "mock".into(),
            model: "demo-gpt".into(),
            customer_type: "standard".into(),
            price_id: poison.then_some(UNKNOWN_PRICE_ID),
            usage: Usage { input_tokens: 10, output_tokens: 5, ..Usage::default() },
            usage_source: UsageSource::Upstream,
            cost: Money::from_nanos(cost),
            status,
            latency_ms: 1,
            created_at_ms: self.now_ms(),
            hot_balance_after: Money::ZERO,
            stored_response: None,
            request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
        }
    }

    /// Runs a hot-store step; in-process, the worker writes the log meanwhile (a settle waits
    /// for its commit) and until it is empty.
    pub async fn pumped<T>(&self, step: impl Future<Output = T>) -> Result<T, StoreError> {
        let Hot::Memory { log, .. } = &self.hot else { return Ok(step.await) };
        let mut step = std::pin::pin!(step);
        let output = loop {
            tokio::select! {
                biased;
                output = &mut step => break output,
                batch = log.read_batch(64) => write(&*self.ledger, &**log, batch?).await?,
            }
        };
        loop {
            let batch = log.read_remaining(64).await?;
            if batch.is_empty() {
                return Ok(output);
            }
            write(&*self.ledger, &**log, batch).await?;
        }
    }

    /// A worker for the Redis streams, named `consumer` (the same name finds its own pending
    /// entries, as a restarted worker does).
    async fn redis_log(&self, consumer: &str, claim_idle_ms: u64, deliveries_max: usize) -> Option<RedisLog> {
        let Hot::Redis { store, prefix, shards, .. } = &self.hot else { return None };
        let config = RedisLogConfig { consumer: consumer.into(), poll_idle_ms: 5, claim_idle_ms, deliveries_max, ..RedisLogConfig::default() };
        Some(RedisLog::new(store.connection(), KeySpace::new(prefix, *shards).expect("key space"), config, CancellationToken::new()).await.expect("redis log"))
    }

    /// The worker writes everything in the log (Redis; in-process the log is always empty).
    pub async fn drain(&self) -> Result<(), StoreError> {
        let Some(log) = self.redis_log("worker", 60_000, 5).await else { return Ok(()) };
        loop {
            let batch = log.read_remaining(100).await?;
            if batch.is_empty() {
                return Ok(());
            }
            write(&*self.ledger, &log, batch).await?;
        }
    }

    /// A worker reads the whole log and dies before acknowledging (after committing or not).
    pub async fn crash(&self, committed: bool) -> Result<(), StoreError> {
        let Some(log) = self.redis_log("worker", 60_000, 5).await else { return Ok(()) };
        loop {
            let batch = log.read_remaining(100).await?;
            if batch.is_empty() {
                return Ok(());
            }
            if committed {
                commit_without_ack(&*self.ledger, batch).await?;
            }
        }
    }

    /// Another worker's sweep: entries delivered (once) to a dead worker go to the dead letters.
    pub async fn reclaim_park(&self) -> Result<(), StoreError> {
        let Some(log) = self.redis_log("sweeper", 0, 1).await else { return Ok(()) };
        // The log has nothing new (the runner checks): the read reclaims, then polls until cut off.
        if let Ok(batch) = tokio::time::timeout(Duration::from_millis(50), log.read_batch(100)).await {
            write(&*self.ledger, &log, batch?).await?;
        }
        Ok(())
    }

    /// The hot store restarts: in-process, a new one with nothing loaded; Redis, a new client.
    pub async fn restart(&mut self) {
        match &self.hot {
            Hot::Memory { .. } => self.hot = memory_hot(),
            Hot::Redis { url, prefix, shards, .. } => {
                let store = redis_hot(url, prefix, *shards).await;
                let (url, prefix, shards) = (url.clone(), prefix.clone(), *shards);
                self.hot = Hot::Redis { store: Arc::new(store), url, prefix, shards };
            }
        }
    }

    /// A cold load as the gateway does it (`charge::load_account`): the ledger's snapshot less
    /// what the account still owes (`operations::load_snapshot`), then any fund change after it.
    pub async fn load(&self, account: &str) -> Result<bool, StoreError> {
        let account_id = self.account_id(account);
        let store = self.store();
        let snapshot = load_snapshot(&*self.ledger, &*store, &account_id, self.now_ms())
            .await?
            .ok_or(StoreError::NotFound { entity: "account", id: account_id.clone() })?;
        let last_fund_seq = snapshot.last_fund_seq;
        let loaded = store.load_account(snapshot).await?;
        for fund in self.ledger.fund_transactions_after(&account_id, last_fund_seq).await? {
            store.apply_fund(&account_id, fund.ledger_seq, fund.amount, None).await?;
        }
        Ok(loaded)
    }
}

async fn redis_hot(url: &str, prefix: &str, shards: u16) -> RedisHotStore {
    RedisHotStore::connect(url, prefix, shards).await.expect("redis").with_clock(Arc::new(|| FIXED_CLOCK_MS))
}

fn memory_hot() -> Hot {
    let (sender, log) = channel_log(64);
    let store = MemoryHotStore::new(sender, Arc::new(|| FIXED_CLOCK_MS));
    Hot::Memory { store: Arc::new(store), log: Arc::new(log) }
}

/// Writes a batch as the usage writer does: one transaction; if the ledger refuses it for
/// good, each event alone, parking the ones it refuses; acknowledged after commit.
async fn write(ledger: &dyn Ledger, log: &dyn EventLog, batch: Vec<Delivery>) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let events: Vec<UsageEvent> = batch.iter().map(|delivery| delivery.event.clone()).collect();
    match ledger.record_usage_batch(&events).await {
        Ok(_) => log.ack(batch).await,
        Err(StoreError::Invalid(_)) if batch.len() > 1 => {
            for delivery in batch {
                Box::pin(write(ledger, log, vec![delivery])).await?;
            }
            Ok(())
        }
        Err(StoreError::Invalid(reason)) => {
            for delivery in batch {
                log.park(delivery, &reason).await?;
            }
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Commits what the ledger accepts of a batch, acknowledging nothing (the worker then dies).
async fn commit_without_ack(ledger: &dyn Ledger, batch: Vec<Delivery>) -> Result<(), StoreError> {
    for delivery in batch {
        match ledger.record_usage_batch(std::slice::from_ref(&delivery.event)).await {
            Ok(_) | Err(StoreError::Invalid(_)) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
