//! LISTEN/NOTIFY: every gateway hears what other gateways (and operators) changed in the
//! ledger. A fund change is applied to the hot balance (idempotently, by its ledger sequence);
//! a price, plan, status or key change invalidates the billing-context cache at once.
//! Notifications are not durable, so after every (re)connect the gateway catches up from the
//! ledger itself.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;
use tollgate_store::postgres::{CONFIG_CHANNEL, FUND_CHANNEL};

use crate::charge;
use crate::state::AppState;

const RECONNECT_BACKOFF_MS_MIN: u64 = 100;
const RECONNECT_BACKOFF_MS_MAX: u64 = 5_000;

/// Listens until shutdown, reconnecting with capped backoff.
pub async fn run_listener(state: AppState, pool: PgPool, shutdown: CancellationToken) {
    let mut backoff_ms = RECONNECT_BACKOFF_MS_MIN;
    while !shutdown.is_cancelled() {
        match listen_once(&state, &pool, &shutdown).await {
            Ok(()) => backoff_ms = RECONNECT_BACKOFF_MS_MIN,
            Err(error) => {
                metrics::counter!("tollgate_notify_reconnects_total").increment(1);
                tracing::warn!(%error, backoff_ms, "ledger notifications interrupted; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
            }
        }
    }
}

/// One connection's life: subscribe, catch up, then apply notifications until it drops.
async fn listen_once(state: &AppState, pool: &PgPool, shutdown: &CancellationToken) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([FUND_CHANNEL, CONFIG_CHANNEL]).await?;
    // The ledger answers again: lookups paused by a failure during the outage resume before
    // the catch-up drops the cached contexts.
    charge::ledger_reachable(state);
    // Subscribed first, then caught up: nothing committed in between is missed.
    catch_up(state).await;
    loop {
        let notification = tokio::select! {
            notification = listener.try_recv() => notification?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let Some(notification) = notification else {
            return Err(sqlx::Error::Protocol("notification connection lost".into()));
        };
        metrics::counter!("tollgate_notifications_total", "channel" => notification.channel().to_string()).increment(1);
        match notification.channel() {
            FUND_CHANNEL => apply_fund_notification(state, notification.payload()).await,
            _ => invalidate(state).await,
        }
    }
}

async fn apply_fund_notification(state: &AppState, payload: &str) {
    let account_id = serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|value| value.get("account_id").and_then(|id| id.as_str()).map(str::to_string));
    let Some(account_id) = account_id else {
        tracing::error!(payload, "fund notification without an account id");
        return;
    };
    if let Err(error) = charge::apply_pending_funds(state, &account_id).await {
        tracing::warn!(account_id, %error, "fund notification not applied yet; retried each second until it is");
    }
}

async fn invalidate(state: &AppState) {
    state.contexts.invalidate_all();
    if let Err(error) = state.reload_prices().await {
        tracing::error!(%error, "reloading prices after a change failed; keeping the previous table");
    }
    if let Err(error) = state.reload_channels().await {
        tracing::error!(%error, "reloading the channels after a change failed; keeping them as they are");
    }
}

/// Everything a missed notification could have said: caches dropped, prices re-read, every
/// loaded account's fund transactions applied up to the ledger's.
async fn catch_up(state: &AppState) {
    invalidate(state).await;
    let account_ids = match state.ledger.account_ids().await {
        Ok(account_ids) => account_ids,
        Err(error) => {
            tracing::error!(%error, "catch-up could not list accounts");
            return;
        }
    };
    for account_id in account_ids {
        if let Err(error) = charge::apply_pending_funds(state, &account_id).await {
            tracing::warn!(account_id, %error, "catch-up of fund transactions failed for an account");
        }
    }
}
