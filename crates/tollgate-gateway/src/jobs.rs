//! Which periodic jobs a process runs, built from its configuration (the runner and the lease
//! protocol are in `tollgate_worker::jobs`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::clock::Clock;
use tollgate_store::redis_store::{Connection, KeySpace, backlog};
use tollgate_store::{HotStore, Ledger};
use tollgate_worker::jobs::{JobWork, LeasedJob, hold_sweep_work, run_hold_sweeper, run_leased};
use tollgate_worker::reconcile::Reconciler;
use tollgate_worker::retention::{PruneSettings, partitions_work, prune_work};

use crate::config::GatewayConfig;

/// The stores a process's jobs work on.
pub struct JobStores {
    pub ledger: Arc<dyn Ledger>,
    pub hot: Arc<dyn HotStore>,
    /// The Redis connection and key space in services mode (for the stream-lag check).
    pub redis: Option<(Connection, KeySpace)>,
    /// The clock charges are dated by: the `prune` job measures the replay window on it.
    pub clock: Clock,
}

/// Starts this process's periodic jobs on `tasks`; they stop at `shutdown`.
pub fn spawn(tasks: &TaskTracker, stores: &JobStores, config: &GatewayConfig, shutdown: &CancellationToken) {
    let hold_sweep = Duration::from_millis(config.limits.hold_sweep_interval_ms);
    let holder = config.worker_name.clone();
    let mut leased = Vec::new();
    match &stores.redis {
        // The in-process store's holds are this process's alone: no lease, nothing to share.
        None => {
            tasks.spawn(run_hold_sweeper(Arc::clone(&stores.hot), hold_sweep, shutdown.clone()));
        }
        Some((connection, keys)) => {
            leased.push(LeasedJob { name: "hold_sweep", period: hold_sweep, work: hold_sweep_work(Arc::clone(&stores.hot)) });
            if config.jobs.stream_lag_interval_ms > 0 {
                let work = stream_lag_work(connection.clone(), keys.clone(), config.jobs.stream_lag_warn_entries);
                leased.push(LeasedJob { name: "stream_lag", period: Duration::from_millis(config.jobs.stream_lag_interval_ms), work });
            }
        }
    }
    if config.jobs.reconcile_interval_ms > 0 {
        let work = reconcile_work(Arc::clone(&stores.ledger), Arc::clone(&stores.hot), hot_store_name(config), config.jobs.reconcile_fix);
        leased.push(LeasedJob { name: "reconcile", period: Duration::from_millis(config.jobs.reconcile_interval_ms), work });
    }
    if config.jobs.prune_interval_ms > 0 {
        let settings = PruneSettings {
            window_ms: i64::try_from(config.limits.replay_window_ms).unwrap_or(i64::MAX),
            attempts_retention_ms: i64::try_from(config.jobs.upstream_attempts_retention_ms).unwrap_or(i64::MAX),
            batch_rows: config.jobs.prune_batch_rows,
            pause: Duration::from_millis(config.jobs.prune_pause_ms),
            rows_per_second: config.jobs.prune_rows_per_second,
        };
        leased.push(LeasedJob { name: "prune", period: Duration::from_millis(config.jobs.prune_interval_ms), work: prune_work(Arc::clone(&stores.ledger), Arc::clone(&stores.clock), settings) });
    }
    if config.jobs.partitions_interval_ms > 0 {
        let work = partitions_work(Arc::clone(&stores.ledger), Arc::clone(&stores.clock), config.jobs.partitions_ahead_months);
        leased.push(LeasedJob { name: "partitions", period: Duration::from_millis(config.jobs.partitions_interval_ms), work });
    }
    if let Some(work) = crate::webhooks::deliver_work(Arc::clone(&stores.ledger), config.alerts.clone()) {
        leased.push(LeasedJob { name: "webhooks", period: Duration::from_millis(config.alerts.deliver_interval_ms), work });
    }
    for job in leased {
        tasks.spawn(run_leased(Arc::clone(&stores.ledger), holder.clone(), job, shutdown.clone()));
    }
}

/// How reconciliation reports names the hot store it compared.
pub fn hot_store_name(config: &GatewayConfig) -> &'static str {
    if config.redis_url.is_some() { "redis" } else { "in-process" }
}

fn reconcile_work(ledger: Arc<dyn Ledger>, hot: Arc<dyn HotStore>, hot_store_name: &'static str, fix: bool) -> JobWork {
    Arc::new(move || {
        let (ledger, hot) = (Arc::clone(&ledger), Arc::clone(&hot));
        Box::pin(async move {
            let reconciler = Reconciler { ledger: &*ledger, hot: Some(&*hot), hot_store_name };
            let run = reconciler.run(fix).await.map_err(|error| error.to_string())?;
            Ok(format!(
                "run {}: {} accounts, {} busy, {} drifts, {} repaired",
                run.id, run.accounts_checked, run.accounts_busy, run.drifts_found, run.accounts_repaired
            ))
        })
    })
}

fn stream_lag_work(connection: Connection, keys: KeySpace, warn_entries: u64) -> JobWork {
    Arc::new(move || {
        let (connection, keys) = (connection.clone(), keys.clone());
        Box::pin(async move {
            let backlog = backlog(&connection, &keys).await.map_err(|error| error.to_string())?;
            metrics::gauge!("tollgate_usage_stream_lag_entries").set(backlog.lag as f64);
            metrics::gauge!("tollgate_usage_pending_entries").set(backlog.pending as f64);
            metrics::gauge!("tollgate_usage_dead_letter_entries").set(backlog.dead_letters as f64);
            if backlog.lag + backlog.pending > warn_entries {
                tracing::warn!(lag = backlog.lag, pending = backlog.pending, "the worker is behind the gateways");
            }
            if backlog.dead_letters > 0 {
                tracing::warn!(dead_letters = backlog.dead_letters, "usage events are parked in the dead-letter streams");
            }
            Ok(format!("lag {}, pending {}, dead letters {}", backlog.lag, backlog.pending, backlog.dead_letters))
        })
    })
}
