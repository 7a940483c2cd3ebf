//! Periodic jobs. With one process there is nothing to elect; a lease comes with scaled-out
//! deployments.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::HotStore;

/// Releases expired holds every `period` until shutdown.
pub async fn run_hold_sweeper(hot: Arc<dyn HotStore>, period: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => break,
        }
        match hot.expire_holds().await {
            Ok(0) => {}
            Ok(expired) => {
                metrics::counter!("tollgate_holds_expired_total").increment(expired);
                tracing::warn!(expired, "released expired holds");
            }
            Err(error) => tracing::error!(%error, "hold sweep failed"),
        }
    }
}
