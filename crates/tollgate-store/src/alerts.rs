//! The events a money change tells the outside world, decided inside its transaction and
//! queued in the outbox there (so a rolled-back change leaves none):
//!
//! - `fund.posted`: a deposit, refund or adjustment moved a balance;
//! - `balance.low`: a balance went from at or above the account's `low_balance_threshold` to
//!   below it — once per crossing (it must climb back to the threshold to cross again);
//! - `key.budget`: a key's spend in a budget period reached [`KEY_BUDGET_ALERT_PERCENTS`] of
//!   its budget — once per period and percentage.
//!
//! Each event has a dedupe key naming its crossing, unique in the outbox: a crossing is queued
//! at most once. The counters behind `key.budget` are `spend_counters`, kept in the same
//! transaction as the usage rows.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;
use time::OffsetDateTime;
use tollgate_core::Money;

use crate::clock::Periods;
use crate::error::{StoreError, StoreResult};
use crate::hot::{CounterSeed, KeySpendSeed};
use crate::model::{FundTransaction, RequestStatus, UsageEvent};

/// Percentages of a key budget whose crossing is an alert.
pub const KEY_BUDGET_ALERT_PERCENTS: [i64; 2] = [80, 100];

/// An event to queue in the outbox of the current transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingEvent {
    pub event_type: &'static str,
    pub account_id: String,
    pub dedupe_key: String,
    pub payload: serde_json::Value,
}

pub(crate) fn fund_posted(fund: &FundTransaction) -> Option<PendingEvent> {
    // A zero entry (a reconciliation's record) moved no money.
    if fund.amount.is_zero() {
        return None;
    }
    Some(PendingEvent {
        event_type: "fund.posted",
        account_id: fund.account_id.clone(),
        dedupe_key: format!("fund.posted:{}:{}", fund.account_id, fund.ledger_seq),
        payload: json!({
            "account_id": fund.account_id, "kind": fund.kind.as_str(), "amount": fund.amount,
            "balance_before": fund.balance_before, "balance_after": fund.balance_after,
            "ledger_seq": fund.ledger_seq, "reference_id": fund.reference_id,
        }),
    })
}

/// `balance.low` if the balance crossed the threshold downwards between `before` and `after`
/// (the position after the change is `ledger_seq`).
pub(crate) fn balance_low(account_id: &str, threshold: Money, before: Money, after: Money, ledger_seq: i64) -> Option<PendingEvent> {
    if !(before >= threshold && after < threshold) {
        return None;
    }
    Some(PendingEvent {
        event_type: "balance.low",
        account_id: account_id.to_string(),
        dedupe_key: format!("balance.low:{account_id}:{ledger_seq}"),
        payload: json!({"account_id": account_id, "threshold": threshold, "balance": after, "ledger_seq": ledger_seq}),
    })
}

/// A spend counter: (scope, owner id, period) with scope `account` or `key` and period `total`,
/// `YYYY-MM` or `YYYY-MM-DD` (UTC, the hot store's budget periods).
pub type SpendKey = (&'static str, String, String);

/// Requests and spend to add per counter for the rows a batch inserted.
pub(crate) fn spend_deltas(inserted: &[&UsageEvent]) -> StoreResult<BTreeMap<SpendKey, (i64, i64)>> {
    let mut deltas: BTreeMap<SpendKey, (i64, i64)> = BTreeMap::new();
    for event in inserted.iter().filter(|event| event.status != RequestStatus::Failed) {
        let (day, month) = period_labels(event.created_at_ms)
            .ok_or_else(|| StoreError::Invalid(format!("usage event {} has an impossible time", event.request_id)))?;
        for (scope, owner) in [("account", &event.account_id), ("key", &event.api_key_id)] {
            for period in ["total".to_string(), month.clone(), day.clone()] {
                let delta = deltas.entry((scope, owner.clone(), period)).or_insert((0, 0));
                delta.0 += 1;
                delta.1 = delta.1.checked_add(event.cost.nanos()).ok_or(StoreError::Overflow("spend counter"))?;
            }
        }
    }
    Ok(deltas)
}

/// The day (`YYYY-MM-DD`) and month (`YYYY-MM`) labels of a moment (UTC).
pub(crate) fn period_labels(at_ms: i64) -> Option<(String, String)> {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000).ok()?;
    let day = format!("{:04}-{:02}-{:02}", at.year(), u8::from(at.month()), at.day());
    let month = day[..7].to_string();
    Some((day, month))
}

/// The SQL reading an account's counters and its keys' for a day, a month and `total`; binds
/// day, month, account id, account id; rows are (scope, owner_id, period, requests, spent).
pub(crate) const SPEND_COUNTERS_OF_ACCOUNT: &str = "SELECT scope, owner_id, period, requests, spent FROM spend_counters
     WHERE period IN (?, ?, 'total')
       AND ((scope = 'account' AND owner_id = ?) OR (scope = 'key' AND owner_id IN (SELECT id FROM api_keys WHERE account_id = ?)))";

/// A [`CounterSeed`] for the periods of `at_ms` from the rows of [`SPEND_COUNTERS_OF_ACCOUNT`].
pub(crate) fn counter_seed(at_ms: i64, day: &str, month: &str, rows: Vec<(String, String, String, i64, i64)>) -> CounterSeed {
    let periods = Periods::at(at_ms);
    let mut seed = CounterSeed { day: periods.day, month: periods.month, ..CounterSeed::default() };
    let count = |value: i64| u64::try_from(value).unwrap_or(0);
    for (scope, owner, period, requests, spent) in rows {
        if scope == "account" {
            if period == day {
                seed.requests_today = count(requests);
            } else if period == month {
                seed.requests_this_month = count(requests);
            }
            continue;
        }
        let position = match seed.keys.iter().position(|key| key.api_key_id == owner) {
            Some(position) => position,
            None => {
                seed.keys.push(KeySpendSeed { api_key_id: owner, ..KeySpendSeed::default() });
                seed.keys.len() - 1
            }
        };
        let key = &mut seed.keys[position];
        let spent = Money::from_nanos(spent);
        if period == day {
            key.spent_today = spent;
        } else if period == month {
            key.spent_this_month = spent;
        } else {
            key.spent_total = spent;
        }
    }
    seed
}

/// The alerts a usage batch raises, from what its statements read back: `counters` are the
/// upserted counters after the batch (scope, owner id, period, spent), `budgets` the budgets of
/// its keys that have any, `thresholds` the low-balance thresholds of its accounts that have
/// one, and `starts`/`ends` the accounts' positions before and after it.
pub(crate) fn usage_batch_alerts(
    deltas: &BTreeMap<SpendKey, (i64, i64)>,
    counters: &[(String, String, String, i64)],
    budgets: &[KeyBudgets],
    thresholds: &[(String, Money)],
    starts: &HashMap<&str, (Money, i64)>,
    ends: &HashMap<&str, (Money, i64)>,
) -> StoreResult<Vec<PendingEvent>> {
    let mut events = Vec::new();
    for (scope, owner, period, after) in counters {
        let Some(key) = budgets.iter().find(|budgets| scope == "key" && budgets.key_id == *owner) else { continue };
        let delta = deltas.get(&("key", owner.clone(), period.clone())).map_or(0, |delta| delta.1);
        let before = after.checked_sub(delta).ok_or(StoreError::Overflow("spend counter"))?;
        events.extend(budget_alerts(key, period, before, *after));
    }
    for (account_id, threshold) in thresholds {
        if let (Some(start), Some(end)) = (starts.get(account_id.as_str()), ends.get(account_id.as_str())) {
            events.extend(balance_low(account_id, *threshold, start.0, end.0, end.1));
        }
    }
    Ok(events)
}

/// A key's budgets, as the ledger holds them.
pub(crate) struct KeyBudgets {
    pub key_id: String,
    pub account_id: String,
    pub daily: Option<Money>,
    pub monthly: Option<Money>,
    pub total: Option<Money>,
}

/// The `key.budget` alerts of one counter of the key moving from `before` to `after` (nanos).
pub(crate) fn budget_alerts(budgets: &KeyBudgets, period: &str, before: i64, after: i64) -> Vec<PendingEvent> {
    let (name, budget) = match period.len() {
        5 => ("total", budgets.total),
        7 => ("monthly", budgets.monthly),
        _ => ("daily", budgets.daily),
    };
    let Some(budget) = budget.filter(|budget| budget.is_positive()) else { return Vec::new() };
    KEY_BUDGET_ALERT_PERCENTS
        .iter()
        .filter_map(|&percent| {
            let line = i128::from(budget.nanos()) * i128::from(percent) / 100;
            (i128::from(before) < line && i128::from(after) >= line).then(|| PendingEvent {
                event_type: "key.budget",
                account_id: budgets.account_id.clone(),
                dedupe_key: format!("key.budget:{}:{period}:{percent}", budgets.key_id),
                payload: json!({
                    "account_id": budgets.account_id, "api_key_id": budgets.key_id, "budget": name, "period": period,
                    "percent": percent, "limit": budget, "spent": Money::from_nanos(after),
                }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balance_alert_fires_only_on_the_way_down_through_the_threshold() {
        let threshold = Money::from_nanos(100);
        assert!(balance_low("a", threshold, Money::from_nanos(150), Money::from_nanos(99), 7).is_some());
        assert!(balance_low("a", threshold, Money::from_nanos(100), Money::from_nanos(99), 7).is_some());
        assert!(balance_low("a", threshold, Money::from_nanos(99), Money::from_nanos(50), 7).is_none(), "already below");
        assert!(balance_low("a", threshold, Money::from_nanos(50), Money::from_nanos(150), 7).is_none(), "going up");
        assert!(balance_low("a", threshold, Money::from_nanos(150), Money::from_nanos(100), 7).is_none(), "at the threshold is not below");
    }

    #[test]
    fn budget_alerts_name_each_percentage_crossed_once() {
        let budgets = KeyBudgets { key_id: "k".into(), account_id: "a".into(), daily: Some(Money::from_nanos(1_000)), monthly: None, total: None };
        let crossed = |before, after| budget_alerts(&budgets, "2026-11-25", before, after).into_iter().map(|event| event.payload["percent"].as_i64().unwrap_or(0)).collect::<Vec<_>>();
        assert_eq!(crossed(0, 799), Vec::<i64>::new());
        assert_eq!(crossed(0, 800), vec![80]);
        assert_eq!(crossed(790, 1_000), vec![80, 100]);
        assert_eq!(crossed(800, 999), Vec::<i64>::new());
        assert!(budget_alerts(&budgets, "2026-11", 0, 5_000).is_empty(), "no monthly budget");
    }
}
