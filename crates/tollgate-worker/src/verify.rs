//! `tollgate verify`: the proof, once the system is quiet, that no charge was lost or doubled
//! and that every balance agrees, read from the ledger and the hot store alone (it writes
//! nothing).
//!
//! - I1 (exactly once): no request id has two charged rows (`doubled`); given the request ids
//!   clients saw succeed, each has its charged row (`lost`), at the cost the client expected
//!   when it says one (`wrong amount`).
//! - I2 (conservation): for every account, account_balance = Σ fund − Σ usage, and the hot
//!   balance agrees once the usage log is drained (reconciliation's comparison, read-only).
//! - I3 (no hold outlives its request): nothing is held once quiet.
//! - I4 (audit chain): every row's balance_before is the previous row's balance_after.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use serde::Serialize;
use tollgate_core::Money;
use tollgate_store::operations::charges_not_in_ledger;
use tollgate_store::verify::check_account;
use tollgate_store::{HotStore, Ledger, StoreError, StoreResult};

use crate::reconcile::Reconciler;

/// Lost request ids listed by name in a report; the count covers all of them.
const LISTED_MAX: usize = 20;

/// A request a client saw served: the account it was charged to, its id and, when the client
/// can tell (a deterministic request at known prices), what it must have cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedRequest {
    pub account_id: String,
    pub request_id: String,
    pub expected_cost: Option<Money>,
}

/// What `verify` found. Sound when every count below `accounts` is zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub accounts: u64,
    pub usage_rows: u64,
    /// Request ids the caller said were served and charged (absent: not checked).
    pub client_charged: Option<u64>,
    /// Of those, the ones without a charged row in the ledger.
    pub lost: u64,
    /// Of those with an expected cost, the ones charged another amount (an estimate where the
    /// response was served whole, a disconnect's partial charge, a wrong price).
    pub wrong_amount: u64,
    /// Request ids with more than one charged row.
    pub doubled: u64,
    /// Rows whose balance_before is not the previous row's balance_after.
    pub chain_breaks: u64,
    /// Accounts whose account_balance or hot balance disagrees with the rows.
    pub drifted_accounts: u64,
    /// The largest |drift| of any balance, in currency units.
    pub max_drift: Money,
    /// Σ held in the hot store (zero once no request is in flight).
    pub held: Money,
    /// Charges made in the hot store whose usage events the ledger does not have yet.
    pub queued_events: u64,
    /// Loaded accounts whose hot balance lacks a fund transaction the ledger committed (a
    /// top-up the customer cannot spend yet).
    pub unapplied_funds: u64,
    /// Accounts that kept changing while read: the system was not quiet.
    pub busy_accounts: u64,
    /// A few of the lost, doubled and wrongly charged request ids and of the chain breaks, for
    /// the operator to look up.
    pub examples: Vec<String>,
}

impl VerifyReport {
    fn example(&mut self, text: String) {
        if self.examples.len() < LISTED_MAX {
            self.examples.push(text);
        }
    }

    pub fn is_sound(&self) -> bool {
        self.lost == 0
            && self.wrong_amount == 0
            && self.doubled == 0
            && self.chain_breaks == 0
            && self.drifted_accounts == 0
            && self.held == Money::ZERO
            && self.queued_events == 0
            && self.unapplied_funds == 0
            && self.busy_accounts == 0
    }

    /// The report as a two-column table, one figure per line.
    pub fn table(&self) -> String {
        let client = self.client_charged.map_or_else(|| "not given".to_string(), |count| count.to_string());
        let rows = [
            ("accounts checked", self.accounts.to_string()),
            ("usage rows", self.usage_rows.to_string()),
            ("charged per the client", client),
            ("lost (I1)", self.lost.to_string()),
            ("charged a wrong amount", self.wrong_amount.to_string()),
            ("doubled (I1)", self.doubled.to_string()),
            ("drifted accounts (I2)", self.drifted_accounts.to_string()),
            ("max drift (I2)", self.max_drift.to_string()),
            ("held (I3)", self.held.to_string()),
            ("chain breaks (I4)", self.chain_breaks.to_string()),
            ("events still queued", self.queued_events.to_string()),
            ("funds not applied", self.unapplied_funds.to_string()),
            ("accounts still moving", self.busy_accounts.to_string()),
            ("verdict", if self.is_sound() { "sound".to_string() } else { "NOT SOUND".to_string() }),
        ];
        let mut out = String::new();
        for (name, value) in rows {
            out.push_str(&format!("{name:<26} {value}\n"));
        }
        for example in &self.examples {
            out.push_str(&format!("  {example}\n"));
        }
        out
    }
}

/// Verifies every account. `served` lists the requests a client saw served and charged; `hot`
/// is the hot store when the caller can reach it (services mode).
///
/// # Errors
/// A store could not be read.
pub async fn verify(ledger: &dyn Ledger, hot: Option<&dyn HotStore>, served: Option<&[ServedRequest]>) -> StoreResult<VerifyReport> {
    let mut report = VerifyReport { client_charged: served.map(|served| served.len() as u64), ..VerifyReport::default() };
    let mut served_by_account: BTreeMap<&str, Vec<&ServedRequest>> = BTreeMap::new();
    for request in served.unwrap_or_default() {
        served_by_account.entry(&request.account_id).or_default().push(request);
    }
    let account_ids = ledger.account_ids().await?;
    report.accounts = account_ids.len() as u64;
    for account_id in &account_ids {
        let check = check_account(ledger, account_id).await?;
        report.chain_breaks += check.chain_breaks.len() as u64;
        for seq in &check.chain_breaks {
            report.example(format!("chain break: {account_id} at ledger_seq {seq}"));
        }
        report.doubled += check.duplicate_request_ids.len() as u64;
        for request_id in &check.duplicate_request_ids {
            report.example(format!("doubled: {account_id} {request_id}"));
        }
        report.usage_rows += check.usage_rows;
        for request in served_by_account.remove(account_id.as_str()).unwrap_or_default() {
            match (check.charged.get(&request.request_id), request.expected_cost) {
                (None, _) => {
                    report.lost += 1;
                    report.example(format!("lost: {account_id} {}", request.request_id));
                }
                (Some(cost), Some(expected)) if *cost != expected => {
                    report.wrong_amount += 1;
                    report.example(format!("wrong amount: {account_id} {} charged {cost}, expected {expected}", request.request_id));
                }
                (Some(_), _) => {}
            }
        }
    }
    // Served for accounts the ledger does not have at all.
    for request in served_by_account.into_values().flatten() {
        report.lost += 1;
        report.example(format!("lost: {} {} (no such account)", request.account_id, request.request_id));
    }

    // I2 across the stores, exactly as reconciliation judges it (read-only here).
    let judgement = Reconciler { ledger, hot, hot_store_name: "verify" }.judge().await?;
    report.busy_accounts = judgement.busy.len() as u64;
    let mut drifted = HashSet::new();
    for (drift, _, _) in &judgement.drifts {
        drifted.insert(drift.account_id.clone());
        let size = if drift.amount.is_negative() { drift.amount.checked_neg() } else { Some(drift.amount) };
        let size = size.ok_or(StoreError::Overflow("drift"))?;
        report.max_drift = report.max_drift.max(size);
    }
    report.drifted_accounts = drifted.len() as u64;

    if let Some(hot) = hot {
        for view in hot.hot_views(&account_ids).await?.into_iter().flatten() {
            report.held = report.held.checked_add(view.held).ok_or(StoreError::Overflow("held"))?;
            let ledger_fund_seq = ledger.account_balance(&view.account_id).await?.map_or(0, |balance| balance.last_fund_seq);
            if view.last_fund_seq < ledger_fund_seq {
                report.unapplied_funds += 1;
                report.example(format!("fund not applied: {} (hot at fund seq {}, ledger at {ledger_fund_seq})", view.account_id, view.last_fund_seq));
            }
        }
        report.queued_events = charges_not_in_ledger(ledger, hot).await?.len() as u64;
    }
    Ok(report)
}

/// Parses a list of served requests: one `ACCOUNT_ID REQUEST_ID [EXPECTED_COST]` per line, the
/// cost in currency units as the API writes money (blank lines and `#` comments skipped).
///
/// # Errors
/// A line with too few or too many fields, or a cost that is not an amount, named by its number.
pub fn parse_charged_list(text: &str) -> Result<Vec<ServedRequest>, String> {
    let mut served = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (account_id, request_id, cost) = match fields[..] {
            [account_id, request_id] => (account_id, request_id, None),
            [account_id, request_id, cost] => (account_id, request_id, Some(cost)),
            _ => return Err(format!("line {}: expected `ACCOUNT_ID REQUEST_ID [EXPECTED_COST]`, got {line:?}", index + 1)),
        };
        let expected_cost = cost
            .map(|cost| Money::from_str(cost).map_err(|error| format!("line {}: expected cost {cost:?}: {error}", index + 1)))
            .transpose()?;
        served.push(ServedRequest { account_id: account_id.to_string(), request_id: request_id.to_string(), expected_cost });
    }
    Ok(served)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn charged_lists_are_pairs_per_line_with_an_optional_cost() {
        let served = parse_charged_list("# served\nacct_1 req-1\n\n  acct_2   req-2  0.000123 \n").unwrap();
        let request = |account: &str, request: &str, cost: Option<Money>| ServedRequest { account_id: account.into(), request_id: request.into(), expected_cost: cost };
        assert_eq!(served, vec![request("acct_1", "req-1", None), request("acct_2", "req-2", Some(Money::from_nanos(123_000)))]);
        assert_eq!(parse_charged_list("acct_1\n").unwrap_err(), "line 1: expected `ACCOUNT_ID REQUEST_ID [EXPECTED_COST]`, got \"acct_1\"");
        assert!(parse_charged_list("a b c d").is_err());
        assert!(parse_charged_list("a b 1.2.3").unwrap_err().starts_with("line 1: expected cost \"1.2.3\""));
    }

    #[test]
    fn a_report_is_sound_only_when_nothing_is_off() {
        let sound = VerifyReport { accounts: 3, usage_rows: 10, client_charged: Some(10), ..VerifyReport::default() };
        assert!(sound.is_sound());
        assert!(sound.table().contains("verdict                    sound"));
        for broken in [
            VerifyReport { lost: 1, ..sound.clone() },
            VerifyReport { wrong_amount: 1, ..sound.clone() },
            VerifyReport { doubled: 1, ..sound.clone() },
            VerifyReport { chain_breaks: 1, ..sound.clone() },
            VerifyReport { drifted_accounts: 1, ..sound.clone() },
            VerifyReport { held: Money::from_nanos(1), ..sound.clone() },
            VerifyReport { queued_events: 1, ..sound.clone() },
            VerifyReport { unapplied_funds: 1, ..sound.clone() },
            VerifyReport { busy_accounts: 1, ..sound.clone() },
        ] {
            assert!(!broken.is_sound(), "{broken:?}");
            assert!(broken.table().contains("NOT SOUND"));
        }
    }
}
