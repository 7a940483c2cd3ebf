//! The `prune` job: deletes the stored responses whose replay window has passed, and the
//! upstream attempts past their retention, in bounded batches with a pause between them, then gives the space back in steps with the same pause
//! (`Retention::compact_step`).
//! Which retries are replayed does not depend on it: the gateway decides by the charge's age.
//!
//! The `partitions` job: makes the usage log's monthly partitions ahead of time (PostgreSQL).

use std::sync::Arc;
use std::time::Duration;

use tollgate_store::Ledger;
use tollgate_store::StoreResult;
use tollgate_store::clock::Clock;

use crate::jobs::JobWork;

/// How the job prunes.
#[derive(Clone, Copy, Debug)]
pub struct PruneSettings {
    /// Bodies of charges older than this are deleted (`limits.replay_window_ms`).
    pub window_ms: i64,
    /// Upstream attempts recorded longer ago than this are deleted (0: kept until their month is
    /// archived).
    pub attempts_retention_ms: i64,
    /// Rows per batch: one short transaction each.
    pub batch_rows: u32,
    /// Between two batches, at least.
    pub pause: Duration,
    /// At most this many rows deleted a second, on average over a run (0: no bound). A backlog
    /// (the job off for a while, a replay window shortened) is then worked off at a pace the
    /// writers beside it do not feel; set it above the rate of charged non-streaming requests,
    /// or bodies pile up (`tollgate_stored_response_oldest_age_seconds` shows it).
    pub rows_per_second: u32,
}

/// How long to wait after a batch of `rows` that took `took`: the pause, or longer so that the
/// run stays under `rows_per_second`.
pub fn pause_after(rows: u64, took: Duration, settings: &PruneSettings) -> Duration {
    if settings.rows_per_second == 0 {
        return settings.pause;
    }
    // The time `rows` may take at the bound, less what the batch took already.
    let paced = Duration::from_secs_f64(rows as f64 / f64::from(settings.rows_per_second)).saturating_sub(took);
    paced.max(settings.pause)
}

/// Pages handed back to the file system per step (4 MiB of SQLite's 4 KiB pages).
const COMPACT_PAGES_PER_STEP: u32 = 1_024;

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneRun {
    pub rows: u64,
    pub bytes: u64,
    pub batches: u64,
    /// Upstream attempts deleted.
    pub attempts: u64,
    /// When the oldest body still kept was charged (Unix ms).
    pub oldest_kept_ms: Option<i64>,
}

/// Prunes every stored response whose window has ended by `now_ms`, batch by batch.
///
/// # Errors
/// The ledger failed a batch; what earlier batches deleted stays deleted.
pub async fn prune(ledger: &dyn Ledger, now_ms: i64, settings: PruneSettings) -> StoreResult<PruneRun> {
    // A body goes when its window has ended — `now − charged_at ≥ window`, as the gateway
    // decides a retry — so everything charged up to `now − window` inclusive.
    let before_ms = now_ms.saturating_sub(settings.window_ms).saturating_add(1);
    let mut run = PruneRun::default();
    loop {
        let started = std::time::Instant::now();
        let batch = ledger.prune_stored_responses(before_ms, settings.batch_rows).await?;
        run.batches += 1;
        run.rows += batch.rows;
        run.bytes += batch.bytes;
        metrics::counter!("tollgate_stored_responses_pruned_total").increment(batch.rows);
        metrics::counter!("tollgate_stored_response_bytes_pruned_total").increment(batch.bytes);
        if batch.rows < u64::from(settings.batch_rows) {
            break;
        }
        tokio::time::sleep(pause_after(batch.rows, started.elapsed(), &settings)).await;
    }
    if settings.attempts_retention_ms > 0 {
        let attempts_before_ms = now_ms.saturating_sub(settings.attempts_retention_ms);
        loop {
            let started = std::time::Instant::now();
            let rows = ledger.prune_upstream_attempts(attempts_before_ms, settings.batch_rows).await?;
            run.batches += 1;
            run.attempts += rows;
            metrics::counter!("tollgate_upstream_attempts_pruned_total").increment(rows);
            if rows < u64::from(settings.batch_rows) {
                break;
            }
            tokio::time::sleep(pause_after(rows, started.elapsed(), &settings)).await;
        }
    }
    if run.rows > 0 || run.attempts > 0 {
        while ledger.compact_step(COMPACT_PAGES_PER_STEP).await? > 0 {
            tokio::time::sleep(settings.pause).await;
        }
    }
    run.oldest_kept_ms = ledger.oldest_stored_response_ms().await?;
    let oldest_age_ms = run.oldest_kept_ms.map_or(0, |oldest| now_ms.saturating_sub(oldest).max(0));
    metrics::gauge!("tollgate_stored_response_oldest_age_seconds").set(oldest_age_ms as f64 / 1000.0);
    Ok(run)
}

/// The job's work. `clock` is the one charges are dated by (the system's, or a test's), so the
/// window is measured as the gateway measures it when a retry comes.
pub fn prune_work(ledger: Arc<dyn Ledger>, clock: Clock, settings: PruneSettings) -> JobWork {
    Arc::new(move || {
        let (ledger, now_ms) = (Arc::clone(&ledger), clock());
        Box::pin(async move {
            let run = prune(&*ledger, now_ms, settings).await.map_err(|error| error.to_string())?;
            let oldest = run.oldest_kept_ms.map_or_else(|| "none kept".to_string(), |oldest| format!("oldest kept charged at {oldest} ms"));
            Ok(format!("{} stored responses pruned ({} bytes) and {} upstream attempts in {} batches; {oldest}", run.rows, run.bytes, run.attempts, run.batches))
        })
    })
}

/// The `partitions` job's work: the partitions of this month and `months_ahead` more, on the
/// clock charges are dated by. Gauges: months made ahead of the current one, rows in the default
/// partition (a month nobody made a partition for; each run moves them).
pub fn partitions_work(ledger: Arc<dyn Ledger>, clock: Clock, months_ahead: u32) -> JobWork {
    Arc::new(move || {
        let (ledger, now_ms) = (Arc::clone(&ledger), clock());
        Box::pin(async move {
            let partitions = ledger.ensure_usage_partitions(now_ms, months_ahead).await.map_err(|error| error.to_string())?;
            if !partitions.partitioned {
                return Ok("the usage log is not partitioned on this ledger".to_string());
            }
            let ahead = months_covered_ahead(&partitions.months, now_ms).map_err(|error| error.to_string())?;
            metrics::gauge!("tollgate_usage_partition_months_ahead").set(f64::from(ahead));
            metrics::gauge!("tollgate_usage_log_default_rows").set(partitions.default_rows as f64);
            metrics::counter!("tollgate_usage_partitions_made_total").increment(partitions.made.len() as u64);
            let made = if partitions.made.is_empty() { "none made".to_string() } else { format!("made {}", partitions.made.join(", ")) };
            Ok(format!("{made}; {} months partitioned, {ahead} ahead of this one; {} rows in the default partition", partitions.months.len(), partitions.default_rows))
        })
    })
}

/// How many months after the current one have a partition without a gap (0: only this one,
/// or not even it).
///
/// # Errors
/// The time is outside what a date can hold.
pub fn months_covered_ahead(months: &[String], now_ms: i64) -> StoreResult<u32> {
    let mut ahead = 0;
    while months.contains(&tollgate_store::retention::month_label(now_ms, ahead + 1)?) {
        ahead += 1;
    }
    Ok(ahead)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::{PruneSettings, months_covered_ahead, pause_after};

    #[test]
    fn a_bounded_prune_waits_out_what_its_rows_may_take() {
        let mut settings = PruneSettings { window_ms: 1, attempts_retention_ms: 0, batch_rows: 1_000, pause: Duration::from_millis(50), rows_per_second: 2_000 };
        // 1,000 rows at 2,000 a second: half a second, of which the batch took 100 ms.
        assert_eq!(pause_after(1_000, Duration::from_millis(100), &settings), Duration::from_millis(400));
        assert_eq!(pause_after(1_000, Duration::from_millis(480), &settings), Duration::from_millis(50), "never below the pause");
        assert_eq!(pause_after(1_000, Duration::from_secs(3), &settings), Duration::from_millis(50), "a slow batch waits the pause only");
        settings.rows_per_second = 0;
        assert_eq!(pause_after(1_000, Duration::ZERO, &settings), Duration::from_millis(50), "no bound: the pause");
    }

    #[test]
    fn months_ahead_count_the_partitions_after_this_month_up_to_the_first_gap() {
        let december = 1_796_083_200_000; // 2026-12-01 UTC
        let months = |labels: &[&str]| labels.iter().map(|label| label.to_string()).collect::<Vec<_>>();
        assert_eq!(months_covered_ahead(&months(&["2026-12", "2027-01", "2027-02"]), december).unwrap(), 2);
        assert_eq!(months_covered_ahead(&months(&["2026-12", "2027-02"]), december).unwrap(), 0, "a gap ends the count");
        assert_eq!(months_covered_ahead(&months(&["2026-11", "2027-01"]), december).unwrap(), 1, "earlier months do not count");
        assert_eq!(months_covered_ahead(&[], december).unwrap(), 0);
    }
}
