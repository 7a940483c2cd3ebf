//! Usage log → ledger, in batches, acknowledged after commit.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::{Ledger, StoreError};
use tollgate_store::model::RecordOutcome;
use tollgate_store::queue::{Delivery, EventLog};

/// Limits of the writer.
#[derive(Clone, Debug)]
pub struct UsageWriterConfig {
    /// Events written in one ledger transaction at most.
    pub batch_events_max: usize,
    /// First wait after a failed write; doubles up to `retry_backoff_ms_max`.
    pub retry_backoff_ms_min: u64,
    pub retry_backoff_ms_max: u64,
}

impl Default for UsageWriterConfig {
    fn default() -> Self {
        UsageWriterConfig { batch_events_max: 500, retry_backoff_ms_min: 50, retry_backoff_ms_max: 5_000 }
    }
}

/// Runs until the log is closed and drained, or `shutdown` fires and what is left in the log
/// is committed. A batch that fails is retried with capped backoff: events are never dropped.
///
/// The next batch is read while this one is written and acknowledged, so the log's round trips
/// overlap the ledger's commit. Batches still commit one after another, in the order read.
pub async fn run_usage_writer(
    log: impl EventLog,
    ledger: Arc<dyn Ledger>,
    config: UsageWriterConfig,
    shutdown: CancellationToken,
) {
    let mut next = next_batch(&log, &config, &shutdown).await;
    while let Some(batch) = next {
        let (committed, following) = tokio::join!(
            write_until_committed(&log, &*ledger, batch, &config, &shutdown),
            next_batch(&log, &config, &shutdown),
        );
        if !committed {
            // Shutdown cut the retries short. The batch read ahead is not acknowledged either:
            // a durable log delivers both again to the next worker.
            break;
        }
        next = following;
    }
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
            Ok(batch) => return Some(batch),
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

/// Writes one batch, retrying until it commits. Returns false if shutdown interrupted the
/// retries (the batch stays unacknowledged, so a durable log re-delivers it).
async fn write_until_committed(
    log: &impl EventLog,
    ledger: &dyn Ledger,
    batch: Vec<Delivery>,
    config: &UsageWriterConfig,
    shutdown: &CancellationToken,
) -> bool {
    let events: Vec<_> = batch.iter().map(|delivery| delivery.event.clone()).collect();
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
                if let Err(error) = log.ack(batch).await {
                    tracing::error!(%error, "acknowledging a committed batch failed; it will be re-delivered and skipped as duplicate");
                }
                return true;
            }
            Err(StoreError::Invalid(reason)) if batch.len() > 1 => {
                // One bad event must not hold the others hostage: write them one by one.
                tracing::error!(reason, events = batch.len(), "the ledger refused a usage batch; isolating the bad events");
                for delivery in batch {
                    if !Box::pin(write_until_committed(log, ledger, vec![delivery], config, shutdown)).await {
                        return false;
                    }
                }
                return true;
            }
            Err(StoreError::Invalid(reason)) => {
                for delivery in batch {
                    if let Err(error) = log.park(delivery, &reason).await {
                        tracing::error!(%error, "parking a refused usage event failed; it will be re-delivered");
                    }
                }
                return true;
            }
            Err(error) => {
                metrics::counter!("tollgate_usage_batch_failures_total").increment(1);
                tracing::error!(%error, events = events.len(), backoff_ms, "writing a usage batch failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                    () = shutdown.cancelled() => return false,
                }
                backoff_ms = (backoff_ms * 2).min(config.retry_backoff_ms_max);
            }
        }
    }
}
