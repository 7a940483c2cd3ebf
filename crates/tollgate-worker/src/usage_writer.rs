//! Usage log → ledger, in batches, acknowledged after commit.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::{Ledger, StoreError};
use tollgate_store::model::RecordOutcome;
use tollgate_store::model::UsageEvent;
use tollgate_store::queue::{Delivery, EventLog, Receipt};

/// Limits of the writer.
#[derive(Clone, Debug)]
pub struct UsageWriterConfig {
    /// Events written in one ledger transaction at most.
    pub batch_events_max: usize,
    /// When a read finds fewer than `batch_events_max` events, how long to wait for more before
    /// writing them: a batch of a few rows costs the ledger nearly what a full one does. Only
    /// with a durable log (`EventLog::durable`, Redis): with the in-process log a settle waits
    /// for the commit, and the writer never lingers. 0 writes at once.
    pub batch_linger_ms: u64,
    /// First wait after a failed write; doubles up to `retry_backoff_ms_max`.
    pub retry_backoff_ms_min: u64,
    pub retry_backoff_ms_max: u64,
}

impl Default for UsageWriterConfig {
    fn default() -> Self {
        UsageWriterConfig { batch_events_max: 500, batch_linger_ms: 0, retry_backoff_ms_min: 50, retry_backoff_ms_max: 5_000 }
    }
}

/// Batches committed and waiting for their acknowledgement, at most: the writer goes on with the
/// next batch while the log acknowledges the last one, and waits if the log falls this far behind.
const ACKS_QUEUED_MAX: usize = 2;

/// Runs until the log is closed and drained, or `shutdown` fires and what is left in the log
/// is committed. A batch that fails is retried with capped backoff: events are never dropped.
///
/// Three things overlap: the ledger writes one batch, the log reads the next, and the log
/// acknowledges the one before (each a round trip to its own server). Batches still commit one
/// after another, in the order read, and each is acknowledged only after its commit.
pub async fn run_usage_writer(
    log: impl EventLog,
    ledger: Arc<dyn Ledger>,
    config: UsageWriterConfig,
    shutdown: CancellationToken,
) {
    let (committed_sender, mut committed) = tokio::sync::mpsc::channel::<Vec<Delivery>>(ACKS_QUEUED_MAX);
    let acknowledge = async {
        while let Some(deliveries) = committed.recv().await {
            if let Err(error) = log.ack(deliveries).await {
                tracing::error!(%error, "acknowledging a committed batch failed; it will be re-delivered and skipped as duplicate");
            }
        }
    };
    let write = async {
        let mut next = next_batch(&log, &config, &shutdown).await;
        while let Some(batch) = next {
            // Handed to the acknowledgements as soon as committed, not when the next batch is
            // read: on a quiet log that read waits for new events, and a settle waits for its ack.
            let write_and_queue = async {
                let Written { committed, complete } = write_until_committed(&log, &*ledger, batch, &config, &shutdown).await;
                let queued = committed.is_empty() || committed_sender.send(committed).await.is_ok();
                complete && queued
            };
            let (written, following) = tokio::join!(write_and_queue, next_batch(&log, &config, &shutdown));
            if !written {
                // Shutdown cut the retries short. The batch read ahead is not acknowledged
                // either: a durable log delivers both again to the next worker.
                break;
            }
            next = following;
        }
        // Closes the queue: the acknowledgements end once every committed batch has its own.
        drop(committed_sender);
    };
    tokio::join!(write, acknowledge);
    tracing::info!("usage writer stopped");
}

/// The next batch to write; None once the log is closed and drained, or drained after shutdown.
async fn next_batch(log: &impl EventLog, config: &UsageWriterConfig, shutdown: &CancellationToken) -> Option<Vec<Delivery>> {
    loop {
        let batch = if shutdown.is_cancelled() {
            // Draining: whatever is still queued, then stop.
            log.read_remaining(config.batch_events_max).await
        } else {
            tokio::select! {
                batch = log.read_batch(config.batch_events_max) => batch,
                () = shutdown.cancelled() => continue,
            }
        };
        match batch {
            Ok(batch) if batch.is_empty() => return None,
            Ok(batch) => return Some(linger(log, config, shutdown, batch).await),
            Err(error) if shutdown.is_cancelled() => {
                // The events stay in the log (Redis keeps them) for the next worker.
                tracing::error!(%error, "reading the usage log failed while draining; leaving the rest to the next worker");
                return None;
            }
            Err(error) => {
                tracing::error!(%error, "reading the usage log failed");
                tokio::time::sleep(Duration::from_millis(config.retry_backoff_ms_min)).await;
            }
        }
    }
}

/// Tops a short batch up with what arrives within `batch_linger_ms` (see [`UsageWriterConfig`]).
async fn linger(log: &impl EventLog, config: &UsageWriterConfig, shutdown: &CancellationToken, mut batch: Vec<Delivery>) -> Vec<Delivery> {
    let room = config.batch_events_max.saturating_sub(batch.len());
    if config.batch_linger_ms == 0 || room == 0 || !log.durable() || shutdown.is_cancelled() {
        return batch;
    }
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(config.batch_linger_ms)) => {}
        () = shutdown.cancelled() => {}
    }
    match log.read_remaining(room).await {
        Ok(more) => batch.extend(more),
        // What the failed read took stays pending in the log, and is read again.
        Err(error) => tracing::warn!(%error, "topping up a usage batch failed; writing what was read"),
    }
    batch
}

/// What became of a batch: the deliveries committed (to acknowledge), and whether every one
/// was committed or parked (false: shutdown interrupted the retries, the rest stays in the log).
struct Written {
    committed: Vec<Delivery>,
    complete: bool,
}

/// Writes one batch, retrying until it commits; parks the events the ledger refuses for good.
async fn write_until_committed(
    log: &impl EventLog,
    ledger: &dyn Ledger,
    batch: Vec<Delivery>,
    config: &UsageWriterConfig,
    shutdown: &CancellationToken,
) -> Written {
    // The events go to the ledger by reference and come back to their receipts after: an event
    // carries its response body, and a copy of each cost a tenth of the writer's time.
    let (events, receipts): (Vec<_>, Vec<_>) = batch.into_iter().map(|delivery| (delivery.event, delivery.receipt)).unzip();
    let deliveries = |events: Vec<UsageEvent>, receipts: Vec<Receipt>| {
        events.into_iter().zip(receipts).map(|(event, receipt)| Delivery { event, receipt }).collect::<Vec<_>>()
    };
    let mut backoff_ms = config.retry_backoff_ms_min;
    loop {
        let started = std::time::Instant::now();
        match ledger.record_usage_batch(&events).await {
            Ok(outcomes) => {
                let duplicates = outcomes.iter().filter(|outcome| **outcome == RecordOutcome::Duplicate).count();
                metrics::counter!("tollgate_usage_rows_written_total").increment((outcomes.len() - duplicates) as u64);
                metrics::histogram!("tollgate_usage_batch_seconds").record(started.elapsed().as_secs_f64());
                if duplicates > 0 {
                    metrics::counter!("tollgate_usage_duplicates_total").increment(duplicates as u64);
                    tracing::warn!(duplicates, "usage events already in the ledger were skipped");
                }
                return Written { committed: deliveries(events, receipts), complete: true };
            }
            Err(StoreError::Invalid(reason)) if events.len() > 1 => {
                // One bad event must not hold the others hostage: write them one by one.
                tracing::error!(reason, events = events.len(), "the ledger refused a usage batch; isolating the bad events");
                let mut committed = Vec::new();
                for delivery in deliveries(events, receipts) {
                    let one = Box::pin(write_until_committed(log, ledger, vec![delivery], config, shutdown)).await;
                    committed.extend(one.committed);
                    if !one.complete {
                        return Written { committed, complete: false };
                    }
                }
                return Written { committed, complete: true };
            }
            Err(StoreError::Invalid(reason)) => {
                for delivery in deliveries(events, receipts) {
                    if let Err(error) = log.park(delivery, &reason).await {
                        tracing::error!(%error, "parking a refused usage event failed; it will be re-delivered");
                    }
                }
                return Written { committed: Vec::new(), complete: true };
            }
            Err(error) => {
                metrics::counter!("tollgate_usage_batch_failures_total").increment(1);
                tracing::error!(%error, events = events.len(), backoff_ms, "writing a usage batch failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                    () = shutdown.cancelled() => return Written { committed: Vec::new(), complete: false },
                }
                backoff_ms = (backoff_ms * 2).min(config.retry_backoff_ms_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use tollgate_core::{Money, Usage, UsageSource};
    use tollgate_store::model::{AccountKind, NewAccount, RequestStatus};
    use tollgate_store::queue::{ChannelLog, ChannelLogSender, channel_log};
    use tollgate_store::sqlite::SqliteLedger;

    use super::*;

    fn charge(request_id: &str) -> UsageEvent {
        UsageEvent {
            request_id: request_id.into(),
            account_id: "a".into(),
            api_key_id: "key".into(),
            provider: "mock".into(),
            model: "demo-gpt".into(),
            customer_type: "standard".into(),
            price_id: None,
            usage: Usage { input_tokens: 10, output_tokens: 5, ..Usage::default() },
            usage_source: UsageSource::Upstream,
            cost: Money::from_nanos(7),
            status: RequestStatus::Success,
            latency_ms: 3,
            created_at_ms: 1_769_903_970_000,
            hot_balance_after: Money::ZERO,
            stored_response: None,
            request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
        }
    }

    /// A SQLite ledger in a file of its own, with account "a".
    async fn ledger_with_account() -> (Arc<dyn Ledger>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("tollgate-writer-{}.db", uuid::Uuid::new_v4().simple()));
        let ledger = SqliteLedger::connect(&format!("sqlite://{}", path.display()), 2).await.unwrap();
        ledger
            .create_account(NewAccount {
                id: "a".into(),
                kind: AccountKind::User,
                name: "n".into(),
                customer_type: "standard".into(),
                credit_limit: Money::from_nanos(1_000),
                daily_request_quota: None,
                monthly_request_quota: None,
                low_balance_threshold: None,
            })
            .await
            .unwrap();
        (Arc::new(ledger), path)
    }

    /// A writer on `log` into `ledger`, and the token that stops it.
    fn spawn_writer(log: impl EventLog, ledger: &Arc<dyn Ledger>, config: UsageWriterConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(run_usage_writer(log, Arc::clone(ledger), config, shutdown.clone()));
        (shutdown, writer)
    }

    /// Stops the writer (with the sender gone the log drains and ends) and removes the ledger's file.
    async fn stop_writer(shutdown: CancellationToken, sender: ChannelLogSender, writer: tokio::task::JoinHandle<()>, path: &std::path::Path) {
        shutdown.cancel();
        drop(sender);
        writer.await.unwrap();
        let _ = std::fs::remove_file(path);
    }

    /// Each committed batch is acknowledged while the log stays open and quiet: the writer's
    /// read of the next batch waits for events that may never come, and a settle waits for its
    /// acknowledgement. Acknowledging only once that read returned left them waiting for good.
    #[tokio::test]
    async fn a_committed_batch_is_acknowledged_while_the_log_is_quiet() {
        let (ledger, path) = ledger_with_account().await;
        let (sender, log) = channel_log(16);
        let (shutdown, writer) = spawn_writer(log, &ledger, UsageWriterConfig::default());
        for request_id in ["r1", "r2"] {
            let committed = sender.reserve().await.unwrap().append(charge(request_id), true).unwrap();
            // The sender stays open and nothing else is sent: only the commit can answer.
            tokio::time::timeout(Duration::from_secs(30), committed).await.expect("the commit was never acknowledged").unwrap();
            assert!(ledger.request_charged("a", request_id).await.unwrap(), "acknowledged before its commit");
        }
        // Read before stop_writer removes the file: a pooled connection opened after that would
        // find a new, empty database.
        assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(-14));
        stop_writer(shutdown, sender, writer, &path).await;
    }

    /// Issue 19 item 9: a usage row the ledger refuses for good is parked, and a park is not a
    /// commit. The settle waiting for it fails (the gateway then withholds the response), and
    /// the hot store keeps the charge as owed; it once took the park for the commit, and the
    /// response left with no usage row behind it.
    #[tokio::test]
    async fn a_parked_charge_fails_its_settle_and_stays_owed() {
        use tollgate_store::HotStore;
        use tollgate_store::hot::{AccountSnapshot, CounterSeed};
        use tollgate_store::memory::MemoryHotStore;

        let (ledger, path) = ledger_with_account().await;
        let (sender, log) = channel_log(16);
        let (shutdown, writer) = spawn_writer(log, &ledger, UsageWriterConfig::default());
        let store = MemoryHotStore::new(sender.clone(), tollgate_store::clock::system_clock());
        // Account "b" is in the hot store only: the ledger refuses its usage rows.
        for account_id in ["a", "b"] {
            let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: account_id.into(), balance: Money::from_nanos(100), last_fund_seq: 0, charged_request_ids: Vec::new(), counters: CounterSeed::default() };
            assert!(store.load_account(snapshot).await.unwrap());
        }
        let refused = UsageEvent { account_id: "b".into(), ..charge("r1") };
        let settled = tokio::time::timeout(Duration::from_secs(30), store.settle(refused)).await.expect("the settle never returned");
        assert!(settled.is_err(), "a parked charge was acknowledged as committed: {settled:?}");
        let owed = store.unlogged_charges().await.unwrap();
        assert_eq!(owed.iter().map(|charge| (charge.account_id.as_str(), charge.cost)).collect::<Vec<_>>(), [("b", Money::from_nanos(7))], "the charge stays owed");
        assert_eq!(store.balance("b", "key").await.unwrap().unwrap().balance, Money::from_nanos(93));
        // The writer goes on: the next charge commits and its settle returns.
        tokio::time::timeout(Duration::from_secs(30), store.settle(charge("r2"))).await.expect("the settle never returned").unwrap();
        assert!(ledger.request_charged("a", "r2").await.unwrap());
        drop(store);
        stop_writer(shutdown, sender, writer, &path).await;
    }

    /// The in-process log, standing in for a durable one (Redis) to show the linger in-process.
    struct Durable(ChannelLog);

    #[async_trait::async_trait]
    impl EventLog for Durable {
        async fn read_batch(&self, max: usize) -> tollgate_store::StoreResult<Vec<Delivery>> {
            self.0.read_batch(max).await
        }
        async fn read_remaining(&self, max: usize) -> tollgate_store::StoreResult<Vec<Delivery>> {
            self.0.read_remaining(max).await
        }
        async fn ack(&self, deliveries: Vec<Delivery>) -> tollgate_store::StoreResult<()> {
            self.0.ack(deliveries).await
        }
        async fn park(&self, delivery: Delivery, reason: &str) -> tollgate_store::StoreResult<()> {
            self.0.park(delivery, reason).await
        }
        fn durable(&self) -> bool {
            true
        }
    }

    /// With a linger and a durable log, a short batch waits for company: what arrives meanwhile
    /// is written with it.
    #[tokio::test]
    async fn a_short_batch_waits_for_company_when_lingering() {
        let (ledger, path) = ledger_with_account().await;
        let (sender, log) = channel_log(16);
        let (shutdown, writer) = spawn_writer(Durable(log), &ledger, UsageWriterConfig { batch_linger_ms: 2_000, ..UsageWriterConfig::default() });
        let mut first = sender.reserve().await.unwrap().append(charge("r1"), true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(first.try_recv().is_err(), "written before the linger ran out");
        assert!(!ledger.request_charged("a", "r1").await.unwrap());
        let second = sender.reserve().await.unwrap().append(charge("r2"), true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), second).await.expect("the batch was never written").unwrap();
        assert!(ledger.request_charged("a", "r1").await.unwrap() && ledger.request_charged("a", "r2").await.unwrap());
        stop_writer(shutdown, sender, writer, &path).await;
    }

    /// The in-process log is not durable: its settles wait for the commit, so a configured
    /// linger is not applied to it (a minute here, against an answer within half of one).
    #[tokio::test]
    async fn the_in_process_log_is_written_at_once_whatever_the_linger() {
        let (ledger, path) = ledger_with_account().await;
        let (sender, log) = channel_log(16);
        let (shutdown, writer) = spawn_writer(log, &ledger, UsageWriterConfig { batch_linger_ms: 60_000, ..UsageWriterConfig::default() });
        let committed = sender.reserve().await.unwrap().append(charge("r1"), true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), committed).await.expect("the in-process log lingered").unwrap();
        assert!(ledger.request_charged("a", "r1").await.unwrap());
        stop_writer(shutdown, sender, writer, &path).await;
    }
}
