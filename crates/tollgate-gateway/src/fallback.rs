//! The hot store with ledger charging behind it (`degradation.hot_store_down = "charge_ledger"`):
//! while Redis is unreachable, authorize, settle and void run in PostgreSQL
//! ([`LedgerCharging`]); when Redis answers again, the accounts charged in the ledger are
//! resynchronised — unloaded from Redis, so their next request loads them from the ledger —
//! before Redis serves them again.
//!
//! Modes, per gateway process:
//! - `Hot`: every step in Redis. A step that finds Redis unreachable switches to `Ledger`; an
//!   account found not loaded is asked of the ledger first (it may be stale).
//! - `Ledger`: every new request is authorized in the ledger.
//! - `Recovering` (Redis answers again): a request for an account still marked stale is
//!   charged in the ledger, any other in Redis; [`run_resync`] releases each stale account once
//!   it has no open ledger hold (its next load subtracts the charges Redis made that the ledger
//!   does not have yet). When none is left: `Hot`.
//!
//! A request settles or voids where it was authorized. A Redis settle that fails is charged in
//! the ledger instead (the ledger's per-request-id uniqueness keeps it to one charge even if
//! Redis did apply it), so a request served is never left unbilled.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tollgate_core::Money;
use tollgate_store::hot::{AccountSnapshot, Authorization, AuthorizeRequest, BalanceView, FundApplication, Refusal, Settlement, WithdrawalHold};
use tollgate_store::ledger_charging::LedgerCharging;
use tollgate_store::model::{ChargedRequest, UsageEvent};
use tollgate_store::operations::{HotAccountView, UnloggedCharge};
use tollgate_store::{HotStore, StoreError, StoreResult};

/// How often the resync loop looks at Redis and the stale accounts.
const RESYNC_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Hot = 0,
    Ledger = 1,
    Recovering = 2,
}

/// A hot store that keeps charging in the ledger while it is unreachable.
pub struct LedgerFallback {
    hot: Arc<dyn HotStore>,
    charging: LedgerCharging,
    mode: AtomicU8,
    /// (account, request id) of the holds this process placed in the ledger: their settle or
    /// void goes there too.
    ledger_held: Mutex<HashSet<(String, String)>>,
}

fn unavailable(result: &StoreResult<impl Sized>) -> bool {
    matches!(result, Err(StoreError::Unavailable(_)))
}

impl LedgerFallback {
    pub fn new(hot: Arc<dyn HotStore>, charging: LedgerCharging) -> LedgerFallback {
        LedgerFallback { hot, charging, mode: AtomicU8::new(Mode::Hot as u8), ledger_held: Mutex::new(HashSet::new()) }
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Acquire) {
            0 => Mode::Hot,
            1 => Mode::Ledger,
            _ => Mode::Recovering,
        }
    }

    fn set_mode(&self, mode: Mode) {
        let previous = self.mode.swap(mode as u8, Ordering::AcqRel);
        if previous != mode as u8 {
            metrics::gauge!("tollgate_hot_store_mode").set(f64::from(mode as u8));
            match mode {
                Mode::Ledger => tracing::error!("the hot store is unreachable: charging in the ledger (degradation.hot_store_down = charge_ledger)"),
                Mode::Recovering => tracing::warn!("the hot store answers again: resynchronising the accounts charged in the ledger"),
                Mode::Hot => tracing::warn!("resynchronised: charging in the hot store again"),
            }
        }
    }

    fn ledger_held(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        // The set is only ever inserted into and removed from; a panic elsewhere cannot leave
        // it half-changed, so a poisoned lock is still sound to use.
        self.ledger_held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn authorize_in_ledger(&self, request: &AuthorizeRequest, only_if_stale: bool) -> StoreResult<Option<Authorization>> {
        let authorization = self.charging.authorize(request, only_if_stale).await?;
        if let Some(Authorization::Held { .. }) = authorization {
            self.ledger_held().insert((request.account_id.clone(), request.request_id.clone()));
        }
        Ok(authorization)
    }

    /// Ledger mode: every request is authorized in the ledger.
    async fn authorize_in_ledger_always(&self, request: &AuthorizeRequest) -> StoreResult<Authorization> {
        self.authorize_in_ledger(request, false)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the ledger declined an unconditional authorize".into()))
    }

    async fn authorize_or_fall_back(&self, request: &AuthorizeRequest) -> StoreResult<Authorization> {
        let outcome = self.hot.authorize(request).await;
        if !unavailable(&outcome) {
            return outcome;
        }
        self.set_mode(Mode::Ledger);
        self.authorize_in_ledger_always(request).await
    }

    async fn settle_in_ledger(&self, event: &UsageEvent) -> StoreResult<Settlement> {
        let settlement = self.charging.settle(event).await?;
        // The account is stale now, whatever the mode was: do not serve it from Redis unchecked.
        if self.mode() == Mode::Hot {
            self.set_mode(Mode::Recovering);
        }
        Ok(settlement)
    }

    /// One pass of the resync. Ledger → Recovering once Redis answers; Hot → Recovering when any
    /// account is marked stale (another gateway charged the ledger, or this one before a
    /// restart). Recovering: every stale account is unloaded from Redis at once — a gateway that
    /// finds an account not loaded asks the ledger before loading it, so none serves a stale
    /// account from Redis — and its mark is released once no ledger hold of it is open and the
    /// ledger has every charge of it still in Redis's usage log. Recovering → Hot when no
    /// account is marked.
    ///
    /// # Errors
    /// A store failed; the next pass tries again.
    pub async fn resync_step(&self) -> StoreResult<()> {
        match self.mode() {
            Mode::Hot => {
                if self.charging.stale_accounts().await?.is_empty() {
                    return Ok(());
                }
                self.set_mode(Mode::Recovering);
            }
            Mode::Ledger => {
                self.hot.ping().await?;
                self.set_mode(Mode::Recovering);
            }
            Mode::Recovering => {}
        }
        // Holds of gateways that died in ledger mode would otherwise only go when their
        // account is authorized again (`serve --no-worker` runs no sweeper here).
        self.charging.expire_holds().await?;
        let mut stale = self.charging.stale_accounts().await?;
        if !stale.is_empty() {
            // The next request loads each from the ledger, less the charges Redis made that the
            // ledger does not have yet (operations::load_snapshot): none waits for the worker,
            // nor for good on a charge parked in the dead letters.
            for account_id in &stale {
                self.charging.release_stale(account_id, &*self.hot).await?;
            }
            stale = self.charging.stale_accounts().await?;
        }
        if self.mode() == Mode::Recovering && stale.is_empty() {
            self.set_mode(Mode::Hot);
        }
        Ok(())
    }
}

/// Resynchronises until `shutdown`, and releases expired ledger holds.
pub async fn run_resync(fallback: Arc<LedgerFallback>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(RESYNC_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // Set on every pass, not only on change: the exporter may be installed after start.
        metrics::gauge!("tollgate_hot_store_mode").set(f64::from(fallback.mode() as u8));
        let resynchronising = fallback.mode() == Mode::Recovering;
        if let Err(error) = fallback.resync_step().await {
            // Otherwise a failure is the expected answer: Redis still down (Ledger), or
            // PostgreSQL down while Redis charges (Hot).
            if resynchronising {
                tracing::warn!(%error, "resynchronising the hot store failed; retrying");
            }
        }
    }
}

#[async_trait]
impl HotStore for LedgerFallback {
    async fn ping(&self) -> StoreResult<()> {
        self.hot.ping().await
    }

    fn recent_charge_ms(&self) -> i64 {
        self.hot.recent_charge_ms()
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> StoreResult<Authorization> {
        match self.mode() {
            Mode::Hot => {
                let outcome = self.authorize_or_fall_back(request).await?;
                if outcome == Authorization::Refused(Refusal::AccountNotLoaded) {
                    // Before it is loaded from the ledger: the ledger may be serving it.
                    if let Some(authorization) = self.authorize_in_ledger(request, true).await? {
                        return Ok(authorization);
                    }
                }
                Ok(outcome)
            }
            Mode::Ledger => self.authorize_in_ledger_always(request).await,
            Mode::Recovering => match self.authorize_in_ledger(request, true).await? {
                Some(authorization) => Ok(authorization),
                None => self.authorize_or_fall_back(request).await,
            },
        }
    }

    /// Pins are read only where they live, in Redis: in `Hot` mode, when Redis holds the
    /// account and answers; otherwise the request goes unpinned (a pin only reorders channels).
    async fn authorize_pinned(&self, request: &AuthorizeRequest, session: Option<&str>) -> StoreResult<(Authorization, Option<String>)> {
        if self.mode() == Mode::Hot
            && let Ok(outcome) = self.hot.authorize_pinned(request, session).await
            && outcome.0 != Authorization::Refused(Refusal::AccountNotLoaded)
        {
            return Ok(outcome);
        }
        Ok((self.authorize(request).await?, None))
    }

    async fn clear_pins(&self, account_id: &str) -> StoreResult<()> {
        self.hot.clear_pins(account_id).await
    }

    async fn lock_session(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<Option<u64>> {
        self.hot.lock_session(account_id, session, token, ttl_ms).await
    }

    async fn renew_session_lock(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<bool> {
        self.hot.renew_session_lock(account_id, session, token, ttl_ms).await
    }

    async fn unlock_session(&self, account_id: &str, session: &str, token: Option<&str>) -> StoreResult<bool> {
        self.hot.unlock_session(account_id, session, token).await
    }

    async fn settle(&self, event: UsageEvent) -> StoreResult<Settlement> {
        let key = (event.account_id.clone(), event.request_id.clone());
        // Settle runs once per request, charged or not: the entry goes either way (a hold left
        // in the ledger expires).
        if self.ledger_held().remove(&key) {
            return self.settle_in_ledger(&event).await;
        }
        let outcome = self.hot.settle(event.clone()).await;
        match outcome {
            Err(StoreError::Unavailable(_)) => {
                self.set_mode(Mode::Ledger);
                tracing::warn!(request_id = event.request_id, "settle could not reach the hot store: charged in the ledger");
            }
            // Unloaded under the request by a resync: the ledger now keeps the account.
            Err(StoreError::NotFound { entity: "hot account", .. }) => {
                tracing::warn!(request_id = event.request_id, "the account left the hot store during the request: charged in the ledger");
            }
            other => return other,
        }
        self.settle_in_ledger(&event).await
    }

    async fn void(&self, event: UsageEvent) -> StoreResult<()> {
        let key = (event.account_id.clone(), event.request_id.clone());
        if self.ledger_held().remove(&key) {
            return self.charging.void(&event).await;
        }
        // A Redis hold that cannot be released expires on its own.
        self.hot.void(event).await
    }

    async fn expire_holds(&self) -> StoreResult<u64> {
        let in_hot = match self.hot.expire_holds().await {
            Err(StoreError::Unavailable(_)) if self.mode() != Mode::Hot => 0,
            other => other?,
        };
        // PostgreSQL down must not stop Redis's holds from expiring.
        let in_ledger = self.charging.expire_holds().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "releasing expired ledger holds failed; the next sweep retries");
            0
        });
        Ok(in_ledger + in_hot)
    }

    /// A stale account is not loaded: the ledger keeps it until the resync releases it.
    async fn load_account(&self, snapshot: AccountSnapshot) -> StoreResult<bool> {
        if self.charging.is_stale(&snapshot.account_id).await? {
            return Ok(false);
        }
        self.hot.load_account(snapshot).await
    }

    async fn apply_fund(&self, account_id: &str, fund_ledger_seq: i64, amount: Money, withdrawal_id: Option<&str>) -> StoreResult<FundApplication> {
        self.hot.apply_fund(account_id, fund_ledger_seq, amount, withdrawal_id).await
    }

    /// Only in `Hot` mode and for an account Redis keeps: elsewhere the account's free funds
    /// are split between Redis and the ledger, and no one step sees them all. A refund waits
    /// for the recovery rather than risk taking held or spent money.
    async fn hold_withdrawal(&self, account_id: &str, withdrawal_id: &str, amount: Money, ttl_ms: u64) -> StoreResult<WithdrawalHold> {
        if self.mode() != Mode::Hot || self.charging.is_stale(account_id).await? {
            return Err(StoreError::Unavailable("funds cannot leave an account while the hot store is degraded; retry once it has recovered".into()));
        }
        self.hot.hold_withdrawal(account_id, withdrawal_id, amount, ttl_ms).await
    }

    async fn release_withdrawal(&self, account_id: &str, withdrawal_id: &str) -> StoreResult<()> {
        self.hot.release_withdrawal(account_id, withdrawal_id).await
    }

    /// Outside `Hot` mode the ledger's view: Redis may be down, or stale for this account.
    async fn balance(&self, account_id: &str, api_key_id: &str) -> StoreResult<Option<BalanceView>> {
        match self.mode() {
            Mode::Hot => match self.hot.balance(account_id, api_key_id).await? {
                None if self.charging.is_stale(account_id).await? => self.charging.balance_view(account_id, api_key_id).await,
                view => Ok(view),
            },
            Mode::Ledger | Mode::Recovering => self.charging.balance_view(account_id, api_key_id).await,
        }
    }

    /// Outside `Hot` mode `None`: the caller then reads the ledger, where a request charged in
    /// the ledger keeps its binding and response (and one charged in Redis does once the worker
    /// wrote it).
    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<ChargedRequest>> {
        match self.mode() {
            Mode::Hot => self.hot.charged_request(account_id, request_id).await,
            Mode::Ledger | Mode::Recovering => Ok(None),
        }
    }

    async fn unload_account(&self, account_id: &str) -> StoreResult<()> {
        self.hot.unload_account(account_id).await
    }

    async fn hot_views(&self, account_ids: &[String]) -> StoreResult<Vec<Option<HotAccountView>>> {
        self.hot.hot_views(account_ids).await
    }

    async fn unlogged_charges(&self) -> StoreResult<Vec<UnloggedCharge>> {
        self.hot.unlogged_charges().await
    }

    async fn unlogged_charges_of(&self, account_id: &str) -> StoreResult<Vec<UnloggedCharge>> {
        self.hot.unlogged_charges_of(account_id).await
    }

    async fn repair_balance(&self, seen: &HotAccountView, balance: Money) -> StoreResult<bool> {
        self.hot.repair_balance(seen, balance).await
    }
}
