//! Charging in the PostgreSQL ledger (the opt-in mode for an unreachable hot store): the same
//! guarantees as the hot stores — no overspend under concurrency, one charge per request id,
//! holds released by settle and void — and stale accounts released only when no hold is open.
//! Runs against the server named by `TOLLGATE_TEST_POSTGRES_URL` (started by `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use tollgate_core::Money;
use tollgate_store::Ledger;
use tollgate_store::clock::system_clock;
use tollgate_store::hot::{Authorization, AuthorizeRequest, BudgetPeriod, Limits, Refusal};
use tollgate_store::ledger_charging::LedgerCharging;
use tollgate_store::memory::MemoryHotStore;
use tollgate_store::model::{RequestStatus, UsageEvent};
use tollgate_store::postgres::PgLedger;
use tollgate_store::queue::channel_log;
use tollgate_store::verify::check_account;

mod support;
use support::{fresh_postgres_url, funded_account};

const TENTH: i64 = 100_000_000;

async fn ledger_with_account(nanos: i64) -> (PgLedger, LedgerCharging) {
    let ledger = PgLedger::connect(&fresh_postgres_url("charging").await, 8).await.unwrap();
    funded_account(&ledger, "a", nanos).await;
    let charging = LedgerCharging::new(ledger.pool().clone());
    (ledger, charging)
}

fn request(request_id: &str, hold: i64, limits: Limits) -> AuthorizeRequest {
    AuthorizeRequest {
        account_id: "a".into(),
        api_key_id: "key".into(),
        request_id: request_id.into(),
        hold: Money::from_nanos(hold),
        hold_tokens: 10,
        limits,
        hold_ttl_ms: 60_000,
    }
}

/// A usage event of account `a`.
fn event(request_id: &str, cost: i64, status: RequestStatus) -> UsageEvent {
    support::event("a", request_id, cost, status)
}

async fn authorize(charging: &LedgerCharging, request: &AuthorizeRequest) -> Authorization {
    charging.authorize(request, false).await.unwrap().expect("an unconditional authorize decides")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_authorizes_never_hold_more_than_the_balance() {
    let (ledger, charging) = ledger_with_account(10 * TENTH).await;
    let attempts: Vec<_> = (0..20)
        .map(|index| {
            let charging = charging.clone();
            tokio::spawn(async move { authorize(&charging, &request(&format!("r{index}"), TENTH, Limits::default())).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for attempt in attempts {
        outcomes.push(attempt.await.unwrap());
    }
    let held = outcomes.iter().filter(|outcome| matches!(outcome, Authorization::Held { .. })).count();
    let refused = outcomes.iter().filter(|outcome| matches!(outcome, Authorization::Refused(Refusal::InsufficientBalance { .. }))).count();
    assert_eq!((held, refused), (10, 10), "{outcomes:?}");
    let view = charging.balance_view("a", "key").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held), (Money::from_nanos(10 * TENTH), Money::from_nanos(10 * TENTH)));
    assert!(check_account(&ledger, "a").await.unwrap().is_sound());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_held_once_and_charged_once() {
    let (ledger, charging) = ledger_with_account(10 * TENTH).await;
    assert!(matches!(authorize(&charging, &request("r", TENTH, Limits::default())).await, Authorization::Held { .. }));
    assert_eq!(authorize(&charging, &request("r", TENTH, Limits::default())).await, Authorization::Refused(Refusal::InProgress));

    let settled = charging.settle(&event("r", TENTH / 2, RequestStatus::Success)).await.unwrap();
    assert_eq!((settled.balance_before, settled.balance_after, settled.already_settled), (Money::from_nanos(10 * TENTH), Money::from_nanos(19 * TENTH / 2), false));
    let again = charging.settle(&event("r", TENTH / 2, RequestStatus::Success)).await.unwrap();
    assert!(again.already_settled, "a second settle charges nothing");
    assert_eq!(authorize(&charging, &request("r", TENTH, Limits::default())).await, Authorization::Refused(Refusal::AlreadyCharged));

    // A voided request releases its hold and may be retried.
    assert!(matches!(authorize(&charging, &request("v", TENTH, Limits::default())).await, Authorization::Held { .. }));
    charging.void(&event("v", 0, RequestStatus::Failed)).await.unwrap();
    assert!(matches!(authorize(&charging, &request("v", TENTH, Limits::default())).await, Authorization::Held { .. }));

    let view = charging.balance_view("a", "key").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held), (Money::from_nanos(19 * TENTH / 2), Money::from_nanos(TENTH)));
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(19 * TENTH / 2));
    assert!(check_account(&ledger, "a").await.unwrap().is_sound());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_budgets_count_open_holds() {
    let (_ledger, charging) = ledger_with_account(10 * TENTH).await;
    let limits = Limits { key_budget_total: Some(Money::from_nanos(3 * TENTH / 2)), ..Limits::default() };
    assert!(matches!(authorize(&charging, &request("one", TENTH, limits.clone())).await, Authorization::Held { .. }));
    assert_eq!(
        authorize(&charging, &request("two", TENTH, limits)).await,
        Authorization::Refused(Refusal::KeyBudgetExceeded { period: BudgetPeriod::Total, retry_after_secs: None })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_account_is_released_only_when_no_hold_is_open() {
    let (_ledger, charging) = ledger_with_account(10 * TENTH).await;
    let (sender, _log) = channel_log(16);
    let hot = Arc::new(MemoryHotStore::new(sender, system_clock()));
    // Not stale yet: a conditional authorize leaves it to the hot store.
    assert_eq!(charging.authorize(&request("x", TENTH, Limits::default()), true).await.unwrap(), None);

    assert!(matches!(authorize(&charging, &request("r", TENTH, Limits::default())).await, Authorization::Held { .. }));
    assert_eq!(charging.stale_accounts().await.unwrap(), vec!["a".to_string()]);
    assert!(!charging.release_stale("a", &*hot).await.unwrap(), "a hold is open: its settle will charge the ledger");
    // Stale: a conditional authorize is decided in the ledger.
    assert!(charging.authorize(&request("y", TENTH, Limits::default()), true).await.unwrap().is_some());

    charging.settle(&event("r", TENTH, RequestStatus::Success)).await.unwrap();
    charging.void(&event("y", 0, RequestStatus::Failed)).await.unwrap();
    assert!(charging.release_stale("a", &*hot).await.unwrap());
    assert!(charging.stale_accounts().await.unwrap().is_empty());
}
