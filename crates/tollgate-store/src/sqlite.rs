//! The embedded ledger on SQLite. Every write is one `BEGIN IMMEDIATE` transaction (SQLite's
//! single writer is the per-account sequencer of the audit chain); money is INTEGER nano-units,
//! times INTEGER Unix milliseconds; every query binds its parameters.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use time::OffsetDateTime;
use tollgate_core::Money;

use crate::alerts::{SPEND_COUNTERS_OF_ACCOUNT, counter_seed, period_labels, spend_deltas, usage_batch_alerts};
use crate::error::{StoreError, StoreResult};
use crate::hot::CounterSeed;
use crate::ledger::Ledger;
use crate::operations::{CHARGED_REQUEST, key_budgets_from, threshold_from};
use crate::model::{
    Account, AccountBalance, AccountPatch, ApiKey, FundKind, FundOutcome, FundTransaction, LedgerEntry, NewAccount,
    ChargedRequest, NewApiKey, NewFund, NewPrice, PriceRow, RecordOutcome, SummaryQuery, SummaryRow, AccountQuery, PriceHistoryQuery, TopUpQuery, TopUp,
    RequestStatus, SessionLockMode, TopUpStatus, UsageEvent, UsageQuery, UsageRow,
};
use crate::sqlite_ops::json_list;
use crate::sql_rows::{
    Fields, UsagePlan, account_from, allowed_models_text, apply_patch, check_fund_direction, check_hot_store_range, checked_add, fund_from,
    key_from, kind_text, merge_statement, statement_queries, money, ms_of, now_ms, optional_i64, plan_usage_batch, price_from, status_text, charged_request_from, to_i64, topup_from, };

/// How long a connection waits for SQLite's write lock before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// How long a caller waits for a pooled connection.
const ACQUIRE_TIMEOUT_MS: u64 = 10_000;

/// The SQLite ledger: readers share a pool; every write transaction goes through one connection
/// of its own. SQLite lets one writer in at a time anyway, and a connection that alone writes
/// keeps its page cache: one that sees another connection's commit drops its whole cache and
/// reads the pages back from the file.
#[derive(Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
    writer: SqlitePool,
    /// Usage rows an archive deletes per write transaction (`crate::archive`).
    pub(crate) archive_chunk_rows: u64,
}

fn options(url: &str) -> StoreResult<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|error| StoreError::Invalid(format!("bad SQLite URL {url:?}: {error}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a committed charge survives a power cut, not only a process crash.
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        // Pruning frees pages; `Retention::compact` hands them back to the file system. Takes
        // effect on a new file; an older one is converted once when opened (see `connect`).
        .auto_vacuum(SqliteAutoVacuum::Incremental)
        .busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)))
}

/// Applies the migrations to the database at `url` (creating it if missing).
///
/// # Errors
/// The database cannot be opened or a migration fails.
pub async fn migrate(url: &str) -> StoreResult<()> {
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options(url)?).await?;
    sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// A file made before pruning existed is not in incremental auto-vacuum mode: setting the mode
/// takes a `VACUUM` (a rewrite of the whole file, once; it needs the file's size again in free
/// disk while it runs).
async fn incremental_vacuum_on(pool: &SqlitePool) -> StoreResult<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum").fetch_one(pool).await?;
    if mode != INCREMENTAL {
        tracing::warn!("converting the SQLite ledger to incremental auto-vacuum, once: VACUUM rewrites the whole file");
        let mut connection = pool.acquire().await?;
        sqlx::query("PRAGMA auto_vacuum = INCREMENTAL").execute(&mut *connection).await?;
        sqlx::query("VACUUM").execute(&mut *connection).await?;
    }
    Ok(())
}

impl SqliteLedger {
    /// Opens (creating if needed) and migrates the database.
    ///
    /// # Errors
    /// The database cannot be opened or migrated.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<SqliteLedger> {
        // One parse for both pools: each parse of `sqlite::memory:` names a new database.
        let options = options(url)?;
        // No ping before each use (sqlx's default): a file has no far end to hang up, and the
        // ping was one more round trip to the connection's worker thread per transaction.
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        incremental_vacuum_on(&pool).await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(SqliteLedger { pool, writer, archive_chunk_rows: 20_000 })
    }

    /// The ledger with another number of rows an archive deletes per write transaction (each
    /// holds the write lock: embedded mode's settles wait for it).
    #[must_use]
    pub fn with_archive_chunk_rows(self, rows: u64) -> SqliteLedger {
        SqliteLedger { archive_chunk_rows: rows.max(1), ..self }
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(crate) async fn write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// An account's running (balance, ledger_seq) inside a write transaction.
pub(crate) async fn balance_for_update(transaction: &mut Transaction<'static, Sqlite>, account_id: &str) -> StoreResult<(Money, i64)> {
    let row = sqlx::query("SELECT balance, ledger_seq FROM account_balance WHERE account_id = ?")
        .bind(account_id)
        .fetch_optional(&mut **transaction)
        .await?
        .ok_or_else(|| StoreError::NotFound { entity: "account", id: account_id.to_string() })?;
    Ok((money(&row, "balance")?, row.int("ledger_seq")?))
}

/// Inserts a fund transaction at the account's next ledger position and moves its balance.
pub(crate) async fn insert_fund(transaction: &mut Transaction<'static, Sqlite>, fund: &NewFund) -> StoreResult<FundTransaction> {
    let (balance_before, ledger_seq) = balance_for_update(transaction, &fund.account_id).await?;
    let balance_after = checked_add(balance_before, fund.amount)?;
    check_hot_store_range(fund, balance_after)?;
    if fund.kind == FundKind::Refund && balance_after.is_negative() {
        return Err(StoreError::Invalid(format!("refund exceeds balance {balance_before}")));
    }
    let ledger_seq = ledger_seq + 1;
    let now = now_ms();
    let row = sqlx::query(
        "INSERT INTO fund_transactions (account_id, kind, amount, balance_before, balance_after, ledger_seq, reference_id, reason, operator_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
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
    sqlx::query("UPDATE account_balance SET balance = ?, ledger_seq = ?, last_fund_seq = ?, updated_at = ? WHERE account_id = ?")
        .bind(balance_after.nanos())
        .bind(ledger_seq)
        .bind(ledger_seq)
        .bind(now)
        .bind(&fund.account_id)
        .execute(&mut **transaction)
        .await?;
    let inserted = fund_from(&row)?;
    crate::sqlite_ops::after_fund(transaction, &inserted).await?;
    Ok(inserted)
}

/// A fund transaction by its reference, in a transaction or straight from the pool.
async fn fund_by_reference<'e>(executor: impl sqlx::Executor<'e, Database = Sqlite>, kind: FundKind, reference_id: &str) -> StoreResult<Option<FundTransaction>> {
    sqlx::query("SELECT * FROM fund_transactions WHERE kind = ? AND reference_id = ?")
        .bind(kind.as_str())
        .bind(reference_id)
        .fetch_optional(executor)
        .await?
        .as_ref()
        .map(fund_from)
        .transpose()
}

/// Inserts one usage event at the account's running position; returns the new position or
/// `None` for a duplicate charged request id.
/// What a usage batch starts from, read in one statement (each is a round trip to SQLite's
/// worker thread): each account's (balance, ledger_seq), and which of the batch's (account,
/// request id) pairs are charged already.
struct BatchStart<'a> {
    positions: HashMap<&'a str, (Money, i64)>,
    charged: HashSet<(String, String)>,
}

async fn batch_start<'a>(transaction: &mut Transaction<'static, Sqlite>, events: &'a [UsageEvent]) -> StoreResult<BatchStart<'a>> {
    let mut account_ids: Vec<&str> = events.iter().map(|event| event.account_id.as_str()).collect();
    account_ids.sort_unstable();
    account_ids.dedup();
    let pairs: Vec<serde_json::Value> = events
        .iter()
        .filter(|event| event.status != RequestStatus::Failed)
        .map(|event| serde_json::json!([event.account_id, event.request_id]))
        .collect();
    let pairs = serde_json::Value::Array(pairs).to_string();
    // A position row has no request id; a charged row has one.
    let rows = sqlx::query(
        "SELECT account_id, balance, ledger_seq, NULL AS request_id FROM account_balance
             WHERE account_id IN (SELECT value FROM json_each(?))
         UNION ALL
         SELECT account_id, NULL, NULL, request_id FROM usage_log WHERE status <> 'failed'
             AND (account_id, request_id) IN (SELECT value ->> 0, value ->> 1 FROM jsonb_each(?))
         UNION ALL
         SELECT account_id, NULL, NULL, request_id FROM archived_charges
             WHERE (account_id, request_id) IN (SELECT value ->> 0, value ->> 1 FROM jsonb_each(?))",
    )
    .bind(json_list(&account_ids))
    .bind(&pairs)
    .bind(&pairs)
    .fetch_all(&mut **transaction)
    .await?;
    let mut start = BatchStart { positions: HashMap::with_capacity(account_ids.len()), charged: HashSet::new() };
    for row in rows {
        let account_id = row.text("account_id")?;
        if let Some(request_id) = row.optional_text("request_id")? {
            start.charged.insert((account_id, request_id));
        } else if let Some(key) = account_ids.iter().find(|id| **id == account_id) {
            start.positions.insert(*key, (money(&row, "balance")?, row.int("ledger_seq")?));
        }
    }
    if let Some(unknown) = account_ids.iter().find(|id| !start.positions.contains_key(**id)) {
        return Err(StoreError::Invalid(format!("usage event names unknown account {unknown}")));
    }
    Ok(start)
}

/// The usage_log row of an event at the account's running position, which it advances, and its
/// upstream_attempts rows.
fn usage_row(event: &UsageEvent, position: &mut (Money, i64)) -> StoreResult<(serde_json::Value, Vec<serde_json::Value>)> {
    let (balance_before, ledger_seq) = *position;
    let balance_after = balance_before.checked_sub(event.cost).ok_or(StoreError::Overflow("balance"))?;
    *position = (balance_after, ledger_seq + 1);
    let attempts = crate::sql_rows::attempt_rows(event, ledger_seq + 1)?
        .into_iter()
        .map(|row| {
            let [input, cached_input, cache_write, output, reasoning] = match row.usage {
                Some(usage) => usage.map(Some),
                None => [None; 5],
            };
            serde_json::json!([
                row.account_id, row.ledger_seq, row.attempt, row.request_id, row.channel, row.provider, row.upstream_model,
                row.status_code, i64::from(row.served), row.error, row.latency_ms, row.first_byte_ms,
                input, cached_input, cache_write, output, reasoning, row.created_at,
            ])
        })
        .collect();
    let row = serde_json::json!([
        event.request_id,
        event.account_id,
        event.api_key_id,
        event.provider,
        event.model,
        event.customer_type,
        event.price_id,
        to_i64(event.usage.input_tokens, "input_tokens")?,
        to_i64(event.usage.cached_input_tokens, "cached_input_tokens")?,
        to_i64(event.usage.cache_write_tokens, "cache_write_tokens")?,
        to_i64(event.usage.output_tokens, "output_tokens")?,
        to_i64(event.usage.reasoning_tokens, "reasoning_tokens")?,
        event.usage_source.as_str(),
        event.cost.nanos(),
        balance_before.nanos(),
        balance_after.nanos(),
        ledger_seq + 1,
        event.status.as_str(),
        to_i64(event.latency_ms, "latency_ms")?,
        event.created_at_ms,
        event.request_fingerprint,
    ]);
    Ok((row, attempts))
}

/// A usage batch's writes, and what its alerts read back, as one list of statements: the usage
/// rows (in batch order, so ids follow ledger positions); the stored responses of the charged
/// ones, each keyed by its usage row's id (migration 0004), found by (account, request id) —
/// `CROSS JOIN` keeps the batch the outer loop, where the planner of a small table would scan
/// `usage_log` once per body; the spend counters, returning their new totals; the budgets of the
/// batch's keys and the low-balance thresholds of its accounts; the balances moved.
///
/// SQLite's worker thread runs the list in one round trip (each is two switches between threads,
/// and embedded mode's settles wait for this commit). sqlx hands the bound values to the
/// statements in order: plain `?` only, since sqlx takes the unused numbers below a `?NNN` for
/// parameters and shifts every later statement's values. Duplicates were filtered out inside the same `BEGIN IMMEDIATE`
/// transaction, so every usage row must insert: no `ON CONFLICT`, and the unique index still
/// refuses a second charge, failing the batch. Bodies travel as hex: JSON carries text. Each row
/// travels as a JSON array read with `jsonb_each`, whose values are SQLite's binary JSON: the
/// `->>` of each column reads it in place (`json_each` would print each row back to text for
/// every `->>` to parse again, a sixth of the writer's time).
const WRITE_USAGE_BATCH: &str = "
INSERT INTO usage_log (request_id, account_id, api_key_id, provider, model, customer_type, price_id,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    usage_source, cost, balance_before, balance_after, ledger_seq, status, latency_ms, created_at, request_fingerprint)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
    value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11,
    value ->> 12, value ->> 13, value ->> 14, value ->> 15, value ->> 16, value ->> 17, value ->> 18, value ->> 19,
    value ->> 20
FROM jsonb_each(?) ORDER BY key;
INSERT INTO stored_responses (usage_id, status, content_type, body, created_at)
SELECT usage_log.id, stored.value ->> 2, stored.value ->> 3, unhex(stored.value ->> 4), stored.value ->> 5
FROM jsonb_each(?) AS stored
CROSS JOIN usage_log ON usage_log.account_id = stored.value ->> 0 AND usage_log.request_id = stored.value ->> 1
    AND usage_log.status <> 'failed';
INSERT INTO upstream_attempts (usage_id, attempt, account_id, request_id, channel, provider, upstream_model, status_code,
    served, error, latency_ms, first_byte_ms, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, created_at)
SELECT usage_log.id, a.value ->> 2, a.value ->> 0, a.value ->> 3, a.value ->> 4, a.value ->> 5, a.value ->> 6, a.value ->> 7,
    a.value ->> 8, a.value ->> 9, a.value ->> 10, a.value ->> 11, a.value ->> 12, a.value ->> 13, a.value ->> 14, a.value ->> 15,
    a.value ->> 16, a.value ->> 17
FROM jsonb_each(?) AS a
CROSS JOIN usage_log ON usage_log.account_id = a.value ->> 0 AND usage_log.ledger_seq = a.value ->> 1;
INSERT INTO spend_counters (scope, owner_id, period, requests, spent, updated_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, ? FROM jsonb_each(?) WHERE true
ON CONFLICT (scope, owner_id, period) DO UPDATE SET requests = spend_counters.requests + excluded.requests,
    spent = spend_counters.spent + excluded.spent, updated_at = excluded.updated_at
RETURNING 'counter' AS row_kind, scope, owner_id, period, spent;
SELECT 'budget' AS row_kind, id, account_id, budget_daily, budget_monthly, budget_total FROM api_keys
WHERE id IN (SELECT value FROM json_each(?)) AND (budget_daily IS NOT NULL OR budget_monthly IS NOT NULL OR budget_total IS NOT NULL);
SELECT 'threshold' AS row_kind, id, low_balance_threshold FROM accounts
WHERE id IN (SELECT value FROM json_each(?)) AND low_balance_threshold IS NOT NULL;
UPDATE account_balance SET balance = batch.value ->> 1, ledger_seq = batch.value ->> 2, updated_at = ?
FROM jsonb_each(?) AS batch WHERE account_balance.account_id = batch.value ->> 0";

/// Writes a planned usage batch ([`WRITE_USAGE_BATCH`]) and queues the alerts it raises.
async fn write_usage_batch(
    transaction: &mut Transaction<'static, Sqlite>,
    rows: Vec<(serde_json::Value, Vec<serde_json::Value>)>,
    inserted: &[&UsageEvent],
    starts: &HashMap<&str, (Money, i64)>,
    ends: &HashMap<&str, (Money, i64)>,
) -> StoreResult<()> {
    let stored: Vec<serde_json::Value> = inserted
        .iter()
        .filter_map(|event| {
            let stored = event.stored_response.as_ref()?;
            Some(serde_json::json!([event.account_id, event.request_id, stored.status, stored.content_type, hex(&stored.body), event.created_at_ms]))
        })
        .collect();
    let deltas = spend_deltas(inserted)?;
    let counter_rows: Vec<serde_json::Value> =
        deltas.iter().map(|((scope, owner, period), (requests, spent))| serde_json::json!([scope, owner, period, requests, spent])).collect();
    let key_ids: Vec<&str> = deltas.keys().filter(|(scope, _, _)| *scope == "key").map(|(_, owner, _)| owner.as_str()).collect();
    let account_ids: Vec<&str> = ends.keys().copied().collect();
    let balances: Vec<serde_json::Value> =
        ends.iter().map(|(account_id, (balance, ledger_seq))| serde_json::json!([account_id, balance.nanos(), ledger_seq])).collect();
    let now = now_ms();
    let (rows, attempts): (Vec<serde_json::Value>, Vec<Vec<serde_json::Value>>) = rows.into_iter().unzip();
    let attempts: Vec<serde_json::Value> = attempts.into_iter().flatten().collect();
    let read_back = sqlx::query(WRITE_USAGE_BATCH)
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(serde_json::Value::Array(stored).to_string())
        .bind(serde_json::Value::Array(attempts).to_string())
        .bind(now)
        .bind(serde_json::Value::Array(counter_rows).to_string())
        .bind(json_list(&key_ids))
        .bind(json_list(&account_ids))
        .bind(now)
        .bind(serde_json::Value::Array(balances).to_string())
        .fetch_all(&mut **transaction)
        .await?;
    let (mut counters, mut budgets, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
    for row in &read_back {
        match row.text("row_kind")?.as_str() {
            "counter" => counters.push((row.text("scope")?, row.text("owner_id")?, row.text("period")?, row.int("spent")?)),
            "budget" => budgets.push(key_budgets_from(row)?),
            "threshold" => thresholds.push(threshold_from(row)?),
            other => return Err(StoreError::Corrupt(format!("a usage batch read back an unexpected row kind {other:?}"))),
        }
    }
    let events = usage_batch_alerts(&deltas, &counters, &budgets, &thresholds, starts, ends)?;
    crate::sqlite_ops::queue_events(transaction, &events).await
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn ping(&self) -> StoreResult<()> {
        crate::sql_reads::Reads(&self.pool).ping().await
    }

    async fn create_account(&self, account: NewAccount) -> StoreResult<Account> {
        let mut transaction = self.write().await?;
        let now = now_ms();
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE id = ?").bind(&account.id).fetch_optional(&mut *transaction).await?;
        if exists.is_some() {
            return Err(StoreError::Conflict(format!("account {} already exists", account.id)));
        }
        let row = sqlx::query(
            "INSERT INTO accounts (id, kind, name, customer_type, status, credit_limit, daily_request_quota, monthly_request_quota, low_balance_threshold, created_at, updated_at)
             VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(&account.id)
        .bind(kind_text(account.kind))
        .bind(&account.name)
        .bind(&account.customer_type)
        .bind(account.credit_limit.nanos())
        .bind(optional_i64(account.daily_request_quota, "daily_request_quota")?)
        .bind(optional_i64(account.monthly_request_quota, "monthly_request_quota")?)
        .bind(account.low_balance_threshold.map(Money::nanos))
        .bind(now)
        .bind(now)
        .fetch_one(&mut *transaction)
        .await?;
        sqlx::query("INSERT INTO account_balance (account_id, balance, last_fund_seq, ledger_seq, updated_at) VALUES (?, 0, 0, 0, ?)")
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
        let mut transaction = self.write().await?;
        let row = sqlx::query("SELECT * FROM accounts WHERE id = ?")
            .bind(account_id)
            .fetch_optional(&mut *transaction)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: "account", id: account_id.to_string() })?;
        let mut account = account_from(&row)?;
        apply_patch(&mut account, patch);
        let row = sqlx::query(
            "UPDATE accounts SET name = ?, customer_type = ?, status = ?, credit_limit = ?, daily_request_quota = ?, monthly_request_quota = ?, low_balance_threshold = ?,
             updated_at = ? WHERE id = ? RETURNING *",
        )
        .bind(&account.name)
        .bind(&account.customer_type)
        .bind(status_text(account.status))
        .bind(account.credit_limit.nanos())
        .bind(optional_i64(account.daily_request_quota, "daily_request_quota")?)
        .bind(optional_i64(account.monthly_request_quota, "monthly_request_quota")?)
        .bind(account.low_balance_threshold.map(Money::nanos))
        .bind(now_ms())
        .bind(account_id)
        .fetch_one(&mut *transaction)
        .await?;
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
        if self.account(&key.account_id).await?.is_none() {
            return Err(StoreError::NotFound { entity: "account", id: key.account_id });
        }
        let allowed_models = allowed_models_text(key.allowed_models.as_ref())?;
        let row = sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, status, budget_daily, budget_monthly, budget_total, rpm, tpm, allowed_models, session_lock, expires_at, created_at)
             VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
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
        .bind(allowed_models)
        .bind(key.session_lock.map(SessionLockMode::as_str))
        .bind(key.expires_at.map(ms_of))
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        key_from(&row)
    }

    async fn keys_for_account(&self, account_id: &str) -> StoreResult<Vec<ApiKey>> {
        sqlx::query("SELECT * FROM api_keys WHERE account_id = ? ORDER BY created_at, id")
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key_from)
            .collect()
    }

    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>> {
        crate::sql_reads::Reads(&self.pool).key_by_hash(key_hash).await
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<ApiKey> {
        let row = sqlx::query("UPDATE api_keys SET status = 'revoked', revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING *")
            .bind(now_ms())
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: "key", id: key_id.to_string() })?;
        key_from(&row)
    }

    async fn put_prices(&self, prices: Vec<NewPrice>) -> StoreResult<Vec<PriceRow>> {
        let mut transaction = self.write().await?;
        let now = now_ms();
        let mut rows = Vec::with_capacity(prices.len());
        for new in prices {
            new.price.validate().map_err(|error| StoreError::Invalid(format!("{}:{} ({}): {error}", new.provider, new.model, new.customer_type)))?;
            let row = sqlx::query(
                "INSERT INTO prices (provider, model, customer_type, input_per_mtok, output_per_mtok, cached_input_per_mtok, cache_write_per_mtok, per_request, effective_from)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
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
        sqlx::query(
            "SELECT * FROM prices WHERE id IN (SELECT MAX(id) FROM prices GROUP BY provider, model, customer_type)
             ORDER BY provider, model, customer_type",
        )
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
        let mut transaction = self.write().await?;
        if let Some(row) = sqlx::query("SELECT * FROM topup_records WHERE reference_id = ?").bind(reference_id).fetch_optional(&mut *transaction).await? {
            let existing = topup_from(&row)?;
            if existing.account_id != account_id || existing.amount != amount {
                return Err(StoreError::Conflict(format!("reference_id {reference_id} was used for a different top-up")));
            }
            return Ok(existing);
        }
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE id = ?").bind(account_id).fetch_optional(&mut *transaction).await?;
        if exists.is_none() {
            return Err(StoreError::NotFound { entity: "account", id: account_id.to_string() });
        }
        let row = sqlx::query(
            "INSERT INTO topup_records (id, account_id, amount, reference_id, status, created_at) VALUES (?, ?, ?, ?, 'pending', ?) RETURNING *",
        )
        .bind(format!("topup_{}", uuid::Uuid::now_v7().simple()))
        .bind(account_id)
        .bind(amount.nanos())
        .bind(reference_id)
        .bind(now_ms())
        .fetch_one(&mut *transaction)
        .await?;
        let topup = topup_from(&row)?;
        transaction.commit().await?;
        Ok(topup)
    }

    async fn confirm_topup(&self, topup_id: &str) -> StoreResult<(TopUp, FundTransaction)> {
        let mut transaction = self.write().await?;
        let row = sqlx::query("SELECT * FROM topup_records WHERE id = ?")
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
        let fund = insert_fund(
            &mut transaction,
            &NewFund {
                account_id: topup.account_id.clone(),
                kind: FundKind::Deposit,
                amount: topup.amount,
                reference_id: topup.reference_id.clone(),
                reason: Some("top-up".into()),
                operator_id: None,
            },
        )
        .await?;
        let row = sqlx::query("UPDATE topup_records SET status = 'confirmed', fund_seq = ?, confirmed_at = ? WHERE id = ? RETURNING *")
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
        let mut transaction = self.write().await?;
        if let Some(existing) = fund_by_reference(&mut *transaction, fund.kind, &fund.reference_id).await? {
            if existing.account_id != fund.account_id || existing.amount != fund.amount {
                return Err(StoreError::Conflict(format!("reference_id {} was used for a different {}", fund.reference_id, fund.kind.as_str())));
            }
            return Ok(FundOutcome { transaction: existing, newly_applied: false });
        }
        let inserted = insert_fund(&mut transaction, &fund).await?;
        transaction.commit().await?;
        Ok(FundOutcome { transaction: inserted, newly_applied: true })
    }

    async fn channel_states(&self) -> StoreResult<Vec<crate::model::ChannelState>> {
        crate::sql_reads::Reads(&self.pool).channel_states().await
    }

    async fn set_channel_state(&self, state: crate::model::ChannelState) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO channel_states (model, channel, enabled, reason, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (model, channel) DO UPDATE SET enabled = excluded.enabled, reason = excluded.reason, updated_at = excluded.updated_at",
        )
        .bind(&state.model)
        .bind(&state.channel)
        .bind(i64::from(state.enabled))
        .bind(&state.reason)
        .bind(state.updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn added_channels(&self) -> StoreResult<Vec<crate::model::AddedChannel>> {
        crate::sql_reads::Reads(&self.pool).added_channels().await
    }

    async fn add_channel(&self, channel: crate::model::AddedChannel) -> StoreResult<()> {
        let inserted = crate::operations::add_channel_query(crate::operations::ADD_CHANNEL, &channel)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("model {} already has a channel {}", channel.model, channel.channel)));
        }
        Ok(())
    }

    async fn remove_channel(&self, model: &str, channel: &str) -> StoreResult<bool> {
        let mut transaction = self.write().await?;
        let removed = sqlx::query("DELETE FROM added_channels WHERE model = ? AND channel = ?").bind(model).bind(channel).execute(&mut *transaction).await?.rows_affected();
        sqlx::query("DELETE FROM channel_states WHERE model = ? AND channel = ?").bind(model).bind(channel).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(removed > 0)
    }

    async fn upstream_attempts(&self, account_id: &str, request_id: &str) -> StoreResult<Vec<crate::model::RecordedAttempt>> {
        crate::sql_reads::Reads(&self.pool).upstream_attempts(account_id, request_id).await
    }

    async fn fund_transactions_after(&self, account_id: &str, after_ledger_seq: i64) -> StoreResult<Vec<FundTransaction>> {
        crate::sql_reads::Reads(&self.pool).fund_transactions_after(account_id, after_ledger_seq).await
    }

    /// A batch in four round trips to SQLite's worker thread whatever its size (begin, read the
    /// start, write, commit; a fifth when it raises alerts): embedded mode's settles wait for
    /// this commit.
    async fn record_usage_batch(&self, events: &[UsageEvent]) -> StoreResult<Vec<RecordOutcome>> {
        let mut transaction = self.write().await?;
        // BEGIN IMMEDIATE holds SQLite's one write lock: what is charged now is all there is to skip.
        let BatchStart { mut positions, charged } = batch_start(&mut transaction, events).await?;
        let starts = positions.clone();
        let UsagePlan { rows, inserted, outcomes } = plan_usage_batch(events, &mut positions, charged, usage_row)?;
        write_usage_batch(&mut transaction, rows, &inserted, &starts, &positions).await?;
        transaction.commit().await?;
        Ok(outcomes)
    }

    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<ChargedRequest>> {
        let row = sqlx::query(CHARGED_REQUEST)
            .bind(account_id)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(charged_request_from).transpose()
    }

    async fn request_charged(&self, account_id: &str, request_id: &str) -> StoreResult<bool> {
        let charged = sqlx::query(crate::operations::CHARGED_ONE).bind(account_id).bind(request_id).fetch_optional(&self.pool).await?;
        Ok(charged.is_some())
    }

    async fn charged_request_ids_since(&self, account_id: &str, since: OffsetDateTime) -> StoreResult<Vec<String>> {
        crate::sql_reads::Reads(&self.pool).charged_request_ids_since(account_id, since).await
    }

    async fn counter_seed(&self, account_id: &str, at_ms: i64) -> StoreResult<CounterSeed> {
        let (day, month) = period_labels(at_ms).ok_or_else(|| StoreError::Invalid(format!("impossible time {at_ms}")))?;
        let rows = sqlx::query_as(SPEND_COUNTERS_OF_ACCOUNT).bind(&day).bind(&month).bind(account_id).bind(account_id).fetch_all(&self.pool).await?;
        Ok(counter_seed(at_ms, &day, &month, rows))
    }

    async fn usage_rows(&self, query: UsageQuery) -> StoreResult<Vec<UsageRow>> {
        crate::sql_reads::Reads(&self.pool).usage_rows(query).await
    }

    async fn statement(&self, account_id: &str, start: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> StoreResult<Vec<LedgerEntry>> {
        // One read transaction, one snapshot (WAL) for the three reads: an archive committing
        // between them would otherwise show a month's rows twice (live and as runs) or not at all.
        let mut snapshot = self.pool.begin().await?;
        let [mut funds, mut usage, mut runs] = statement_queries::<Sqlite>(account_id, start, end);
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
        // Summed in Rust with checked arithmetic, as PostgreSQL's NUMERIC sum is exact: SQLite's
        // SUM fails on integer overflow ("integer overflow") but reports nothing finer.
        let mut balance = Money::ZERO;
        let amounts: Vec<i64> = sqlx::query_scalar("SELECT amount FROM fund_transactions WHERE account_id = ?").bind(account_id).fetch_all(&self.pool).await?;
        for amount in amounts {
            balance = checked_add(balance, Money::from_nanos(amount))?;
        }
        let costs: Vec<i64> = sqlx::query_scalar("SELECT cost FROM ledger_costs WHERE account_id = ?").bind(account_id).fetch_all(&self.pool).await?;
        for cost in costs {
            balance = balance.checked_sub(Money::from_nanos(cost)).ok_or(StoreError::Overflow("balance"))?;
        }
        Ok(balance)
    }
}
