//! The ledger reads both databases answer with the same SQL, written once over `sqlx::Database`:
//! each backend's `Ledger` method hands over its pool. Statements are written with `?`;
//! [`Dialect::sql`] gives PostgreSQL its numbered placeholders.

use sqlx::postgres::Postgres;
use sqlx::sqlite::Sqlite;
use time::OffsetDateTime;

use crate::error::{StoreError, StoreResult};
use crate::model::{
    Account, AccountBalance, AccountQuery, ApiKey, FundKind, FundTransaction, PriceHistoryQuery, PriceRow, SummaryGroup, SummaryQuery, SummaryRow, TopUp, TopUpQuery, UsageQuery, UsageRow,
};
use crate::operations::{
    DUE_OUTBOX, DeliveryAttempt, JobRun, OutboxEvent, RECONCILIATIONS, ReconciliationRun, delivery_from, job_run_from, outbox_from, reconciliation_from,
};
use crate::sql_rows::{Fields, account_from, day_of, fund_from, key_from, money, ms_of, price_from, push_time_range, push_usage_query, to_u64, topup_from, usage_from};

/// What differs in a statement the two databases share.
pub(crate) trait Dialect: sqlx::Database {
    /// The statement with this database's placeholders.
    fn sql(text: &'static str) -> sqlx::AssertSqlSafe<String>;
}

impl Dialect for Postgres {
    fn sql(text: &'static str) -> sqlx::AssertSqlSafe<String> {
        crate::operations::pg(text)
    }
}

impl Dialect for Sqlite {
    fn sql(text: &'static str) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(text.to_string())
    }
}

/// The shared reads, on one database's pool.
pub(crate) struct Reads<'p, DB: sqlx::Database>(pub &'p sqlx::Pool<DB>);

impl<DB> Reads<'_, DB>
where
    DB: Dialect,
    DB::Row: Fields,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    pub(crate) async fn ping(&self) -> StoreResult<()> {
        sqlx::query(DB::sql("SELECT 1")).execute(self.0).await?;
        Ok(())
    }

    pub(crate) async fn account(&self, account_id: &str) -> StoreResult<Option<Account>> {
        sqlx::query(DB::sql("SELECT * FROM accounts WHERE id = ?")).bind(account_id).fetch_optional(self.0).await?.as_ref().map(account_from).transpose()
    }

    pub(crate) async fn account_balance(&self, account_id: &str) -> StoreResult<Option<AccountBalance>> {
        let row = sqlx::query(DB::sql("SELECT * FROM account_balance WHERE account_id = ?")).bind(account_id).fetch_optional(self.0).await?;
        row.map(|row| {
            Ok(AccountBalance {
                account_id: row.text("account_id")?,
                balance: money(&row, "balance")?,
                last_fund_seq: row.int("last_fund_seq")?,
                ledger_seq: row.int("ledger_seq")?,
            })
        })
        .transpose()
    }

    /// One text column of every row.
    async fn texts(&self, sql: &'static str, column: &str) -> StoreResult<Vec<String>> {
        sqlx::query(DB::sql(sql)).fetch_all(self.0).await?.iter().map(|row| row.text(column)).collect()
    }

    pub(crate) async fn channel_states(&self) -> StoreResult<Vec<crate::model::ChannelState>> {
        let rows = sqlx::query(DB::sql(
            "SELECT model, channel, CAST(CASE WHEN enabled THEN 1 ELSE 0 END AS BIGINT) AS enabled, reason, updated_at
             FROM channel_states ORDER BY model, channel",
        ))
        .fetch_all(self.0)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(crate::model::ChannelState {
                    model: row.text("model")?,
                    channel: row.text("channel")?,
                    enabled: row.int("enabled")? != 0,
                    reason: row.optional_text("reason")?,
                    updated_at_ms: row.int("updated_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn added_channels(&self) -> StoreResult<Vec<crate::model::AddedChannel>> {
        let rows = sqlx::query(DB::sql(
            "SELECT model, channel, provider, upstream_model, priority, weight, concurrent_requests_max,
                 requests_per_minute_max, tokens_per_minute_max, created_at
             FROM added_channels ORDER BY model, channel",
        ))
        .fetch_all(self.0)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(crate::model::AddedChannel {
                    model: row.text("model")?,
                    channel: row.text("channel")?,
                    provider: row.text("provider")?,
                    upstream_model: row.optional_text("upstream_model")?,
                    priority: number(row.int("priority")?, "priority")?,
                    weight: number(row.int("weight")?, "weight")?,
                    concurrent_requests_max: row.optional_int("concurrent_requests_max")?.map(|max| number(max, "concurrent_requests_max")).transpose()?,
                    requests_per_minute_max: row.optional_int("requests_per_minute_max")?.map(|max| number(max, "requests_per_minute_max")).transpose()?,
                    tokens_per_minute_max: row.optional_int("tokens_per_minute_max")?.map(|max| number(max, "tokens_per_minute_max")).transpose()?,
                    created_at_ms: row.int("created_at")?,
                })
            })
            .collect()
    }

    /// A request's upstream attempts, newest usage row first (a request id that failed and
    /// was sent again has several), each in attempt order; at most 1,000.
    pub(crate) async fn upstream_attempts(&self, account_id: &str, request_id: &str) -> StoreResult<Vec<crate::model::RecordedAttempt>> {
        let rows = sqlx::query(DB::sql(
            "SELECT usage_id, attempt, request_id, channel, provider, upstream_model, status_code,
                 CAST(CASE WHEN served THEN 1 ELSE 0 END AS BIGINT) AS served, error, latency_ms, first_byte_ms,
                 input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, created_at
             FROM upstream_attempts WHERE account_id = ? AND request_id = ? ORDER BY usage_id DESC, attempt LIMIT 1000",
        ))
        .bind(account_id)
        .bind(request_id)
        .fetch_all(self.0)
        .await?;
        rows.iter().map(crate::sql_rows::attempt_from).collect()
    }

    pub(crate) async fn account_ids(&self) -> StoreResult<Vec<String>> {
        self.texts("SELECT id FROM accounts ORDER BY id", "id").await
    }

    pub(crate) async fn customer_types(&self) -> StoreResult<Vec<String>> {
        self.texts("SELECT DISTINCT customer_type FROM accounts ORDER BY customer_type", "customer_type").await
    }

    pub(crate) async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>> {
        sqlx::query(DB::sql("SELECT * FROM api_keys WHERE key_hash = ?")).bind(key_hash).fetch_optional(self.0).await?.as_ref().map(key_from).transpose()
    }

    pub(crate) async fn fund_by_reference(&self, kind: FundKind, reference_id: &str) -> StoreResult<Option<FundTransaction>> {
        sqlx::query(DB::sql("SELECT * FROM fund_transactions WHERE kind = ? AND reference_id = ?"))
            .bind(kind.as_str())
            .bind(reference_id)
            .fetch_optional(self.0)
            .await?
            .as_ref()
            .map(fund_from)
            .transpose()
    }

    pub(crate) async fn fund_transactions_after(&self, account_id: &str, after_ledger_seq: i64) -> StoreResult<Vec<FundTransaction>> {
        sqlx::query(DB::sql("SELECT * FROM fund_transactions WHERE account_id = ? AND ledger_seq > ? ORDER BY ledger_seq"))
            .bind(account_id)
            .bind(after_ledger_seq)
            .fetch_all(self.0)
            .await?
            .iter()
            .map(fund_from)
            .collect()
    }

    pub(crate) async fn charged_request_ids_since(&self, account_id: &str, since: OffsetDateTime) -> StoreResult<Vec<String>> {
        sqlx::query(DB::sql("SELECT request_id FROM usage_log WHERE account_id = ? AND created_at >= ? AND status <> 'failed'"))
            .bind(account_id)
            .bind(ms_of(since))
            .fetch_all(self.0)
            .await?
            .iter()
            .map(|row| row.text("request_id"))
            .collect()
    }

    pub(crate) async fn usage_rows(&self, query: UsageQuery) -> StoreResult<Vec<UsageRow>> {
        let mut builder = sqlx::QueryBuilder::<DB>::new("SELECT * FROM usage_log WHERE TRUE");
        push_usage_query(&mut builder, query);
        builder.build().fetch_all(self.0).await?.iter().map(usage_from).collect()
    }

    /// Totalled by the database (one row per group, whatever the rows in range); both
    /// databases' SUM fails rather than wrap on overflow, and the cast back to BIGINT fails
    /// rather than round.
    pub(crate) async fn summary(&self, query: SummaryQuery) -> StoreResult<Vec<SummaryRow>> {
        let columns: Vec<&str> = query
            .group_by
            .iter()
            .map(|group| match group {
                SummaryGroup::Model => "model",
                SummaryGroup::Key => "api_key_id",
                // The UTC day's number since 1970 (times are positive Unix milliseconds).
                SummaryGroup::Day => "created_at / 86400000",
            })
            .collect();
        let selected: Vec<String> = columns.iter().enumerate().map(|(index, column)| format!("{column} AS g{index}")).collect();
        let mut builder = sqlx::QueryBuilder::<DB>::new(format!(
            "SELECT {}, COUNT(*) AS requests, CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
             CAST(SUM(cached_input_tokens) AS BIGINT) AS cached_input_tokens, CAST(SUM(cache_write_tokens) AS BIGINT) AS cache_write_tokens, \
             CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, CAST(SUM(cost) AS BIGINT) AS cost \
             FROM usage_log WHERE status <> 'failed'",
            selected.join(", ")
        ));
        if let Some(account_id) = query.account_id {
            builder.push(" AND account_id = ").push_bind(account_id);
        }
        push_time_range(&mut builder, query.start, query.end);
        let positions: Vec<String> = (1..=columns.len()).map(|position| position.to_string()).collect();
        builder.push(format!(" GROUP BY {0} ORDER BY {0} LIMIT ", positions.join(", "))).push_bind(i64::from(query.limit));
        builder.push(" OFFSET ").push_bind(i64::try_from(query.offset).unwrap_or(i64::MAX));
        let rows = builder.build().fetch_all(self.0).await?;
        rows.iter()
            .map(|row| {
                let mut summary = SummaryRow {
                    group: String::new(),
                    day: None,
                    model: None,
                    api_key_id: None,
                    requests: to_u64(row.int("requests")?, "requests")?,
                    input_tokens: to_u64(row.int("input_tokens")?, "tokens")?,
                    cached_input_tokens: to_u64(row.int("cached_input_tokens")?, "tokens")?,
                    cache_write_tokens: to_u64(row.int("cache_write_tokens")?, "tokens")?,
                    output_tokens: to_u64(row.int("output_tokens")?, "tokens")?,
                    cost: money(row, "cost")?,
                };
                let mut values = Vec::with_capacity(columns.len());
                for (index, group) in query.group_by.iter().enumerate() {
                    let column = format!("g{index}");
                    let value = match group {
                        SummaryGroup::Day => {
                            let day = row.int(&column)?;
                            day_of(day.checked_mul(86_400_000).ok_or_else(|| StoreError::Corrupt(format!("usage day {day}")))?)?
                        }
                        SummaryGroup::Model | SummaryGroup::Key => row.text(&column)?,
                    };
                    match group {
                        SummaryGroup::Day => summary.day = Some(value.clone()),
                        SummaryGroup::Model => summary.model = Some(value.clone()),
                        SummaryGroup::Key => summary.api_key_id = Some(value.clone()),
                    }
                    values.push(value);
                }
                summary.group = values.join(", ");
                Ok(summary)
            })
            .collect()
    }

    pub(crate) async fn accounts_page(&self, query: AccountQuery) -> StoreResult<Vec<Account>> {
        let mut builder = sqlx::QueryBuilder::<DB>::new("SELECT * FROM accounts WHERE TRUE");
        if let Some(search) = query.search {
            let pattern = format!("%{}%", like_escaped(&search.to_lowercase()));
            builder.push(" AND (LOWER(id) LIKE ").push_bind(pattern.clone()).push(" ESCAPE '\\' OR LOWER(name) LIKE ").push_bind(pattern).push(" ESCAPE '\\')");
        }
        if let Some(after) = query.after {
            builder.push(" AND id > ").push_bind(after);
        }
        builder.push(" ORDER BY id LIMIT ").push_bind(i64::from(query.limit));
        builder.build().fetch_all(self.0).await?.iter().map(account_from).collect()
    }

    pub(crate) async fn topups(&self, query: TopUpQuery) -> StoreResult<Vec<TopUp>> {
        let mut builder = sqlx::QueryBuilder::<DB>::new("SELECT * FROM topup_records WHERE TRUE");
        if let Some(account_id) = query.account_id {
            builder.push(" AND account_id = ").push_bind(account_id);
        }
        if let Some(status) = query.status {
            builder.push(" AND status = ").push_bind(status.as_str());
        }
        builder.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit));
        builder.build().fetch_all(self.0).await?.iter().map(topup_from).collect()
    }

    pub(crate) async fn price_history(&self, query: PriceHistoryQuery) -> StoreResult<Vec<PriceRow>> {
        let mut builder = sqlx::QueryBuilder::<DB>::new("SELECT * FROM prices WHERE TRUE");
        for (column, value) in [("provider", query.provider), ("model", query.model), ("customer_type", query.customer_type)] {
            if let Some(value) = value {
                builder.push(format!(" AND {column} = ")).push_bind(value);
            }
        }
        builder.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        builder.build().fetch_all(self.0).await?.iter().map(price_from).collect()
    }

    pub(crate) async fn reconciliations(&self, limit: u32) -> StoreResult<Vec<ReconciliationRun>> {
        sqlx::query(DB::sql(RECONCILIATIONS)).bind(i64::from(limit)).fetch_all(self.0).await?.iter().map(reconciliation_from).collect()
    }

    pub(crate) async fn due_outbox(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<OutboxEvent>> {
        sqlx::query(DB::sql(DUE_OUTBOX)).bind(now_ms).bind(i64::from(limit)).fetch_all(self.0).await?.iter().map(outbox_from).collect()
    }

    /// The newest rows of a table, optionally of one owner (`column = value`).
    async fn newest(&self, table: &str, column: &str, value: Option<Owner>, order: &str, limit: u32) -> StoreResult<Vec<DB::Row>> {
        let mut builder = sqlx::QueryBuilder::<DB>::new(format!("SELECT * FROM {table} WHERE TRUE"));
        match value {
            Some(Owner::Text(text)) => {
                builder.push(format!(" AND {column} = ")).push_bind(text);
            }
            Some(Owner::Id(id)) => {
                builder.push(format!(" AND {column} = ")).push_bind(id);
            }
            None => {}
        }
        builder.push(format!(" ORDER BY {order} LIMIT ")).push_bind(i64::from(limit));
        Ok(builder.build().fetch_all(self.0).await?)
    }

    pub(crate) async fn job_runs(&self, job: Option<&str>, limit: u32) -> StoreResult<Vec<JobRun>> {
        self.newest("job_runs", "job", job.map(|job| Owner::Text(job.to_string())), "started_at DESC, job", limit).await?.iter().map(job_run_from).collect()
    }

    pub(crate) async fn outbox_events(&self, account_id: Option<&str>, limit: u32) -> StoreResult<Vec<OutboxEvent>> {
        self.newest("outbox", "account_id", account_id.map(|id| Owner::Text(id.to_string())), "id DESC", limit).await?.iter().map(outbox_from).collect()
    }

    pub(crate) async fn deliveries(&self, outbox_id: Option<i64>, limit: u32) -> StoreResult<Vec<DeliveryAttempt>> {
        self.newest("webhook_deliveries", "outbox_id", outbox_id.map(Owner::Id), "id DESC", limit).await?.iter().map(delivery_from).collect()
    }
}

/// A text for LIKE that matches itself only: backslash, `%` and `_` escaped with a backslash.
fn like_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '\\' | '%' | '_') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// The owner a listing is narrowed to.
enum Owner {
    Text(String),
    Id(i64),
}

/// An integer column of `added_channels` in the narrower type the model keeps it in.
fn number<T: TryFrom<i64>>(value: i64, column: &str) -> StoreResult<T> {
    T::try_from(value).map_err(|_| StoreError::Corrupt(format!("added_channels.{column}: {value}")))
}
