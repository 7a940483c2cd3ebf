//! Periodic jobs.
//!
//! Jobs on shared state (reconciliation, the Redis hold sweep, the stream-lag check, webhook
//! delivery) run under a lease kept in the ledger's database, so that with several gateways
//! and workers exactly one instance runs each period of each job:
//!
//! - time is cut into periods (`period_start = now − now mod period`); every instance tries to
//!   claim the current period when it begins;
//! - a claim succeeds only if no lease on the job is live and the period has not run
//!   (`job_runs` has one row per job and period), and hands out a fencing token that grows with
//!   every claim;
//! - the holder renews its lease while it works; an instance that cannot renew (another one
//!   took over after its lease ran out) stops working at once;
//! - a killed leader's lease runs out after `lease` at most, so another instance runs the next
//!   period: a leader is replaced within one period.
//!
//! The in-process hold sweeper of embedded mode acts on this process's own memory, so it runs
//! without a lease ([`run_hold_sweeper`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::clock::now_ms;
use tollgate_store::{HotStore, Ledger};

/// What a job's one run returns: an outcome for `job_runs`, or an error.
pub type JobFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
/// A job's work, called once per claimed period.
pub type JobWork = Arc<dyn Fn() -> JobFuture + Send + Sync>;

/// A periodic job run under a lease.
#[derive(Clone)]
pub struct LeasedJob {
    /// The job's name in `job_leases` and `job_runs`: the same on every instance.
    pub name: &'static str,
    pub period: Duration,
    pub work: JobWork,
}

/// The longest lease: a holder renews every third of it while it works.
const LEASE_MAX: Duration = Duration::from_secs(30);
/// Pause after the ledger refused a claim for an error, before the next try.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// The lease of a job with this period: as long as the period (so a killed leader is replaced
/// by the next period), at most [`LEASE_MAX`] and at least one second.
pub fn lease_for(period: Duration) -> Duration {
    period.clamp(Duration::from_secs(1), LEASE_MAX)
}

/// Claims and runs `job` every period until shutdown. `holder` names this instance in the runs.
pub async fn run_leased(ledger: Arc<dyn Ledger>, holder: String, job: LeasedJob, shutdown: CancellationToken) {
    let period_ms = i64::try_from(job.period.as_millis()).unwrap_or(i64::MAX).max(1);
    let lease = lease_for(job.period);
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut last_period = i64::MIN;
    // The job's series exist from the start: its first run shows in `rate()`.
    metrics::counter!("tollgate_job_runs_total", "job" => job.name).absolute(0);
    metrics::counter!("tollgate_job_failures_total", "job" => job.name).absolute(0);
    let _registered = metrics::histogram!("tollgate_job_seconds", "job" => job.name);
    loop {
        let now = now_ms();
        let period_start = now - now.rem_euclid(period_ms);
        if period_start > last_period {
            match ledger.claim_job(job.name, period_start, &holder, lease_ms).await {
                Ok(Some(fence)) => {
                    last_period = period_start;
                    run_claimed(&*ledger, &job, period_start, fence, lease, &shutdown).await;
                }
                Ok(None) => last_period = period_start,
                Err(error) => {
                    tracing::warn!(job = job.name, %error, "could not claim the job; trying again");
                    if sleep_or_shutdown(CLAIM_RETRY, &shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let next = period_start.saturating_add(period_ms);
        let wait = Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0));
        if sleep_or_shutdown(wait, &shutdown).await {
            return;
        }
    }
}

/// Runs one claimed period, renewing the lease meanwhile; records the outcome.
async fn run_claimed(ledger: &dyn Ledger, job: &LeasedJob, period_start: i64, fence: i64, lease: Duration, shutdown: &CancellationToken) {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let started = std::time::Instant::now();
    let renew = || async move {
        match ledger.renew_job(job.name, fence, lease_ms).await {
            Ok(held) => held,
            Err(error) => {
                // Not lost yet: the lease may still be live; the next renewal tries again.
                tracing::warn!(job = job.name, %error, "could not renew the job's lease");
                true
            }
        }
    };
    let outcome = match beside_renewals((job.work)(), lease / 3, renew, shutdown).await {
        RunEnd::Done(result) => result.unwrap_or_else(|error| format!("error: {error}")),
        RunEnd::Shutdown => "interrupted by shutdown".to_string(),
        RunEnd::LeaseLost => {
            // Another instance holds the job now: stop, it runs the job from here.
            tracing::warn!(job = job.name, fence, "lost the job's lease; stopping this run");
            metrics::counter!("tollgate_job_leases_lost_total", "job" => job.name).increment(1);
            return;
        }
    };
    metrics::counter!("tollgate_job_runs_total", "job" => job.name).increment(1);
    metrics::histogram!("tollgate_job_seconds", "job" => job.name).record(started.elapsed().as_secs_f64());
    if outcome.starts_with("error") {
        tracing::error!(job = job.name, %outcome, "job failed");
        metrics::counter!("tollgate_job_failures_total", "job" => job.name).increment(1);
    }
    if let Err(error) = ledger.finish_job(job.name, period_start, fence, &outcome).await {
        tracing::warn!(job = job.name, %error, "could not record the job's outcome; its lease runs out by itself");
    }
}

/// How [`beside_renewals`] ended.
#[derive(Debug, PartialEq, Eq)]
enum RunEnd<T> {
    Done(T),
    LeaseLost,
    Shutdown,
}

/// Polls `work` to its end while `renew` runs every `every` — beside it, never instead of it:
/// on SQLite both need the one writer connection, and a renewal awaited while the work sat
/// unpolled inside its write transaction waited for the connection that transaction held; the
/// work (and every charge queued behind the writer) stalled until the pool's timeout, again at
/// every renewal (a prune run took 70 s for 153 rows, and the gateway served nothing). `renew`
/// says whether the lease is still held.
async fn beside_renewals<T, F: Future<Output = bool>>(
    work: impl Future<Output = T>,
    every: Duration,
    mut renew: impl FnMut() -> F,
    shutdown: &CancellationToken,
) -> RunEnd<T> {
    let renewals = async {
        let mut renewal = tokio::time::interval(every);
        renewal.tick().await;
        loop {
            renewal.tick().await;
            if !renew().await {
                return;
            }
        }
    };
    tokio::select! {
        result = work => RunEnd::Done(result),
        () = renewals => RunEnd::LeaseLost,
        () = shutdown.cancelled() => RunEnd::Shutdown,
    }
}

/// Sleeps; true if shutdown came first.
async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}

/// The hold sweep as a job: releases expired holds, reports how many.
pub fn hold_sweep_work(hot: Arc<dyn HotStore>) -> JobWork {
    Arc::new(move || {
        let hot = Arc::clone(&hot);
        Box::pin(async move { sweep_once(&*hot).await.map(|expired| format!("{expired} holds released")).map_err(|error| error.to_string()) })
    })
}

async fn sweep_once(hot: &dyn HotStore) -> tollgate_store::StoreResult<u64> {
    let expired = hot.expire_holds().await?;
    if expired > 0 {
        metrics::counter!("tollgate_holds_expired_total").increment(expired);
        tracing::warn!(expired, "released expired holds");
    }
    Ok(expired)
}

/// Releases expired holds every `period` until shutdown, without a lease: for the in-process hot
/// store, whose holds only this process can see.
pub async fn run_hold_sweeper(hot: Arc<dyn HotStore>, period: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => break,
        }
        if let Err(error) = sweep_once(&*hot).await {
            tracing::error!(%error, "hold sweep failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Notify;

    use super::*;

    /// A renewal that can only finish once the work has moved on (as on SQLite, when the work
    /// holds the writer the renewal waits for) does not stop the work: the run ends.
    #[tokio::test(start_paused = true)]
    async fn the_work_goes_on_while_a_renewal_waits_for_it() {
        let moved_on = Arc::new(Notify::new());
        let work = {
            let moved_on = Arc::clone(&moved_on);
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                moved_on.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
                "done"
            }
        };
        let renew = || {
            let moved_on = Arc::clone(&moved_on);
            async move {
                moved_on.notified().await;
                true
            }
        };
        // Paused time jumps ahead when every task waits: a stalled run reaches the hour at once.
        let ended = tokio::time::timeout(Duration::from_secs(3_600), beside_renewals(work, Duration::from_secs(1), renew, &CancellationToken::new())).await;
        assert_eq!(ended, Ok(RunEnd::Done("done")), "the run ended, after renewals began");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_or_a_shutdown_ends_the_run() {
        let endless = || std::future::pending::<()>();
        let lost = beside_renewals(endless(), Duration::from_secs(1), || async { false }, &CancellationToken::new()).await;
        assert_eq!(lost, RunEnd::LeaseLost);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(beside_renewals(endless(), Duration::from_secs(1), || async { true }, &shutdown).await, RunEnd::Shutdown);
    }
}
