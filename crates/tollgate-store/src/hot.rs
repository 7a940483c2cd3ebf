//! The hot store: balances, holds, quota and budget counters and idempotency records, changed
//! only by atomic steps of the charge protocol (DESIGN "reserve → settle"):
//!
//! 1. `authorize` — ONE atomic step: idempotency on (account, request id), request quotas, key
//!    budgets, rate limits, and `balance + credit_limit − held ≥ hold`; on success a hold with an
//!    expiry is recorded. Nothing is forwarded upstream before it succeeds.
//! 2. `settle` — ONE atomic step: release the hold, deduct the real cost (which may exceed the
//!    hold by the bounded overrun), count budgets, and append the usage event to the hot store's
//!    log. It returns only once the charge is durable (invariant I1), so the gateway may then
//!    send the response's last byte.
//! 3. `void` — release the hold, charge nothing, record the failed request.
//! 4. `expire_holds` — release holds whose request died; nothing leaks.
//!
//! Status checks (key revoked, account suspended) happen in the gateway against the billing
//! context, which is invalidated synchronously on every change.

use async_trait::async_trait;
use tollgate_core::Money;

use crate::error::StoreResult;
use crate::model::UsageEvent;
use crate::operations::{HotAccountView, UnloggedCharge};

/// How long a hot store remembers a charged request id after its settle (and how far back a
/// cold load reads them), unless `limits.recent_charge_ms` says otherwise. The ledger
/// remembers every charge, and the gateway asks it about ids a client sends; the hot store's
/// record is for what the ledger cannot answer yet: a second settle of the same id, from a
/// request authorized before the first settle (its hold had expired). Such a settle comes
/// within `hold_ttl_ms + settle_timeout_ms` of the first (15.5 minutes by default), which the
/// gateway's configuration keeps below this. Until the ledger has a charge, its record stays
/// however long that takes (Redis: 24 h, the worker's lag it covers). Each remembered id costs
/// memory (docs/RETENTION.md has the bytes and the ceiling at 1,000 charges a second).
pub const RECENT_CHARGE_MS: i64 = 20 * 60 * 1000;

/// The limits that apply to one request, from the billing context. Passing them in keeps the hot
/// store free of configuration that would need its own invalidation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub credit_limit: Money,
    pub daily_request_quota: Option<u64>,
    pub monthly_request_quota: Option<u64>,
    pub key_budget_daily: Option<Money>,
    pub key_budget_monthly: Option<Money>,
    pub key_budget_total: Option<Money>,
    pub key_requests_per_minute: Option<u64>,
    pub key_tokens_per_minute: Option<u64>,
}

/// Everything `authorize` needs; `request_id` doubles as the hold id and idempotency key.
#[derive(Clone, Debug)]
pub struct AuthorizeRequest {
    pub account_id: String,
    pub api_key_id: String,
    pub request_id: String,
    /// The amount to reserve: the priced estimate of prompt plus maximum output.
    pub hold: Money,
    /// Tokens the estimate counts, for the tokens-per-minute limit.
    pub hold_tokens: u64,
    pub limits: Limits,
    /// After this long an unsettled hold is released by `expire_holds`.
    pub hold_ttl_ms: u64,
}

/// Where a session's requests go (routing affinity): written by the settle of a request that
/// succeeded, in the same step as its charge, for the next request of the session to try first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPin {
    /// The model and a digest of the session key, as the gateway spells them.
    pub session: String,
    /// The channel that served.
    pub channel: String,
    pub ttl_ms: u64,
}

/// Pins an account keeps at most in the process's own store; past it new sessions go unpinned
/// until old pins expire (a pin only reorders channels).
pub const PINS_PER_ACCOUNT_MAX: usize = 10_000;

/// The outcome of `authorize`: a hold, or the reason there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    Held { available_after: Money },
    Refused(Refusal),
}

/// Which key budget refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPeriod {
    Daily,
    Monthly,
    Total,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Daily => "daily",
            BudgetPeriod::Monthly => "monthly",
            BudgetPeriod::Total => "total",
        }
    }
}

/// Why `authorize` placed no hold. Each maps to one contract error code in the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The hot store does not hold this account yet: load it from the ledger and retry.
    AccountNotLoaded,
    /// A request with this id holds funds right now.
    InProgress,
    /// A request with this id was already charged.
    AlreadyCharged,
    InsufficientBalance { available: Money, required: Money },
    DailyQuotaExceeded { retry_after_secs: u64 },
    MonthlyQuotaExceeded { retry_after_secs: u64 },
    KeyBudgetExceeded { period: BudgetPeriod, retry_after_secs: Option<u64> },
    RateLimited { retry_after_secs: u64 },
}

impl Refusal {
    /// Every [`Refusal::reason`], for the metric's series registered at zero.
    pub const REASONS: [&'static str; 8] =
        ["account_not_loaded", "in_progress", "already_charged", "insufficient_balance", "daily_quota", "monthly_quota", "key_budget", "rate_limited"];

    /// The refusal's metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::AccountNotLoaded => "account_not_loaded",
            Refusal::InProgress => "in_progress",
            Refusal::AlreadyCharged => "already_charged",
            Refusal::InsufficientBalance { .. } => "insufficient_balance",
            Refusal::DailyQuotaExceeded { .. } => "daily_quota",
            Refusal::MonthlyQuotaExceeded { .. } => "monthly_quota",
            Refusal::KeyBudgetExceeded { .. } => "key_budget",
            Refusal::RateLimited { .. } => "rate_limited",
        }
    }
}

/// What a request's quotas, key budgets and balance are judged against, as a store counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commitments {
    pub requests_today: u64,
    pub requests_this_month: u64,
    pub key_spent_today: Money,
    pub key_spent_this_month: Money,
    pub key_spent_total: Money,
    /// The key's open holds, counted against every budget period.
    pub key_held: Money,
    pub balance: Money,
    /// The account's open holds.
    pub held: Money,
}

/// The first request quota, key budget or balance limit the request would break — the checks
/// every store makes after idempotency and rate limits, in this order. Read-only.
///
/// # Errors
/// `Overflow` when the sums leave the money range.
pub fn commitment_refusal(request: &AuthorizeRequest, committed: &Commitments, periods: &crate::clock::Periods) -> crate::error::StoreResult<Option<Refusal>> {
    use crate::error::StoreError;
    let limits = &request.limits;
    if limits.daily_request_quota.is_some_and(|quota| committed.requests_today >= quota) {
        return Ok(Some(Refusal::DailyQuotaExceeded { retry_after_secs: periods.seconds_to_next_day }));
    }
    if limits.monthly_request_quota.is_some_and(|quota| committed.requests_this_month >= quota) {
        return Ok(Some(Refusal::MonthlyQuotaExceeded { retry_after_secs: periods.seconds_to_next_month }));
    }
    let budgets = [
        (BudgetPeriod::Daily, limits.key_budget_daily, committed.key_spent_today, Some(periods.seconds_to_next_day)),
        (BudgetPeriod::Monthly, limits.key_budget_monthly, committed.key_spent_this_month, Some(periods.seconds_to_next_month)),
        (BudgetPeriod::Total, limits.key_budget_total, committed.key_spent_total, None),
    ];
    for (period, budget, spent, retry_after_secs) in budgets {
        let Some(budget) = budget else { continue };
        let committed = spent
            .checked_add(committed.key_held)
            .and_then(|sum| sum.checked_add(request.hold))
            .ok_or(StoreError::Overflow("key budget"))?;
        if committed > budget {
            return Ok(Some(Refusal::KeyBudgetExceeded { period, retry_after_secs }));
        }
    }
    let available = available(committed.balance, limits.credit_limit, committed.held)?;
    if available < request.hold {
        return Ok(Some(Refusal::InsufficientBalance { available, required: request.hold }));
    }
    Ok(None)
}

/// What an account may still hold: balance + credit limit − open holds (I3 keeps it ≥ 0).
///
/// # Errors
/// `Overflow` when the sum leaves the money range.
pub fn available(balance: Money, credit_limit: Money, held: Money) -> crate::error::StoreResult<Money> {
    balance
        .checked_add(credit_limit)
        .and_then(|limit| limit.checked_sub(held))
        .ok_or(crate::error::StoreError::Overflow("available"))
}

/// The balance movement a settle made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub balance_before: Money,
    pub balance_after: Money,
    /// True when this request id had been settled before: nothing was charged this time.
    pub already_settled: bool,
}

/// Account state loaded from the ledger into a hot store that does not hold the account.
#[derive(Clone, Debug)]
pub struct AccountSnapshot {
    pub account_id: String,
    pub balance: Money,
    pub last_fund_seq: i64,
    /// Request ids charged in the last [`RECENT_CHARGE_MS`]: see there why earlier ones are
    /// the ledger's to answer.
    pub charged_request_ids: Vec<String>,
    /// Quota and budget counters as the ledger last recorded them.
    pub counters: CounterSeed,
    /// Charges this hot store made that the ledger does not have yet (in the usage log or its
    /// dead letters, from before an unload): `balance` already lacks them and
    /// `charged_request_ids` names them; a store that forgot them on unload counts them again.
    pub unlogged: Vec<UnloggedCharge>,
}

/// The ledger's quota and budget counters (`spend_counters`) for the day and month of one
/// moment. A cold load starts its counters from them, so a lost hot store or a restart does not
/// reset quotas and budgets; they lag the hot store only by the events not yet persisted. A
/// store takes a period's values only if that period is still its current one, and never
/// lowers a counter it already holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSeed {
    /// The periods of the counts, numbered as [`crate::clock::Periods`].
    pub day: i64,
    pub month: i64,
    pub requests_today: u64,
    pub requests_this_month: u64,
    pub keys: Vec<KeySpendSeed>,
}

/// One key's spend in the periods of a [`CounterSeed`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySpendSeed {
    pub api_key_id: String,
    pub spent_today: Money,
    pub spent_this_month: Money,
    pub spent_total: Money,
}

/// What `apply_fund` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FundApplication {
    Applied { balance_after: Money },
    /// The hot store had already applied this fund transaction (or a later one).
    AlreadyApplied,
    /// The account is not loaded; loading it later includes this fund transaction.
    AccountNotLoaded,
}

/// What `hold_withdrawal` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithdrawalHold {
    /// The amount is reserved: write the fund transaction, then apply it (which releases the
    /// hold) or release it if the ledger refused.
    Held,
    /// The account's free funds (balance − held, the credit limit not counted) are less than
    /// the amount. Nothing changed.
    Insufficient { free: Money },
    /// A withdrawal with this id is being written right now. Nothing changed.
    InProgress,
    /// The account is not loaded: load it and ask again.
    AccountNotLoaded,
}

/// The hold id of a fund withdrawal (refund or negative adjustment): its kind and reference,
/// which the ledger keeps with the fund transaction, so whoever applies the transaction (this
/// gateway, or another one told by NOTIFY) releases the hold in the same step.
pub fn withdrawal_id(kind: &str, reference_id: &str) -> String {
    format!("{kind}:{reference_id}")
}

/// Live balance and counters of an account (and one of its keys), for `/v1/balance`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalanceView {
    pub balance: Money,
    pub held: Money,
    pub last_fund_seq: i64,
    pub daily_requests_used: u64,
    pub monthly_requests_used: u64,
    pub key_spent_daily: Money,
    pub key_spent_monthly: Money,
    pub key_spent_total: Money,
}

/// Balances, holds, counters and idempotency records; see the module doc for the protocol.
#[async_trait]
pub trait HotStore: Send + Sync + 'static {
    /// Answers when the store is reachable (the ledger-charging mode polls it to come back).
    async fn ping(&self) -> StoreResult<()>;

    /// How long after its settle this store remembers a charged request id; a cold load reads
    /// the ledger's ids that far back. See [`RECENT_CHARGE_MS`].
    fn recent_charge_ms(&self) -> i64;

    /// One atomic step: idempotency, quotas, budgets, rate limits, balance hold.
    async fn authorize(&self, request: &AuthorizeRequest) -> StoreResult<Authorization>;

    /// [`authorize`](Self::authorize), also reading where `session` (a model and a session
    /// key, [`SessionPin::session`]) was last served — routing affinity — in the same step
    /// where the store can. A store without pins answers none.
    async fn authorize_pinned(&self, request: &AuthorizeRequest, session: Option<&str>) -> StoreResult<(Authorization, Option<String>)> {
        let _ = session;
        Ok((self.authorize(request).await?, None))
    }

    /// Takes the lock of an account's session for `token`, for `ttl_ms` unless renewed (the
    /// session lock, issue 23). Returns the lock's fencing number — larger than any handed out
    /// before for the account — or `None` while another token holds it. A store without locks
    /// grants every request (fencing number 0).
    async fn lock_session(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<Option<u64>> {
        let _ = (account_id, session, token, ttl_ms);
        Ok(Some(0))
    }

    /// Extends a session lock `token` holds by `ttl_ms` from now; false if it no longer does.
    async fn renew_session_lock(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<bool> {
        let _ = (account_id, session, token, ttl_ms);
        Ok(true)
    }

    /// Releases a session lock if `token` holds it (`None`: whoever holds it, the operator's
    /// manual release). Returns whether a lock was released.
    async fn unlock_session(&self, account_id: &str, session: &str, token: Option<&str>) -> StoreResult<bool> {
        let _ = (account_id, session, token);
        Ok(false)
    }

    /// Forgets every pin of an account (the operator's `DELETE /internal/accounts/{id}/pins`).
    async fn clear_pins(&self, account_id: &str) -> StoreResult<()> {
        let _ = account_id;
        Ok(())
    }

    /// One atomic step: release the hold, deduct `event.cost`, count budgets, append the event.
    /// Returns once the charge is durable. Settling an already settled request id charges
    /// nothing and says so. A hold that expired meanwhile does not stop the charge: the request
    /// did complete, and it is charged exactly once.
    async fn settle(&self, event: UsageEvent) -> StoreResult<Settlement>;

    /// Releases the hold of a request that produced nothing billable and records it (cost 0).
    async fn void(&self, event: UsageEvent) -> StoreResult<()>;

    /// Releases every hold past its expiry; returns how many.
    async fn expire_holds(&self) -> StoreResult<u64>;

    /// Loads an account the hot store does not hold. Returns false (and changes nothing) when it
    /// is already there, so two loaders racing cannot double a balance.
    async fn load_account(&self, snapshot: AccountSnapshot) -> StoreResult<bool>;

    /// Applies a committed fund transaction once, by its `ledger_seq`: a seq at or below the last
    /// applied one is skipped, so callers apply an account's fund transactions in order. In the
    /// same step it releases the withdrawal hold `withdrawal_id` names, if it is still there
    /// (whether or not this call applied the transaction): the hold and the debit it reserved
    /// for never both count.
    async fn apply_fund(
        &self,
        account_id: &str,
        fund_ledger_seq: i64,
        amount: Money,
        withdrawal_id: Option<&str>,
    ) -> StoreResult<FundApplication>;

    /// One atomic step before a refund or negative adjustment is written to the ledger ("funds
    /// out only from free funds"): reserves `amount` of the account's free funds — the balance,
    /// which already lacks every settled charge the ledger may not have yet, less every open
    /// hold; never the credit limit — under `withdrawal_id`, until `apply_fund` or
    /// `release_withdrawal` releases it or `ttl_ms` passes. While held, authorize sees it as held.
    async fn hold_withdrawal(&self, account_id: &str, withdrawal_id: &str, amount: Money, ttl_ms: u64) -> StoreResult<WithdrawalHold>;

    /// Releases a withdrawal hold whose fund transaction was not written (the ledger refused it).
    async fn release_withdrawal(&self, account_id: &str, withdrawal_id: &str) -> StoreResult<()>;

    /// Live state, or `None` if the account is not loaded.
    async fn balance(&self, account_id: &str, api_key_id: &str)
    -> StoreResult<Option<BalanceView>>;

    /// What a charged request id is bound to, with its response if one was kept, while this
    /// store holds it for the ledger; `None` sends the caller to the ledger (the in-process store
    /// keeps nothing: its ledger commit happens before the response; Redis keeps it until the
    /// ledger has the row).
    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<crate::model::ChargedRequest>>;

    /// Forgets an account so the next request loads it from the ledger again (used after a repair).
    async fn unload_account(&self, account_id: &str) -> StoreResult<()>;

    /// Balances of these accounts (`None` where not loaded), for reconciliation.
    async fn hot_views(&self, account_ids: &[String]) -> StoreResult<Vec<Option<HotAccountView>>>;

    /// Charges made here whose usage events may not be in the ledger yet: what the usage log
    /// still holds (and its dead letters), with a cost above zero.
    async fn unlogged_charges(&self) -> StoreResult<Vec<UnloggedCharge>>;

    /// [`HotStore::unlogged_charges`] of one account, loaded or not (an unload keeps them: they
    /// are still owed), free ones included, read by an index rather than by a scan of the log.
    async fn unlogged_charges_of(&self, account_id: &str) -> StoreResult<Vec<UnloggedCharge>>;

    /// Sets the balance to `balance` only if the account is exactly as `seen` (balance, fund
    /// position) and holds nothing: no charge or fund change slipped in since reconciliation
    /// read it. Returns whether it did.
    async fn repair_balance(&self, seen: &HotAccountView, balance: Money) -> StoreResult<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registered label values are exactly the labels refusals produce, once each.
    #[test]
    fn every_refusal_reason_is_listed_once() {
        let every = [
            Refusal::AccountNotLoaded,
            Refusal::InProgress,
            Refusal::AlreadyCharged,
            Refusal::InsufficientBalance { available: Money::ZERO, required: Money::ZERO },
            Refusal::DailyQuotaExceeded { retry_after_secs: 0 },
            Refusal::MonthlyQuotaExceeded { retry_after_secs: 0 },
            Refusal::KeyBudgetExceeded { period: BudgetPeriod::Daily, retry_after_secs: None },
            Refusal::RateLimited { retry_after_secs: 0 },
        ];
        // A new variant fails to compile here until it is added above (and to REASONS).
        for refusal in &every {
            match refusal {
                Refusal::AccountNotLoaded
                | Refusal::InProgress
                | Refusal::AlreadyCharged
                | Refusal::InsufficientBalance { .. }
                | Refusal::DailyQuotaExceeded { .. }
                | Refusal::MonthlyQuotaExceeded { .. }
                | Refusal::KeyBudgetExceeded { .. }
                | Refusal::RateLimited { .. } => {}
            }
        }
        assert_eq!(every.map(|refusal| refusal.reason()), Refusal::REASONS);
    }
}
