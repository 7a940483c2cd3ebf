//! `Operations` on SQLite (embedded mode): the statements of `operations.rs`. Writes take the
//! database's one write lock (`BEGIN IMMEDIATE`), which orders them as PostgreSQL's row locks do.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::{Sqlite, Transaction};
use tollgate_core::Money;

use crate::alerts::{PendingEvent, balance_low, fund_posted};
use crate::error::StoreResult;
use crate::model::{FundKind, FundTransaction, NewFund};
use crate::operations::{
    BALANCE_BEFORE, PERIOD_FUNDS, PERIOD_USAGE, PeriodTotals, period_totals_from,
    ACCOUNT_TOTALS, ADVANCE_OUTBOX, BalanceRepair, CHARGED_ONE, DeliveryAttempt, DeliveryNext, ENSURE_LEASE,
    FINISH_RECONCILIATION, FINISH_RUN, INSERT_DELIVERY, INSERT_OUTBOX, INSERT_RUN, JOB_RUNS_KEPT, JobRun, LEDGER_TOTALS,
    LedgerTotals, Operations, OutboxEvent, PERIOD_RAN, PRUNE_RUNS, RELEASE_LEASE, RENEW_LEASE,
    ReconciliationRun, SOME_LEDGER_TOTALS, START_RECONCILIATION, TAKE_LEASE, advance, THRESHOLD, proven_balance, repair_reference, totals_from,
};
use crate::sql_rows::{Fields, now_ms, to_i64};
use crate::sqlite::{SqliteLedger, balance_for_update, insert_fund};

/// Queues events for the outside world inside the caller's transaction: they exist only if
/// that transaction commits. A dedupe key already queued adds nothing.
pub(crate) async fn queue_events(transaction: &mut Transaction<'static, Sqlite>, events: &[PendingEvent]) -> StoreResult<()> {
    let now = now_ms();
    for event in events {
        sqlx::query(INSERT_OUTBOX)
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
pub(crate) async fn after_fund(transaction: &mut Transaction<'static, Sqlite>, fund: &FundTransaction) -> StoreResult<()> {
    let mut events: Vec<PendingEvent> = fund_posted(fund).into_iter().collect();
    let threshold: Option<i64> = sqlx::query_scalar(THRESHOLD).bind(&fund.account_id).fetch_one(&mut **transaction).await?;
    if let Some(threshold) = threshold {
        events.extend(balance_low(&fund.account_id, Money::from_nanos(threshold), fund.balance_before, fund.balance_after, fund.ledger_seq));
    }
    queue_events(transaction, &events).await
}

/// A list of ids as one JSON text, for `json_each(?)`: one bound parameter whatever its length.
pub(crate) fn json_list(ids: &[impl AsRef<str>]) -> String {
    serde_json::Value::from_iter(ids.iter().map(AsRef::as_ref)).to_string()
}

#[async_trait]
impl Operations for SqliteLedger {
    async fn ledger_snapshot(&self, accounts: Option<&[String]>, charges: &[(String, String)]) -> StoreResult<(Vec<LedgerTotals>, HashSet<(String, String)>)> {
        // One read transaction: WAL gives it one snapshot from its first read on.
        let mut transaction = self.pool().begin().await?;
        let rows = match accounts {
            None => sqlx::query(LEDGER_TOTALS).fetch_all(&mut *transaction).await?,
            Some(accounts) => {
                let sql = sqlx::AssertSqlSafe(format!("{SOME_LEDGER_TOTALS} IN (SELECT value FROM json_each(?)) ORDER BY b.account_id"));
                sqlx::query(sql).bind(json_list(accounts)).fetch_all(&mut *transaction).await?
            }
        };
        let totals = rows.iter().map(totals_from).collect::<StoreResult<Vec<_>>>()?;
        let mut charged = HashSet::new();
        for (account_id, request_id) in charges {
            if sqlx::query(CHARGED_ONE).bind(account_id).bind(request_id).fetch_optional(&mut *transaction).await?.is_some() {
                charged.insert((account_id.clone(), request_id.clone()));
            }
        }
        transaction.commit().await?;
        Ok((totals, charged))
    }

    async fn repair_balance(&self, repair: &BalanceRepair) -> StoreResult<Option<FundTransaction>> {
        let mut transaction = self.write().await?;
        let (balance, ledger_seq) = balance_for_update(&mut transaction, &repair.account_id).await?;
        if balance != repair.expected_balance || ledger_seq != repair.expected_ledger_seq {
            return Ok(None);
        }
        let row = sqlx::query(ACCOUNT_TOTALS).bind(&repair.account_id).bind(&repair.account_id).fetch_one(&mut *transaction).await?;
        let proven = proven_balance(&row)?;
        sqlx::query("UPDATE account_balance SET balance = ? WHERE account_id = ?").bind(proven.nanos()).bind(&repair.account_id).execute(&mut *transaction).await?;
        let entry = NewFund {
            account_id: repair.account_id.clone(),
            kind: FundKind::Adjustment,
            amount: Money::ZERO,
            reference_id: repair_reference(repair),
            reason: Some(repair.note.clone()),
            operator_id: Some("reconciliation".into()),
        };
        let inserted = insert_fund(&mut transaction, &entry).await?;
        transaction.commit().await?;
        Ok(Some(inserted))
    }

    async fn start_reconciliation(&self, fix: bool) -> StoreResult<i64> {
        let mut transaction = self.write().await?;
        let id = sqlx::query_scalar(START_RECONCILIATION).bind(now_ms()).bind(i64::from(fix)).fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(id)
    }

    async fn finish_reconciliation(&self, run: &ReconciliationRun) -> StoreResult<()> {
        let mut transaction = self.write().await?;
        sqlx::query(FINISH_RECONCILIATION)
            .bind(now_ms())
            .bind(to_i64(run.accounts_checked, "accounts")?)
            .bind(to_i64(run.accounts_busy, "accounts")?)
            .bind(to_i64(run.drifts_found, "drifts")?)
            .bind(to_i64(run.accounts_repaired, "accounts")?)
            .bind(run.total_drift.nanos())
            .bind(run.report.to_string())
            .bind(run.id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn reconciliations(&self, limit: u32) -> StoreResult<Vec<ReconciliationRun>> {
        crate::sql_reads::Reads(self.pool()).reconciliations(limit).await
    }

    async fn period_totals(&self, account_id: &str, start_ms: i64, end_ms: i64) -> StoreResult<PeriodTotals> {
        // One snapshot: rows committed meanwhile cannot fall between the three reads.
        let mut transaction = self.pool().begin().await?;
        let opening = sqlx::query(BALANCE_BEFORE).bind(account_id).bind(start_ms).bind(account_id).bind(start_ms).fetch_one(&mut *transaction).await?;
        let funds = sqlx::query(PERIOD_FUNDS).bind(account_id).bind(start_ms).bind(end_ms).fetch_all(&mut *transaction).await?;
        let usage = sqlx::query(PERIOD_USAGE).bind(account_id).bind(start_ms).bind(end_ms).fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        period_totals_from(&opening, &funds, &usage)
    }

    async fn claim_job(&self, job: &str, period_start: i64, holder: &str, lease_ms: i64) -> StoreResult<Option<i64>> {
        let now = now_ms();
        let mut transaction = self.write().await?;
        sqlx::query(ENSURE_LEASE).bind(job).execute(&mut *transaction).await?;
        let lease = sqlx::query("SELECT fence, expires_at FROM job_leases WHERE job = ?").bind(job).fetch_one(&mut *transaction).await?;
        let (fence, expires_at) = (lease.int("fence")?, lease.int("expires_at")?);
        if expires_at > now {
            return Ok(None);
        }
        if sqlx::query(PERIOD_RAN).bind(job).bind(period_start).fetch_optional(&mut *transaction).await?.is_some() {
            return Ok(None);
        }
        let fence = fence + 1;
        sqlx::query(TAKE_LEASE).bind(holder).bind(fence).bind(now.saturating_add(lease_ms)).bind(job).execute(&mut *transaction).await?;
        sqlx::query(INSERT_RUN).bind(job).bind(period_start).bind(holder).bind(fence).bind(now).execute(&mut *transaction).await?;
        let keep_after = period_start.saturating_sub(lease_ms.saturating_mul(JOB_RUNS_KEPT));
        sqlx::query(PRUNE_RUNS).bind(job).bind(keep_after).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(Some(fence))
    }

    async fn renew_job(&self, job: &str, fence: i64, lease_ms: i64) -> StoreResult<bool> {
        let mut transaction = self.write().await?;
        let result = sqlx::query(RENEW_LEASE).bind(now_ms().saturating_add(lease_ms)).bind(job).bind(fence).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(result.rows_affected() == 1)
    }

    async fn finish_job(&self, job: &str, period_start: i64, fence: i64, outcome: &str) -> StoreResult<()> {
        let mut transaction = self.write().await?;
        sqlx::query(FINISH_RUN).bind(now_ms()).bind(outcome).bind(job).bind(period_start).bind(fence).execute(&mut *transaction).await?;
        sqlx::query(RELEASE_LEASE).bind(job).bind(fence).execute(&mut *transaction).await?;
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
        let mut transaction = self.write().await?;
        sqlx::query(INSERT_DELIVERY)
            .bind(attempt.outbox_id)
            .bind(to_i64(attempt.attempt, "attempt")?)
            .bind(&attempt.url)
            .bind(attempt.status_code.map(i64::from))
            .bind(&attempt.error)
            .bind(to_i64(attempt.duration_ms, "duration")?)
            .bind(attempt.attempted_at)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(ADVANCE_OUTBOX)
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
