//! Charging in the PostgreSQL ledger itself, for the opt-in degradation mode in which the hot
//! store is unreachable (`degradation.hot_store_down = "charge_ledger"`; seeds 001/004 "Redis
//! failure → DB fallback → recover"). The protocol is the hot store's — authorize holds, settle
//! charges once, void releases — with the holds in `ledger_holds` and each step one transaction
//! under the account's `account_balance` row lock, so concurrent gateways cannot overspend.
//!
//! Every account charged here is marked in `hot_stale_accounts`: its hot-store state misses these
//! charges. [`LedgerCharging::release_stale`] unloads it from the hot store (the next request
//! loads it from the ledger) once no ledger hold of it is open; only then may the hot store serve
//! it again.
//!
//! Enforced here: idempotency, the balance with its credit limit, request quotas and key budgets
//! (from the ledger's counters). Not enforced: the per-minute rate limits, which live only in the
//! hot store.

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};
use tollgate_core::Money;

use crate::alerts::{SPEND_COUNTERS_OF_ACCOUNT, counter_seed, period_labels};
use crate::clock::Periods;
use crate::error::{StoreError, StoreResult};
use crate::hot::{Authorization, AuthorizeRequest, BalanceView, Commitments, CounterSeed, HotStore, Refusal, Settlement, available, commitment_refusal};
use crate::model::{RecordOutcome, UsageEvent};
use crate::operations::pg;
use crate::postgres::{DuplicateCheck, balance_for_update, record_usage_in};
use crate::sql_rows::now_ms;

/// Authorize, settle and void against the PostgreSQL ledger.
#[derive(Clone)]
pub struct LedgerCharging {
    pool: PgPool,
}

impl LedgerCharging {
    pub fn new(pool: PgPool) -> LedgerCharging {
        LedgerCharging { pool }
    }

    /// One transaction: the checks `HotStore::authorize` makes, then a hold in `ledger_holds`
    /// and the account marked stale. With `only_if_stale`, returns `None` (and changes nothing)
    /// when the account is not marked stale: the hot store may serve it.
    ///
    /// # Errors
    /// `NotFound` for an unknown account; `Unavailable` when PostgreSQL is.
    pub async fn authorize(&self, request: &AuthorizeRequest, only_if_stale: bool) -> StoreResult<Option<Authorization>> {
        let mut transaction = self.pool.begin().await?;
        let (balance, _) = balance_for_update(&mut transaction, &request.account_id).await?;
        // Locked, so a concurrent release cannot unload the account between this check and
        // the hold (release takes the same row lock).
        let stale = sqlx::query("SELECT 1 FROM hot_stale_accounts WHERE account_id = $1 FOR UPDATE")
            .bind(&request.account_id)
            .fetch_optional(&mut *transaction)
            .await?
            .is_some();
        if only_if_stale && !stale {
            return Ok(None);
        }
        let now = now_ms();
        sqlx::query("DELETE FROM ledger_holds WHERE account_id = $1 AND expires_at <= $2")
            .bind(&request.account_id)
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        if let Some(refusal) = refusal(&mut transaction, request, balance, now).await? {
            return Ok(Some(Authorization::Refused(refusal)));
        }
        let expires_at = now.saturating_add(i64::try_from(request.hold_ttl_ms).unwrap_or(i64::MAX));
        sqlx::query("INSERT INTO ledger_holds (account_id, api_key_id, request_id, amount, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&request.account_id)
            .bind(&request.api_key_id)
            .bind(&request.request_id)
            .bind(request.hold.nanos())
            .bind(expires_at)
            .execute(&mut *transaction)
            .await?;
        mark_stale(&mut transaction, &request.account_id).await?;
        let held = held(&mut transaction, ACCOUNT_HELD, &request.account_id).await?;
        let available_after = available(balance, request.limits.credit_limit, held)?;
        transaction.commit().await?;
        metrics::counter!("tollgate_ledger_charging_total", "step" => "authorize").increment(1);
        Ok(Some(Authorization::Held { available_after }))
    }

    /// One transaction: release the request's hold, record the usage row (once per request id,
    /// as the usage writer does) and move the balance. Durable on return.
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is; `Invalid` for an event the ledger refuses.
    pub async fn settle(&self, event: &UsageEvent) -> StoreResult<Settlement> {
        let mut transaction = self.pool.begin().await?;
        release_hold(&mut transaction, event).await?;
        let events = std::slice::from_ref(event);
        let recorded = record_usage_in(&mut transaction, events, DuplicateCheck::Read).await?;
        let position = |positions: &std::collections::HashMap<&str, (Money, i64)>| {
            positions.get(event.account_id.as_str()).map(|(balance, _)| *balance).ok_or_else(|| StoreError::Corrupt("settled account not locked".into()))
        };
        let settlement = Settlement {
            balance_before: position(&recorded.starts)?,
            balance_after: position(&recorded.positions)?,
            already_settled: recorded.outcomes.first() == Some(&RecordOutcome::Duplicate),
        };
        mark_stale(&mut transaction, &event.account_id).await?;
        transaction.commit().await?;
        metrics::counter!("tollgate_ledger_charging_total", "step" => "settle").increment(1);
        Ok(settlement)
    }

    /// One transaction: release the request's hold and record the failed request (cost 0).
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is.
    pub async fn void(&self, event: &UsageEvent) -> StoreResult<()> {
        let mut transaction = self.pool.begin().await?;
        release_hold(&mut transaction, event).await?;
        record_usage_in(&mut transaction, std::slice::from_ref(event), DuplicateCheck::Read).await?;
        transaction.commit().await?;
        metrics::counter!("tollgate_ledger_charging_total", "step" => "void").increment(1);
        Ok(())
    }

    /// The account's balance, holds and counters as the ledger has them (what `/v1/balance`
    /// shows while the hot store cannot answer); `None` for an unknown account.
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is.
    pub async fn balance_view(&self, account_id: &str, api_key_id: &str) -> StoreResult<Option<BalanceView>> {
        let mut transaction = self.pool.begin().await?;
        let Some(row) = sqlx::query("SELECT balance, last_fund_seq FROM account_balance WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(&mut *transaction)
            .await?
        else {
            return Ok(None);
        };
        let held = held(&mut transaction, ACCOUNT_HELD, account_id).await?;
        let counters = counters(&mut transaction, account_id, now_ms()).await?;
        let key = counters.keys.iter().find(|key| key.api_key_id == api_key_id).cloned().unwrap_or_default();
        Ok(Some(BalanceView {
            balance: Money::from_nanos(row.try_get("balance")?),
            held,
            last_fund_seq: row.try_get("last_fund_seq")?,
            daily_requests_used: counters.requests_today,
            monthly_requests_used: counters.requests_this_month,
            key_spent_daily: key.spent_today,
            key_spent_monthly: key.spent_this_month,
            key_spent_total: key.spent_total,
        }))
    }

    /// Releases every ledger hold past its expiry; returns how many.
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is.
    pub async fn expire_holds(&self) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM ledger_holds WHERE expires_at <= $1").bind(now_ms()).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// Accounts the hot store must not serve until released.
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is.
    pub async fn stale_accounts(&self) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT account_id FROM hot_stale_accounts ORDER BY account_id").fetch_all(&self.pool).await?)
    }

    /// Whether the account is marked stale: the hot store must not serve it.
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL is.
    pub async fn is_stale(&self, account_id: &str) -> StoreResult<bool> {
        Ok(sqlx::query("SELECT 1 FROM hot_stale_accounts WHERE account_id = $1").bind(account_id).fetch_optional(&self.pool).await?.is_some())
    }

    /// Unloads a stale account from the hot store and clears its mark, unless a ledger hold of
    /// it is still open (its settle will charge the ledger). Returns whether it was released.
    /// After the unload the account is reloaded from the ledger, less the charges the hot store
    /// made that the ledger does not have yet (`operations::load_snapshot`).
    ///
    /// # Errors
    /// `Unavailable` when PostgreSQL or the hot store is; the mark stays.
    pub async fn release_stale(&self, account_id: &str, hot: &dyn HotStore) -> StoreResult<bool> {
        let mut transaction = self.pool.begin().await?;
        let marked = sqlx::query("SELECT 1 FROM hot_stale_accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account_id)
            .fetch_optional(&mut *transaction)
            .await?
            .is_some();
        if !marked {
            return Ok(true);
        }
        let holds_open = sqlx::query("SELECT 1 FROM ledger_holds WHERE account_id = $1 AND expires_at > $2 LIMIT 1")
            .bind(account_id)
            .bind(now_ms())
            .fetch_optional(&mut *transaction)
            .await?
            .is_some();
        if holds_open {
            return Ok(false);
        }
        // Under the mark's lock: no ledger authorize of this account can start until commit.
        hot.unload_account(account_id).await?;
        sqlx::query("DELETE FROM hot_stale_accounts WHERE account_id = $1").bind(account_id).execute(&mut *transaction).await?;
        transaction.commit().await?;
        metrics::counter!("tollgate_hot_stale_released_total").increment(1);
        Ok(true)
    }
}

async fn mark_stale(transaction: &mut Transaction<'static, Postgres>, account_id: &str) -> StoreResult<()> {
    sqlx::query("INSERT INTO hot_stale_accounts (account_id, marked_at) VALUES ($1, $2) ON CONFLICT (account_id) DO UPDATE SET marked_at = EXCLUDED.marked_at")
        .bind(account_id)
        .bind(now_ms())
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

async fn release_hold(transaction: &mut Transaction<'static, Postgres>, event: &UsageEvent) -> StoreResult<()> {
    sqlx::query("DELETE FROM ledger_holds WHERE account_id = $1 AND request_id = $2")
        .bind(&event.account_id)
        .bind(&event.request_id)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

const ACCOUNT_HELD: &str = "SELECT COALESCE(SUM(amount), 0)::BIGINT FROM ledger_holds WHERE account_id = $1";
const KEY_HELD: &str = "SELECT COALESCE(SUM(amount), 0)::BIGINT FROM ledger_holds WHERE api_key_id = $1";

/// Σ of the open holds of an account ([`ACCOUNT_HELD`]) or a key ([`KEY_HELD`]).
async fn held(transaction: &mut Transaction<'static, Postgres>, sql: &'static str, owner: &str) -> StoreResult<Money> {
    let nanos: i64 = sqlx::query_scalar(sql).bind(owner).fetch_one(&mut **transaction).await?;
    Ok(Money::from_nanos(nanos))
}

/// The first limit the request would break, as the hot stores judge it, from the ledger's
/// counters and holds. Read-only.
async fn refusal(transaction: &mut Transaction<'static, Postgres>, request: &AuthorizeRequest, balance: Money, now: i64) -> StoreResult<Option<Refusal>> {
    let charged = sqlx::query(crate::postgres::CHARGED_ONE)
        .bind(&request.account_id)
        .bind(&request.request_id)
        .fetch_optional(&mut **transaction)
        .await?;
    if charged.is_some() {
        return Ok(Some(Refusal::AlreadyCharged));
    }
    let in_progress = sqlx::query("SELECT 1 FROM ledger_holds WHERE account_id = $1 AND request_id = $2")
        .bind(&request.account_id)
        .bind(&request.request_id)
        .fetch_optional(&mut **transaction)
        .await?;
    if in_progress.is_some() {
        return Ok(Some(Refusal::InProgress));
    }
    let counters = counters(transaction, &request.account_id, now).await?;
    let key = counters.keys.iter().find(|key| key.api_key_id == request.api_key_id).cloned().unwrap_or_default();
    let committed = Commitments {
        requests_today: counters.requests_today,
        requests_this_month: counters.requests_this_month,
        key_spent_today: key.spent_today,
        key_spent_this_month: key.spent_this_month,
        key_spent_total: key.spent_total,
        key_held: held(transaction, KEY_HELD, &request.api_key_id).await?,
        balance,
        held: held(transaction, ACCOUNT_HELD, &request.account_id).await?,
    };
    commitment_refusal(request, &committed, &Periods::at(now))
}

async fn counters(transaction: &mut Transaction<'static, Postgres>, account_id: &str, now: i64) -> StoreResult<CounterSeed> {
    let (day, month) = period_labels(now).ok_or_else(|| StoreError::Invalid(format!("impossible time {now}")))?;
    let rows = sqlx::query(pg(SPEND_COUNTERS_OF_ACCOUNT))
        .bind(&day)
        .bind(&month)
        .bind(account_id)
        .bind(account_id)
        .fetch_all(&mut **transaction)
        .await?;
    let rows = rows
        .iter()
        .map(|row| Ok((row.try_get("scope")?, row.try_get("owner_id")?, row.try_get("period")?, row.try_get("requests")?, row.try_get("spent")?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(counter_seed(now, &day, &month, rows))
}
