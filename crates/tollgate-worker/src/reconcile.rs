//! Reconciliation: proves, for every account, that the three places a balance lives agree.
//!
//! - (a) the ledger's rows: Σ fund amounts − Σ usage costs (the truth);
//! - (b) account_balance, the running balance the ledger's writers keep;
//! - (c) the hot store's balance, which runs ahead of the ledger by the charges still in the
//!   usage log and behind it by the fund transactions not yet applied.
//!
//! Reading (c) and the ledger at the same instant is impossible across two systems, so each
//! account's hot view is read twice, around the ledger snapshot: an account whose hot balance or
//! fund position changed in between was moving, and is read again (up to [`BUSY_RETRIES`]
//! times) before it is reported busy — never judged on a torn read.
//!
//! Repairs (`fix`) are fenced: the ledger's repair happens under its row lock and only from the
//! state that was read, the hot store's only if the account holds nothing and its balance and
//! fund position are still those read. Each repair is recorded in the ledger as an adjustment
//! of zero whose reason says what was found, so the audit chain shows it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use tollgate_core::Money;
use tollgate_store::operations::{BalanceRepair, HotAccountView, LedgerTotals, ReconciliationRun};
use tollgate_store::{HotStore, Ledger, StoreError, StoreResult};

/// Times an account that moved while being read is read again within one run.
pub const BUSY_RETRIES: usize = 3;
/// Drifts listed one by one in a run's report; the counts cover all of them.
pub const REPORTED_DRIFTS_MAX: usize = 1_000;
/// Busy accounts listed by id in a run's report.
const REPORTED_BUSY_MAX: usize = 100;
/// Pause before busy accounts are read again.
const BUSY_PAUSE: Duration = Duration::from_millis(50);
/// Attempts to write a repair's ledger entry while writers keep moving the account.
const REPAIR_ATTEMPTS: usize = 3;

/// Which balance disagrees with the ledger's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// account_balance ≠ Σ fund − Σ usage.
    LedgerBalance,
    /// The hot balance ≠ the rows' balance − unlogged charges − unapplied funds.
    HotBalance,
}

impl DriftKind {
    pub fn label(self) -> &'static str {
        match self {
            DriftKind::LedgerBalance => "account_balance",
            DriftKind::HotBalance => "hot-store balance",
        }
    }
}

/// One balance that disagrees with the ledger's rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub account_id: String,
    pub kind: DriftKind,
    /// The balance held.
    pub found: Money,
    /// The balance the ledger's rows prove it should hold.
    pub expected: Money,
    /// found − expected: positive when the balance is too high.
    pub amount: Money,
    pub repaired: bool,
    /// Why it was not repaired, when asked to be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrepaired_because: Option<&'static str>,
}

/// What one pass read and judged.
#[derive(Default)]
struct Pass {
    checked: u64,
    drifts: Vec<(Drift, Option<HotAccountView>, LedgerTotals)>,
    busy: Vec<String>,
}

/// What reading every account found: the drifts, with what was read for each (the repair
/// needs it), and the accounts that kept moving.
pub struct Judgement {
    pub checked: u64,
    pub drifts: Vec<(Drift, Option<HotAccountView>, LedgerTotals)>,
    pub busy: Vec<String>,
}

/// The stores reconciliation reads. Without a hot store only (a) and (b) are compared: the
/// `tollgate reconcile` command in embedded mode cannot see the serving process's memory.
pub struct Reconciler<'a> {
    pub ledger: &'a dyn Ledger,
    pub hot: Option<&'a dyn HotStore>,
    /// Named in the report: "redis", "in-process" or "none".
    pub hot_store_name: &'static str,
}

impl Reconciler<'_> {
    /// Runs one reconciliation, records it in `reconciliation_log` and returns it.
    ///
    /// # Errors
    /// A store could not be read; the run stays in the log unfinished.
    pub async fn run(&self, fix: bool) -> StoreResult<ReconciliationRun> {
        let started = Instant::now();
        let run_id = self.ledger.start_reconciliation(fix).await?;
        let Judgement { checked, drifts, busy } = self.judge().await?;

        let mut repaired_accounts = HashSet::new();
        let mut reported = Vec::with_capacity(drifts.len());
        if fix {
            reported = self.repair(run_id, drifts, &mut repaired_accounts).await?;
        } else {
            reported.extend(drifts.into_iter().map(|(drift, _, _)| drift));
        }

        let mut total_drift = Money::ZERO;
        for drift in &reported {
            let size = if drift.amount.is_negative() { drift.amount.checked_neg() } else { Some(drift.amount) };
            total_drift = size.and_then(|size| total_drift.checked_add(size)).ok_or(StoreError::Overflow("total drift"))?;
        }
        let report = serde_json::json!({
            "hot_store": self.hot_store_name,
            "duration_ms": started.elapsed().as_millis() as u64,
            "drifts": reported.iter().take(REPORTED_DRIFTS_MAX).collect::<Vec<_>>(),
            "drifts_not_listed": reported.len().saturating_sub(REPORTED_DRIFTS_MAX),
            "busy_accounts": busy.iter().take(REPORTED_BUSY_MAX).collect::<Vec<_>>(),
        });
        let run = ReconciliationRun {
            id: run_id,
            started_at: time::OffsetDateTime::now_utc(),
            finished_at: Some(time::OffsetDateTime::now_utc()),
            fix,
            accounts_checked: checked,
            accounts_busy: busy.len() as u64,
            drifts_found: reported.len() as u64,
            accounts_repaired: repaired_accounts.len() as u64,
            total_drift,
            report,
        };
        self.ledger.finish_reconciliation(&run).await?;
        record_metrics(&run, started.elapsed());
        if run.drifts_found > 0 {
            tracing::warn!(run = run.id, drifts = run.drifts_found, repaired = run.accounts_repaired, total = %run.total_drift, "reconciliation found drift");
        } else {
            tracing::info!(run = run.id, accounts = run.accounts_checked, busy = run.accounts_busy, "reconciliation: no drift");
        }
        // The log keeps the database's own start time; read the run back as stored.
        Ok(self.ledger.reconciliations(64).await?.into_iter().find(|stored| stored.id == run_id).unwrap_or(run))
    }

    /// Reads every account and judges it, reading again (up to [`BUSY_RETRIES`] times) those
    /// that moved while being read. Writes nothing: `tollgate verify` runs this alone.
    ///
    /// # Errors
    /// A store could not be read.
    pub async fn judge(&self) -> StoreResult<Judgement> {
        let mut pass = self.pass(None).await?;
        let mut checked = pass.checked;
        let mut drifts = std::mem::take(&mut pass.drifts);
        for _ in 0..BUSY_RETRIES {
            if pass.busy.is_empty() {
                break;
            }
            tokio::time::sleep(BUSY_PAUSE).await;
            let busy = std::mem::take(&mut pass.busy);
            pass = self.pass(Some(&busy)).await?;
            checked += pass.checked;
            drifts.append(&mut pass.drifts);
        }
        Ok(Judgement { checked, drifts, busy: pass.busy })
    }

    /// Reads every account (or the ones named) once and judges those that held still.
    async fn pass(&self, accounts: Option<&[String]>) -> StoreResult<Pass> {
        let ids = match accounts {
            Some(accounts) => accounts.to_vec(),
            None => self.ledger.account_ids().await?,
        };
        let Some(hot) = self.hot else {
            let (totals, _) = self.ledger.ledger_snapshot(accounts, &[]).await?;
            let mut pass = Pass { checked: totals.len() as u64, ..Pass::default() };
            for totals in totals {
                if let Some(drift) = ledger_drift(&totals) {
                    pass.drifts.push((drift, None, totals));
                }
            }
            return Ok(pass);
        };

        let before = views_by_account(hot.hot_views(&ids).await?);
        let wanted: HashSet<&String> = ids.iter().collect();
        let unlogged: Vec<_> = hot.unlogged_charges().await?.into_iter().filter(|charge| wanted.contains(&charge.account_id)).collect();
        let pairs: Vec<(String, String)> = unlogged.iter().map(|charge| (charge.account_id.clone(), charge.request_id.clone())).collect();
        let (totals, charged) = self.ledger.ledger_snapshot(accounts, &pairs).await?;
        let after = views_by_account(hot.hot_views(&ids).await?);

        let mut pending_charges: HashMap<&str, Money> = HashMap::new();
        for charge in &unlogged {
            if !charged.contains(&(charge.account_id.clone(), charge.request_id.clone())) {
                let sum = pending_charges.entry(charge.account_id.as_str()).or_insert(Money::ZERO);
                *sum = sum.checked_add(charge.cost).ok_or(StoreError::Overflow("unlogged charges"))?;
            }
        }

        let mut pass = Pass::default();
        for totals in totals {
            let seen = match (before.get(&totals.account_id), after.get(&totals.account_id)) {
                (None, None) => None,
                (Some(first), Some(second)) if first.balance == second.balance && first.last_fund_seq == second.last_fund_seq => Some(second.clone()),
                _ => {
                    pass.busy.push(totals.account_id.clone());
                    continue;
                }
            };
            pass.checked += 1;
            if let Some(drift) = ledger_drift(&totals) {
                pass.drifts.push((drift, seen.clone(), totals.clone()));
            }
            let Some(seen) = seen else { continue };
            let pending = pending_charges.get(totals.account_id.as_str()).copied().unwrap_or(Money::ZERO);
            let unapplied = self.unapplied_funds(&totals, &seen).await?;
            let expected = totals
                .rebuilt
                .checked_sub(pending)
                .and_then(|balance| balance.checked_sub(unapplied))
                .ok_or(StoreError::Overflow("expected hot balance"))?;
            if seen.balance != expected {
                let amount = seen.balance.checked_sub(expected).ok_or(StoreError::Overflow("drift"))?;
                let drift = Drift { account_id: totals.account_id.clone(), kind: DriftKind::HotBalance, found: seen.balance, expected, amount, repaired: false, unrepaired_because: None };
                pass.drifts.push((drift, Some(seen), totals));
            }
        }
        Ok(pass)
    }

    /// Fund amounts the ledger had committed at the snapshot that the hot store has not applied.
    async fn unapplied_funds(&self, totals: &LedgerTotals, seen: &HotAccountView) -> StoreResult<Money> {
        if seen.last_fund_seq >= totals.last_fund_seq {
            return Ok(Money::ZERO);
        }
        let mut sum = Money::ZERO;
        for fund in self.ledger.fund_transactions_after(&totals.account_id, seen.last_fund_seq).await? {
            if fund.ledger_seq <= totals.ledger_seq {
                sum = sum.checked_add(fund.amount).ok_or(StoreError::Overflow("unapplied funds"))?;
            }
        }
        Ok(sum)
    }

    /// Repairs what can be repaired safely and records each repaired account in the ledger.
    async fn repair(
        &self,
        run_id: i64,
        drifts: Vec<(Drift, Option<HotAccountView>, LedgerTotals)>,
        repaired_accounts: &mut HashSet<String>,
    ) -> StoreResult<Vec<Drift>> {
        let mut reported = Vec::with_capacity(drifts.len());
        // Per account: the drifts found, and the ledger state they were found in.
        let mut notes: HashMap<String, (Vec<String>, LedgerTotals)> = HashMap::new();
        for (mut drift, seen, totals) in drifts {
            match drift.kind {
                DriftKind::LedgerBalance => drift.repaired = true,
                DriftKind::HotBalance => match (self.hot, seen) {
                    (Some(hot), Some(seen)) if seen.held.is_zero() => {
                        drift.repaired = hot.repair_balance(&seen, drift.expected).await?;
                        if !drift.repaired {
                            drift.unrepaired_because = Some("the account moved after it was read; the next run checks it again");
                        }
                    }
                    _ => drift.unrepaired_because = Some("the account holds funds for a request in flight; repaired when quiet"),
                },
            }
            if drift.repaired {
                let note = format!("{} {} found, {} expected", drift.kind.label(), drift.found, drift.expected);
                notes.entry(drift.account_id.clone()).or_insert_with(|| (Vec::new(), totals)).0.push(note);
            }
            reported.push(drift);
        }
        for (account_id, (found, totals)) in notes {
            let note = format!("reconciliation run {run_id}: {}", found.join("; "));
            if self.record_repair(run_id, &account_id, &totals, note).await? {
                repaired_accounts.insert(account_id);
            } else {
                // account_balance could not be set under its lock from a state we can explain.
                for drift in reported.iter_mut().filter(|drift| drift.account_id == account_id && drift.kind == DriftKind::LedgerBalance) {
                    drift.repaired = false;
                    drift.unrepaired_because = Some("the ledger kept moving; the next run repairs it");
                }
                if reported.iter().any(|drift| drift.account_id == account_id && drift.repaired) {
                    repaired_accounts.insert(account_id);
                }
            }
        }
        Ok(reported)
    }

    /// Writes the repair entry (and sets account_balance to the proven balance under its lock),
    /// from the state read, or from a fresh read while writers move the account.
    async fn record_repair(&self, run_id: i64, account_id: &str, totals: &LedgerTotals, note: String) -> StoreResult<bool> {
        let mut expected = (totals.balance, totals.ledger_seq);
        for _ in 0..REPAIR_ATTEMPTS {
            let repair = BalanceRepair {
                run_id,
                account_id: account_id.to_string(),
                expected_balance: expected.0,
                expected_ledger_seq: expected.1,
                note: note.clone(),
            };
            if self.ledger.repair_balance(&repair).await?.is_some() {
                return Ok(true);
            }
            match self.ledger.account_balance(account_id).await? {
                Some(current) => expected = (current.balance, current.ledger_seq),
                None => return Ok(false),
            }
        }
        Ok(false)
    }
}

fn ledger_drift(totals: &LedgerTotals) -> Option<Drift> {
    if totals.balance == totals.rebuilt {
        return None;
    }
    Some(Drift {
        account_id: totals.account_id.clone(),
        kind: DriftKind::LedgerBalance,
        found: totals.balance,
        expected: totals.rebuilt,
        amount: totals.balance.checked_sub(totals.rebuilt)?,
        repaired: false,
        unrepaired_because: None,
    })
}

fn views_by_account(views: Vec<Option<HotAccountView>>) -> HashMap<String, HotAccountView> {
    views.into_iter().flatten().map(|view| (view.account_id.clone(), view)).collect()
}

fn record_metrics(run: &ReconciliationRun, took: Duration) {
    metrics::gauge!("tollgate_reconciliation_drift").set(run.total_drift.nanos() as f64 / 1e9);
    metrics::gauge!("tollgate_reconciliation_drifted_accounts").set(run.drifts_found as f64);
    metrics::gauge!("tollgate_reconciliation_busy_accounts").set(run.accounts_busy as f64);
    metrics::gauge!("tollgate_reconciliation_last_run_timestamp_seconds").set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
    metrics::histogram!("tollgate_reconciliation_seconds").record(took.as_secs_f64());
    metrics::counter!("tollgate_reconciliation_repaired_accounts_total").increment(run.accounts_repaired);
}
