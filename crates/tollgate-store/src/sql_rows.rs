//! What the SQL ledgers share: rows read back into models, and the conversions between the
//! stored forms (INTEGER nano-units, INTEGER Unix milliseconds) and the model types. SQLite and
//! PostgreSQL store the same columns with the same types, so one mapping serves both.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;
use tollgate_core::{Money, Price, Usage, UsageSource};

use crate::error::{StoreError, StoreResult};
use crate::model::{
    Account, AccountKind, AccountPatch, AccountStatus, ApiKey, ArchivedRun, ChargedRequest, FundKind, FundTransaction, KeyStatus, LedgerEntry,
    NewFund, PriceRow, RecordOutcome, RequestStatus, SessionLockMode, StoredResponse, TopUp, TopUpStatus,
    UpstreamAttempt, UsageEvent, UsageQuery, UsageRow,
};

/// Rows per page at most.
const PAGE_ROWS_MAX: u32 = 1_000;

/// Typed column access, the same for a row of either database.
pub(crate) trait Fields {
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn optional_int(&self, column: &str) -> StoreResult<Option<i64>>;
    fn text(&self, column: &str) -> StoreResult<String>;
    fn optional_text(&self, column: &str) -> StoreResult<Option<String>>;
    fn bytes(&self, column: &str) -> StoreResult<Vec<u8>>;
}

macro_rules! fields_for {
    ($row:ty) => {
        impl Fields for $row {
            fn int(&self, column: &str) -> StoreResult<i64> {
                Ok(self.try_get::<i64, _>(column)?)
            }
            fn optional_int(&self, column: &str) -> StoreResult<Option<i64>> {
                Ok(self.try_get::<Option<i64>, _>(column)?)
            }
            fn text(&self, column: &str) -> StoreResult<String> {
                Ok(self.try_get::<String, _>(column)?)
            }
            fn optional_text(&self, column: &str) -> StoreResult<Option<String>> {
                Ok(self.try_get::<Option<String>, _>(column)?)
            }
            fn bytes(&self, column: &str) -> StoreResult<Vec<u8>> {
                Ok(self.try_get::<Vec<u8>, _>(column)?)
            }
        }
    };
}

fields_for!(SqliteRow);
fields_for!(PgRow);

pub(crate) use crate::clock::{ms_of, now_ms};

pub(crate) fn time_of(ms: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

fn optional_time(ms: Option<i64>) -> StoreResult<Option<OffsetDateTime>> {
    ms.map(time_of).transpose()
}

pub(crate) fn to_i64(value: u64, what: &'static str) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::Invalid(format!("{what} {value} is out of range")))
}

pub(crate) fn to_u64(value: i64, what: &'static str) -> StoreResult<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value}")))
}

fn optional_u64(value: Option<i64>, what: &'static str) -> StoreResult<Option<u64>> {
    value.map(|value| to_u64(value, what)).transpose()
}

pub(crate) fn optional_i64(value: Option<u64>, what: &'static str) -> StoreResult<Option<i64>> {
    value.map(|value| to_i64(value, what)).transpose()
}

pub(crate) fn money(row: &impl Fields, column: &str) -> StoreResult<Money> {
    Ok(Money::from_nanos(row.int(column)?))
}

fn optional_money(row: &impl Fields, column: &str) -> StoreResult<Option<Money>> {
    Ok(row.optional_int(column)?.map(Money::from_nanos))
}

pub(crate) fn checked_add(left: Money, right: Money) -> StoreResult<Money> {
    left.checked_add(right).ok_or(StoreError::Overflow("balance"))
}

pub(crate) fn kind_text(kind: AccountKind) -> &'static str {
    match kind {
        AccountKind::User => "user",
        AccountKind::Tenant => "tenant",
    }
}

pub(crate) fn status_text(status: AccountStatus) -> &'static str {
    match status {
        AccountStatus::Active => "active",
        AccountStatus::Suspended => "suspended",
    }
}

pub(crate) fn account_from(row: &impl Fields) -> StoreResult<Account> {
    let kind = row.text("kind")?;
    let status = row.text("status")?;
    Ok(Account {
        id: row.text("id")?,
        kind: match kind.as_str() {
            "tenant" => AccountKind::Tenant,
            "user" => AccountKind::User,
            other => return Err(StoreError::Corrupt(format!("account kind {other}"))),
        },
        name: row.text("name")?,
        customer_type: row.text("customer_type")?,
        status: match status.as_str() {
            "active" => AccountStatus::Active,
            "suspended" => AccountStatus::Suspended,
            other => return Err(StoreError::Corrupt(format!("account status {other}"))),
        },
        credit_limit: money(row, "credit_limit")?,
        daily_request_quota: optional_u64(row.optional_int("daily_request_quota")?, "quota")?,
        monthly_request_quota: optional_u64(row.optional_int("monthly_request_quota")?, "quota")?,
        low_balance_threshold: row.optional_int("low_balance_threshold")?.map(Money::from_nanos),
        created_at: time_of(row.int("created_at")?)?,
        updated_at: time_of(row.int("updated_at")?)?,
    })
}

pub(crate) fn key_from(row: &impl Fields) -> StoreResult<ApiKey> {
    let status = row.text("status")?;
    let allowed_models = row.optional_text("allowed_models")?;
    Ok(ApiKey {
        id: row.text("id")?,
        account_id: row.text("account_id")?,
        name: row.text("name")?,
        prefix: row.text("prefix")?,
        status: if status == "revoked" { KeyStatus::Revoked } else { KeyStatus::Active },
        budget_daily: optional_money(row, "budget_daily")?,
        budget_monthly: optional_money(row, "budget_monthly")?,
        budget_total: optional_money(row, "budget_total")?,
        rpm: optional_u64(row.optional_int("rpm")?, "rpm")?,
        tpm: optional_u64(row.optional_int("tpm")?, "tpm")?,
        allowed_models: allowed_models
            .map(|text| serde_json::from_str(&text).map_err(|error| StoreError::Corrupt(format!("allowed_models: {error}"))))
            .transpose()?,
        session_lock: row
            .optional_text("session_lock")?
            .map(|text| SessionLockMode::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("session_lock {text:?}"))))
            .transpose()?,
        expires_at: optional_time(row.optional_int("expires_at")?)?,
        created_at: time_of(row.int("created_at")?)?,
        revoked_at: optional_time(row.optional_int("revoked_at")?)?,
    })
}

pub(crate) fn allowed_models_text(models: Option<&Vec<String>>) -> StoreResult<Option<String>> {
    models
        .map(|models| serde_json::to_string(models).map_err(|error| StoreError::Invalid(error.to_string())))
        .transpose()
}

pub(crate) fn price_from(row: &impl Fields) -> StoreResult<PriceRow> {
    Ok(PriceRow {
        id: row.int("id")?,
        provider: row.text("provider")?,
        model: row.text("model")?,
        customer_type: row.text("customer_type")?,
        price: Price {
            input_per_mtok: money(row, "input_per_mtok")?,
            output_per_mtok: money(row, "output_per_mtok")?,
            cached_input_per_mtok: optional_money(row, "cached_input_per_mtok")?,
            cache_write_per_mtok: optional_money(row, "cache_write_per_mtok")?,
            per_request: money(row, "per_request")?,
        },
        effective_from: time_of(row.int("effective_from")?)?,
    })
}

pub(crate) fn topup_from(row: &impl Fields) -> StoreResult<TopUp> {
    let status = row.text("status")?;
    Ok(TopUp {
        id: row.text("id")?,
        account_id: row.text("account_id")?,
        amount: money(row, "amount")?,
        reference_id: row.text("reference_id")?,
        status: if status == "confirmed" { TopUpStatus::Confirmed } else { TopUpStatus::Pending },
        fund_seq: row.optional_int("fund_seq")?,
        created_at: time_of(row.int("created_at")?)?,
        confirmed_at: optional_time(row.optional_int("confirmed_at")?)?,
    })
}

pub(crate) fn fund_from(row: &impl Fields) -> StoreResult<FundTransaction> {
    let kind = row.text("kind")?;
    Ok(FundTransaction {
        seq: row.int("seq")?,
        account_id: row.text("account_id")?,
        kind: FundKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("fund kind {kind}")))?,
        amount: money(row, "amount")?,
        balance_before: money(row, "balance_before")?,
        balance_after: money(row, "balance_after")?,
        ledger_seq: row.int("ledger_seq")?,
        reference_id: row.text("reference_id")?,
        reason: row.optional_text("reason")?,
        operator_id: row.optional_text("operator_id")?,
        created_at: time_of(row.int("created_at")?)?,
    })
}

pub(crate) fn usage_from(row: &impl Fields) -> StoreResult<UsageRow> {
    let source = row.text("usage_source")?;
    let status = row.text("status")?;
    let tokens = |column: &str| to_u64(row.int(column)?, "tokens");
    Ok(UsageRow {
        id: row.int("id")?,
        request_id: row.text("request_id")?,
        account_id: row.text("account_id")?,
        api_key_id: row.text("api_key_id")?,
        provider: row.text("provider")?,
        model: row.text("model")?,
        customer_type: row.text("customer_type")?,
        price_id: row.optional_int("price_id")?,
        usage: Usage {
            input_tokens: tokens("input_tokens")?,
            cached_input_tokens: tokens("cached_input_tokens")?,
            cache_write_tokens: tokens("cache_write_tokens")?,
            output_tokens: tokens("output_tokens")?,
            reasoning_tokens: tokens("reasoning_tokens")?,
        },
        usage_source: UsageSource::parse(&source).ok_or_else(|| StoreError::Corrupt(format!("usage source {source}")))?,
        cost: money(row, "cost")?,
        balance_before: money(row, "balance_before")?,
        balance_after: money(row, "balance_after")?,
        ledger_seq: row.int("ledger_seq")?,
        status: RequestStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("request status {status}")))?,
        latency_ms: to_u64(row.int("latency_ms")?, "latency")?,
        created_at: time_of(row.int("created_at")?)?,
    })
}

/// A charged request's binding and, when a body was kept (the LEFT JOIN found one), its response.
pub(crate) fn charged_request_from(row: &impl Fields) -> StoreResult<ChargedRequest> {
    let response = match row.optional_int("status")? {
        None => None,
        Some(status) => Some(StoredResponse {
            status: u16::try_from(status).map_err(|_| StoreError::Corrupt(format!("stored status {status}")))?,
            content_type: row.text("content_type")?,
            body: row.bytes("body")?,
        }),
    };
    Ok(ChargedRequest {
        api_key_id: row.text("api_key_id")?,
        charged_at_ms: row.int("created_at")?,
        request_fingerprint: row.optional_text("request_fingerprint")?,
        response,
    })
}

/// The UTC day "YYYY-MM-DD" of a stored time, for summaries by day.
pub(crate) fn day_of(ms: i64) -> StoreResult<String> {
    let date = time_of(ms)?.date();
    Ok(format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day()))
}

/// Applies an operator's patch to an account read under lock.
pub(crate) fn apply_patch(account: &mut Account, patch: AccountPatch) {
    if let Some(name) = patch.name {
        account.name = name;
    }
    if let Some(customer_type) = patch.customer_type {
        account.customer_type = customer_type;
    }
    if let Some(status) = patch.status {
        account.status = status;
    }
    if let Some(credit_limit) = patch.credit_limit {
        account.credit_limit = credit_limit;
    }
    if let Some(quota) = patch.daily_request_quota {
        account.daily_request_quota = quota;
    }
    if let Some(quota) = patch.monthly_request_quota {
        account.monthly_request_quota = quota;
    }
    if let Some(threshold) = patch.low_balance_threshold {
        account.low_balance_threshold = threshold;
    }
}

/// Deposits add, refunds take away, adjustments go either way but never by zero.
pub(crate) fn check_fund_direction(fund: &NewFund) -> StoreResult<()> {
    let direction_ok = match fund.kind {
        FundKind::Deposit => fund.amount.is_positive(),
        FundKind::Refund => fund.amount.is_negative(),
        FundKind::Adjustment => !fund.amount.is_zero(),
    };
    if direction_ok { Ok(()) } else { Err(StoreError::Invalid(format!("a {} cannot move {}", fund.kind.as_str(), fund.amount))) }
}

/// Refuses a fund transaction the hot store could not apply: its amount, or the balance it
/// leaves, outside ±[`Money::HOT_STORE_MAX`]. Committed, it would fail to apply every time it
/// is tried and hold back every later fund change of the account.
pub(crate) fn check_hot_store_range(fund: &NewFund, balance_after: Money) -> StoreResult<()> {
    let max = Money::HOT_STORE_MAX;
    if !fund.amount.in_hot_store_range() {
        return Err(StoreError::Invalid(format!("a {} of {} is beyond the largest amount the hot store holds, ±{max}", fund.kind.as_str(), fund.amount)));
    }
    if !balance_after.in_hot_store_range() {
        return Err(StoreError::Invalid(format!("a {} of {} would leave a balance of {balance_after}, beyond the largest the hot store holds, ±{max}", fund.kind.as_str(), fund.amount)));
    }
    Ok(())
}

/// Adds `created_at` bounds to a query (either database: the builder picks the placeholders).
pub(crate) fn push_time_range<DB: sqlx::Database>(builder: &mut sqlx::QueryBuilder<DB>, start: Option<OffsetDateTime>, end: Option<OffsetDateTime>)
where
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(start) = start {
        builder.push(" AND created_at >= ").push_bind(ms_of(start));
    }
    if let Some(end) = end {
        builder.push(" AND created_at < ").push_bind(ms_of(end));
    }
}

/// The filters, order and page size of a usage listing.
pub(crate) fn push_usage_query<DB: sqlx::Database>(builder: &mut sqlx::QueryBuilder<DB>, query: UsageQuery)
where
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(account_id) = query.account_id {
        builder.push(" AND account_id = ").push_bind(account_id);
    }
    if let Some(api_key_id) = query.api_key_id {
        builder.push(" AND api_key_id = ").push_bind(api_key_id);
    }
    push_time_range(builder, query.start, query.end);
    if let Some(cursor) = query.cursor {
        builder.push(" AND id < ").push_bind(cursor);
    }
    builder.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit.clamp(1, PAGE_ROWS_MAX)));
}

/// The reads of a statement of an account within `[start, end)`: its fund rows, usage rows and
/// archived runs (by their first row's time), for [`merge_statement`].
pub(crate) fn statement_queries<DB: sqlx::Database>(account_id: &str, start: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> [sqlx::QueryBuilder<DB>; 3]
where
    for<'b> i64: sqlx::Encode<'b, DB> + sqlx::Type<DB>,
    for<'b> String: sqlx::Encode<'b, DB> + sqlx::Type<DB>,
{
    ["fund_transactions", "usage_log", "archived_runs"].map(|table| {
        let mut builder = sqlx::QueryBuilder::new(format!("SELECT * FROM {table} WHERE account_id = "));
        builder.push_bind(account_id.to_string());
        push_time_range(&mut builder, start, end);
        builder
    })
}

/// Fund rows, usage rows and archived runs together, in ledger order.
pub(crate) fn merge_statement(funds: &[impl Fields], usage: &[impl Fields], runs: &[impl Fields]) -> StoreResult<Vec<LedgerEntry>> {
    let mut entries = Vec::with_capacity(funds.len() + usage.len() + runs.len());
    for row in funds {
        entries.push(LedgerEntry::Fund(fund_from(row)?));
    }
    for row in usage {
        entries.push(LedgerEntry::Usage(usage_from(row)?));
    }
    for row in runs {
        entries.push(LedgerEntry::Archived(run_from(row)?));
    }
    entries.sort_by_key(LedgerEntry::ledger_seq);
    Ok(entries)
}

pub(crate) fn run_from(row: &impl Fields) -> StoreResult<ArchivedRun> {
    Ok(ArchivedRun {
        account_id: row.text("account_id")?,
        first_seq: row.int("first_seq")?,
        last_seq: row.int("last_seq")?,
        usage_rows: to_u64(row.int("usage_rows")?, "usage_rows")?,
        cost: money(row, "cost")?,
        balance_before: money(row, "balance_before")?,
        balance_after: money(row, "balance_after")?,
        month: row.text("month")?,
        created_at: time_of(row.int("created_at")?)?,
        last_at: time_of(row.int("last_at")?)?,
    })
}

/// What a usage batch does, decided before any row is written: an outcome per event, and the
/// events to insert, each `place`d (turned into its row) at its account's next position. A
/// charge is a duplicate when its (account, request id) is in `charged` (read under the write
/// lock) or earlier in the batch; failed attempts are always recorded.
pub(crate) struct UsagePlan<'a, R> {
    pub rows: Vec<R>,
    pub inserted: Vec<&'a UsageEvent>,
    pub outcomes: Vec<RecordOutcome>,
}

pub(crate) fn plan_usage_batch<'a, R>(
    events: &'a [UsageEvent],
    positions: &mut HashMap<&'a str, (Money, i64)>,
    mut charged: HashSet<(String, String)>,
    mut place: impl FnMut(&UsageEvent, &mut (Money, i64)) -> StoreResult<R>,
) -> StoreResult<UsagePlan<'a, R>> {
    let mut plan = UsagePlan { rows: Vec::with_capacity(events.len()), inserted: Vec::with_capacity(events.len()), outcomes: Vec::with_capacity(events.len()) };
    for event in events {
        let first_charge = event.status == RequestStatus::Failed || charged.insert((event.account_id.clone(), event.request_id.clone()));
        if !first_charge {
            plan.outcomes.push(RecordOutcome::Duplicate);
            continue;
        }
        let position = positions
            .get_mut(event.account_id.as_str())
            .ok_or_else(|| StoreError::Corrupt(format!("account {} has no position in its batch", event.account_id)))?;
        plan.rows.push(place(event, position)?);
        plan.inserted.push(event);
        plan.outcomes.push(RecordOutcome::Inserted);
    }
    Ok(plan)
}

/// One row of `upstream_attempts` (migrations: PostgreSQL 0010, SQLite 0007), before its usage
/// row's id is known: it finds that row by (account, ledger position), unique per account.
pub(crate) struct AttemptRow<'a> {
    pub account_id: &'a str,
    pub ledger_seq: i64,
    pub request_id: &'a str,
    pub attempt: i64,
    pub channel: &'a str,
    pub provider: &'a str,
    pub upstream_model: &'a str,
    pub status_code: Option<i32>,
    pub served: bool,
    pub error: Option<&'a str>,
    pub latency_ms: i64,
    pub first_byte_ms: Option<i64>,
    /// input, cached input, cache write, output, reasoning — the upstream's report, if any.
    pub usage: Option<[i64; 5]>,
    pub created_at: i64,
}

/// The attempt rows of a usage event placed at `ledger_seq`. More than
/// [`crate::model::ATTEMPTS_PER_REQUEST_MAX`] attempts is an event no gateway makes: refused.
pub(crate) fn attempt_rows(event: &UsageEvent, ledger_seq: i64) -> StoreResult<Vec<AttemptRow<'_>>> {
    if event.attempts.len() > crate::model::ATTEMPTS_PER_REQUEST_MAX {
        return Err(StoreError::Invalid(format!("usage event {} carries {} upstream attempts; at most {}", event.request_id, event.attempts.len(), crate::model::ATTEMPTS_PER_REQUEST_MAX)));
    }
    let mut rows = Vec::with_capacity(event.attempts.len());
    for (index, attempt) in event.attempts.iter().enumerate() {
        let usage = match &attempt.upstream_usage {
            Some(usage) => Some([
                to_i64(usage.input_tokens, "input_tokens")?,
                to_i64(usage.cached_input_tokens, "cached_input_tokens")?,
                to_i64(usage.cache_write_tokens, "cache_write_tokens")?,
                to_i64(usage.output_tokens, "output_tokens")?,
                to_i64(usage.reasoning_tokens, "reasoning_tokens")?,
            ]),
            None => None,
        };
        rows.push(AttemptRow {
            account_id: &event.account_id,
            ledger_seq,
            request_id: &event.request_id,
            attempt: i64::try_from(index + 1).map_err(|_| StoreError::Invalid("attempt number".into()))?,
            channel: &attempt.channel,
            provider: &attempt.provider,
            upstream_model: &attempt.upstream_model,
            status_code: attempt.status_code.map(i32::from),
            served: attempt.served,
            error: attempt.error.as_deref(),
            latency_ms: to_i64(attempt.latency_ms, "latency_ms")?,
            first_byte_ms: attempt.first_byte_ms.map(|ms| to_i64(ms, "first_byte_ms")).transpose()?,
            usage,
            created_at: event.created_at_ms,
        });
    }
    Ok(rows)
}

/// An `upstream_attempts` row as read back.
pub(crate) fn attempt_from<R: Fields>(row: &R) -> StoreResult<crate::model::RecordedAttempt> {
    let optional_u64 = |column: &str| -> StoreResult<Option<u64>> {
        row.optional_int(column)?.map(|value| u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {column}")))).transpose()
    };
    let usage = match optional_u64("input_tokens")? {
        Some(input_tokens) => Some(Usage {
            input_tokens,
            cached_input_tokens: optional_u64("cached_input_tokens")?.unwrap_or(0),
            cache_write_tokens: optional_u64("cache_write_tokens")?.unwrap_or(0),
            output_tokens: optional_u64("output_tokens")?.unwrap_or(0),
            reasoning_tokens: optional_u64("reasoning_tokens")?.unwrap_or(0),
        }),
        None => None,
    };
    Ok(crate::model::RecordedAttempt {
        usage_id: row.int("usage_id")?,
        attempt: u32::try_from(row.int("attempt")?).map_err(|_| StoreError::Corrupt("attempt number".into()))?,
        request_id: row.text("request_id")?,
        created_at_ms: row.int("created_at")?,
        attempt_row: UpstreamAttempt {
            channel: row.text("channel")?,
            provider: row.text("provider")?,
            upstream_model: row.text("upstream_model")?,
            status_code: row.optional_int("status_code")?.and_then(|code| u16::try_from(code).ok()),
            served: row.int("served")? != 0,
            error: row.optional_text("error")?,
            latency_ms: optional_u64("latency_ms")?.unwrap_or(0),
            first_byte_ms: optional_u64("first_byte_ms")?,
            upstream_usage: usage,
        },
    })
}
