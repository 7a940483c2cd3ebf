//! The charge path: authorize → (forward, elsewhere) → settle or void. Each step is one atomic
//! hot-store operation; this module adds what surrounds them: loading a cold account from the
//! ledger, applying fund changes in order, and mapping refusals to the contract's errors.

use std::time::Duration;

use tollgate_core::Money;
use tollgate_store::hot::{
    Authorization, AuthorizeRequest, FundApplication, Limits, Refusal, Settlement, WithdrawalHold,
    withdrawal_id,
};
use tollgate_store::operations::load_snapshot;
use tollgate_store::clock::now_ms;
use tollgate_store::model::{FundOutcome, NewFund, UsageEvent};

use crate::config::Billing;
use crate::context::BillingContext;
use crate::error::ApiError;
use crate::state::AppState;

/// Why a charged request id is answered 409 `duplicate_request` when no other reason applies:
/// neither store has its response (a streaming one, a body pruned, or the ledger not caught up).
pub const NOT_REPLAYABLE: &str = "its response is not available to replay";

/// What authorize decided for a request id that passed every check.
pub enum Authorized {
    /// Funds are held; forward the request, then settle or void. `pinned`: the channel the
    /// session was last served by (routing affinity), when one was asked for and is known.
    Held { pinned: Option<String> },
    /// This request id was already charged: replay, never forward.
    AlreadyCharged,
}

/// The limits of a request, from its billing context.
pub fn limits(context: &BillingContext) -> Limits {
    Limits {
        credit_limit: context.account.credit_limit,
        daily_request_quota: context.account.daily_request_quota,
        monthly_request_quota: context.account.monthly_request_quota,
        key_budget_daily: context.key.budget_daily,
        key_budget_monthly: context.key.budget_monthly,
        key_budget_total: context.key.budget_total,
        key_requests_per_minute: context.key.rpm,
        key_tokens_per_minute: context.key.tpm,
    }
}

/// Step 1: hold funds for the request (loading the account into the hot store first if needed).
///
/// # Errors
/// The contract error of the first limit the request breaks; 503 if the stores fail.
pub async fn authorize(state: &AppState, request: &AuthorizeRequest, session: Option<&str>) -> Result<Authorized, ApiError> {
    let started = std::time::Instant::now();
    let mut outcome = state.hot.authorize_pinned(request, session).await?;
    if outcome.0 == Authorization::Refused(Refusal::AccountNotLoaded) {
        load_account(state, &request.account_id).await?;
        outcome = state.hot.authorize_pinned(request, session).await?;
    }
    metrics::histogram!("tollgate_authorize_seconds").record(started.elapsed().as_secs_f64());
    let (outcome, pinned) = outcome;
    let refusal = match outcome {
        Authorization::Held { .. } => return Ok(Authorized::Held { pinned }),
        Authorization::Refused(Refusal::AlreadyCharged) => return Ok(Authorized::AlreadyCharged),
        Authorization::Refused(refusal) => refusal,
    };
    metrics::counter!("tollgate_authorize_refused_total", "reason" => refusal.reason()).increment(1);
    Err(match refusal {
        Refusal::AccountNotLoaded => ApiError::BillingUnavailable("account could not be loaded into the hot store".into()),
        Refusal::InProgress => ApiError::RequestInProgress(request.request_id.clone()),
        Refusal::AlreadyCharged => ApiError::DuplicateRequest(request.request_id.clone(), NOT_REPLAYABLE),
        Refusal::InsufficientBalance { available, required } => ApiError::InsufficientBalance { available, required },
        Refusal::DailyQuotaExceeded { retry_after_secs } => ApiError::DailyQuotaExceeded { retry_after_secs },
        Refusal::MonthlyQuotaExceeded { retry_after_secs } => ApiError::MonthlyQuotaExceeded { retry_after_secs },
        Refusal::KeyBudgetExceeded { period, retry_after_secs } => {
            ApiError::KeyBudgetExceeded { period: period.as_str(), retry_after_secs }
        }
        Refusal::RateLimited { retry_after_secs } => ApiError::RateLimited { retry_after_secs },
    })
}

/// Whether a client-sent request id was charged, asking the hot store (which knows a charge
/// before its row reaches the ledger in services mode) and then the ledger. A hot store that
/// cannot answer leaves it to the ledger; the hold's own check still catches a charge missed.
pub async fn request_charged(state: &AppState, request: &AuthorizeRequest) -> bool {
    match state.hot.charged_request(&request.account_id, &request.request_id).await {
        Ok(Some(_)) => true,
        Ok(None) | Err(_) => charged_in_ledger(state, request).await,
    }
}

/// Whether the ledger already has a charge for this request id, which the hot store may have
/// forgotten (it remembers charged ids for `limits.recent_charge_ms`; the ledger, for good). Asked
/// for ids the client sent: an id made for this request cannot have been charged.
///
/// A ledger that cannot answer within `ledger_lookup_timeout_ms` leaves the hot store's window
/// as the only check, and the lookups pause for [`LEDGER_LOOKUP_PAUSE_MS`] so that an outage
/// costs one request a second that wait, not every one. A client reusing an id older than the
/// window while the ledger is away is then charged in the hot store, its row is refused as a
/// duplicate and the reconciliation reports the drift. Refusing every client-named request for
/// a ledger outage would stop what services mode is built to serve.
pub async fn charged_in_ledger(state: &AppState, request: &AuthorizeRequest) -> bool {
    if state.config.billing == Billing::Off {
        return false;
    }
    if !ledger_lookups_paused(state) {
        let timeout = Duration::from_millis(state.config.limits.ledger_lookup_timeout_ms);
        let reason = match tokio::time::timeout(timeout, state.ledger.request_charged(&request.account_id, &request.request_id)).await {
            Ok(Ok(charged)) => return charged,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        ledger_unreachable(state);
        tracing::warn!(reason, request_id = request.request_id, "the ledger could not say whether a client-sent request id was charged; the hot store's window decides");
    }
    metrics::counter!("tollgate_idempotency_ledger_unchecked_total").increment(1);
    false
}

/// How long ledger lookups on the request path (request ids, billing contexts) pause after
/// one failed.
pub const LEDGER_LOOKUP_PAUSE_MS: i64 = 1_000;

/// Whether a request-path ledger lookup failed less than [`LEDGER_LOOKUP_PAUSE_MS`] ago.
pub fn ledger_lookups_paused(state: &AppState) -> bool {
    now_ms() < state.ledger_lookups_paused_until_ms.load(std::sync::atomic::Ordering::Relaxed)
}

/// Ends a pause: the ledger answered (the notification listener reconnected).
pub fn ledger_reachable(state: &AppState) {
    state.ledger_lookups_paused_until_ms.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// Pauses request-path ledger lookups: the ledger just failed to answer one.
pub fn ledger_unreachable(state: &AppState) {
    state.ledger_lookups_paused_until_ms.store(now_ms().saturating_add(LEDGER_LOOKUP_PAUSE_MS), std::sync::atomic::Ordering::Relaxed);
}

/// Step 3: charge the real cost. Returns once the charge is durable.
///
/// # Errors
/// 503 when the charge could not be made durable in time; the response must not be delivered.
pub async fn settle(state: &AppState, event: UsageEvent) -> Result<Settlement, ApiError> {
    let started = std::time::Instant::now();
    let request_id = event.request_id.clone();
    let source = event.usage_source.as_str();
    let (model, customer_type, usage, cost) = (event.model.clone(), event.customer_type.clone(), event.usage, event.cost);
    let timeout = Duration::from_millis(state.config.limits.settle_timeout_ms);
    let settlement = tokio::time::timeout(timeout, state.hot.settle(event))
        .await
        .map_err(|_| ApiError::BillingUnavailable(format!("settle of {request_id} timed out")))??;
    metrics::histogram!("tollgate_settle_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("tollgate_charges_total", "usage_source" => source).increment(1);
    if settlement.already_settled {
        tracing::warn!(request_id, "settle found the request already charged; nothing charged again");
    } else {
        record_charged(model, customer_type, &usage, cost);
    }
    debug_assert!(
        settlement.already_settled || settlement.balance_after <= settlement.balance_before,
        "a charge never raises a balance"
    );
    Ok(settlement)
}

/// Tokens by kind and spend by model and tier, for dashboards: no account label (the series
/// count stays bounded by models and tiers). Spend is in nanos of the currency unit; the
/// ledger, not this counter, is the record.
fn record_charged(model: String, customer_type: String, usage: &tollgate_core::Usage, cost: tollgate_core::Money) {
    for (kind, tokens) in [
        ("input", usage.input_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("cache_write", usage.cache_write_tokens),
        ("output", usage.output_tokens),
        ("reasoning", usage.reasoning_tokens),
    ] {
        if tokens > 0 {
            metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => kind).increment(tokens);
        }
    }
    metrics::counter!("tollgate_spend_nanos_total", "model" => model, "customer_type" => customer_type).increment(u64::try_from(cost.nanos()).unwrap_or(0));
}

/// Step 4: nothing billable was produced; release the hold and record the failure.
pub async fn void(state: &AppState, event: UsageEvent) {
    let request_id = event.request_id.clone();
    metrics::counter!("tollgate_voids_total").increment(1);
    if let Err(error) = state.hot.void(event).await {
        // The hold expires on its own; log so an operator can see why it lingered.
        tracing::error!(%error, request_id, "void failed; the hold will expire");
    }
}

/// Loads an account into the hot store from the ledger (less what it still owes: see
/// [`load_snapshot`]), then applies any fund transaction that committed after the snapshot (the load races with fund changes; applying by sequence makes
/// the race harmless).
///
/// # Errors
/// `NotFound` for an unknown account; 503 when a store fails.
pub async fn load_account(state: &AppState, account_id: &str) -> Result<(), ApiError> {
    let snapshot = load_snapshot(&*state.ledger, &*state.hot, account_id, state.now_ms())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("account {account_id} not found")))?;
    if !snapshot.unlogged.is_empty() {
        tracing::info!(account_id, charges = snapshot.unlogged.len(), "loading an account that still owes charges the ledger does not have yet");
    }
    if state.hot.load_account(snapshot).await? {
        metrics::counter!("tollgate_hot_account_loads_total").increment(1);
    }
    apply_pending_funds(state, account_id).await
}

/// Applies, in order, every fund transaction of the account the hot store has not applied yet.
/// When a store fails the account is marked in [`UnappliedFunds`] and [`run_fund_retries`]
/// tries again until it succeeds: a top-up confirmed while Redis is down is never left out.
///
/// # Errors
/// 503 when a store fails; the fund change is in the ledger and a later call applies it.
pub async fn apply_pending_funds(state: &AppState, account_id: &str) -> Result<(), ApiError> {
    let result = apply_funds_in_order(state, account_id).await;
    if result.is_err() {
        // Committed in the ledger but not in the hot balance: retried until it is.
        state.unapplied_funds.mark(account_id);
    }
    result
}

async fn apply_funds_in_order(state: &AppState, account_id: &str) -> Result<(), ApiError> {
    // The hot store's own position (never a substitute view): what it lacks is what to apply.
    let Some(view) = state.hot.hot_views(&[account_id.to_string()]).await?.pop().flatten() else {
        // Not loaded: the next load reads a balance that includes the change.
        return Ok(());
    };
    for fund in state.ledger.fund_transactions_after(account_id, view.last_fund_seq).await? {
        // A withdrawal's hold is released in the step that applies it.
        let withdrawal = fund.amount.is_negative().then(|| withdrawal_id(fund.kind.as_str(), &fund.reference_id));
        match state.hot.apply_fund(account_id, fund.ledger_seq, fund.amount, withdrawal.as_deref()).await? {
            FundApplication::Applied { balance_after } => {
                tracing::info!(account_id, fund_seq = fund.seq, amount = %fund.amount, %balance_after, "fund applied to hot balance");
            }
            FundApplication::AlreadyApplied | FundApplication::AccountNotLoaded => {}
        }
    }
    Ok(())
}

/// How long a withdrawal's hold lasts if the gateway dies between holding and applying it.
/// The ledger commit it covers takes milliseconds; another gateway (NOTIFY) or the next load
/// applies a committed one long before this.
const WITHDRAWAL_HOLD_TTL_MS: u64 = 60_000;

/// Funds out — a refund or a negative adjustment — only from free funds (DESIGN "Funds out only
/// from free funds"): the amount is first held in the hot store, atomically against every open
/// hold and every charge (the hot balance already lacks the charges the ledger does not have
/// yet); only then is the fund transaction written, and applying it releases the hold in the
/// same step. A ledger that refuses it releases the hold; one that does not answer leaves it to
/// the apply (if it committed) or to its expiry. A reference already recorded is answered from
/// the ledger, whatever the free funds are now.
///
/// A committed withdrawal whose apply keeps failing past the hold's expiry (60 s, retried each
/// second) would show its funds as free again until applied; both steps go to the same hot
/// store key, so one failing for a minute while authorizes of that account succeed is not
/// expected, and reconciliation reports the drift if it happens.
///
/// # Errors
/// 402 `insufficient_balance` beyond the free funds; 409 while the same reference is being
/// written; the ledger's refusal; 503 when a store is unavailable.
pub async fn record_withdrawal(state: &AppState, fund: NewFund) -> Result<FundOutcome, ApiError> {
    debug_assert!(fund.amount.is_negative(), "a withdrawal takes money out");
    if state.ledger.fund_by_reference(fund.kind, &fund.reference_id).await?.is_some() {
        // The ledger decides: the same transaction is answered as recorded, another a conflict.
        return Ok(state.ledger.record_fund(fund).await?);
    }
    let amount = fund.amount.checked_neg().ok_or_else(|| ApiError::InvalidRequest("amount out of range".into()))?;
    let hold_id = withdrawal_id(fund.kind.as_str(), &fund.reference_id);
    let mut held = state.hot.hold_withdrawal(&fund.account_id, &hold_id, amount, WITHDRAWAL_HOLD_TTL_MS).await?;
    if held == WithdrawalHold::AccountNotLoaded {
        load_account(state, &fund.account_id).await?;
        held = state.hot.hold_withdrawal(&fund.account_id, &hold_id, amount, WITHDRAWAL_HOLD_TTL_MS).await?;
    }
    match held {
        WithdrawalHold::Held => {}
        WithdrawalHold::Insufficient { free } => {
            metrics::counter!("tollgate_withdrawals_refused_total").increment(1);
            return Err(ApiError::InsufficientFreeFunds { free, amount });
        }
        WithdrawalHold::InProgress => return Err(ApiError::RequestInProgress(fund.reference_id)),
        WithdrawalHold::AccountNotLoaded => {
            return Err(ApiError::BillingUnavailable("account could not be loaded into the hot store".into()));
        }
    }
    let account_id = fund.account_id.clone();
    let outcome = match state.ledger.record_fund(fund).await {
        Ok(outcome) => outcome,
        // No answer: the transaction may have committed, and releasing the hold would free
        // funds already taken out until it is applied. The hold stays; the retry loop applies
        // the transaction if it is there (which releases the hold), else the hold expires.
        Err(error @ tollgate_store::StoreError::Unavailable(_)) => {
            state.unapplied_funds.mark(&account_id);
            return Err(error.into());
        }
        Err(refused) => {
            if let Err(error) = state.hot.release_withdrawal(&account_id, &hold_id).await {
                tracing::error!(account_id, hold_id, %error, "releasing a withdrawal the ledger refused failed; it expires on its own");
            }
            return Err(refused.into());
        }
    };
    if let Err(error) = apply_pending_funds(state, &account_id).await {
        // Committed; the retry loop applies it (and releases its hold) each second until done.
        tracing::warn!(account_id, %error, "withdrawal committed but not yet applied to the hot balance");
    }
    Ok(outcome)
}

/// The cost a settle charges for an event, as the usage row will say. Shared with the quote
/// endpoint so both price identically.
///
/// # Errors
/// A price that cannot be computed (overflow) is refused, never charged as zero.
pub fn price_usage(price: &tollgate_core::Price, usage: &tollgate_core::Usage) -> Result<Money, ApiError> {
    tollgate_core::cost(price, usage)
        .map(|breakdown| breakdown.total)
        .map_err(|error| ApiError::Internal(format!("cost computation failed: {error}")))
}

/// Accounts with a committed fund transaction the hot store may not have applied (the apply
/// failed). Per process; a restart catches up from the ledger anyway.
#[derive(Default)]
pub struct UnappliedFunds(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl UnappliedFunds {
    fn mark(&self, account_id: &str) {
        self.lock().insert(account_id.to_string());
    }

    fn take(&self) -> std::collections::BTreeSet<String> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        // Only inserts and a whole take: never half-changed, so a poisoned lock is still sound.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How often failed fund applications are retried.
const FUND_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Retries every failed fund application each second until it succeeds, until `shutdown`.
pub async fn run_fund_retries(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(FUND_RETRY_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        for account_id in state.unapplied_funds.take() {
            match apply_pending_funds(&state, &account_id).await {
                Ok(()) => tracing::info!(account_id, "a fund change that could not be applied earlier is applied"),
                Err(error) => tracing::debug!(account_id, %error, "fund change still not applied; retrying"),
            }
        }
    }
}
