//! The production ledger on PostgreSQL. Every write is one transaction; an account's rows take
//! their ledger positions under its `account_balance` row lock (`SELECT … FOR UPDATE`), so the
//! audit chain (I4) holds with any number of writers. Fund changes and configuration changes are
//! announced with `pg_notify`, which PostgreSQL delivers only when (and if) the transaction
//! commits — a rolled-back change is never announced.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;
use tollgate_core::Money;

use crate::alerts::{SPEND_COUNTERS_OF_ACCOUNT, counter_seed, period_labels};
use crate::error::{StoreError, StoreResult};
use crate::hot::CounterSeed;
use crate::ledger::Ledger;
use crate::operations::pg;
use crate::model::{
    Account, AccountBalance, AccountPatch, ApiKey, FundKind, FundOutcome, FundTransaction, LedgerEntry, NewAccount,
    ChargedRequest, NewApiKey, NewFund, NewPrice, PriceRow, RecordOutcome, RequestStatus, SessionLockMode, StoredResponse, SummaryQuery, SummaryRow, AccountQuery, PriceHistoryQuery, TopUpQuery, TopUp,
    TopUpStatus, UsageEvent, UsageQuery, UsageRow,
};
use crate::sql_rows::{
    Fields, UsagePlan, account_from, allowed_models_text, apply_patch, check_fund_direction, check_hot_store_range, checked_add, fund_from,
    key_from, kind_text, merge_statement, statement_queries, money, ms_of, now_ms, optional_i64, plan_usage_batch, price_from, status_text, charged_request_from, to_i64, topup_from, };

/// Channel of fund changes: `{account_id, customer_type, amount, old_balance, new_balance,
/// fund_seq}` where `fund_seq` is the transaction's ledger_seq (the hot store applies by it).
pub const FUND_CHANNEL: &str = "account_balance_updated";
/// Channel of changes that invalidate billing contexts and prices: `{kind, id}`.
pub const CONFIG_CHANNEL: &str = "tollgate_config_changed";

const ACQUIRE_TIMEOUT_MS: u64 = 10_000;

/// A charged request: its (account, request id) in `charged_requests`, its usage row by id (any
/// month's partition: the row's own date decides the replay window), its stored body if kept.
const CHARGED_REQUEST: &str = "SELECT u.api_key_id, u.created_at, u.request_fingerprint, s.status, s.content_type, s.body
    FROM charged_requests c JOIN usage_log u ON u.id = c.usage_id LEFT JOIN stored_responses s ON s.usage_id = c.usage_id
    WHERE c.account_id = $1 AND c.request_id = $2";
/// Whether an (account, request id) is charged.
pub(crate) const CHARGED_ONE: &str = "SELECT 1 FROM charged_requests WHERE account_id = $1 AND request_id = $2";

/// The PostgreSQL ledger.
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
}

/// Applies the migrations and exits.
///
/// # Errors
/// The database cannot be reached or a migration fails.
pub async fn migrate(url: &str) -> StoreResult<()> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    sqlx::migrate!("./migrations/postgres").run(&pool).await?;
    pool.close().await;
    Ok(())
}

impl PgLedger {
    /// Connects with an explicit pool size and acquire timeout, and migrates.
    ///
    /// # Errors
    /// The database cannot be reached or migrated.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<PgLedger> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgLedger { pool })
    }

    /// The pool, for the LISTEN connection and the worker.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One usage batch in a transaction of its own (see [`DuplicateCheck`]).
    async fn record_usage_checked(&self, events: &[UsageEvent], check: DuplicateCheck) -> StoreResult<Vec<RecordOutcome>> {
        let mut transaction = self.pool.begin().await?;
        let recorded = record_usage_in(&mut transaction, events, check).await?;
        transaction.commit().await?;
        Ok(recorded.outcomes)
    }
}

async fn notify(transaction: &mut Transaction<'static, Postgres>, channel: &str, payload: serde_json::Value) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(channel).bind(payload.to_string()).execute(&mut **transaction).await?;
    Ok(())
}

async fn config_changed(transaction: &mut Transaction<'static, Postgres>, kind: &str, id: &str) -> StoreResult<()> {
    notify(transaction, CONFIG_CHANNEL, json!({"kind": kind, "id": id})).await
}

/// Locks the account's balance row; returns (balance, ledger_seq).
pub(crate) async fn balance_for_update(transaction: &mut Transaction<'static, Postgres>, account_id: &str) -> StoreResult<(Money, i64)> {
    let row = sqlx::query("SELECT balance, ledger_seq FROM account_balance WHERE account_id = $1 FOR UPDATE")
        .bind(account_id)
        .fetch_optional(&mut **transaction)
        .await?
        .ok_or_else(|| StoreError::NotFound { entity: "account", id: account_id.to_string() })?;
    Ok((money(&row, "balance")?, row.int("ledger_seq")?))
}

/// A fund transaction by its reference, in a transaction or straight from the pool.
async fn fund_by_reference<'e>(executor: impl sqlx::Executor<'e, Database = Postgres>, kind: FundKind, reference_id: &str) -> StoreResult<Option<FundTransaction>> {
    sqlx::query("SELECT * FROM fund_transactions WHERE kind = $1 AND reference_id = $2")
        .bind(kind.as_str())
        .bind(reference_id)
        .fetch_optional(executor)
        .await?
        .as_ref()
        .map(fund_from)
        .transpose()
}

/// Inserts a fund transaction at the account's next ledger position (the row is locked by the
/// caller), moves the balance and announces it at commit.
pub(crate) async fn insert_fund(transaction: &mut Transaction<'static, Postgres>, fund: &NewFund, position: (Money, i64)) -> StoreResult<FundTransaction> {
    let (balance_before, ledger_seq) = position;
    let balance_after = checked_add(balance_before, fund.amount)?;
    check_hot_store_range(fund, balance_after)?;
    if fund.kind == FundKind::Refund && balance_after.is_negative() {
        return Err(StoreError::Invalid(format!("refund exceeds balance {balance_before}")));
    }
    let ledger_seq = ledger_seq + 1;
    let now = now_ms();
    let row = sqlx::query(
        "INSERT INTO fund_transactions (account_id, kind, amount, balance_before, balance_after, ledger_seq, reference_id, reason, operator_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
    )
    .bind(&fund.account_id)
    .bind(fund.kind.as_str())
    .bind(fund.amount.nanos())
    .bind(balance_before.nanos())
    .bind(balance_after.nanos())
    .bind(ledger_seq)
    .bind(&fund.reference_id)
    .bind(&fund.reason)
    .bind(&fund.operator_id)
    .bind(now)
    .fetch_one(&mut **transaction)
    .await?;
    sqlx::query("UPDATE account_balance SET balance = $1, ledger_seq = $2, last_fund_seq = $2, updated_at = $3 WHERE account_id = $4")
        .bind(balance_after.nanos())
        .bind(ledger_seq)
        .bind(now)
        .bind(&fund.account_id)
        .execute(&mut **transaction)
        .await?;
    let customer_type: String = sqlx::query_scalar("SELECT customer_type FROM accounts WHERE id = $1")
        .bind(&fund.account_id)
        .fetch_one(&mut **transaction)
        .await?;
    let payload = json!({
        "account_id": fund.account_id, "customer_type": customer_type, "amount": fund.amount.to_string(),
        "old_balance": balance_before.to_string(), "new_balance": balance_after.to_string(), "fund_seq": ledger_seq,
    });
    notify(transaction, FUND_CHANNEL, payload).await?;
    let inserted = fund_from(&row)?;
    crate::postgres_ops::after_fund(transaction, &inserted).await?;
    Ok(inserted)
}

/// The columns of the usage rows one batch inserts, as arrays for a single `INSERT … UNNEST`.
#[derive(Default)]
struct UsageColumns {
    request_id: Vec<String>,
    account_id: Vec<String>,
    api_key_id: Vec<String>,
    provider: Vec<String>,
    model: Vec<String>,
    customer_type: Vec<String>,
    price_id: Vec<Option<i64>>,
    input_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    cache_write_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    reasoning_tokens: Vec<i64>,
    usage_source: Vec<String>,
    cost: Vec<i64>,
    balance_before: Vec<i64>,
    balance_after: Vec<i64>,
    ledger_seq: Vec<i64>,
    status: Vec<String>,
    latency_ms: Vec<i64>,
    created_at: Vec<i64>,
    request_fingerprint: Vec<Option<String>>,
    attempts: AttemptColumns,
}

/// The batch's `upstream_attempts` rows as arrays, each naming its usage row by (account,
/// ledger position).
#[derive(Default)]
struct AttemptColumns {
    account_id: Vec<String>,
    ledger_seq: Vec<i64>,
    request_id: Vec<String>,
    attempt: Vec<i64>,
    channel: Vec<String>,
    provider: Vec<String>,
    upstream_model: Vec<String>,
    status_code: Vec<Option<i64>>,
    served: Vec<bool>,
    error: Vec<Option<String>>,
    latency_ms: Vec<i64>,
    first_byte_ms: Vec<Option<i64>>,
    usage: [Vec<Option<i64>>; 5],
    created_at: Vec<i64>,
}

impl AttemptColumns {
    fn push(&mut self, event: &UsageEvent, ledger_seq: i64) -> StoreResult<()> {
        for row in crate::sql_rows::attempt_rows(event, ledger_seq)? {
            self.account_id.push(row.account_id.to_string());
            self.ledger_seq.push(row.ledger_seq);
            self.request_id.push(row.request_id.to_string());
            self.attempt.push(row.attempt);
            self.channel.push(row.channel.to_string());
            self.provider.push(row.provider.to_string());
            self.upstream_model.push(row.upstream_model.to_string());
            self.status_code.push(row.status_code.map(i64::from));
            self.served.push(row.served);
            self.error.push(row.error.map(str::to_string));
            self.latency_ms.push(row.latency_ms);
            self.first_byte_ms.push(row.first_byte_ms);
            for (column, value) in self.usage.iter_mut().enumerate() {
                value.push(row.usage.map(|usage| usage[column]));
            }
            self.created_at.push(row.created_at);
        }
        Ok(())
    }
}

impl UsageColumns {
    /// Adds the event at the account's running position and advances it.
    fn push(&mut self, event: &UsageEvent, position: &mut (Money, i64)) -> StoreResult<()> {
        let (balance_before, ledger_seq) = *position;
        let balance_after = balance_before.checked_sub(event.cost).ok_or(StoreError::Overflow("balance"))?;
        self.request_id.push(event.request_id.clone());
        self.account_id.push(event.account_id.clone());
        self.api_key_id.push(event.api_key_id.clone());
        self.provider.push(event.provider.clone());
        self.model.push(event.model.clone());
        self.customer_type.push(event.customer_type.clone());
        self.price_id.push(event.price_id);
        self.input_tokens.push(to_i64(event.usage.input_tokens, "input_tokens")?);
        self.cached_input_tokens.push(to_i64(event.usage.cached_input_tokens, "cached_input_tokens")?);
        self.cache_write_tokens.push(to_i64(event.usage.cache_write_tokens, "cache_write_tokens")?);
        self.output_tokens.push(to_i64(event.usage.output_tokens, "output_tokens")?);
        self.reasoning_tokens.push(to_i64(event.usage.reasoning_tokens, "reasoning_tokens")?);
        self.usage_source.push(event.usage_source.as_str().to_string());
        self.cost.push(event.cost.nanos());
        self.balance_before.push(balance_before.nanos());
        self.balance_after.push(balance_after.nanos());
        self.ledger_seq.push(ledger_seq + 1);
        self.status.push(event.status.as_str().to_string());
        self.latency_ms.push(to_i64(event.latency_ms, "latency_ms")?);
        self.created_at.push(event.created_at_ms);
        self.request_fingerprint.push(event.request_fingerprint.clone());
        self.attempts.push(event, ledger_seq + 1)?;
        *position = (balance_after, ledger_seq + 1);
        Ok(())
    }

    /// One statement for the whole batch: its usage rows, the charged ones' (account, request id)
    /// in `charged_requests` (migration 0008), and their stored responses, each keyed by its new
    /// row's id (migration 0006). No `ON CONFLICT`: its speculative insertion cost about 7 µs a
    /// row, and `charged_requests`' primary key refuses a second charge, failing the batch with
    /// `Conflict`.
    async fn insert(self, stored: &[&UsageEvent], transaction: &mut Transaction<'static, Postgres>) -> StoreResult<()> {
        if self.request_id.is_empty() {
            return Ok(());
        }
        let stored: Vec<(&UsageEvent, &StoredResponse)> =
            stored.iter().filter_map(|event| event.stored_response.as_ref().map(|response| (*event, response))).collect();
        let column = |pick: fn(&(&UsageEvent, &StoredResponse)) -> i64| stored.iter().map(pick).collect::<Vec<i64>>();
        let text = |pick: for<'e> fn(&(&'e UsageEvent, &'e StoredResponse)) -> &'e str| stored.iter().map(pick).collect::<Vec<&str>>();
        let attempts = self.attempts;
        let [input, cached_input, cache_write, output, reasoning] = attempts.usage;
        sqlx::query(
            "WITH inserted AS (
                 INSERT INTO usage_log (request_id, account_id, api_key_id, provider, model, customer_type, price_id,
                     input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                     usage_source, cost, balance_before, balance_after, ledger_seq, status, latency_ms, created_at,
                     request_fingerprint)
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[],
                     $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::TEXT[], $14::BIGINT[],
                     $15::BIGINT[], $16::BIGINT[], $17::BIGINT[], $18::TEXT[], $19::BIGINT[], $20::BIGINT[], $21::TEXT[])
                 RETURNING id, account_id, request_id, status, created_at, ledger_seq),
             charged AS (
                 INSERT INTO charged_requests (account_id, request_id, usage_id, created_at)
                 SELECT account_id, request_id, id, created_at FROM inserted WHERE status <> 'failed'),
             attempts AS (
                 INSERT INTO upstream_attempts (usage_id, attempt, account_id, request_id, channel, provider, upstream_model,
                     status_code, served, error, latency_ms, first_byte_ms, input_tokens, cached_input_tokens,
                     cache_write_tokens, output_tokens, reasoning_tokens, created_at)
                 SELECT inserted.id, a.attempt, a.account_id, a.request_id, a.channel, a.provider, a.upstream_model,
                     a.status_code, a.served, a.error, a.latency_ms, a.first_byte_ms, a.input_tokens, a.cached_input_tokens,
                     a.cache_write_tokens, a.output_tokens, a.reasoning_tokens, a.created_at
                 FROM UNNEST($28::TEXT[], $29::BIGINT[], $30::TEXT[], $31::BIGINT[], $32::TEXT[], $33::TEXT[], $34::TEXT[],
                     $35::BIGINT[], $36::BOOLEAN[], $37::TEXT[], $38::BIGINT[], $39::BIGINT[], $40::BIGINT[], $41::BIGINT[],
                     $42::BIGINT[], $43::BIGINT[], $44::BIGINT[], $45::BIGINT[])
                     AS a (account_id, ledger_seq, request_id, attempt, channel, provider, upstream_model, status_code, served,
                         error, latency_ms, first_byte_ms, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
                         reasoning_tokens, created_at)
                 JOIN inserted ON inserted.account_id = a.account_id AND inserted.ledger_seq = a.ledger_seq)
             INSERT INTO stored_responses (usage_id, status, content_type, body, created_at)
             SELECT inserted.id, stored.status, stored.content_type, stored.body, stored.created_at
             FROM UNNEST($22::TEXT[], $23::TEXT[], $24::BIGINT[], $25::TEXT[], $26::BYTEA[], $27::BIGINT[])
                 AS stored (account_id, request_id, status, content_type, body, created_at)
             JOIN inserted ON inserted.account_id = stored.account_id AND inserted.request_id = stored.request_id
                 AND inserted.status <> 'failed'",
        )
        .bind(self.request_id)
        .bind(self.account_id)
        .bind(self.api_key_id)
        .bind(self.provider)
        .bind(self.model)
        .bind(self.customer_type)
        .bind(self.price_id)
        .bind(self.input_tokens)
        .bind(self.cached_input_tokens)
        .bind(self.cache_write_tokens)
        .bind(self.output_tokens)
        .bind(self.reasoning_tokens)
        .bind(self.usage_source)
        .bind(self.cost)
        .bind(self.balance_before)
        .bind(self.balance_after)
        .bind(self.ledger_seq)
        .bind(self.status)
        .bind(self.latency_ms)
        .bind(self.created_at)
        .bind(self.request_fingerprint)
        .bind(text(|(event, _)| event.account_id.as_str()))
        .bind(text(|(event, _)| event.request_id.as_str()))
        .bind(column(|(_, response)| i64::from(response.status)))
        .bind(text(|(_, response)| response.content_type.as_str()))
        .bind(stored.iter().map(|(_, response)| response.body.as_slice()).collect::<Vec<&[u8]>>())
        .bind(column(|(event, _)| event.created_at_ms))
        .bind(attempts.account_id)
        .bind(attempts.ledger_seq)
        .bind(attempts.request_id)
        .bind(attempts.attempt)
        .bind(attempts.channel)
        .bind(attempts.provider)
        .bind(attempts.upstream_model)
        .bind(attempts.status_code)
        .bind(attempts.served)
        .bind(attempts.error)
        .bind(attempts.latency_ms)
        .bind(attempts.first_byte_ms)
        .bind(input)
        .bind(cached_input)
        .bind(cache_write)
        .bind(output)
        .bind(reasoning)
        .bind(attempts.created_at)
        .execute(&mut **transaction)
        .await?;
        Ok(())
    }
}

/// How a batch learns which of its charges the ledger has already.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum DuplicateCheck {
    /// Read them under the account locks before inserting: the batch skips them.
    Read,
    /// Insert at once (a charge the ledger has is rare: a batch delivered again after a lost
    /// acknowledgement): the unique index refuses one, failing the batch with `Conflict`, and the
    /// caller writes it again with `Read`. Saves a lookup per row (about 5 µs in PostgreSQL).
    Optimistic,
}

/// What [`record_usage_in`] did: an outcome per event, and each account's (balance, ledger_seq)
/// before and after the batch.
pub(crate) struct RecordedUsage<'a> {
    pub outcomes: Vec<RecordOutcome>,
    pub starts: HashMap<&'a str, (Money, i64)>,
    pub positions: HashMap<&'a str, (Money, i64)>,
}

/// Records usage events in the caller's transaction: each charge once per (account, request
/// id), at the account's next ledger positions, with its stored response, counters and alerts,
/// and the balances moved. Shared by the usage writer and charging in the ledger.
pub(crate) async fn record_usage_in<'a>(
    transaction: &mut Transaction<'static, Postgres>,
    events: &'a [UsageEvent],
    check: DuplicateCheck,
) -> StoreResult<RecordedUsage<'a>> {
    let mut positions = lock_accounts(transaction, events).await?;
    check_prices(transaction, events).await?;
    let starts = positions.clone();
    // Under the locks no other writer can charge these accounts, so what is charged now is
    // all there is to skip.
    let charged = match check {
        DuplicateCheck::Read => charged_already(transaction, events).await?,
        DuplicateCheck::Optimistic => HashSet::new(),
    };
    let mut columns = UsageColumns::default();
    let UsagePlan { inserted: inserted_events, outcomes, .. } = plan_usage_batch(events, &mut positions, charged, |event, position| columns.push(event, position))?;
    columns.insert(&inserted_events, transaction).await.map_err(|error| match (error, check) {
        (StoreError::Conflict(message), DuplicateCheck::Read) => StoreError::Corrupt(format!("a usage row charged twice under its account's lock: {message}")),
        (other, _) => other,
    })?;
    crate::postgres_ops::after_usage_batch(transaction, &starts, &positions, &inserted_events).await?;
    let (account_ids, (balances, ledger_seqs)): (Vec<&str>, (Vec<i64>, Vec<i64>)) =
        positions.iter().map(|(account_id, (balance, ledger_seq))| (*account_id, (balance.nanos(), *ledger_seq))).unzip();
    sqlx::query(
        "UPDATE account_balance SET balance = batch.balance, ledger_seq = batch.ledger_seq, updated_at = $4
         FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS batch (account_id, balance, ledger_seq)
         WHERE account_balance.account_id = batch.account_id",
    )
    .bind(account_ids)
    .bind(balances)
    .bind(ledger_seqs)
    .bind(now_ms())
    .execute(&mut **transaction)
    .await?;
    Ok(RecordedUsage { outcomes, starts, positions })
}

/// Locks the batch's accounts in one order (so concurrent workers cannot deadlock) and returns
/// their running positions.
async fn lock_accounts<'a>(transaction: &mut Transaction<'static, Postgres>, events: &'a [UsageEvent]) -> StoreResult<HashMap<&'a str, (Money, i64)>> {
    let mut account_ids: Vec<&str> = events.iter().map(|event| event.account_id.as_str()).collect();
    account_ids.sort_unstable();
    account_ids.dedup();
    let rows = sqlx::query("SELECT account_id, balance, ledger_seq FROM account_balance WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE")
        .bind(&account_ids)
        .fetch_all(&mut **transaction)
        .await?;
    let mut positions = HashMap::with_capacity(account_ids.len());
    for row in rows {
        let account_id = row.text("account_id")?;
        let Some(key) = account_ids.iter().find(|id| **id == account_id) else { continue };
        positions.insert(*key, (money(&row, "balance")?, row.int("ledger_seq")?));
    }
    if let Some(unknown) = account_ids.iter().find(|id| !positions.contains_key(**id)) {
        return Err(StoreError::Invalid(format!("usage event names unknown account {unknown}")));
    }
    Ok(positions)
}

/// Refuses a batch that names a price row the ledger does not have: once per batch, for its
/// distinct price ids (usage_log has no per-row foreign keys, migration 0005).
async fn check_prices(transaction: &mut Transaction<'static, Postgres>, events: &[UsageEvent]) -> StoreResult<()> {
    let mut price_ids: Vec<i64> = events.iter().filter_map(|event| event.price_id).collect();
    price_ids.sort_unstable();
    price_ids.dedup();
    if price_ids.is_empty() {
        return Ok(());
    }
    let known: Vec<i64> = sqlx::query_scalar("SELECT id FROM prices WHERE id = ANY($1)").bind(&price_ids).fetch_all(&mut **transaction).await?;
    match price_ids.iter().find(|id| !known.contains(id)) {
        Some(unknown) => Err(StoreError::Invalid(format!("usage event names unknown price {unknown}"))),
        None => Ok(()),
    }
}

/// The (account, request id) pairs of the batch that already have a charged row.
async fn charged_already(transaction: &mut Transaction<'static, Postgres>, events: &[UsageEvent]) -> StoreResult<HashSet<(String, String)>> {
    let (account_ids, request_ids): (Vec<&str>, Vec<&str>) = events
        .iter()
        .filter(|event| event.status != RequestStatus::Failed)
        .map(|event| (event.account_id.as_str(), event.request_id.as_str()))
        .unzip();
    let rows = sqlx::query("SELECT account_id, request_id FROM charged_requests WHERE (account_id, request_id) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))")
    .bind(&account_ids)
    .bind(&request_ids)
    .fetch_all(&mut **transaction)
    .await?;
    rows.iter().map(|row| Ok((row.text("account_id")?, row.text("request_id")?))).collect()
}

#[async_trait]
impl Ledger for PgLedger {
    async fn ping(&self) -> StoreResult<()> {
        crate::sql_reads::Reads(&self.pool).ping().await
    }

    async fn create_account(&self, account: NewAccount) -> StoreResult<Account> {
        let mut transaction = self.pool.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO accounts (id, kind, name, customer_type, status, credit_limit, daily_request_quota, monthly_request_quota, low_balance_threshold, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $9, $8, $8) ON CONFLICT (id) DO NOTHING RETURNING *",
        )
        .bind(&account.id)
        .bind(kind_text(account.kind))
        .bind(&account.name)
        .bind(&account.customer_type)
        .bind(account.credit_limit.nanos())
        .bind(optional_i64(account.daily_request_quota, "daily_request_quota")?)
        .bind(optional_i64(account.monthly_request_quota, "monthly_request_quota")?)
        .bind(now)
        .bind(account.low_balance_threshold.map(Money::nanos))
        .fetch_optional(&mut *transaction)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("account {} already exists", account.id)))?;
        sqlx::query("INSERT INTO account_balance (account_id, balance, last_fund_seq, ledger_seq, updated_at) VALUES ($1, 0, 0, 0, $2)")
            .bind(&account.id)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        let created = account_from(&row)?;
        transaction.commit().await?;
        Ok(created)
    }

    async fn account(&self, account_id: &str) -> StoreResult<Option<Account>> {
        crate::sql_reads::Reads(&self.pool).account(account_id).await
    }

    async fn update_account(&self, account_id: &str, patch: AccountPatch) -> StoreResult<Account> {
        let mut transaction = self.pool.begin().await?;
        let row = sqlx::query("SELECT * FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(account_id)
            .fetch_optional(&mut *transaction)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: "account", id: account_id.to_string() })?;
        let mut account = account_from(&row)?;
        apply_patch(&mut account, patch);
        let row = sqlx::query(
            "UPDATE accounts SET name = $1, customer_type = $2, status = $3, credit_limit = $4, daily_request_quota = $5, monthly_request_quota = $6, updated_at = $7,
             low_balance_threshold = $9 WHERE id = $8 RETURNING *",
        )
        .bind(&account.name)
        .bind(&account.customer_type)
        .bind(status_text(account.status))
        .bind(account.credit_limit.nanos())
        .bind(optional_i64(account.daily_request_quota, "daily_request_quota")?)
        .bind(optional_i64(account.monthly_request_quota, "monthly_request_quota")?)
        .bind(now_ms())
        .bind(account_id)
        .bind(account.low_balance_threshold.map(Money::nanos))
        .fetch_one(&mut *transaction)
        .await?;
        config_changed(&mut transaction, "account", account_id).await?;
        let updated = account_from(&row)?;
        transaction.commit().await?;
        Ok(updated)
    }

    async fn account_balance(&self, account_id: &str) -> StoreResult<Option<AccountBalance>> {
        crate::sql_reads::Reads(&self.pool).account_balance(account_id).await
    }

    async fn account_ids(&self) -> StoreResult<Vec<String>> {
        crate::sql_reads::Reads(&self.pool).account_ids().await
    }

    async fn accounts_page(&self, query: AccountQuery) -> StoreResult<Vec<Account>> {
        crate::sql_reads::Reads(&self.pool).accounts_page(query).await
    }

    async fn customer_types(&self) -> StoreResult<Vec<String>> {
        crate::sql_reads::Reads(&self.pool).customer_types().await
    }

    async fn create_key(&self, key: NewApiKey) -> StoreResult<ApiKey> {
        let mut transaction = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE id = $1").bind(&key.account_id).fetch_optional(&mut *transaction).await?;
        if exists.is_none() {
            return Err(StoreError::NotFound { entity: "account", id: key.account_id });
        }
        let row = sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, status, budget_daily, budget_monthly, budget_total, rpm, tpm, allowed_models, session_lock, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING *",
        )
        .bind(&key.id)
        .bind(&key.account_id)
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(&key.prefix)
        .bind(key.budget_daily.map(Money::nanos))
        .bind(key.budget_monthly.map(Money::nanos))
        .bind(key.budget_total.map(Money::nanos))
        .bind(optional_i64(key.rpm, "rpm")?)
        .bind(optional_i64(key.tpm, "tpm")?)
        .bind(allowed_models_text(key.allowed_models.as_ref())?)
        .bind(key.session_lock.map(SessionLockMode::as_str))
        .bind(key.expires_at.map(ms_of))
        .bind(now_ms())
        .fetch_one(&mut *transaction)
        .await?;
        config_changed(&mut transaction, "key", &key.id).await?;
        let created = key_from(&row)?;
        transaction.commit().await?;
        Ok(created)
    }

    async fn keys_for_account(&self, account_id: &str) -> StoreResult<Vec<ApiKey>> {
        sqlx::query("SELECT * FROM api_keys WHERE account_id = $1 ORDER BY created_at, id").bind(account_id).fetch_all(&self.pool).await?.iter().map(key_from).collect()
    }

    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>> {
        crate::sql_reads::Reads(&self.pool).key_by_hash(key_hash).await
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<ApiKey> {
        let mut transaction = self.pool.begin().await?;
        let row = sqlx::query("UPDATE api_keys SET status = 'revoked', revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING *")
            .bind(now_ms())
            .bind(key_id)
            .fetch_optional(&mut *transaction)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: "key", id: key_id.to_string() })?;
        config_changed(&mut transaction, "key", key_id).await?;
        let revoked = key_from(&row)?;
        transaction.commit().await?;
        Ok(revoked)
    }

    async fn put_prices(&self, prices: Vec<NewPrice>) -> StoreResult<Vec<PriceRow>> {
        let mut transaction = self.pool.begin().await?;
        let now = now_ms();
        let mut rows = Vec::with_capacity(prices.len());
        for new in prices {
            new.price.validate().map_err(|error| StoreError::Invalid(format!("{}:{} ({}): {error}", new.provider, new.model, new.customer_type)))?;
            let row = sqlx::query(
                "INSERT INTO prices (provider, model, customer_type, input_per_mtok, output_per_mtok, cached_input_per_mtok, cache_write_per_mtok, per_request, effective_from)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            )
            .bind(&new.provider)
            .bind(&new.model)
            .bind(&new.customer_type)
            .bind(new.price.input_per_mtok.nanos())
            .bind(new.price.output_per_mtok.nanos())
            .bind(new.price.cached_input_per_mtok.map(Money::nanos))
            .bind(new.price.cache_write_per_mtok.map(Money::nanos))
            .bind(new.price.per_request.nanos())
            .bind(now)
            .fetch_one(&mut *transaction)
            .await?;
            rows.push(price_from(&row)?);
        }
        config_changed(&mut transaction, "prices", "").await?;
        transaction.commit().await?;
        Ok(rows)
    }

    async fn topups(&self, query: TopUpQuery) -> StoreResult<Vec<TopUp>> {
        crate::sql_reads::Reads(&self.pool).topups(query).await
    }

    async fn price_history(&self, query: PriceHistoryQuery) -> StoreResult<Vec<PriceRow>> {
        crate::sql_reads::Reads(&self.pool).price_history(query).await
    }

    async fn current_prices(&self) -> StoreResult<Vec<PriceRow>> {
        sqlx::query("SELECT DISTINCT ON (provider, model, customer_type) * FROM prices ORDER BY provider, model, customer_type, id DESC")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(price_from)
            .collect()
    }

    async fn create_topup(&self, account_id: &str, amount: Money, reference_id: &str) -> StoreResult<TopUp> {
        if !amount.is_positive() {
            return Err(StoreError::Invalid("top-up amount must be positive".into()));
        }
        let mut transaction = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE id = $1").bind(account_id).fetch_optional(&mut *transaction).await?;
        if exists.is_none() {
            return Err(StoreError::NotFound { entity: "account", id: account_id.to_string() });
        }
        let inserted = sqlx::query(
            "INSERT INTO topup_records (id, account_id, amount, reference_id, status, created_at) VALUES ($1, $2, $3, $4, 'pending', $5)
             ON CONFLICT (reference_id) DO NOTHING RETURNING *",
        )
        .bind(format!("topup_{}", uuid::Uuid::now_v7().simple()))
        .bind(account_id)
        .bind(amount.nanos())
        .bind(reference_id)
        .bind(now_ms())
        .fetch_optional(&mut *transaction)
        .await?;
        let topup = match inserted {
            Some(row) => topup_from(&row)?,
            None => {
                let row = sqlx::query("SELECT * FROM topup_records WHERE reference_id = $1").bind(reference_id).fetch_one(&mut *transaction).await?;
                let existing = topup_from(&row)?;
                if existing.account_id != account_id || existing.amount != amount {
                    return Err(StoreError::Conflict(format!("reference_id {reference_id} was used for a different top-up")));
                }
                existing
            }
        };
        transaction.commit().await?;
        Ok(topup)
    }

    async fn confirm_topup(&self, topup_id: &str) -> StoreResult<(TopUp, FundTransaction)> {
        let mut transaction = self.pool.begin().await?;
        // Lock the top-up first, then the balance: two confirmations serialise here.
        let row = sqlx::query("SELECT * FROM topup_records WHERE id = $1 FOR UPDATE")
            .bind(topup_id)
            .fetch_optional(&mut *transaction)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: "top-up", id: topup_id.to_string() })?;
        let topup = topup_from(&row)?;
        if topup.status == TopUpStatus::Confirmed {
            let fund = fund_by_reference(&mut *transaction, FundKind::Deposit, &topup.reference_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("confirmed top-up {topup_id} has no deposit")))?;
            return Ok((topup, fund));
        }
        let position = balance_for_update(&mut transaction, &topup.account_id).await?;
        let fund = NewFund {
            account_id: topup.account_id.clone(),
            kind: FundKind::Deposit,
            amount: topup.amount,
            reference_id: topup.reference_id.clone(),
            reason: Some("top-up".into()),
            operator_id: None,
        };
        let fund = insert_fund(&mut transaction, &fund, position).await?;
        let row = sqlx::query("UPDATE topup_records SET status = 'confirmed', fund_seq = $1, confirmed_at = $2 WHERE id = $3 RETURNING *")
            .bind(fund.seq)
            .bind(now_ms())
            .bind(topup_id)
            .fetch_one(&mut *transaction)
            .await?;
        let confirmed = topup_from(&row)?;
        transaction.commit().await?;
        Ok((confirmed, fund))
    }

    async fn fund_by_reference(&self, kind: FundKind, reference_id: &str) -> StoreResult<Option<FundTransaction>> {
        crate::sql_reads::Reads(&self.pool).fund_by_reference(kind, reference_id).await
    }

    async fn record_fund(&self, fund: NewFund) -> StoreResult<FundOutcome> {
        check_fund_direction(&fund)?;
        let mut transaction = self.pool.begin().await?;
        // The account lock first: the same reference sent twice at once serialises on it, and
        // the second sees the first's row.
        let position = balance_for_update(&mut transaction, &fund.account_id).await?;
        if let Some(existing) = fund_by_reference(&mut *transaction, fund.kind, &fund.reference_id).await? {
            if existing.account_id != fund.account_id || existing.amount != fund.amount {
                return Err(StoreError::Conflict(format!("reference_id {} was used for a different {}", fund.reference_id, fund.kind.as_str())));
            }
            return Ok(FundOutcome { transaction: existing, newly_applied: false });
        }
        let inserted = insert_fund(&mut transaction, &fund, position).await?;
        transaction.commit().await?;
        Ok(FundOutcome { transaction: inserted, newly_applied: true })
    }

    async fn channel_states(&self) -> StoreResult<Vec<crate::model::ChannelState>> {
        crate::sql_reads::Reads(&self.pool).channel_states().await
    }

    async fn set_channel_state(&self, state: crate::model::ChannelState) -> StoreResult<()> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO channel_states (model, channel, enabled, reason, updated_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (model, channel) DO UPDATE SET enabled = excluded.enabled, reason = excluded.reason, updated_at = excluded.updated_at",
        )
        .bind(&state.model)
        .bind(&state.channel)
        .bind(state.enabled)
        .bind(&state.reason)
        .bind(state.updated_at_ms)
        .execute(&mut *transaction)
        .await?;
        config_changed(&mut transaction, "channel", &format!("{}/{}", state.model, state.channel)).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn added_channels(&self) -> StoreResult<Vec<crate::model::AddedChannel>> {
        crate::sql_reads::Reads(&self.pool).added_channels().await
    }

    async fn add_channel(&self, channel: crate::model::AddedChannel) -> StoreResult<()> {
        let mut transaction = self.pool.begin().await?;
        let inserted = crate::operations::add_channel_query(pg(crate::operations::ADD_CHANNEL), &channel).execute(&mut *transaction).await?.rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("model {} already has a channel {}", channel.model, channel.channel)));
        }
        config_changed(&mut transaction, "channel", &format!("{}/{}", channel.model, channel.channel)).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn remove_channel(&self, model: &str, channel: &str) -> StoreResult<bool> {
        let mut transaction = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM added_channels WHERE model = $1 AND channel = $2").bind(model).bind(channel).execute(&mut *transaction).await?.rows_affected();
        if removed == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM channel_states WHERE model = $1 AND channel = $2").bind(model).bind(channel).execute(&mut *transaction).await?;
        config_changed(&mut transaction, "channel", &format!("{model}/{channel}")).await?;
        transaction.commit().await?;
        Ok(true)
    }

    async fn upstream_attempts(&self, account_id: &str, request_id: &str) -> StoreResult<Vec<crate::model::RecordedAttempt>> {
        crate::sql_reads::Reads(&self.pool).upstream_attempts(account_id, request_id).await
    }

    async fn fund_transactions_after(&self, account_id: &str, after_ledger_seq: i64) -> StoreResult<Vec<FundTransaction>> {
        crate::sql_reads::Reads(&self.pool).fund_transactions_after(account_id, after_ledger_seq).await
    }

    async fn record_usage_batch(&self, events: &[UsageEvent]) -> StoreResult<Vec<RecordOutcome>> {
        match self.record_usage_checked(events, DuplicateCheck::Optimistic).await {
            Err(StoreError::Conflict(message)) => {
                tracing::info!(message, events = events.len(), "a usage batch holds a charge the ledger has; writing it again, skipping those");
                self.record_usage_checked(events, DuplicateCheck::Read).await
            }
            other => other,
        }
    }

    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<ChargedRequest>> {
        sqlx::query(CHARGED_REQUEST)
            .bind(account_id)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(charged_request_from)
            .transpose()
    }

    async fn request_charged(&self, account_id: &str, request_id: &str) -> StoreResult<bool> {
        let charged = sqlx::query(CHARGED_ONE).bind(account_id).bind(request_id).fetch_optional(&self.pool).await?;
        Ok(charged.is_some())
    }

    async fn charged_request_ids_since(&self, account_id: &str, since: OffsetDateTime) -> StoreResult<Vec<String>> {
        crate::sql_reads::Reads(&self.pool).charged_request_ids_since(account_id, since).await
    }

    async fn counter_seed(&self, account_id: &str, at_ms: i64) -> StoreResult<CounterSeed> {
        let (day, month) = period_labels(at_ms).ok_or_else(|| StoreError::Invalid(format!("impossible time {at_ms}")))?;
        let rows = sqlx::query_as(pg(SPEND_COUNTERS_OF_ACCOUNT)).bind(&day).bind(&month).bind(account_id).bind(account_id).fetch_all(&self.pool).await?;
        Ok(counter_seed(at_ms, &day, &month, rows))
    }

    async fn usage_rows(&self, query: UsageQuery) -> StoreResult<Vec<UsageRow>> {
        crate::sql_reads::Reads(&self.pool).usage_rows(query).await
    }

    async fn statement(&self, account_id: &str, start: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> StoreResult<Vec<LedgerEntry>> {
        // One snapshot for the three reads, or an archive committing between them would show a
        // month's rows twice (live and as runs) or not at all. A snapshot alone is not enough: a
        // dropped partition is gone even from snapshots taken before the drop. So usage_log is
        // locked before the snapshot is taken (the first SELECT takes it): an archive's drop,
        // which locks usage_log whole, either waits for these reads or is committed before them.
        let mut snapshot = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *snapshot).await?;
        sqlx::query("LOCK TABLE ONLY usage_log IN ACCESS SHARE MODE").execute(&mut *snapshot).await?;
        let [mut funds, mut usage, mut runs] = statement_queries::<Postgres>(account_id, start, end);
        let funds = funds.build().fetch_all(&mut *snapshot).await?;
        let usage = usage.build().fetch_all(&mut *snapshot).await?;
        let runs = runs.build().fetch_all(&mut *snapshot).await?;
        snapshot.commit().await?;
        merge_statement(&funds, &usage, &runs)
    }

    async fn summary(&self, query: SummaryQuery) -> StoreResult<Vec<SummaryRow>> {
        crate::sql_reads::Reads(&self.pool).summary(query).await
    }

    async fn rebuilt_balance(&self, account_id: &str) -> StoreResult<Money> {
        // NUMERIC sums cannot overflow; the result must still fit the balance type.
        let rebuilt: Option<String> = sqlx::query_scalar(
            "SELECT ((SELECT COALESCE(SUM(amount::NUMERIC), 0) FROM fund_transactions WHERE account_id = $1)
                   - (SELECT COALESCE(SUM(cost::NUMERIC), 0) FROM ledger_costs WHERE account_id = $1))::TEXT",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        let text = rebuilt.unwrap_or_else(|| "0".into());
        text.parse::<i64>().map(Money::from_nanos).map_err(|_| StoreError::Overflow("rebuilt balance"))
    }
}
