//! The ledger's operational side: reconciliation runs and repairs, periodic jobs under a lease,
//! and the outbox of events told to the outside world after their transaction commits.
//!
//! Both SQL ledgers implement [`Operations`] with the same statements: they are written once
//! here with `?` placeholders, and PostgreSQL numbers them (`pg`).

use std::collections::HashSet;

use async_trait::async_trait;
use serde::Serialize;
use time::OffsetDateTime;
use tollgate_core::Money;

use crate::error::{StoreError, StoreResult};
use crate::model::FundTransaction;
use crate::sql_rows::{Fields, money, time_of};

/// What the ledger says of one account, read in one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerTotals {
    pub account_id: String,
    /// account_balance.balance: the running balance the writers keep.
    pub balance: Money,
    /// Σ fund amounts − Σ usage costs: the balance the rows prove.
    pub rebuilt: Money,
    pub ledger_seq: i64,
    pub last_fund_seq: i64,
}

/// A hot-store balance as reconciliation reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotAccountView {
    pub account_id: String,
    pub balance: Money,
    pub held: Money,
    /// The ledger_seq of the last fund transaction the hot balance includes.
    pub last_fund_seq: i64,
}

/// A charge the hot store made whose usage event the ledger may not have yet (still in the
/// usage log, or parked in its dead letters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnloggedCharge {
    pub account_id: String,
    pub request_id: String,
    pub cost: Money,
}

/// The hot store's unlogged charges the ledger does not have yet. An entry the ledger already
/// has is only waiting to be deleted from the log (the worker committed it); it is left out.
///
/// # Errors
/// A store could not be read.
pub async fn charges_not_in_ledger(ledger: &dyn crate::Ledger, hot: &dyn crate::HotStore) -> StoreResult<Vec<UnloggedCharge>> {
    let unlogged = hot.unlogged_charges().await?;
    let pairs: Vec<(String, String)> = unlogged.iter().map(|charge| (charge.account_id.clone(), charge.request_id.clone())).collect();
    // No account's totals are needed, only which of these charges the ledger has.
    let (_, in_ledger) = ledger.ledger_snapshot(Some(&[]), &pairs).await?;
    Ok(unlogged.into_iter().filter(|charge| !in_ledger.contains(&(charge.account_id.clone(), charge.request_id.clone()))).collect())
}

/// What a cold load puts in the hot store, or `None` if the ledger has no such account: the
/// ledger's balance less the charges this hot store made that the ledger does not have yet (in
/// the usage log or its dead letters: an account unloaded and loaded again still owes them, and
/// a balance without them could be spent twice), the fund position, the request ids charged in
/// the hot store's [`recent_charge_ms`](crate::HotStore::recent_charge_ms) and those still on
/// their way, the
/// ledger's counters.
///
/// The reads go in this order so that a commit racing the load is never lost: the hot store's
/// unlogged charges first (an unloaded account gets no new ones; the worker only takes them
/// away), then which of them the ledger has, then the balance. A charge committed between the
/// last two is subtracted twice — the balance errs low, and reconciliation repairs it. In the
/// other order a charge committed and acknowledged in between would be in neither read, and the
/// account could spend its cost again.
///
/// # Errors
/// A store could not be read, or the balance less what is owed leaves the money range.
pub async fn load_snapshot(
    ledger: &dyn crate::Ledger,
    hot: &dyn crate::HotStore,
    account_id: &str,
    now_ms: i64,
) -> StoreResult<Option<crate::hot::AccountSnapshot>> {
    let mut unlogged = hot.unlogged_charges_of(account_id).await?;
    if !unlogged.is_empty() {
        let pairs: Vec<(String, String)> = unlogged.iter().map(|charge| (account_id.to_string(), charge.request_id.clone())).collect();
        let (_, in_ledger) = ledger.ledger_snapshot(Some(&[]), &pairs).await?;
        unlogged.retain(|charge| !in_ledger.contains(&(account_id.to_string(), charge.request_id.clone())));
    }
    let Some(position) = ledger.account_balance(account_id).await? else { return Ok(None) };
    let owed = unlogged.iter().try_fold(Money::ZERO, |sum, charge| sum.checked_add(charge.cost)).ok_or(StoreError::Overflow("unlogged charges"))?;
    let balance = position.balance.checked_sub(owed).ok_or(StoreError::Overflow("balance"))?;
    let since = time_of(now_ms.saturating_sub(hot.recent_charge_ms()))?;
    let mut charged_request_ids = ledger.charged_request_ids_since(account_id, since).await?;
    charged_request_ids.extend(unlogged.iter().map(|charge| charge.request_id.clone()));
    let counters = ledger.counter_seed(account_id, now_ms).await?;
    Ok(Some(crate::hot::AccountSnapshot {
        account_id: account_id.to_string(),
        balance,
        last_fund_seq: position.last_fund_seq,
        charged_request_ids,
        counters,
        unlogged,
    }))
}

/// A repair of account_balance to the balance the rows prove, made only if the account is still
/// where reconciliation saw it. The repair is written as an adjustment of zero at the account's
/// next ledger position (before = after = the proven balance), so the audit chain records it
/// and stays whole.
#[derive(Clone, Debug)]
pub struct BalanceRepair {
    pub run_id: i64,
    pub account_id: String,
    pub expected_balance: Money,
    pub expected_ledger_seq: i64,
    /// Why: the drifts found, in words, kept as the entry's reason.
    pub note: String,
}

/// One reconciliation run, as `reconciliation_log` keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ReconciliationRun {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub fix: bool,
    pub accounts_checked: u64,
    /// Accounts that kept changing while being read: neither judged nor repaired this run.
    pub accounts_busy: u64,
    pub drifts_found: u64,
    pub accounts_repaired: u64,
    /// Σ |drift| over the drifts found.
    pub total_drift: Money,
    /// The full report (JSON).
    pub report: serde_json::Value,
}

/// One period of one job that an instance claimed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobRun {
    pub job: String,
    /// Unix ms of the period's start; a (job, period) runs at most once.
    #[serde(serialize_with = "unix_ms::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start: i64,
    pub holder: String,
    /// The lease's fencing token: it grows with every claim of the job.
    pub fence: i64,
    #[serde(serialize_with = "unix_ms::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: i64,
    #[serde(serialize_with = "unix_ms::rfc3339_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    pub outcome: Option<String>,
}

/// An event for the outside world, written with the money change it describes.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_type: String,
    pub account_id: String,
    pub dedupe_key: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: u64,
    #[serde(serialize_with = "unix_ms::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub next_attempt_at: i64,
    #[serde(serialize_with = "unix_ms::rfc3339_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<i64>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "unix_ms::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
}

/// One attempt to deliver an outbox event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    pub outbox_id: i64,
    pub attempt: u64,
    pub url: String,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
    #[serde(serialize_with = "unix_ms::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub attempted_at: i64,
}

/// Times the jobs compute with as Unix milliseconds, shown as RFC 3339 like every time in the
/// API.
mod unix_ms {
    use serde::Serializer;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub fn rfc3339<S: Serializer>(ms: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        let time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(*ms) * 1_000_000).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&time.format(&Rfc3339).map_err(serde::ser::Error::custom)?)
    }

    #[allow(clippy::ref_option)] // serde hands a field over by reference
    pub fn rfc3339_option<S: Serializer>(ms: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => rfc3339(ms, serializer),
            None => serializer.serialize_none(),
        }
    }
}

/// Where an event stands after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryNext {
    Delivered,
    RetryAt(i64),
    GaveUp,
}

/// Money movements of one account within a period `[start, end)` of creation times.
///
/// The opening balance is the sum of every row created before `start` (not a chain value):
/// a usage row written late by the worker still counts in the period its request was made, so
/// the closing balance of one period is exactly the opening balance of the next, and the last
/// period's closing balance is the ledger's balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeriodTotals {
    pub opening_balance: Money,
    pub deposits: KindTotal,
    pub refunds: KindTotal,
    pub adjustments: KindTotal,
    /// Usage costs (positive) and how many usage rows.
    pub usage: KindTotal,
    pub closing_balance: Money,
}

/// How many rows of one kind and the sum of their amounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindTotal {
    pub count: u64,
    pub amount: Money,
}

/// Reconciliation, job leases and the outbox, on the ledger's database.
#[async_trait]
pub trait Operations: Send + Sync {
    /// In one database snapshot: the running and proven balance of every account (or of the
    /// ones named), ordered by account id, and which of `charges` (account, request id) have a
    /// charged usage row.
    async fn ledger_snapshot(
        &self,
        accounts: Option<&[String]>,
        charges: &[(String, String)],
    ) -> StoreResult<(Vec<LedgerTotals>, HashSet<(String, String)>)>;
    /// Sets account_balance to the proven balance and records the repair (see `BalanceRepair`).
    /// `None` when the account moved since it was read: nothing is written.
    async fn repair_balance(&self, repair: &BalanceRepair) -> StoreResult<Option<FundTransaction>>;
    async fn start_reconciliation(&self, fix: bool) -> StoreResult<i64>;
    async fn finish_reconciliation(&self, run: &ReconciliationRun) -> StoreResult<()>;
    /// The newest runs first.
    async fn reconciliations(&self, limit: u32) -> StoreResult<Vec<ReconciliationRun>>;

    /// The account's movements within `[start, end)` (unix ms), read in one snapshot.
    async fn period_totals(&self, account_id: &str, start_ms: i64, end_ms: i64) -> StoreResult<PeriodTotals>;

    /// Claims `job` for the period starting at `period_start`: succeeds (with a fencing token)
    /// only if no instance holds an unexpired lease on the job and the period has not run.
    async fn claim_job(&self, job: &str, period_start: i64, holder: &str, lease_ms: i64) -> StoreResult<Option<i64>>;
    /// Extends a held lease; false if another instance took the job over (stop working then).
    async fn renew_job(&self, job: &str, fence: i64, lease_ms: i64) -> StoreResult<bool>;
    /// Records the run's outcome and releases the lease.
    async fn finish_job(&self, job: &str, period_start: i64, fence: i64, outcome: &str) -> StoreResult<()>;
    /// The newest runs first.
    async fn job_runs(&self, job: Option<&str>, limit: u32) -> StoreResult<Vec<JobRun>>;

    /// Pending events due at `now_ms`, oldest first.
    async fn due_outbox(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<OutboxEvent>>;
    /// Logs an attempt and moves the event on.
    async fn record_delivery(&self, attempt: &DeliveryAttempt, next: DeliveryNext) -> StoreResult<()>;
    /// The newest events first.
    async fn outbox_events(&self, account_id: Option<&str>, limit: u32) -> StoreResult<Vec<OutboxEvent>>;
    /// The newest attempts first.
    async fn deliveries(&self, outbox_id: Option<i64>, limit: u32) -> StoreResult<Vec<DeliveryAttempt>>;
}

/// Numbers `?` placeholders for PostgreSQL (`$1`, `$2`, …). Only the constant statements of
/// this module go through it (they hold no `?` inside literals), so the result is as safe as they.
pub(crate) fn pg(sql: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(numbered(sql))
}

fn numbered(sql: &str) -> String {
    let mut numbered = String::with_capacity(sql.len() + 16);
    let mut index = 0;
    for character in sql.chars() {
        if character == '?' {
            index += 1;
            numbered.push('$');
            numbered.push_str(&index.to_string());
        } else {
            numbered.push(character);
        }
    }
    numbered
}

pub(crate) const LEDGER_TOTALS: &str = "SELECT b.account_id, b.balance, b.ledger_seq, b.last_fund_seq,
        CAST(COALESCE(f.total, 0) AS BIGINT) AS funds, CAST(COALESCE(u.total, 0) AS BIGINT) AS costs
    FROM account_balance b
    LEFT JOIN (SELECT account_id, SUM(amount) AS total FROM fund_transactions GROUP BY account_id) f ON f.account_id = b.account_id
    LEFT JOIN (SELECT account_id, SUM(cost) AS total FROM ledger_costs GROUP BY account_id) u ON u.account_id = b.account_id
    ORDER BY b.account_id";
/// `LEDGER_TOTALS` for named accounts: per-account sums over the account indexes.
pub(crate) const SOME_LEDGER_TOTALS: &str = "SELECT b.account_id, b.balance, b.ledger_seq, b.last_fund_seq,
        CAST((SELECT COALESCE(SUM(amount), 0) FROM fund_transactions f WHERE f.account_id = b.account_id) AS BIGINT) AS funds,
        CAST((SELECT COALESCE(SUM(cost), 0) FROM ledger_costs u WHERE u.account_id = b.account_id) AS BIGINT) AS costs
    FROM account_balance b WHERE b.account_id";
pub(crate) const ACCOUNT_TOTALS: &str = "SELECT
        CAST((SELECT COALESCE(SUM(amount), 0) FROM fund_transactions WHERE account_id = ?) AS BIGINT) AS funds,
        CAST((SELECT COALESCE(SUM(cost), 0) FROM ledger_costs WHERE account_id = ?) AS BIGINT) AS costs";
/// A charged request: its usage row by (account, request id), with what the id is bound to, then
/// the stored body, if any, by the row's id (migration 0006). SQLite's: usage_log's unique index
/// knows the charged ids there; PostgreSQL's partitioned usage_log cannot have one, and its
/// ledger asks `charged_requests` (postgres.rs).
pub(crate) const CHARGED_REQUEST: &str = "SELECT u.api_key_id, u.created_at, u.request_fingerprint, s.status, s.content_type, s.body
    FROM usage_log u LEFT JOIN stored_responses s ON s.usage_id = u.id
    WHERE u.account_id = ? AND u.request_id = ? AND u.status <> 'failed'";
/// SQLite's: a charged id is in usage_log's unique index, or in archived_charges once its month
/// was archived (migration 0006).
pub(crate) const CHARGED_ONE: &str = "SELECT 1 FROM usage_log WHERE account_id = ?1 AND request_id = ?2 AND status <> 'failed'
    UNION ALL SELECT 1 FROM archived_charges WHERE account_id = ?1 AND request_id = ?2";
pub(crate) const START_RECONCILIATION: &str = "INSERT INTO reconciliation_log (started_at, fix) VALUES (?, ?) RETURNING id";
pub(crate) const FINISH_RECONCILIATION: &str = "UPDATE reconciliation_log SET finished_at = ?, accounts_checked = ?, accounts_busy = ?,
    drifts_found = ?, accounts_repaired = ?, total_drift = ?, report = ? WHERE id = ?";
pub(crate) const RECONCILIATIONS: &str = "SELECT * FROM reconciliation_log ORDER BY id DESC LIMIT ?";

/// An added channel, unless the model has one of that name (`?` placeholders; see [`pg`]).
pub(crate) const ADD_CHANNEL: &str = "INSERT INTO added_channels (model, channel, provider, upstream_model, priority, weight, concurrent_requests_max,
         requests_per_minute_max, tokens_per_minute_max, created_at)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, channel) DO NOTHING";

/// [`ADD_CHANNEL`] with the channel's values bound, for either database (`sql`: it as the
/// database spells it).
pub(crate) fn add_channel_query<'q, DB: sqlx::Database>(sql: impl sqlx::SqlSafeStr, channel: &'q crate::model::AddedChannel) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(sql)
        .bind(&channel.model)
        .bind(&channel.channel)
        .bind(&channel.provider)
        .bind(&channel.upstream_model)
        .bind(i64::from(channel.priority))
        .bind(i64::from(channel.weight))
        .bind(channel.concurrent_requests_max.map(i64::from))
        .bind(channel.requests_per_minute_max.map(i64::from))
        // Beyond i64 is refused before it gets here (`check_channel`); saturating keeps it a limit.
        .bind(channel.tokens_per_minute_max.map(|max| i64::try_from(max).unwrap_or(i64::MAX)))
        .bind(channel.created_at_ms)
}
pub(crate) const ENSURE_LEASE: &str = "INSERT INTO job_leases (job, holder, fence, expires_at) VALUES (?, '', 0, 0) ON CONFLICT (job) DO NOTHING";
pub(crate) const PERIOD_RAN: &str = "SELECT 1 FROM job_runs WHERE job = ? AND period_start = ?";
pub(crate) const TAKE_LEASE: &str = "UPDATE job_leases SET holder = ?, fence = ?, expires_at = ? WHERE job = ?";
pub(crate) const INSERT_RUN: &str = "INSERT INTO job_runs (job, period_start, holder, fence, started_at) VALUES (?, ?, ?, ?, ?)";
pub(crate) const PRUNE_RUNS: &str = "DELETE FROM job_runs WHERE job = ? AND period_start < ?";
pub(crate) const RENEW_LEASE: &str = "UPDATE job_leases SET expires_at = ? WHERE job = ? AND fence = ?";
pub(crate) const FINISH_RUN: &str = "UPDATE job_runs SET finished_at = ?, outcome = ? WHERE job = ? AND period_start = ? AND fence = ?";
pub(crate) const RELEASE_LEASE: &str = "UPDATE job_leases SET expires_at = 0 WHERE job = ? AND fence = ?";
/// Runs kept per job: older ones are pruned when a period is claimed.
pub(crate) const JOB_RUNS_KEPT: i64 = 1_000;

pub(crate) const INSERT_OUTBOX: &str = "INSERT INTO outbox (event_type, account_id, dedupe_key, payload, status, next_attempt_at, created_at)
    VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (dedupe_key) DO NOTHING";
pub(crate) const DUE_OUTBOX: &str = "SELECT * FROM outbox WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?";
pub(crate) const INSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries (outbox_id, attempt, url, status_code, error, duration_ms, attempted_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)";
pub(crate) const ADVANCE_OUTBOX: &str = "UPDATE outbox SET attempts = ?, status = ?, next_attempt_at = ?, delivered_at = ?, last_error = ? WHERE id = ?";

pub(crate) const BALANCE_BEFORE: &str = "SELECT
        CAST((SELECT COALESCE(SUM(amount), 0) FROM fund_transactions WHERE account_id = ? AND created_at < ?) AS BIGINT) AS funds,
        CAST((SELECT COALESCE(SUM(cost), 0) FROM ledger_costs WHERE account_id = ? AND created_at < ?) AS BIGINT) AS costs";
pub(crate) const PERIOD_FUNDS: &str = "SELECT kind, COUNT(*) AS entries, CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS total
    FROM fund_transactions WHERE account_id = ? AND created_at >= ? AND created_at < ? GROUP BY kind";
pub(crate) const PERIOD_USAGE: &str = "SELECT CAST(COALESCE(SUM(entries), 0) AS BIGINT) AS entries, CAST(COALESCE(SUM(cost), 0) AS BIGINT) AS total
    FROM ledger_costs WHERE account_id = ? AND created_at >= ? AND created_at < ?";

/// Assembles a period's totals from the three reads above.
pub(crate) fn period_totals_from(opening: &impl Fields, funds: &[impl Fields], usage: &impl Fields) -> StoreResult<PeriodTotals> {
    let opening_balance = proven_balance(opening)?;
    let mut totals = PeriodTotals {
        opening_balance,
        deposits: KindTotal::default(),
        refunds: KindTotal::default(),
        adjustments: KindTotal::default(),
        usage: KindTotal { count: count(usage, "entries")?, amount: money(usage, "total")? },
        closing_balance: opening_balance,
    };
    for row in funds {
        let total = KindTotal { count: count(row, "entries")?, amount: money(row, "total")? };
        match row.text("kind")?.as_str() {
            "deposit" => totals.deposits = total,
            "refund" => totals.refunds = total,
            _ => totals.adjustments = total,
        }
    }
    let overflow = StoreError::Overflow("period totals");
    totals.closing_balance = [totals.deposits.amount, totals.refunds.amount, totals.adjustments.amount]
        .into_iter()
        .try_fold(opening_balance, Money::checked_add)
        .and_then(|balance| balance.checked_sub(totals.usage.amount))
        .ok_or(overflow)?;
    Ok(totals)
}

pub(crate) const THRESHOLD: &str = "SELECT low_balance_threshold FROM accounts WHERE id = ?";

/// (account id, low-balance threshold) from a row of `id, low_balance_threshold`.
pub(crate) fn threshold_from(row: &impl Fields) -> StoreResult<(String, Money)> {
    Ok((row.text("id")?, money(row, "low_balance_threshold")?))
}

pub(crate) fn key_budgets_from(row: &impl Fields) -> StoreResult<crate::alerts::KeyBudgets> {
    let optional = |column: &str| row.optional_int(column).map(|nanos| nanos.map(Money::from_nanos));
    Ok(crate::alerts::KeyBudgets {
        key_id: row.text("id")?,
        account_id: row.text("account_id")?,
        daily: optional("budget_daily")?,
        monthly: optional("budget_monthly")?,
        total: optional("budget_total")?,
    })
}

pub(crate) fn totals_from(row: &impl Fields) -> StoreResult<LedgerTotals> {
    let funds = money(row, "funds")?;
    let costs = money(row, "costs")?;
    Ok(LedgerTotals {
        account_id: row.text("account_id")?,
        balance: money(row, "balance")?,
        rebuilt: funds.checked_sub(costs).ok_or(StoreError::Overflow("rebuilt balance"))?,
        ledger_seq: row.int("ledger_seq")?,
        last_fund_seq: row.int("last_fund_seq")?,
    })
}

pub(crate) fn proven_balance(row: &impl Fields) -> StoreResult<Money> {
    money(row, "funds")?.checked_sub(money(row, "costs")?).ok_or(StoreError::Overflow("rebuilt balance"))
}

fn count(row: &impl Fields, column: &str) -> StoreResult<u64> {
    u64::try_from(row.int(column)?).map_err(|_| StoreError::Corrupt(format!("negative {column}")))
}

pub(crate) fn reconciliation_from(row: &impl Fields) -> StoreResult<ReconciliationRun> {
    let report = row.optional_text("report")?.unwrap_or_else(|| "null".into());
    Ok(ReconciliationRun {
        id: row.int("id")?,
        started_at: time_of(row.int("started_at")?)?,
        finished_at: row.optional_int("finished_at")?.map(time_of).transpose()?,
        fix: row.int("fix")? != 0,
        accounts_checked: count(row, "accounts_checked")?,
        accounts_busy: count(row, "accounts_busy")?,
        drifts_found: count(row, "drifts_found")?,
        accounts_repaired: count(row, "accounts_repaired")?,
        total_drift: money(row, "total_drift")?,
        report: serde_json::from_str(&report).map_err(|error| StoreError::Corrupt(format!("reconciliation report: {error}")))?,
    })
}

pub(crate) fn job_run_from(row: &impl Fields) -> StoreResult<JobRun> {
    Ok(JobRun {
        job: row.text("job")?,
        period_start: row.int("period_start")?,
        holder: row.text("holder")?,
        fence: row.int("fence")?,
        started_at: row.int("started_at")?,
        finished_at: row.optional_int("finished_at")?,
        outcome: row.optional_text("outcome")?,
    })
}

pub(crate) fn outbox_from(row: &impl Fields) -> StoreResult<OutboxEvent> {
    let payload = row.text("payload")?;
    Ok(OutboxEvent {
        id: row.int("id")?,
        event_type: row.text("event_type")?,
        account_id: row.text("account_id")?,
        dedupe_key: row.text("dedupe_key")?,
        payload: serde_json::from_str(&payload).map_err(|error| StoreError::Corrupt(format!("outbox payload: {error}")))?,
        status: row.text("status")?,
        attempts: count(row, "attempts")?,
        next_attempt_at: row.int("next_attempt_at")?,
        delivered_at: row.optional_int("delivered_at")?,
        last_error: row.optional_text("last_error")?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn delivery_from(row: &impl Fields) -> StoreResult<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        outbox_id: row.int("outbox_id")?,
        attempt: count(row, "attempt")?,
        url: row.text("url")?,
        status_code: row.optional_int("status_code")?.and_then(|code| u16::try_from(code).ok()),
        error: row.optional_text("error")?,
        duration_ms: count(row, "duration_ms")?,
        attempted_at: row.int("attempted_at")?,
    })
}

/// The outbox row's columns after an attempt: (status, next_attempt_at, delivered_at).
pub(crate) fn advance(attempt: &DeliveryAttempt, next: DeliveryNext) -> (&'static str, i64, Option<i64>) {
    match next {
        DeliveryNext::Delivered => ("delivered", attempt.attempted_at, Some(attempt.attempted_at)),
        DeliveryNext::RetryAt(at) => ("pending", at, None),
        DeliveryNext::GaveUp => ("failed", attempt.attempted_at, None),
    }
}

/// The reference of a repair entry: one per account and run.
pub(crate) fn repair_reference(repair: &BalanceRepair) -> String {
    format!("reconcile:{}:{}", repair.run_id, repair.account_id)
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(numbered("UPDATE t SET a = ?, b = ? WHERE c = ?"), "UPDATE t SET a = $1, b = $2 WHERE c = $3");
        assert_eq!(numbered("SELECT 1"), "SELECT 1");
    }
}
