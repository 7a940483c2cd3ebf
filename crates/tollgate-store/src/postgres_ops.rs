//! `Operations` on PostgreSQL: the statements of `operations.rs`, numbered for PostgreSQL.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::{Postgres, Transaction};
use tollgate_core::Money;

use crate::alerts::{PendingEvent, balance_low, fund_posted, spend_deltas, usage_batch_alerts};
use crate::error::StoreResult;
use crate::model::{FundKind, FundTransaction, NewFund, UsageEvent};
use crate::operations::{
    BALANCE_BEFORE, PERIOD_FUNDS, PERIOD_USAGE, PeriodTotals, period_totals_from,
    ACCOUNT_TOTALS, ADVANCE_OUTBOX, BalanceRepair, DeliveryAttempt, DeliveryNext, ENSURE_LEASE,
    FINISH_RECONCILIATION, FINISH_RUN, INSERT_DELIVERY, INSERT_OUTBOX, INSERT_RUN, JOB_RUNS_KEPT, JobRun, LEDGER_TOTALS,
    LedgerTotals, Operations, OutboxEvent, PERIOD_RAN, PRUNE_RUNS, RELEASE_LEASE, RENEW_LEASE,
    ReconciliationRun, SOME_LEDGER_TOTALS, START_RECONCILIATION, TAKE_LEASE, advance, pg,
    THRESHOLD, key_budgets_from, threshold_from, proven_balance, repair_reference, totals_from,
};
use crate::postgres::{PgLedger, balance_for_update, insert_fund};
use crate::sql_rows::{Fields, now_ms, to_i64};

/// Queues events for the outside world inside the caller's transaction: they exist only if
/// that transaction commits. A dedupe key already queued adds nothing.
async fn queue_events(transaction: &mut Transaction<'static, Postgres>, events: &[PendingEvent]) -> StoreResult<()> {
    let now = now_ms();
    for event in events {
        sqlx::query(pg(INSERT_OUTBOX))
            .bind(event.event_type)
            .bind(&event.account_id)
            .bind(&event.dedupe_key)
            .bind(event.payload.to_string())
            .bind(now)
            .bind(now)
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

/// The events of a fund transaction, queued in its transaction.
pub(crate) async fn after_fund(transaction: &mut Transaction<'static, Postgres>, fund: &FundTransaction) -> StoreResult<()> {
    let mut events: Vec<PendingEvent> = fund_posted(fund).into_iter().collect();
    let threshold: Option<i64> = sqlx::query_scalar(pg(THRESHOLD)).bind(&fund.account_id).fetch_one(&mut **transaction).await?;
    if let Some(threshold) = threshold {
        events.extend(balance_low(&fund.account_id, Money::from_nanos(threshold), fund.balance_before, fund.balance_after, fund.ledger_seq));
    }
    queue_events(transaction, &events).await
}

/// Spend counters and the events of a usage batch, in its transaction: `starts` and `ends` are
/// the accounts' positions before and after it, `inserted` the rows it inserted.
pub(crate) async fn after_usage_batch(
    transaction: &mut Transaction<'static, Postgres>,
    starts: &HashMap<&str, (Money, i64)>,
    ends: &HashMap<&str, (Money, i64)>,
    inserted: &[&UsageEvent],
) -> StoreResult<()> {
    let deltas = spend_deltas(inserted)?;
    let (mut counters, mut budgets) = (Vec::new(), Vec::new());
    if !deltas.is_empty() {
        let scopes: Vec<&str> = deltas.keys().map(|(scope, _, _)| *scope).collect();
        let owners: Vec<&str> = deltas.keys().map(|(_, owner, _)| owner.as_str()).collect();
        let periods: Vec<&str> = deltas.keys().map(|(_, _, period)| period.as_str()).collect();
        let (requests, spent): (Vec<i64>, Vec<i64>) = deltas.values().copied().unzip();
        let key_ids: Vec<&str> = deltas.keys().filter(|(scope, _, _)| *scope == "key").map(|(_, owner, _)| owner.as_str()).collect();
        counters = sqlx::query_as(
            "INSERT INTO spend_counters (scope, owner_id, period, requests, spent, updated_at)
             SELECT scope, owner_id, period, requests, spent, $6 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[])
                 AS delta (scope, owner_id, period, requests, spent)
             ON CONFLICT (scope, owner_id, period) DO UPDATE SET requests = spend_counters.requests + excluded.requests,
                 spent = spend_counters.spent + excluded.spent, updated_at = excluded.updated_at
             RETURNING scope, owner_id, period, spent",
        )
        .bind(scopes)
        .bind(owners)
        .bind(periods)
        .bind(requests)
        .bind(spent)
        .bind(now_ms())
        .fetch_all(&mut **transaction)
        .await?;
        budgets = sqlx::query(
            "SELECT id, account_id, budget_daily, budget_monthly, budget_total FROM api_keys
             WHERE id = ANY($1) AND (budget_daily IS NOT NULL OR budget_monthly IS NOT NULL OR budget_total IS NOT NULL)",
        )
        .bind(&key_ids)
        .fetch_all(&mut **transaction)
        .await?
        .iter()
        .map(key_budgets_from)
        .collect::<StoreResult<Vec<_>>>()?;
    }
    let account_ids: Vec<&str> = ends.keys().copied().collect();
    let thresholds = sqlx::query("SELECT id, low_balance_threshold FROM accounts WHERE id = ANY($1) AND low_balance_threshold IS NOT NULL")
        .bind(&account_ids)
        .fetch_all(&mut **transaction)
        .await?
        .iter()
        .map(threshold_from)
        .collect::<StoreResult<Vec<_>>>()?;
    let events = usage_batch_alerts(&deltas, &counters, &budgets, &thresholds, starts, ends)?;
    queue_events(transaction, &events).await
}

#[async_trait]
impl Operations for PgLedger {
    async fn ledger_snapshot(&self, accounts: Option<&[String]>, charges: &[(String, String)]) -> StoreResult<(Vec<LedgerTotals>, HashSet<(String, String)>)> {
        let mut transaction = self.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *transaction).await?;
        let rows = match accounts {
            None => sqlx::query(LEDGER_TOTALS).fetch_all(&mut *transaction).await?,
            Some(accounts) => {
                let sql = sqlx::AssertSqlSafe(format!("{SOME_LEDGER_TOTALS} = ANY($1::TEXT[]) ORDER BY b.account_id"));
                sqlx::query(sql).bind(accounts).fetch_all(&mut *transaction).await?
            }
        };
        let totals = rows.iter().map(totals_from).collect::<StoreResult<Vec<_>>>()?;
        let (accounts, requests): (Vec<&str>, Vec<&str>) = charges.iter().map(|(account, request)| (account.as_str(), request.as_str())).unzip();
        let rows = sqlx::query(
            "SELECT c.account_id, c.request_id FROM charged_requests c
             JOIN UNNEST($1::TEXT[], $2::TEXT[]) AS wanted (account_id, request_id)
               ON c.account_id = wanted.account_id AND c.request_id = wanted.request_id",
        )
        .bind(accounts)
        .bind(requests)
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        let charged = rows.iter().map(|row| Ok((row.text("account_id")?, row.text("request_id")?))).collect::<StoreResult<HashSet<_>>>()?;
        Ok((totals, charged))
    }

    async fn repair_balance(&self, repair: &BalanceRepair) -> StoreResult<Option<FundTransaction>> {
        let mut transaction = self.pool().begin().await?;
        let (balance, ledger_seq) = balance_for_update(&mut transaction, &repair.account_id).await?;
        if balance != repair.expected_balance || ledger_seq != repair.expected_ledger_seq {
            return Ok(None);
        }
        // Under the row lock no writer adds rows for the account: this is the proven balance.
        let row = sqlx::query(pg(ACCOUNT_TOTALS)).bind(&repair.account_id).bind(&repair.account_id).fetch_one(&mut *transaction).await?;
        let proven = proven_balance(&row)?;
        let entry = NewFund {
            account_id: repair.account_id.clone(),
            kind: FundKind::Adjustment,
            amount: Money::ZERO,
            reference_id: repair_reference(repair),
            reason: Some(repair.note.clone()),
            operator_id: Some("reconciliation".into()),
        };
        let inserted = insert_fund(&mut transaction, &entry, (proven, ledger_seq)).await?;
        transaction.commit().await?;
        Ok(Some(inserted))
    }

    async fn start_reconciliation(&self, fix: bool) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(pg(START_RECONCILIATION)).bind(now_ms()).bind(i64::from(fix)).fetch_one(self.pool()).await?)
    }

    async fn finish_reconciliation(&self, run: &ReconciliationRun) -> StoreResult<()> {
        sqlx::query(pg(FINISH_RECONCILIATION))
            .bind(now_ms())
            .bind(to_i64(run.accounts_checked, "accounts")?)
            .bind(to_i64(run.accounts_busy, "accounts")?)
            .bind(to_i64(run.drifts_found, "drifts")?)
            .bind(to_i64(run.accounts_repaired, "accounts")?)
            .bind(run.total_drift.nanos())
            .bind(run.report.to_string())
            .bind(run.id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn reconciliations(&self, limit: u32) -> StoreResult<Vec<ReconciliationRun>> {
        crate::sql_reads::Reads(self.pool()).reconciliations(limit).await
    }

    async fn period_totals(&self, account_id: &str, start_ms: i64, end_ms: i64) -> StoreResult<PeriodTotals> {
        // One snapshot: rows committed meanwhile cannot fall between the three reads.
        let mut transaction = self.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *transaction).await?;
        let opening = sqlx::query(pg(BALANCE_BEFORE)).bind(account_id).bind(start_ms).bind(account_id).bind(start_ms).fetch_one(&mut *transaction).await?;
        let funds = sqlx::query(pg(PERIOD_FUNDS)).bind(account_id).bind(start_ms).bind(end_ms).fetch_all(&mut *transaction).await?;
        let usage = sqlx::query(pg(PERIOD_USAGE)).bind(account_id).bind(start_ms).bind(end_ms).fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        period_totals_from(&opening, &funds, &usage)
    }

    async fn claim_job(&self, job: &str, period_start: i64, holder: &str, lease_ms: i64) -> StoreResult<Option<i64>> {
        let now = now_ms();
        sqlx::query(pg(ENSURE_LEASE)).bind(job).execute(self.pool()).await?;
        let mut transaction = self.pool().begin().await?;
        let lease = sqlx::query("SELECT fence, expires_at FROM job_leases WHERE job = $1 FOR UPDATE").bind(job).fetch_one(&mut *transaction).await?;
        let (fence, expires_at) = (lease.int("fence")?, lease.int("expires_at")?);
        if expires_at > now {
            return Ok(None);
        }
        if sqlx::query(pg(PERIOD_RAN)).bind(job).bind(period_start).fetch_optional(&mut *transaction).await?.is_some() {
            return Ok(None);
        }
        let fence = fence + 1;
        sqlx::query(pg(TAKE_LEASE)).bind(holder).bind(fence).bind(now.saturating_add(lease_ms)).bind(job).execute(&mut *transaction).await?;
        sqlx::query(pg(INSERT_RUN)).bind(job).bind(period_start).bind(holder).bind(fence).bind(now).execute(&mut *transaction).await?;
        let keep_after = period_start.saturating_sub(lease_ms.saturating_mul(JOB_RUNS_KEPT));
        sqlx::query(pg(PRUNE_RUNS)).bind(job).bind(keep_after).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(Some(fence))
    }

    async fn renew_job(&self, job: &str, fence: i64, lease_ms: i64) -> StoreResult<bool> {
        let result = sqlx::query(pg(RENEW_LEASE)).bind(now_ms().saturating_add(lease_ms)).bind(job).bind(fence).execute(self.pool()).await?;
        Ok(result.rows_affected() == 1)
    }

    async fn finish_job(&self, job: &str, period_start: i64, fence: i64, outcome: &str) -> StoreResult<()> {
        let mut transaction = self.pool().begin().await?;
        sqlx::query(pg(FINISH_RUN)).bind(now_ms()).bind(outcome).bind(job).bind(period_start).bind(fence).execute(&mut *transaction).await?;
        sqlx::query(pg(RELEASE_LEASE)).bind(job).bind(fence).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn job_runs(&self, job: Option<&str>, limit: u32) -> StoreResult<Vec<JobRun>> {
        crate::sql_reads::Reads(self.pool()).job_runs(job, limit).await
    }

    async fn due_outbox(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<OutboxEvent>> {
        crate::sql_reads::Reads(self.pool()).due_outbox(now_ms, limit).await
    }

    async fn record_delivery(&self, attempt: &DeliveryAttempt, next: DeliveryNext) -> StoreResult<()> {
        let (status, next_attempt_at, delivered_at) = advance(attempt, next);
        let mut transaction = self.pool().begin().await?;
        sqlx::query(pg(INSERT_DELIVERY))
            .bind(attempt.outbox_id)
            .bind(to_i64(attempt.attempt, "attempt")?)
            .bind(&attempt.url)
            .bind(attempt.status_code.map(i64::from))
            .bind(&attempt.error)
            .bind(to_i64(attempt.duration_ms, "duration")?)
            .bind(attempt.attempted_at)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(pg(ADVANCE_OUTBOX))
            .bind(to_i64(attempt.attempt, "attempt")?)
            .bind(status)
            .bind(next_attempt_at)
            .bind(delivered_at)
            .bind(&attempt.error)
            .bind(attempt.outbox_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn outbox_events(&self, account_id: Option<&str>, limit: u32) -> StoreResult<Vec<OutboxEvent>> {
        crate::sql_reads::Reads(self.pool()).outbox_events(account_id, limit).await
    }

    async fn deliveries(&self, outbox_id: Option<i64>, limit: u32) -> StoreResult<Vec<DeliveryAttempt>> {
        crate::sql_reads::Reads(self.pool()).deliveries(outbox_id, limit).await
    }
}
