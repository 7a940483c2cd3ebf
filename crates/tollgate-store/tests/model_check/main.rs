//! A model-based checker of the charge protocol at the store level (TigerBeetle's VOPR in
//! spirit; issue 19 item 4).
//!
//! - `model.rs`: the reference model — accounts, keys, holds, budgets, fund operations, the
//!   usage log and the ledger — written from DESIGN.md's rules, in plain data structures.
//! - `ops.rs`: the operations, their families (each can be switched off while its fix is in
//!   flight) and the seeded generator (splitmix64: a seed names the same run for good).
//! - `system.rs`: the hot store + ledger pair under test, driven through the public API only,
//!   with a worker of our own that writes the usage log by the usage writer's rules.
//! - this file: the runner, which steps model and system together and compares after every
//!   step (balances, held, key held and spent, request counters, unlogged charges, the ledger's
//!   balance) and at every quiet point (I1, I2, I4, from the ledger's own rows), and shrinks a
//!   failing sequence to the shortest that still fails the same rule.
//!
//! Pairs: in-process + SQLite; Redis + PostgreSQL; Redis Cluster + PostgreSQL (both need the
//! servers `scripts/test` starts; without them these tests fail, they do not skip).
//!
//! CI (`scripts/test` runs every test target) runs 300 seeds in-process and 100 on each Redis
//! pair, 60 operations each; a long run is by hand, e.g. `TOLLGATE_MODEL_SEEDS=5000
//! TOLLGATE_MODEL_SEED=1000 cargo test --release -p tollgate-store --test model_check`.
//!
//! Environment: `TOLLGATE_MODEL_SEEDS` (seeds per pair), `TOLLGATE_MODEL_SEED` (the first),
//! `TOLLGATE_MODEL_STEPS` (operations per seed), `TOLLGATE_MODEL_FAMILIES` (`all`, or a comma
//! list of the switched-off families to run: see `ops::Families`), `TOLLGATE_MODEL_KEEP_GOING`
//! (report every failing rule instead of stopping at the first), `TOLLGATE_MODEL_SHRINK_SECS`
//! (how long shrinking may take, 120 s by default).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod model;
mod ops;
#[path = "../support/mod.rs"]
mod support;
mod system;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::Money;
use tollgate_store::hot::{Authorization, AuthorizeRequest, FundApplication, Limits, Refusal, WithdrawalHold, withdrawal_id};
use tollgate_store::model::{FundKind, LedgerEntry, NewFund, RecordOutcome, RequestStatus};
use tollgate_store::postgres::PgLedger;
use tollgate_store::sqlite::SqliteLedger;
use tollgate_store::{Ledger, StoreError};

use model::{AuthorizeOutcome, Event, Model, ModelLimits, SettleOutcome, WithdrawOutcome};
use ops::{ACCOUNTS, Families, KEYS_PER_ACCOUNT, Op};
use system::{LONG_TTL_MS, System};

/// Where a run broke: the step, the rule, what differed.
#[derive(Clone, Debug)]
struct Failure {
    step: usize,
    rule: &'static str,
    detail: String,
}

/// What a passing run did, for the summary.
#[derive(Clone, Debug, Default)]
struct Stats {
    steps: u64,
    skipped: u64,
    hold_exceeded: u64,
    quiet_checks: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.skipped += other.skipped;
        self.hold_exceeded += other.hold_exceeded;
        self.quiet_checks += other.quiet_checks;
    }
}

/// A hot store + ledger pair: makes a fresh system per run over one shared ledger.
#[derive(Clone)]
enum Pair {
    Memory { ledger: Arc<dyn Ledger> },
    Redis { ledger: Arc<dyn Ledger>, url: String },
}

impl Pair {
    async fn system(&self) -> System {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        match self {
            Pair::Memory { ledger } => System::memory(Arc::clone(ledger), tag).await,
            Pair::Redis { ledger, url } => System::redis(Arc::clone(ledger), tag, url).await,
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn account_name(account: usize) -> String {
    format!("a{account}")
}

fn key_name(key: usize) -> String {
    format!("k{key}")
}

fn request_name(request: u32) -> String {
    format!("r{request}")
}

fn fail(step: usize, rule: &'static str, detail: String) -> Failure {
    Failure { step, rule, detail }
}

/// Runs `ops` against a fresh system and the model in lockstep; the first difference fails.
async fn run(pair: &Pair, ops: &[Op], families: Families) -> Result<Stats, Failure> {
    let mut system = pair.system().await;
    let accounts: Vec<String> = (0..ACCOUNTS).map(account_name).collect();
    let keys: Vec<String> = (0..KEYS_PER_ACCOUNT).map(key_name).collect();
    system.create(&accounts, &keys).await.map_err(|error| fail(0, "setup", error.to_string()))?;
    let mut model = Model::new(&accounts);
    model.late_settle_counts_request = families.late_settle_counts_request;
    let mut written: Vec<(String, Event)> = Vec::new();
    let mut stats = Stats::default();
    let mut credit_max = 0;
    for (step, op) in ops.iter().enumerate() {
        if skipped(op, &model, families, system.is_memory()) {
            stats.skipped += 1;
            continue;
        }
        stats.steps += 1;
        if let Op::Authorize { limits, .. } = op {
            credit_max = credit_max.max(limits.credit);
        }
        apply(&mut system, &mut model, &mut written, op).await.map_err(|(rule, detail)| fail(step, rule, detail))?;
        if system.is_memory() {
            // The in-process log is written as it fills (settles wait for their commit).
            written.extend(model.drain());
        }
        compare_state(&system, &model, touched(op)).await.map_err(|(rule, detail)| fail(step, rule, detail))?;
        model.check_no_overspend(credit_max).map_err(|detail| fail(step, "I3 no overspend", detail))?;
        if matches!(op, Op::Drain | Op::Unload { .. }) || (system.is_memory() && step % 8 == 0) {
            stats.quiet_checks += 1;
            compare_ledger(&system, &model).await.map_err(|(rule, detail)| fail(step, rule, detail))?;
        }
    }
    // Quiet at the end: the worker catches up, then everything is compared.
    let end = ops.len();
    model.drain();
    system.drain().await.map_err(|error| fail(end, "drain", error.to_string()))?;
    compare_state(&system, &model, None).await.map_err(|(rule, detail)| fail(end, rule, detail))?;
    compare_ledger(&system, &model).await.map_err(|(rule, detail)| fail(end, rule, detail))?;
    stats.quiet_checks += 1;
    stats.hold_exceeded = model.accounts.values().map(|account| account.hold_exceeded).sum();
    Ok(stats)
}

/// Whether an operation is left out: meaningless in this state, not on this backend, or in a
/// switched-off family where it would reach a known bug.
fn skipped(op: &Op, model: &Model, families: Families, memory: bool) -> bool {
    let account = |index: &usize| model.account(&account_name(*index));
    match op {
        Op::Settle { account: index, key, request, poison, cost } => {
            let other_key = account(index).holds.get(&request_name(*request)).is_some_and(|hold| hold.key != key_name(*key));
            (other_key && !families.settle_under_other_key)
                || (*poison && memory && !families.embedded_dead_letters)
                || (*cost == 0 && !memory && !families.zero_amounts_on_redis)
        }
        Op::Withdraw { account: index, amount, .. } => {
            let state = account(index);
            !families.funds_out_beyond_free && (state.held != 0 || state.unlogged().next().is_some() || *amount > state.free_funds())
        }
        Op::ReapplyFund { account: index } => account(index).last_fund_seq == 0,
        Op::Unload { account: index } => {
            let state = account(index);
            !state.loaded
                || (!state.holds.is_empty() && !families.unload_with_open_holds)
                || (state.log.iter().any(|event| event.poison || event.delivered.is_some()) || !state.dead.is_empty()) && !families.reload_with_dead_letters
        }
        Op::Authorize { hold, .. } => *hold == 0 && !memory && !families.zero_amounts_on_redis,
        Op::Load { account: index } => account(index).loaded,
        Op::Restart => memory && model.accounts.values().any(|state| !state.dead.is_empty()) && !families.embedded_dead_letters,
        Op::Crash { .. } => memory,
        Op::ReclaimPark => {
            let logs = || model.accounts.values().flat_map(|state| state.log.iter());
            memory || !families.reclaim_parking || logs().next().is_none() || logs().any(|event| event.delivered.is_none())
        }
        _ => false,
    }
}

type Broken = (&'static str, String);

fn limits_of(limits: &ModelLimits) -> Limits {
    Limits {
        credit_limit: Money::from_nanos(limits.credit),
        daily_request_quota: limits.daily_quota,
        monthly_request_quota: limits.monthly_quota,
        key_budget_daily: limits.budget_daily.map(Money::from_nanos),
        key_budget_monthly: limits.budget_monthly.map(Money::from_nanos),
        key_budget_total: limits.budget_total.map(Money::from_nanos),
        key_requests_per_minute: None,
        key_tokens_per_minute: None,
    }
}

fn outcome_of(authorization: &Authorization) -> Result<AuthorizeOutcome, String> {
    Ok(match authorization {
        Authorization::Held { available_after } => AuthorizeOutcome::Held { available_after: available_after.nanos() },
        Authorization::Refused(Refusal::AccountNotLoaded) => AuthorizeOutcome::NotLoaded,
        Authorization::Refused(Refusal::AlreadyCharged) => AuthorizeOutcome::AlreadyCharged,
        Authorization::Refused(Refusal::InProgress) => AuthorizeOutcome::InProgress,
        Authorization::Refused(Refusal::DailyQuotaExceeded { .. }) => AuthorizeOutcome::DailyQuota,
        Authorization::Refused(Refusal::MonthlyQuotaExceeded { .. }) => AuthorizeOutcome::MonthlyQuota,
        Authorization::Refused(Refusal::KeyBudgetExceeded { period, .. }) => AuthorizeOutcome::Budget(period.as_str()),
        Authorization::Refused(Refusal::InsufficientBalance { available, required }) => {
            AuthorizeOutcome::Insufficient { available: available.nanos(), required: required.nanos() }
        }
        Authorization::Refused(other) => return Err(format!("unexpected refusal {other:?}")),
    })
}

fn store_error(what: &'static str) -> impl Fn(StoreError) -> Broken {
    move |error| (what, format!("store error: {error}"))
}

/// One operation on the model and on the system; the answers must agree.
async fn apply(system: &mut System, model: &mut Model, written: &mut Vec<(String, Event)>, op: &Op) -> Result<(), Broken> {
    match op {
        Op::Authorize { account, key, request, hold, limits, short_ttl } => {
            let (account, key, request) = (account_name(*account), key_name(*key), request_name(*request));
            let expected = model.authorize(&account, &key, &request, *hold, limits, *short_ttl);
            let authorize = AuthorizeRequest {
                account_id: system.account_id(&account),
                api_key_id: system.key_id(&account, &key),
                request_id: system.request_id(&request),
                hold: Money::from_nanos(*hold),
                hold_tokens: 10,
                limits: limits_of(limits),
                hold_ttl_ms: if *short_ttl { 0 } else { LONG_TTL_MS },
            };
            let store = system.store();
            let actual = system.pumped(store.authorize(&authorize)).await.map_err(store_error("authorize"))?.map_err(store_error("authorize"))?;
            let actual = outcome_of(&actual).map_err(|detail| ("authorize", detail))?;
            if actual != expected {
                return Err(("authorize (DESIGN reserve: idempotency, quotas, budgets, available)", format!("expected {expected:?}, store answered {actual:?}")));
            }
        }
        Op::Settle { account, key, request, cost, poison } => {
            let (account, key, request) = (account_name(*account), key_name(*key), request_name(*request));
            let expected = model.settle(&account, &key, &request, *cost, *poison);
            let event = system.event(&account, &key, &request, *cost, RequestStatus::Success, *poison);
            let store = system.store();
            let actual = match system.pumped(store.settle(event)).await.map_err(store_error("settle"))? {
                Ok(settlement) if settlement.already_settled => SettleOutcome::Already { balance: settlement.balance_before.nanos() },
                Ok(settlement) => SettleOutcome::Settled { before: settlement.balance_before.nanos(), after: settlement.balance_after.nanos() },
                Err(StoreError::NotFound { .. }) => SettleOutcome::NotLoaded,
                // Embedded, a charge the ledger refused is parked: the charge stands (hot, and
                // owed as unlogged), but the settle says it is not durable, so the gateway
                // withholds the response (issue 19 item 9).
                Err(StoreError::Unavailable(_)) if system.is_memory() && *poison && matches!(expected, SettleOutcome::Settled { .. }) => expected.clone(),
                Err(error) => return Err(("settle", format!("store error: {error}"))),
            };
            if actual != expected {
                return Err(("settle (DESIGN settle: once per request id)", format!("expected {expected:?}, store answered {actual:?}")));
            }
        }
        Op::Void { account, key, request } => {
            let (account, key, request) = (account_name(*account), key_name(*key), request_name(*request));
            model.void(&account, &key, &request);
            let store = system.store();
            system.pumped(store.void(system.event(&account, &key, &request, 0, RequestStatus::Failed, false))).await.map_err(store_error("void"))?.map_err(store_error("void"))?;
        }
        Op::Expire => {
            let expected = model.expire();
            let store = system.store();
            let actual = system.pumped(store.expire_holds()).await.map_err(store_error("expire"))?.map_err(store_error("expire"))?;
            if actual != expected {
                return Err(("expire (DESIGN expire: every due hold released once)", format!("expected {expected} released, store released {actual}")));
            }
        }
        Op::Deposit { account, amount } => {
            let account = account_name(*account);
            let ledger_seq = model.deposit(&account, *amount);
            deposit(system, model, &account, *amount, ledger_seq).await?;
        }
        Op::Withdraw { account, amount, refund } => {
            let account = account_name(*account);
            let kind = if *refund { FundKind::Refund } else { FundKind::Adjustment };
            // As the gateway does it (charge::record_withdrawal): load a cold account first.
            if !model.account(&account).loaded {
                model.load(&account);
                system.load(&account).await.map_err(store_error("load"))?;
            }
            let outcome = model.withdraw(&account, *amount);
            withdraw(system, model, &account, kind, *amount, outcome).await?;
        }
        Op::ReapplyFund { account } => {
            let account = account_name(*account);
            let state = model.account(&account);
            let expected = if state.loaded { FundApplication::AlreadyApplied } else { FundApplication::AccountNotLoaded };
            let actual = system.store().apply_fund(&system.account_id(&account), state.last_fund_seq, Money::from_nanos(1), None).await.map_err(store_error("apply_fund"))?;
            if actual != expected {
                return Err(("apply_fund once by ledger_seq", format!("expected {expected:?}, store answered {actual:?}")));
            }
        }
        Op::Unload { account } => {
            let account = account_name(*account);
            written.extend(model.drain());
            system.drain().await.map_err(store_error("drain"))?;
            model.unload(&account);
            system.store().unload_account(&system.account_id(&account)).await.map_err(store_error("unload"))?;
        }
        Op::Load { account } => {
            let account = account_name(*account);
            model.load(&account);
            let loaded = system.load(&account).await.map_err(store_error("load"))?;
            if !loaded {
                return Err(("load", "the store says the account was loaded already".into()));
            }
        }
        Op::Restart => {
            if system.is_memory() {
                let loaded: Vec<String> = model.accounts.iter().filter(|(_, state)| state.loaded).map(|(id, _)| id.clone()).collect();
                for account in loaded {
                    model.unload(&account);
                }
                // A parked charge lived in the process only, and its settle failed: its response
                // was withheld, so losing it charges the request at most once (I1).
                for state in model.accounts.values_mut() {
                    state.dead.clear();
                }
            }
            system.restart().await;
        }
        Op::Drain => {
            written.extend(model.drain());
            system.drain().await.map_err(store_error("drain"))?;
        }
        Op::Crash { committed } => {
            model.crash(*committed);
            system.crash(*committed).await.map_err(store_error("crash"))?;
        }
        Op::ReclaimPark => {
            model.park_delivered();
            system.reclaim_park().await.map_err(store_error("reclaim"))?;
        }
        Op::Redeliver { account, request } => {
            let (account, request) = (account_name(*account), request_name(*request));
            let Some((_, event)) = written.iter().rev().find(|(id, event)| *id == account && event.request_id == request).cloned() else { return Ok(()) };
            let expected = if model.redeliver(&account, &event) { RecordOutcome::Inserted } else { RecordOutcome::Duplicate };
            let status = if event.failed { RequestStatus::Failed } else { RequestStatus::Success };
            let usage = system.event(&account, &event.key, &request, event.cost, status, false);
            let actual = system.ledger.record_usage_batch(&[usage]).await.map_err(store_error("redeliver"))?;
            if actual != vec![expected] {
                return Err(("I1 exactly-once (a re-delivered event)", format!("expected {expected:?}, ledger answered {actual:?}")));
            }
        }
    }
    Ok(())
}

/// A deposit: recorded in the ledger at the position the model expects, then applied to the hot
/// store by it.
async fn deposit(system: &mut System, model: &Model, account: &str, amount: i64, expected_seq: i64) -> Result<(), Broken> {
    let reference_id = system.next_reference();
    let account_id = system.account_id(account);
    let new = NewFund { account_id: account_id.clone(), kind: FundKind::Deposit, amount: Money::from_nanos(amount), reference_id, reason: None, operator_id: None };
    let transaction = system.ledger.record_fund(new).await.map_err(|error| ("record_fund", format!("deposit of {amount}: {error}")))?.transaction;
    if transaction.ledger_seq != expected_seq {
        return Err(("I4 audit chain (fund position)", format!("fund at ledger_seq {}, expected {expected_seq}", transaction.ledger_seq)));
    }
    let state = model.account(account);
    let expected = if state.loaded { FundApplication::Applied { balance_after: Money::from_nanos(state.balance) } } else { FundApplication::AccountNotLoaded };
    let actual = system.store().apply_fund(&account_id, transaction.ledger_seq, transaction.amount, None).await.map_err(store_error("apply_fund"))?;
    if actual != expected {
        return Err(("apply_fund", format!("expected {expected:?}, store answered {actual:?}")));
    }
    Ok(())
}

/// A refund or negative adjustment the gateway's way: hold the amount in the hot store (only
/// free funds), write it to the ledger, apply it (which releases the hold in the same step).
async fn withdraw(system: &mut System, model: &Model, account: &str, kind: FundKind, amount: i64, outcome: WithdrawOutcome) -> Result<(), Broken> {
    let reference_id = system.next_reference();
    let account_id = system.account_id(account);
    let hold_id = withdrawal_id(kind.as_str(), &reference_id);
    let held = system.store().hold_withdrawal(&account_id, &hold_id, Money::from_nanos(amount), LONG_TTL_MS).await.map_err(store_error("hold_withdrawal"))?;
    let rule = "funds out only from free funds (DESIGN)";
    let ledger_seq = match (outcome, held) {
        (WithdrawOutcome::Refused { free }, WithdrawalHold::Insufficient { free: store_free }) if store_free.nanos() == free => return Ok(()),
        (WithdrawOutcome::Recorded { ledger_seq }, WithdrawalHold::Held) => ledger_seq,
        (expected, actual) => {
            let state = model.account(account);
            return Err((rule, format!("{} of {amount}: model {expected:?}, store {actual:?} (balance {}, held {})", kind.as_str(), state.balance, state.held)));
        }
    };
    let new = NewFund { account_id: account_id.clone(), kind, amount: Money::from_nanos(-amount), reference_id, reason: None, operator_id: None };
    let transaction = system.ledger.record_fund(new).await.map_err(store_error("record_fund"))?.transaction;
    if transaction.ledger_seq != ledger_seq {
        return Err(("I4 audit chain (fund position)", format!("fund at ledger_seq {}, expected {ledger_seq}", transaction.ledger_seq)));
    }
    let expected = FundApplication::Applied { balance_after: Money::from_nanos(model.account(account).balance) };
    let actual = system.store().apply_fund(&account_id, transaction.ledger_seq, transaction.amount, Some(&hold_id)).await.map_err(store_error("apply_fund"))?;
    if actual != expected {
        return Err(("apply_fund", format!("expected {expected:?}, store answered {actual:?}")));
    }
    Ok(())
}

/// The one account an operation changes, or None when it may change any.
fn touched(op: &Op) -> Option<String> {
    match op {
        Op::Authorize { account, .. }
        | Op::Settle { account, .. }
        | Op::Void { account, .. }
        | Op::Deposit { account, .. }
        | Op::Withdraw { account, .. }
        | Op::ReapplyFund { account }
        | Op::Load { account }
        | Op::Redeliver { account, .. } => Some(account_name(*account)),
        Op::Expire | Op::Unload { .. } | Op::Restart | Op::Drain | Op::Crash { .. } | Op::ReclaimPark => None,
    }
}

/// After every step: the hot state of each account the step touched (`only`; every account
/// when None) and of its keys, its ledger balance and fund position, and the unlogged charges.
async fn compare_state(system: &System, model: &Model, only: Option<String>) -> Result<(), Broken> {
    let store = system.store();
    for (account, state) in model.accounts.iter().filter(|(account, _)| only.as_ref().is_none_or(|only| only == *account)) {
        let account_id = system.account_id(account);
        for key in (0..KEYS_PER_ACCOUNT).map(key_name) {
            let view = store.balance(&account_id, &system.key_id(account, &key)).await.map_err(store_error("balance"))?;
            let Some(view) = view else {
                if state.loaded {
                    return Err(("hot state", format!("{account} is loaded in the model, not in the store")));
                }
                continue;
            };
            if !state.loaded {
                return Err(("hot state", format!("{account} was unloaded, the store still has it: {view:?}")));
            }
            let spent = state.keys.get(&key).map_or(0, |key| key.spent);
            let expected = (state.balance, state.held, state.fund_seq, state.requests, state.requests, spent, spent, spent);
            let actual = (
                view.balance.nanos(),
                view.held.nanos(),
                view.last_fund_seq,
                view.daily_requests_used,
                view.monthly_requests_used,
                view.key_spent_daily.nanos(),
                view.key_spent_monthly.nanos(),
                view.key_spent_total.nanos(),
            );
            if actual != expected {
                return Err(("hot state (balance, held, fund_seq, requests today/month, key spent day/month/total)", format!("{account} {key}: expected {expected:?}, store has {actual:?}")));
            }
            let held = state.keys.get(&key).map_or(0, |key| key.held);
            probe_key_held(system, account, &key, spent, held).await?;
        }
        let balance = system.ledger.account_balance(&account_id).await.map_err(store_error("ledger"))?.ok_or(("ledger", format!("{account} missing")))?;
        if (balance.balance.nanos(), balance.last_fund_seq) != (state.ledger_balance, state.last_fund_seq) {
            return Err(("ledger balance", format!("{account}: expected ({}, fund seq {}), ledger has ({}, {})", state.ledger_balance, state.last_fund_seq, balance.balance, balance.last_fund_seq)));
        }
    }
    let mut actual: Vec<(String, String, i64)> = store
        .unlogged_charges()
        .await
        .map_err(store_error("unlogged_charges"))?
        .into_iter()
        .map(|charge| (charge.account_id, charge.request_id, charge.cost.nanos()))
        .collect();
    let mut expected: Vec<(String, String, i64)> = model
        .accounts
        .iter()
        .flat_map(|(account, state)| state.in_log().map(move |event| (system.account_id(account), system.request_id(&event.request_id), event.cost)))
        .collect();
    actual.sort();
    expected.sort();
    if actual != expected {
        return Err(("unlogged charges (I1/I2: a charge is in the ledger or the log, once)", format!("expected {expected:?}, store reports {actual:?}")));
    }
    Ok(())
}

/// A key's open holds are not in the balance view; two refused authorizations measure them:
/// with a total budget of spent + held the budget passes (the balance check then refuses, the
/// credit limit being far below zero), with one unit less it refuses.
async fn probe_key_held(system: &System, account: &str, key: &str, spent: i64, held: i64) -> Result<(), Broken> {
    let store = system.store();
    for (budget, budget_passes) in [(spent + held, true), (spent + held - 1, false)] {
        let probe = AuthorizeRequest {
            account_id: system.account_id(account),
            api_key_id: system.key_id(account, key),
            request_id: system.request_id("probe"),
            hold: Money::ZERO,
            hold_tokens: 0,
            limits: Limits { credit_limit: Money::from_nanos(-(1 << 40)), key_budget_total: Some(Money::from_nanos(budget)), ..Limits::default() },
            hold_ttl_ms: LONG_TTL_MS,
        };
        let outcome = store.authorize(&probe).await.map_err(store_error("probe"))?;
        let passed = match outcome {
            Authorization::Refused(Refusal::InsufficientBalance { .. }) => true,
            Authorization::Refused(Refusal::KeyBudgetExceeded { .. }) => false,
            other => return Err(("key held probe", format!("{account} {key}: probe answered {other:?}"))),
        };
        if passed != budget_passes {
            return Err(("key held (budgets count the key's open holds)", format!("{account} {key}: expected key held {held} (spent {spent}); a total budget of {budget} {} the store", if passed { "passed" } else { "was refused by" })));
        }
    }
    Ok(())
}

/// At quiet points: every account's ledger rows are the model's, in order (I1: one charged row
/// per request id; I4: the chain), Σ rows = account_balance (I2), and a loaded account's hot
/// balance equals the ledger's less what the store itself reports unlogged (I2).
async fn compare_ledger(system: &System, model: &Model) -> Result<(), Broken> {
    let store = system.store();
    let unlogged = store.unlogged_charges().await.map_err(store_error("unlogged_charges"))?;
    for (account, state) in &model.accounts {
        let account_id = system.account_id(account);
        let entries = system.ledger.statement(&account_id, None, None).await.map_err(store_error("statement"))?;
        let mut previous_after = 0;
        let mut charged = BTreeSet::new();
        for (index, entry) in entries.iter().enumerate() {
            if entry.ledger_seq() != index as i64 + 1 || entry.balance_before().nanos() != previous_after {
                return Err(("I4 audit chain", format!("{account}: row {index} at ledger_seq {} starts at {} after {previous_after}", entry.ledger_seq(), entry.balance_before())));
            }
            previous_after = entry.balance_after().nanos();
            if let LedgerEntry::Usage(row) = entry
                && row.status != RequestStatus::Failed
                && !charged.insert(row.request_id.clone())
            {
                return Err(("I1 exactly-once", format!("{account}: request {} has two charged rows", row.request_id)));
            }
        }
        let rows: Vec<(i64, Option<String>, bool, i64, i64, i64)> = entries
            .iter()
            .map(|entry| match entry {
                LedgerEntry::Fund(fund) => (fund.ledger_seq, None, false, fund.amount.nanos(), fund.balance_before.nanos(), fund.balance_after.nanos()),
                LedgerEntry::Usage(row) => (row.ledger_seq, Some(row.request_id.clone()), row.status == RequestStatus::Failed, -row.cost.nanos(), row.balance_before.nanos(), row.balance_after.nanos()),
                // Never archived here: an archived run fails the comparison.
                LedgerEntry::Archived(run) => (run.first_seq, Some(format!("archived {}", run.month)), false, -run.cost.nanos(), run.balance_before.nanos(), run.balance_after.nanos()),
            })
            .collect();
        let expected: Vec<(i64, Option<String>, bool, i64, i64, i64)> = state
            .rows
            .iter()
            .map(|row| (row.ledger_seq, row.request_id.as_ref().map(|request| system.request_id(request)), row.failed, row.amount, row.balance_before, row.balance_after))
            .collect();
        if rows != expected {
            return Err(("ledger rows (I1 one charge per request id, I4 chain)", format!("{account}: expected {expected:?}\n  ledger has {rows:?}")));
        }
        let rebuilt = system.ledger.rebuilt_balance(&account_id).await.map_err(store_error("rebuilt"))?.nanos();
        if rebuilt != state.ledger_balance || previous_after != state.ledger_balance {
            return Err(("I2 conservation (ledger)", format!("{account}: Σ rows {rebuilt}, chain end {previous_after}, account_balance {}", state.ledger_balance)));
        }
        let in_flight: i64 = unlogged.iter().filter(|charge| charge.account_id == account_id).map(|charge| charge.cost.nanos()).sum();
        let committed_in_log = state.in_log().any(|event| event.delivered == Some(true));
        if let Some(view) = store.balance(&account_id, "none").await.map_err(store_error("balance"))?
            && !committed_in_log
            && view.balance.nanos() != state.ledger_balance - in_flight
        {
            return Err(("I2 conservation (hot = ledger − unlogged)", format!("{account}: hot {}, ledger {}, unlogged {in_flight}", view.balance, state.ledger_balance)));
        }
    }
    Ok(())
}

/// Removes operations, halves then singles (delta debugging), while the run still fails the
/// same rule; returns the shortest sequence found and its failure.
async fn shrink(pair: &Pair, ops: Vec<Op>, families: Families, failure: Failure) -> (Vec<Op>, Failure) {
    let started = Instant::now();
    let budget = Duration::from_secs(env_number("TOLLGATE_MODEL_SHRINK_SECS", 120));
    let mut best = ops[..(failure.step + 1).min(ops.len())].to_vec();
    let mut best_failure = failure;
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut index = 0;
        let mut progressed = false;
        while index < best.len() && started.elapsed() < budget {
            let mut candidate = best.clone();
            candidate.drain(index..(index + chunk).min(best.len()));
            match run(pair, &candidate, families).await {
                Err(found) if found.rule == best_failure.rule => {
                    candidate.truncate((found.step + 1).min(candidate.len()));
                    best = candidate;
                    best_failure = found;
                    progressed = true;
                }
                _ => index += chunk,
            }
        }
        if started.elapsed() >= budget || (chunk == 1 && !progressed) {
            return (best, best_failure);
        }
        if !progressed {
            chunk = chunk.div_ceil(2);
        }
    }
}

/// Runs the configured seeds on a pair; panics with every failing seed's shortest sequence.
async fn check(name: &str, pair: Pair, seeds_default: u64) {
    let seeds = env_number("TOLLGATE_MODEL_SEEDS", seeds_default);
    let first = env_number("TOLLGATE_MODEL_SEED", 1);
    let steps = env_number("TOLLGATE_MODEL_STEPS", 60) as usize;
    let keep_going = std::env::var("TOLLGATE_MODEL_KEEP_GOING").is_ok_and(|value| value == "1");
    let families = Families::from_env();
    let started = Instant::now();
    let mut total = Stats::default();
    let mut reports: BTreeMap<&'static str, String> = BTreeMap::new();
    for seed in first..first + seeds {
        let ops = ops::generate(seed, steps);
        match run(&pair, &ops, families).await {
            Ok(stats) => total.add(&stats),
            Err(failure) if !reports.contains_key(failure.rule) => {
                let (shortest, failure) = shrink(&pair, ops, families, failure).await;
                let sequence: Vec<String> = shortest.iter().enumerate().map(|(index, op)| format!("  {index:>3}. {op}")).collect();
                let report = format!(
                    "{name}: seed {seed} breaks \"{}\" at step {} of its shortest sequence ({} ops):\n{}\n  -> {}\n  replay: TOLLGATE_MODEL_SEED={seed} TOLLGATE_MODEL_SEEDS=1 TOLLGATE_MODEL_STEPS={steps} TOLLGATE_MODEL_FAMILIES={}",
                    failure.rule,
                    failure.step,
                    shortest.len(),
                    sequence.join("\n"),
                    failure.detail,
                    std::env::var("TOLLGATE_MODEL_FAMILIES").unwrap_or_default(),
                );
                eprintln!("{report}\n");
                reports.insert(failure.rule, report);
                if !keep_going {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    eprintln!(
        "{name}: {seeds} seeds from {first} x {steps} ops in {:.1} s: {} steps run, {} skipped by switched-off families, {} quiet-point ledger checks, {} settles above their hold (I7, counted), families {families:?}",
        started.elapsed().as_secs_f64(),
        total.steps,
        total.skipped,
        total.quiet_checks,
        total.hold_exceeded,
    );
    assert!(reports.is_empty(), "{} rule(s) broken:\n\n{}", reports.len(), reports.into_values().collect::<Vec<_>>().join("\n\n"));
}

async fn sqlite_ledger() -> Arc<dyn Ledger> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-model-{}.db", uuid::Uuid::new_v4().simple()));
    Arc::new(SqliteLedger::connect(&format!("sqlite://{}", path.display()), 4).await.unwrap())
}

async fn postgres_ledger() -> Arc<dyn Ledger> {
    Arc::new(PgLedger::connect(&support::fresh_postgres_url("model").await, 4).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_and_sqlite() {
    check("in-process + SQLite", Pair::Memory { ledger: sqlite_ledger().await }, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_postgres() {
    let url = std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    check("Redis + PostgreSQL", Pair::Redis { ledger: postgres_ledger().await, url }, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_and_postgres() {
    let url = std::env::var("TOLLGATE_TEST_REDIS_CLUSTER_URL").expect("TOLLGATE_TEST_REDIS_CLUSTER_URL is not set: run scripts/test, which starts a Redis Cluster");
    check("Redis Cluster + PostgreSQL", Pair::Redis { ledger: postgres_ledger().await, url }, 100).await;
}
