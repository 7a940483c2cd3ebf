//! The hot-store conformance suite: the same checks against the in-process store and the Redis
//! store, on a single Redis (`TOLLGATE_TEST_REDIS_URL`) and on a Redis Cluster
//! (`TOLLGATE_TEST_REDIS_CLUSTER_URL`) — both started by `scripts/test`; without them these
//! tests fail, they do not skip. Each Redis test gets its own key prefix.
//!
//! Checks whose answer depends on the calendar (which day, month or minute a count falls in,
//! whether a hold is due) run on a [`ManualClock`] the check sets — and moves across a
//! period's end on purpose, where a run on the wall clock would only cross one by chance. The
//! others run on the stores' own time (the system clock; Redis: the server's `TIME`), the
//! production path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_core::{Money, Usage, UsageSource};
use tollgate_store::HotStore;
use tollgate_store::hot::{AccountSnapshot, Authorization, AuthorizeRequest, CounterSeed, FundApplication, KeySpendSeed, Limits, Refusal};
use tollgate_store::memory::MemoryHotStore;
use tollgate_store::model::{ChargedRequest, RequestStatus, StoredResponse, UsageEvent};
use tollgate_store::queue::{EventLog, channel_log};
use tollgate_store::StoreError;
use tollgate_store::redis_store::{Connection, KeySpace, RedisHotStore, RedisLog, RedisLogConfig};
use tollgate_store::clock::{Clock, ManualClock, Periods};
use tollgate_store::hot::BudgetPeriod;
use time::macros::datetime;

/// How long a check waits for something that takes real time (a server's clock to pass a TTL)
/// before it fails: generous, so a loaded machine is slow, not wrong.
const WAIT_BOUND: Duration = Duration::from_secs(30);

fn prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn memory() -> Arc<dyn HotStore> {
    memory_on(tollgate_store::clock::system_clock())
}

fn memory_on(clock: Clock) -> Arc<dyn HotStore> {
    let (sender, log) = channel_log(1024);
    // Stands in for the worker: acknowledges every event so settles return.
    tokio::spawn(async move {
        loop {
            let batch = log.read_batch(64).await.unwrap();
            if batch.is_empty() {
                return;
            }
            log.ack(batch).await.unwrap();
        }
    });
    Arc::new(MemoryHotStore::new(sender, clock))
}

fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis")
}

fn cluster_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_CLUSTER_URL").expect("TOLLGATE_TEST_REDIS_CLUSTER_URL is not set: run scripts/test, which starts a Redis Cluster")
}

async fn redis() -> Arc<dyn HotStore> {
    Arc::new(RedisHotStore::connect(&redis_url(), &prefix(), 16).await.unwrap())
}

async fn cluster() -> Arc<dyn HotStore> {
    Arc::new(RedisHotStore::connect(&cluster_url(), &prefix(), 16).await.unwrap())
}

async fn redis_on(clock: Clock) -> Arc<dyn HotStore> {
    Arc::new(RedisHotStore::connect(&redis_url(), &prefix(), 16).await.unwrap().with_clock(clock))
}

async fn cluster_on(clock: Clock) -> Arc<dyn HotStore> {
    Arc::new(RedisHotStore::connect(&cluster_url(), &prefix(), 16).await.unwrap().with_clock(clock))
}

/// Where a set clock starts: the middle of a day in the middle of a month (2026-06-15 12:00:00
/// UTC), 12 h from the day's end and 15.5 days from the month's.
fn midday() -> ManualClock {
    ManualClock::at_time(datetime!(2026-06-15 12:00:00 UTC))
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod on_memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(super::memory()).await; })*
        }
        mod on_redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(super::redis().await).await; })*
        }
        mod on_redis_cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(super::cluster().await).await; })*
        }
    };
}

/// The same, each check with a clock of its own, standing at [`midday`] until the check moves it.
macro_rules! conformance_on_a_set_clock {
    ($($check:ident),* $(,)?) => {
        mod on_a_set_clock {
            mod on_memory {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let clock = super::super::midday();
                    super::super::$check(super::super::memory_on(clock.clock()), clock).await;
                })*
            }
            mod on_redis {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let clock = super::super::midday();
                    super::super::$check(super::super::redis_on(clock.clock()).await, clock).await;
                })*
            }
            mod on_redis_cluster {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let clock = super::super::midday();
                    super::super::$check(super::super::cluster_on(clock.clock()).await, clock).await;
                })*
            }
        }
    };
}

conformance!(
    fund_changes_apply_once_and_in_order,
    concurrent_authorizations_never_overspend,
    accounts_on_every_shard_work,
    two_loaders_racing_load_once,
    a_cold_load_remembers_every_charged_id,
    a_settle_releases_the_hold_of_the_key_it_was_placed_for,
    an_unload_releases_what_its_holds_kept_of_the_key,
    without_a_set_clock_the_stores_keep_their_own_time,
);

conformance_on_a_set_clock!(
    authorize_settle_void_and_idempotency,
    expired_holds_are_released_and_a_late_settle_charges_once,
    quotas_budgets_and_rate_limits_refuse_with_their_reason,
    a_cold_load_starts_from_the_ledger_counters,
    withdrawals_take_only_free_funds,
    the_last_millisecond_of_a_day_and_midnight_count_in_different_days,
    a_hold_from_before_midnight_leaves_the_new_day_alone,
    a_month_end_starts_monthly_quotas_and_budgets_afresh,
    a_minute_boundary_starts_the_rate_limits_afresh,
);

async fn load(store: &dyn HotStore, account: &str, balance: i64) {
    let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: account.into(), balance: Money::from_nanos(balance), last_fund_seq: 0, charged_request_ids: vec!["old".into()], counters: CounterSeed::default() };
    assert!(store.load_account(snapshot.clone()).await.unwrap());
    assert!(!store.load_account(snapshot).await.unwrap(), "a second load changes nothing");
}

fn request(account: &str, id: &str, hold: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        account_id: account.into(),
        api_key_id: format!("key-{account}"),
        request_id: id.into(),
        hold: Money::from_nanos(hold),
        hold_tokens: 10,
        limits: Limits::default(),
        hold_ttl_ms: 60_000,
    }
}

fn event(account: &str, id: &str, cost: i64, status: RequestStatus) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        account_id: account.into(),
        api_key_id: format!("key-{account}"),
        provider: "p".into(),
        model: "m".into(),
        customer_type: "t".into(),
        price_id: Some(1),
        usage: Usage { input_tokens: 3, output_tokens: 2, ..Usage::default() },
        usage_source: UsageSource::Upstream,
        cost: Money::from_nanos(cost),
        status,
        latency_ms: 1,
        created_at_ms: 0,
        hot_balance_after: Money::ZERO,
        stored_response: None,
        request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
    }
}

/// A Redis store on one shard (its own key prefix) with `account` loaded, and its key space.
async fn one_shard_store(account: &str) -> (RedisHotStore, KeySpace) {
    let prefix = prefix();
    let store = RedisHotStore::connect(&redis_url(), &prefix, 1).await.unwrap();
    load(&store, account, 1_000).await;
    (store, KeySpace::new(&prefix, 1).unwrap())
}

fn held(outcome: &Authorization) -> bool {
    matches!(outcome, Authorization::Held { .. })
}

async fn authorize_settle_void_and_idempotency(store: Arc<dyn HotStore>, _clock: ManualClock) {
    assert_eq!(store.authorize(&request("a", "r1", 10)).await.unwrap(), Authorization::Refused(Refusal::AccountNotLoaded));
    load(&*store, "a", 100).await;
    assert_eq!(store.authorize(&request("a", "old", 1)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged));
    assert_eq!(store.authorize(&request("a", "r1", 60)).await.unwrap(), Authorization::Held { available_after: Money::from_nanos(40) });
    assert_eq!(store.authorize(&request("a", "r1", 1)).await.unwrap(), Authorization::Refused(Refusal::InProgress));
    assert_eq!(
        store.authorize(&request("a", "r2", 41)).await.unwrap(),
        Authorization::Refused(Refusal::InsufficientBalance { available: Money::from_nanos(40), required: Money::from_nanos(41) })
    );
    let settlement = store.settle(event("a", "r1", 55, RequestStatus::Success)).await.unwrap();
    assert_eq!((settlement.balance_before, settlement.balance_after, settlement.already_settled), (Money::from_nanos(100), Money::from_nanos(45), false));
    assert!(store.settle(event("a", "r1", 55, RequestStatus::Success)).await.unwrap().already_settled);
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held, view.key_spent_total, view.key_spent_daily), (Money::from_nanos(45), Money::ZERO, Money::from_nanos(55), Money::from_nanos(55)));
    assert!(held(&store.authorize(&request("a", "r3", 45)).await.unwrap()));
    store.void(event("a", "r3", 0, RequestStatus::Failed)).await.unwrap();
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held, view.daily_requests_used), (Money::from_nanos(45), Money::ZERO, 1));
    assert!(held(&store.authorize(&request("a", "r3", 45)).await.unwrap()), "a voided id may be used again");
    assert!(store.balance("nobody", "k").await.unwrap().is_none());
}

async fn expired_holds_are_released_and_a_late_settle_charges_once(store: Arc<dyn HotStore>, clock: ManualClock) {
    load(&*store, "a", 100).await;
    let short = AuthorizeRequest { hold_ttl_ms: 150, ..request("a", "slow", 80) };
    assert!(held(&store.authorize(&short).await.unwrap()));
    clock.advance_ms(149);
    assert_eq!(store.expire_holds().await.unwrap(), 0, "not yet due 1 ms before its TTL ends");
    clock.advance_ms(1);
    assert_eq!(store.expire_holds().await.unwrap(), 1, "due when its TTL ends");
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::ZERO);
    let settlement = store.settle(event("a", "slow", 30, RequestStatus::Success)).await.unwrap();
    assert!(!settlement.already_settled);
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held), (Money::from_nanos(70), Money::ZERO));
}

async fn quotas_budgets_and_rate_limits_refuse_with_their_reason(store: Arc<dyn HotStore>, _clock: ManualClock) {
    load(&*store, "a", 1_000).await;
    let limited = |id: &str, limits: Limits| AuthorizeRequest { limits, ..request("a", id, 10) };
    let daily = Limits { daily_request_quota: Some(1), ..Limits::default() };
    assert!(held(&store.authorize(&limited("q1", daily.clone())).await.unwrap()));
    // At midday on 15 June: 12 h to the day's end, 15.5 days to the month's.
    assert_eq!(store.authorize(&limited("q2", daily)).await.unwrap(), Authorization::Refused(Refusal::DailyQuotaExceeded { retry_after_secs: 43_200 }));
    let monthly = Limits { monthly_request_quota: Some(1), ..Limits::default() };
    assert_eq!(store.authorize(&limited("q3", monthly)).await.unwrap(), Authorization::Refused(Refusal::MonthlyQuotaExceeded { retry_after_secs: 1_339_200 }));
    let budget = Limits { key_budget_total: Some(Money::from_nanos(15)), ..Limits::default() };
    assert_eq!(
        store.authorize(&limited("b1", budget)).await.unwrap(),
        Authorization::Refused(Refusal::KeyBudgetExceeded { period: tollgate_store::hot::BudgetPeriod::Total, retry_after_secs: None }),
        "the open hold of q1 counts against the key budget"
    );
    let rpm = Limits { key_requests_per_minute: Some(1), ..Limits::default() };
    assert_eq!(store.authorize(&limited("m1", rpm)).await.unwrap(), Authorization::Refused(Refusal::RateLimited { retry_after_secs: 60 }));
    let credit = Limits { credit_limit: Money::from_nanos(5), ..Limits::default() };
    let big = AuthorizeRequest { limits: credit, ..request("a", "c1", 995) };
    assert_eq!(store.authorize(&big).await.unwrap(), Authorization::Held { available_after: Money::ZERO }, "credit extends what may be held");
}

async fn fund_changes_apply_once_and_in_order(store: Arc<dyn HotStore>) {
    assert_eq!(store.apply_fund("a", 1, Money::from_nanos(5), None).await.unwrap(), FundApplication::AccountNotLoaded);
    load(&*store, "a", 0).await;
    assert_eq!(store.apply_fund("a", 2, Money::from_nanos(5), None).await.unwrap(), FundApplication::Applied { balance_after: Money::from_nanos(5) });
    assert_eq!(store.apply_fund("a", 2, Money::from_nanos(5), None).await.unwrap(), FundApplication::AlreadyApplied);
    assert_eq!(store.apply_fund("a", 1, Money::from_nanos(5), None).await.unwrap(), FundApplication::AlreadyApplied);
    assert_eq!(store.apply_fund("a", 3, Money::from_nanos(-2), None).await.unwrap(), FundApplication::Applied { balance_after: Money::from_nanos(3) });
    let view = store.balance("a", "k").await.unwrap().unwrap();
    assert_eq!((view.balance, view.last_fund_seq), (Money::from_nanos(3), 3));
    store.unload_account("a").await.unwrap();
    assert!(store.balance("a", "k").await.unwrap().is_none());
}

/// Funds out only from free funds: a withdrawal holds against the balance less every open hold
/// (never the credit limit), is seen by authorize while held, and is released by the apply of
/// its fund transaction (exactly once, even when applied before), by a release, or by expiry.
async fn withdrawals_take_only_free_funds(store: Arc<dyn HotStore>, clock: ManualClock) {
    use tollgate_store::hot::WithdrawalHold;
    assert_eq!(store.hold_withdrawal("a", "refund:r0", Money::from_nanos(1), 60_000).await.unwrap(), WithdrawalHold::AccountNotLoaded);
    load(&*store, "a", 100).await;
    let credit = Limits { credit_limit: Money::from_nanos(1_000), ..Limits::default() };
    assert!(held(&store.authorize(&AuthorizeRequest { limits: credit.clone(), ..request("a", "q1", 70) }).await.unwrap()));
    assert_eq!(
        store.hold_withdrawal("a", "refund:r1", Money::from_nanos(31), 60_000).await.unwrap(),
        WithdrawalHold::Insufficient { free: Money::from_nanos(30) },
        "the open hold is not free, nor is the credit limit"
    );
    assert_eq!(store.hold_withdrawal("a", "refund:r1", Money::from_nanos(30), 60_000).await.unwrap(), WithdrawalHold::Held);
    assert_eq!(store.hold_withdrawal("a", "refund:r1", Money::from_nanos(30), 60_000).await.unwrap(), WithdrawalHold::InProgress);
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::from_nanos(100));
    let refused = store.authorize(&request("a", "q2", 1)).await.unwrap();
    assert_eq!(refused, Authorization::Refused(Refusal::InsufficientBalance { available: Money::ZERO, required: Money::from_nanos(1) }), "held for the withdrawal");
    // Applying the fund transaction releases its hold in the same step; a second apply of it
    // releases nothing more.
    let applied = store.apply_fund("a", 1, Money::from_nanos(-30), Some("refund:r1")).await.unwrap();
    assert_eq!(applied, FundApplication::Applied { balance_after: Money::from_nanos(70) });
    assert_eq!(store.apply_fund("a", 1, Money::from_nanos(-30), Some("refund:r1")).await.unwrap(), FundApplication::AlreadyApplied);
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::from_nanos(70));
    // The charge settles; nothing is free until it does, then what it left is.
    store.settle(event("a", "q1", 60, RequestStatus::Success)).await.unwrap();
    assert_eq!(store.hold_withdrawal("a", "refund:r2", Money::from_nanos(11), 60_000).await.unwrap(), WithdrawalHold::Insufficient { free: Money::from_nanos(10) });
    // A withdrawal the ledger refused is released; one whose gateway died expires.
    assert_eq!(store.hold_withdrawal("a", "refund:r2", Money::from_nanos(10), 60_000).await.unwrap(), WithdrawalHold::Held);
    store.release_withdrawal("a", "refund:r2").await.unwrap();
    store.release_withdrawal("a", "refund:r2").await.unwrap();
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::ZERO);
    assert_eq!(store.hold_withdrawal("a", "adjustment:r3", Money::from_nanos(10), 100).await.unwrap(), WithdrawalHold::Held);
    clock.advance_ms(99);
    assert_eq!(store.expire_holds().await.unwrap(), 0, "not yet due");
    clock.advance_ms(1);
    assert_eq!(store.expire_holds().await.unwrap(), 1);
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.balance, view.held), (Money::from_nanos(10), Money::ZERO));
    // A withdrawal applied after its hold expired is applied, and releases nothing twice.
    assert_eq!(store.apply_fund("a", 2, Money::from_nanos(-10), Some("adjustment:r3")).await.unwrap(), FundApplication::Applied { balance_after: Money::ZERO });
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::ZERO);
}

async fn concurrent_authorizations_never_overspend(store: Arc<dyn HotStore>) {
    load(&*store, "a", 20 * 7).await;
    let mut tasks = Vec::new();
    for index in 0..200 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move { store.authorize(&request("a", &format!("c{index}"), 7)).await.unwrap() }));
    }
    let mut holds = 0;
    for task in tasks {
        if held(&task.await.unwrap()) {
            holds += 1;
        }
    }
    assert_eq!(holds, 20);
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::from_nanos(140));
}

async fn accounts_on_every_shard_work(store: Arc<dyn HotStore>) {
    for index in 0..40 {
        let account = format!("acct-{index}");
        load(&*store, &account, 50).await;
        assert!(held(&store.authorize(&request(&account, "r", 20)).await.unwrap()));
        let settlement = store.settle(event(&account, "r", 20, RequestStatus::Success)).await.unwrap();
        assert_eq!(settlement.balance_after, Money::from_nanos(30));
    }
    assert_eq!(store.expire_holds().await.unwrap(), 0);
}

/// Issue 19 item 7: a settle gives the funds back to the key its hold was placed for, as void
/// and expire do; an event naming another key leaves that key's held alone (it once went below
/// zero, and the hold's key kept its funds held for good). The spend is the event's key's, as
/// the usage row and so the ledger's counters say.
async fn a_settle_releases_the_hold_of_the_key_it_was_placed_for(store: Arc<dyn HotStore>) {
    load(&*store, "a", 10_000).await;
    let on_key = |key: &str, id: &str, hold: i64, budget_total: i64| AuthorizeRequest {
        api_key_id: key.into(),
        limits: Limits { key_budget_total: Some(Money::from_nanos(budget_total)), ..Limits::default() },
        ..request("a", id, hold)
    };
    assert!(held(&store.authorize(&on_key("key-one", "r1", 100, 1_000)).await.unwrap()));
    assert!(held(&store.authorize(&on_key("key-two", "r2", 50, 1_000)).await.unwrap()));
    let mismatched = UsageEvent { api_key_id: "key-two".into(), ..event("a", "r1", 30, RequestStatus::Success) };
    store.settle(mismatched).await.unwrap();
    let spent = |view: Option<tollgate_store::hot::BalanceView>| view.unwrap().key_spent_total;
    assert_eq!(spent(store.balance("a", "key-one").await.unwrap()), Money::ZERO);
    assert_eq!(spent(store.balance("a", "key-two").await.unwrap()), Money::from_nanos(30), "the spend is where the usage row puts it");
    // key-one: held 0 + 1,000 fits a budget of 1,000 only if r1's hold left it.
    assert!(held(&store.authorize(&on_key("key-one", "r3", 1_000, 1_000)).await.unwrap()), "r1's hold still counts against key-one");
    // key-two: spent 30, and r2 still holds 50, so 21 more breaks a budget of 100 and 20 fits.
    assert!(!held(&store.authorize(&on_key("key-two", "r4", 21, 100)).await.unwrap()), "key-two's held was lowered by r1's settle");
    assert!(held(&store.authorize(&on_key("key-two", "r5", 20, 100)).await.unwrap()));
    assert_eq!(store.balance("a", "key-one").await.unwrap().unwrap().balance, Money::from_nanos(9_970));
}

/// Issue 19 item 6: unloading an account (the resync after ledger charging) drops its holds,
/// and with them what they kept of the key's held: left behind (the key's state outlives the
/// account in Redis), it refused the key's budgets early after every resync.
async fn an_unload_releases_what_its_holds_kept_of_the_key(store: Arc<dyn HotStore>) {
    load(&*store, "a", 1_000).await;
    let budgeted = |id: &str| AuthorizeRequest { limits: Limits { key_budget_total: Some(Money::from_nanos(150)), ..Limits::default() }, ..request("a", id, 100) };
    assert!(held(&store.authorize(&budgeted("r1")).await.unwrap()));
    store.unload_account("a").await.unwrap();
    load(&*store, "a", 1_000).await;
    assert!(held(&store.authorize(&budgeted("r2")).await.unwrap()), "the unloaded hold still counts against the key budget");
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::from_nanos(100));
    assert_eq!(store.expire_holds().await.unwrap(), 0);
}

/// The stream log: settled events arrive once, an unacknowledged batch comes back to the same
/// consumer after a restart, another consumer takes over idle entries, and an entry delivered
/// too often is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_log_delivers_once_and_survives_consumer_crashes() {
    stream_log_delivers_once_and_survives_consumer_crashes(&redis_url()).await;
}

/// The same on a Redis Cluster (acknowledging is one MULTI/EXEC on the shard's node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_log_delivers_once_and_survives_consumer_crashes_on_a_cluster() {
    stream_log_delivers_once_and_survives_consumer_crashes(&cluster_url()).await;
}

async fn stream_log_delivers_once_and_survives_consumer_crashes(url: &str) {
    let prefix = prefix();
    let store = RedisHotStore::connect(url, &prefix, 4).await.unwrap();
    let keys = KeySpace::new(&prefix, 4).unwrap();
    let log_config = |consumer: &str| RedisLogConfig { consumer: consumer.into(), poll_idle_ms: 10, claim_idle_ms: 200, deliveries_max: 3, ..RedisLogConfig::default() };
    for index in 0..10 {
        let account = format!("s{index}");
        load(&store, &account, 100).await;
        assert!(held(&store.authorize(&request(&account, "r", 10)).await.unwrap()));
        store.settle(event(&account, "r", 10, RequestStatus::Success)).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let first = RedisLog::new(store.connection(), keys.clone(), log_config("first"), shutdown.clone()).await.unwrap();
    assert_eq!(first.lag().await.unwrap(), 10, "ten settled events not yet delivered");
    let batch = first.read_batch(100).await.unwrap();
    assert_eq!(first.lag().await.unwrap(), 0);
    assert_eq!(batch.len(), 10);
    assert!(batch.iter().all(|delivery| delivery.event.hot_balance_after == Money::from_nanos(90)));
    // "first" crashes without acknowledging; restarted under the same name it reads them again.
    drop(first);
    let first = RedisLog::new(store.connection(), keys.clone(), log_config("first"), shutdown.clone()).await.unwrap();
    let again = first.read_batch(100).await.unwrap();
    assert_eq!(again.len(), 10, "own pending entries are re-delivered after a restart");
    drop(first);
    // Another consumer takes them over once idle, and acknowledges them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = RedisLog::new(store.connection(), keys.clone(), log_config("second"), shutdown.clone()).await.unwrap();
    let taken = second.read_batch(100).await.unwrap();
    assert_eq!(taken.len(), 10, "idle entries of a dead consumer are taken over");
    second.ack(taken).await.unwrap();
    assert_eq!(second.pending().await.unwrap(), 0);
    // Nothing is left to read.
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
    });
    assert!(second.read_batch(100).await.unwrap().is_empty());
}

/// A busy account's last hour of charged ids goes in over several calls (Redis:
/// `LOAD_IDS_PER_CALL` per call): every one of them is refused afterwards, the first and the last.
async fn a_cold_load_remembers_every_charged_id(store: Arc<dyn HotStore>) {
    let count = 2 * tollgate_store::redis_store::LOAD_IDS_PER_CALL + 7;
    let charged_request_ids: Vec<String> = (0..count).map(|index| format!("charged-{index}")).collect();
    let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: "busy".into(), balance: Money::from_nanos(1_000), last_fund_seq: 0, charged_request_ids, counters: CounterSeed::default() };
    assert!(store.load_account(snapshot).await.unwrap());
    for index in [0, count / 2, count - 1] {
        let refused = store.authorize(&request("busy", &format!("charged-{index}"), 10)).await.unwrap();
        assert_eq!(refused, Authorization::Refused(Refusal::AlreadyCharged), "charged-{index}");
    }
    assert!(held(&store.authorize(&request("busy", "new", 10)).await.unwrap()));
}

/// Cold start: two gateways loading the same account at once must not double its balance.
async fn two_loaders_racing_load_once(store: Arc<dyn HotStore>) {
    let mut loaders = Vec::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        loaders.push(tokio::spawn(async move {
            let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: "cold".into(), balance: Money::from_nanos(500), last_fund_seq: 4, charged_request_ids: Vec::new(), counters: CounterSeed::default() };
            store.load_account(snapshot).await.unwrap()
        }));
    }
    let mut loaded = 0;
    for loader in loaders {
        if loader.await.unwrap() {
            loaded += 1;
        }
    }
    assert_eq!(loaded, 1);
    let view = store.balance("cold", "k").await.unwrap().unwrap();
    assert_eq!((view.balance, view.last_fund_seq), (Money::from_nanos(500), 4));
}

/// A lost hot store (or a restarted embedded one) loads counters from the ledger: quotas and
/// budgets spent before the loss still count; counts of a past period are not applied.
async fn a_cold_load_starts_from_the_ledger_counters(store: Arc<dyn HotStore>, clock: ManualClock) {
    let now = Periods::at(clock.now_ms());
    let key = KeySpendSeed {
        api_key_id: "key-s".into(),
        spent_today: Money::from_nanos(40),
        spent_this_month: Money::from_nanos(70),
        spent_total: Money::from_nanos(90),
    };
    let counters = CounterSeed { day: now.day, month: now.month, requests_today: 3, requests_this_month: 5, keys: vec![key] };
    let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: "s".into(), balance: Money::from_nanos(1_000), last_fund_seq: 1, charged_request_ids: Vec::new(), counters };
    assert!(store.load_account(snapshot).await.unwrap());
    let view = store.balance("s", "key-s").await.unwrap().unwrap();
    assert_eq!((view.daily_requests_used, view.monthly_requests_used), (3, 5));
    assert_eq!(
        (view.key_spent_daily, view.key_spent_monthly, view.key_spent_total),
        (Money::from_nanos(40), Money::from_nanos(70), Money::from_nanos(90))
    );
    let limited = |id: &str, limits: Limits| AuthorizeRequest { limits, ..request("s", id, 10) };
    let daily = Limits { daily_request_quota: Some(3), ..Limits::default() };
    assert!(matches!(store.authorize(&limited("d", daily)).await.unwrap(), Authorization::Refused(Refusal::DailyQuotaExceeded { .. })));
    let budget = Limits { key_budget_total: Some(Money::from_nanos(95)), ..Limits::default() };
    assert!(matches!(store.authorize(&limited("b", budget)).await.unwrap(), Authorization::Refused(Refusal::KeyBudgetExceeded { .. })));
    assert!(held(&store.authorize(&limited("ok", Limits { key_budget_total: Some(Money::from_nanos(100)), ..Limits::default() })).await.unwrap()));

    // Yesterday's counts are not today's.
    let stale = CounterSeed { day: now.day - 1, month: now.month - 1, requests_today: 9, requests_this_month: 9, keys: Vec::new() };
    let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: "y".into(), balance: Money::from_nanos(1_000), last_fund_seq: 1, charged_request_ids: Vec::new(), counters: stale };
    assert!(store.load_account(snapshot).await.unwrap());
    let view = store.balance("y", "key-y").await.unwrap().unwrap();
    assert_eq!((view.daily_requests_used, view.monthly_requests_used), (0, 0));
}

/// The last millisecond of a day and the first of the next are two days: a request at
/// 23:59:59.999 counts against that day's quota and key budget, one at 00:00:00.000 against a
/// fresh day's, while the month's counts go on.
async fn the_last_millisecond_of_a_day_and_midnight_count_in_different_days(store: Arc<dyn HotStore>, clock: ManualClock) {
    clock.set_time(datetime!(2026-06-15 23:59:59.999 UTC));
    load(&*store, "q", 1_000).await;
    load(&*store, "b", 1_000).await;
    let quota = |id: &str| AuthorizeRequest { limits: Limits { daily_request_quota: Some(1), ..Limits::default() }, ..request("q", id, 10) };
    let budget = |id: &str| AuthorizeRequest { limits: Limits { key_budget_daily: Some(Money::from_nanos(15)), ..Limits::default() }, ..request("b", id, 10) };
    for (account, first) in [("q", quota("late")), ("b", budget("late"))] {
        assert!(held(&store.authorize(&first).await.unwrap()), "{account}");
        store.settle(event(account, "late", 10, RequestStatus::Success)).await.unwrap();
    }
    // One millisecond before the day's end: a retry after 1 s is a retry tomorrow.
    assert_eq!(store.authorize(&quota("early")).await.unwrap(), Authorization::Refused(Refusal::DailyQuotaExceeded { retry_after_secs: 1 }));
    assert_eq!(
        store.authorize(&budget("early")).await.unwrap(),
        Authorization::Refused(Refusal::KeyBudgetExceeded { period: BudgetPeriod::Daily, retry_after_secs: Some(1) })
    );
    let before = store.balance("b", "key-b").await.unwrap().unwrap();
    assert_eq!((before.daily_requests_used, before.key_spent_daily), (1, Money::from_nanos(10)));

    clock.advance_ms(1); // 2026-06-16 00:00:00.000
    let after = store.balance("b", "key-b").await.unwrap().unwrap();
    assert_eq!((after.daily_requests_used, after.key_spent_daily), (0, Money::ZERO), "a new day counts from zero");
    assert_eq!(
        (after.monthly_requests_used, after.key_spent_monthly, after.key_spent_total),
        (1, Money::from_nanos(10), Money::from_nanos(10)),
        "the month and the total go on"
    );
    assert!(held(&store.authorize(&quota("early")).await.unwrap()), "the new day's quota is free");
    assert!(held(&store.authorize(&budget("early")).await.unwrap()), "the new day's budget is free");
    assert_eq!(store.authorize(&quota("later")).await.unwrap(), Authorization::Refused(Refusal::DailyQuotaExceeded { retry_after_secs: 86_400 }));
}

/// A hold placed at 23:59:59.999 took its request slot from that day: voided or expired after
/// midnight it gives nothing back to the new day, which it never took from; settled after
/// midnight, its spend falls in the day the charge is made, the day the ledger dates it by.
async fn a_hold_from_before_midnight_leaves_the_new_day_alone(store: Arc<dyn HotStore>, clock: ManualClock) {
    clock.set_time(datetime!(2026-06-15 23:59:59.999 UTC));
    load(&*store, "a", 1_000).await;
    let quota = |id: &str, hold_ttl_ms: u64| AuthorizeRequest {
        limits: Limits { daily_request_quota: Some(3), ..Limits::default() },
        hold_ttl_ms,
        ..request("a", id, 10)
    };
    for (id, ttl_ms) in [("voided", 60_000), ("expiring", 1), ("settled", 60_000)] {
        assert!(held(&store.authorize(&quota(id, ttl_ms)).await.unwrap()), "{id}");
    }
    clock.advance_ms(1); // 2026-06-16 00:00:00.000: "expiring" is due
    assert!(held(&store.authorize(&quota("new-1", 60_000)).await.unwrap()));
    store.void(event("a", "voided", 0, RequestStatus::Failed)).await.unwrap();
    assert_eq!(store.expire_holds().await.unwrap(), 1);
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.daily_requests_used, view.held), (1, Money::from_nanos(20)), "the new day still counts its own request");
    store.settle(event("a", "settled", 7, RequestStatus::Success)).await.unwrap();
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    assert_eq!((view.key_spent_daily, view.key_spent_monthly, view.held), (Money::from_nanos(7), Money::from_nanos(7), Money::from_nanos(10)));
    for id in ["new-2", "new-3"] {
        assert!(held(&store.authorize(&quota(id, 60_000)).await.unwrap()), "{id}");
    }
    assert_eq!(store.authorize(&quota("new-4", 60_000)).await.unwrap(), Authorization::Refused(Refusal::DailyQuotaExceeded { retry_after_secs: 86_400 }));
}

/// A month's last millisecond and the next month's first: the monthly quota and key budget
/// start afresh at every kind of month end — a 30-day month, February of a common year, of a
/// leap year and of a century year that is not leap, a year's end — and not at the end of 28
/// February in a leap year, which is not the month's.
async fn a_month_end_starts_monthly_quotas_and_budgets_afresh(store: Arc<dyn HotStore>, clock: ManualClock) {
    const DAY_SECONDS: u64 = 86_400;
    // (the last millisecond, the days of the month after it)
    let ends = [
        (datetime!(2026-04-30 23:59:59.999 UTC), 31),
        (datetime!(2026-02-28 23:59:59.999 UTC), 31),
        (datetime!(2028-02-29 23:59:59.999 UTC), 31),
        (datetime!(2100-02-28 23:59:59.999 UTC), 31),
        (datetime!(2026-12-31 23:59:59.999 UTC), 31),
        (datetime!(2026-01-31 23:59:59.999 UTC), 28),
    ];
    for (index, (last_millisecond, next_month_days)) in ends.into_iter().enumerate() {
        let account = format!("m{index}");
        clock.set_time(last_millisecond);
        load(&*store, &account, 1_000).await;
        let limits = Limits { monthly_request_quota: Some(1), key_budget_monthly: Some(Money::from_nanos(15)), ..Limits::default() };
        let monthly = |id: &str| AuthorizeRequest { limits: limits.clone(), ..request(&account, id, 10) };
        let budget_only = AuthorizeRequest { limits: Limits { key_budget_monthly: Some(Money::from_nanos(15)), ..Limits::default() }, ..request(&account, "over", 10) };
        assert!(held(&store.authorize(&monthly("last")).await.unwrap()), "{last_millisecond}");
        store.settle(event(&account, "last", 10, RequestStatus::Success)).await.unwrap();
        assert_eq!(store.authorize(&monthly("refused")).await.unwrap(), Authorization::Refused(Refusal::MonthlyQuotaExceeded { retry_after_secs: 1 }), "{last_millisecond}");
        assert_eq!(
            store.authorize(&budget_only).await.unwrap(),
            Authorization::Refused(Refusal::KeyBudgetExceeded { period: BudgetPeriod::Monthly, retry_after_secs: Some(1) }),
            "{last_millisecond}"
        );

        clock.advance_ms(1);
        let view = store.balance(&account, &format!("key-{account}")).await.unwrap().unwrap();
        assert_eq!((view.monthly_requests_used, view.key_spent_monthly, view.key_spent_total), (0, Money::ZERO, Money::from_nanos(10)), "{last_millisecond} + 1 ms");
        assert!(held(&store.authorize(&monthly("first")).await.unwrap()), "{last_millisecond} + 1 ms: a new month");
        assert_eq!(
            store.authorize(&monthly("second")).await.unwrap(),
            Authorization::Refused(Refusal::MonthlyQuotaExceeded { retry_after_secs: next_month_days * DAY_SECONDS }),
            "{last_millisecond} + 1 ms"
        );
    }
    // 28 February 2028 ends a day, not the month: 29 February follows.
    clock.set_time(datetime!(2028-02-28 23:59:59.999 UTC));
    load(&*store, "leap", 1_000).await;
    let monthly = |id: &str| AuthorizeRequest { limits: Limits { monthly_request_quota: Some(1), ..Limits::default() }, ..request("leap", id, 10) };
    assert!(held(&store.authorize(&monthly("last")).await.unwrap()));
    clock.advance_ms(1);
    assert_eq!(store.authorize(&monthly("next")).await.unwrap(), Authorization::Refused(Refusal::MonthlyQuotaExceeded { retry_after_secs: DAY_SECONDS }));
}

/// A minute's last millisecond and the next minute's first: the per-minute request and token
/// limits start afresh.
async fn a_minute_boundary_starts_the_rate_limits_afresh(store: Arc<dyn HotStore>, clock: ManualClock) {
    clock.set_time(datetime!(2026-06-15 12:34:59.999 UTC));
    load(&*store, "a", 1_000).await;
    let requests = |id: &str| AuthorizeRequest { limits: Limits { key_requests_per_minute: Some(1), ..Limits::default() }, ..request("a", id, 10) };
    // Each request holds 10 tokens: a limit of 10 lets one through.
    let tokens = |id: &str| AuthorizeRequest { api_key_id: "key-t".into(), limits: Limits { key_tokens_per_minute: Some(10), ..Limits::default() }, ..request("a", id, 10) };
    assert!(held(&store.authorize(&requests("r1")).await.unwrap()));
    assert!(held(&store.authorize(&tokens("t1")).await.unwrap()));
    assert_eq!(store.authorize(&requests("r2")).await.unwrap(), Authorization::Refused(Refusal::RateLimited { retry_after_secs: 1 }));
    assert_eq!(store.authorize(&tokens("t2")).await.unwrap(), Authorization::Refused(Refusal::RateLimited { retry_after_secs: 1 }));
    clock.advance_ms(1); // 12:35:00.000
    assert!(held(&store.authorize(&requests("r2")).await.unwrap()));
    assert!(held(&store.authorize(&tokens("t2")).await.unwrap()));
    assert_eq!(store.authorize(&requests("r3")).await.unwrap(), Authorization::Refused(Refusal::RateLimited { retry_after_secs: 60 }));
}

/// Without a set clock each store keeps its own time — the system clock in process, the
/// server's `TIME` in Redis — and it runs: a request counts in the current day, and a hold of
/// 1 ms comes due without anyone moving a clock.
async fn without_a_set_clock_the_stores_keep_their_own_time(store: Arc<dyn HotStore>) {
    load(&*store, "a", 100).await;
    let day = Periods::at(tollgate_store::clock::now_ms()).day;
    assert!(held(&store.authorize(&AuthorizeRequest { hold_ttl_ms: 1, ..request("a", "brief", 10) }).await.unwrap()));
    let view = store.balance("a", "key-a").await.unwrap().unwrap();
    // Unless midnight passed in between, which leaves the count in the day before.
    if Periods::at(tollgate_store::clock::now_ms()).day == day {
        assert_eq!(view.daily_requests_used, 1);
    }
    let started = std::time::Instant::now();
    let mut released = 0;
    while released == 0 {
        assert!(started.elapsed() < WAIT_BOUND, "a hold of 1 ms was not released in {WAIT_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        released += store.expire_holds().await.unwrap();
    }
    assert_eq!(released, 1);
    assert_eq!(store.balance("a", "key-a").await.unwrap().unwrap().held, Money::ZERO);
}

/// An entry delivered `deliveries_max` times without an acknowledgement is parked in the shard's
/// dead-letter stream instead of being delivered forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_delivered_too_often_is_parked() {
    let prefix = prefix();
    let store = RedisHotStore::connect(&redis_url(), &prefix, 1).await.unwrap();
    let keys = KeySpace::new(&prefix, 1).unwrap();
    let log_config = |consumer: &str| RedisLogConfig { consumer: consumer.into(), poll_idle_ms: 10, claim_idle_ms: 100, deliveries_max: 2, ..RedisLogConfig::default() };
    load(&store, "p", 100).await;
    assert!(held(&store.authorize(&request("p", "poison", 10)).await.unwrap()));
    store.settle(event("p", "poison", 10, RequestStatus::Success)).await.unwrap();
    let shutdown = CancellationToken::new();
    for _ in 0..2 {
        let crashing = RedisLog::new(store.connection(), keys.clone(), log_config("crashing"), shutdown.clone()).await.unwrap();
        assert_eq!(crashing.read_batch(10).await.unwrap().len(), 1);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let survivor = RedisLog::new(store.connection(), keys.clone(), log_config("survivor"), shutdown.clone()).await.unwrap();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    assert!(survivor.read_batch(10).await.unwrap().is_empty(), "the parked entry is not delivered again");
    assert_eq!(survivor.pending().await.unwrap(), 0);
    let mut connection = store.connection();
    let parked: usize = redis::cmd("XLEN").arg(keys.dead_letters(0)).query_async(&mut connection).await.unwrap();
    assert_eq!(parked, 1);
}

/// Issue 19 item 8: a parked entry leaves the usage stream in the same step that puts it in the
/// dead letters, whichever path parks it (delivered too often, unreadable, refused by the
/// ledger), so `unlogged_charges` counts its charge once (the reclaim once left it in both:
/// reconciliation saw false drift and its fix debited twice); and an unreadable entry is
/// reported, not an error that stops reconciliation, verify and the stale release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_charge_is_owed_once_and_an_unreadable_entry_stops_nothing() {
    let (store, keys) = one_shard_store("p").await;
    let log_config = |consumer: &str| RedisLogConfig { consumer: consumer.into(), poll_idle_ms: 10, claim_idle_ms: 100, deliveries_max: 2, ..RedisLogConfig::default() };
    assert!(held(&store.authorize(&request("p", "poison", 10)).await.unwrap()));
    store.settle(event("p", "poison", 10, RequestStatus::Success)).await.unwrap();
    let mut connection = store.connection();
    for stream in [keys.stream(0), keys.dead_letters(0)] {
        let _: String = redis::cmd("XADD").arg(&stream).arg("*").arg("event").arg("{not json").query_async(&mut connection).await.unwrap();
    }
    // Two lives of a consumer read "poison" and die; the first parks the unreadable entry.
    for _ in 0..2 {
        let crashing = RedisLog::new(store.connection(), keys.clone(), log_config("crashing"), CancellationToken::new()).await.unwrap();
        assert_eq!(crashing.read_batch(10).await.unwrap().len(), 1);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reclaiming = CancellationToken::new();
    let survivor = RedisLog::new(store.connection(), keys.clone(), log_config("survivor"), reclaiming.clone()).await.unwrap();
    let stop = reclaiming.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    assert!(survivor.read_batch(10).await.unwrap().is_empty(), "poison was parked, not delivered again");

    // A charge the ledger refuses, parked by the writer.
    assert!(held(&store.authorize(&request("p", "refused", 20)).await.unwrap()));
    store.settle(event("p", "refused", 20, RequestStatus::Success)).await.unwrap();
    let writer = RedisLog::new(store.connection(), keys.clone(), log_config("writer"), CancellationToken::new()).await.unwrap();
    let mut batch = writer.read_batch(10).await.unwrap();
    assert_eq!(batch.len(), 1);
    writer.park(batch.remove(0), "refused by the ledger").await.unwrap();

    let length = |stream: String| {
        let mut connection = store.connection();
        async move { redis::cmd("XLEN").arg(stream).query_async::<usize>(&mut connection).await.unwrap() }
    };
    assert_eq!(length(keys.stream(0)).await, 0, "every parked entry left the usage stream");
    assert_eq!(length(keys.dead_letters(0)).await, 4, "two unreadable entries, poison and refused");
    assert_eq!(writer.pending().await.unwrap(), 0);
    let mut owed: Vec<(String, Money)> = store.unlogged_charges().await.unwrap().into_iter().map(|charge| (charge.request_id, charge.cost)).collect();
    owed.sort();
    assert_eq!(owed, [("poison".to_string(), Money::from_nanos(10)), ("refused".to_string(), Money::from_nanos(20))], "each parked charge owed once");
}

/// The worker reads the next batch while it writes one: no read hands out again an entry still
/// in flight (read, not yet acknowledged), neither from this consumer's own pending entries
/// after a restart nor through the reclaim of idle entries, which must not park it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_in_flight_are_never_handed_out_twice() {
    let (store, keys) = one_shard_store("f").await;
    let config = RedisLogConfig { consumer: "writer".into(), poll_idle_ms: 10, claim_idle_ms: 100, deliveries_max: 3, ..RedisLogConfig::default() };
    for index in 0..10 {
        let id = format!("r{index}");
        assert!(held(&store.authorize(&request("f", &id, 10)).await.unwrap()));
        store.settle(event("f", &id, 10, RequestStatus::Success)).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    // A first life reads all ten and dies without acknowledging them.
    let first = RedisLog::new(store.connection(), keys.clone(), config.clone(), shutdown.clone()).await.unwrap();
    assert_eq!(first.read_batch(100).await.unwrap().len(), 10);
    drop(first);

    // Restarted, it reads its own pending entries again: in two batches, each entry once.
    let log = RedisLog::new(store.connection(), keys.clone(), config, shutdown.clone()).await.unwrap();
    let one = log.read_batch(4).await.unwrap();
    let two = log.read_batch(100).await.unwrap();
    let mut ids: Vec<&str> = one.iter().chain(&two).map(|delivery| delivery.event.request_id.as_str()).collect();
    assert_eq!((one.len(), two.len()), (4, 6));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "each entry handed out once");

    // Idle past claim_idle_ms and delivered up to deliveries_max times, they are in flight: not
    // handed out again, not parked.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    assert!(log.read_batch(100).await.unwrap().is_empty(), "nothing is handed out twice");
    let mut connection = store.connection();
    let parked: usize = redis::cmd("XLEN").arg(keys.dead_letters(0)).query_async(&mut connection).await.unwrap();
    assert_eq!(parked, 0, "entries in flight are never parked");

    // Acknowledged, they are gone.
    log.ack(one).await.unwrap();
    log.ack(two).await.unwrap();
    assert_eq!(log.pending().await.unwrap(), 0);
}

/// A drain (shutdown) reads until a pass comes back empty. A pass that finds this consumer's own
/// pending entries all in flight must go on to the new ones, or the drain stops short of them:
/// a clean shutdown once left the last charges of 50 streams in the stream this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_reads_past_own_pending_entries_in_flight() {
    let (store, keys) = one_shard_store("d").await;
    let config = RedisLogConfig { consumer: "drainer".into(), poll_idle_ms: 10, claim_idle_ms: 60_000, deliveries_max: 3, ..RedisLogConfig::default() };
    let settle = |id: &'static str| {
        let store = &store;
        async move {
            assert!(held(&store.authorize(&request("d", id, 10)).await.unwrap()));
            store.settle(event("d", id, 10, RequestStatus::Success)).await.unwrap();
        }
    };
    for id in ["old-1", "old-2", "old-3"] {
        settle(id).await;
    }
    let shutdown = CancellationToken::new();
    // A first life takes three entries and dies without acknowledging them.
    let first = RedisLog::new(store.connection(), keys.clone(), config.clone(), shutdown.clone()).await.unwrap();
    assert_eq!(first.read_batch(100).await.unwrap().len(), 3);
    drop(first);
    // Restarted, it takes them again from its own pending entries; they are being written when
    // two new charges arrive and shutdown begins.
    let log = RedisLog::new(store.connection(), keys, config, shutdown.clone()).await.unwrap();
    let in_flight = log.read_batch(100).await.unwrap();
    assert_eq!(in_flight.len(), 3);
    for id in ["new-1", "new-2"] {
        settle(id).await;
    }
    shutdown.cancel();
    let drained = log.read_remaining(100).await.unwrap();
    let mut ids: Vec<&str> = drained.iter().map(|delivery| delivery.event.request_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["new-1", "new-2"], "the drain's pass hands out the new entries");
    log.ack(in_flight).await.unwrap();
    log.ack(drained).await.unwrap();
    assert!(log.read_remaining(100).await.unwrap().is_empty());
    assert_eq!(log.pending().await.unwrap(), 0);
}

/// Every period counter the scripts write expires after its period, whether the call created it
/// or added to it (the TTL is set once, at creation); no counter is left without a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn period_counters_always_carry_their_ttl() {
    let prefix = prefix();
    let store = RedisHotStore::connect(&redis_url(), &prefix, 1).await.unwrap();
    load(&store, "c", 1_000).await;
    for id in ["one", "two"] {
        assert!(held(&store.authorize(&request("c", id, 10)).await.unwrap()));
        store.settle(event("c", id, 7, RequestStatus::Success)).await.unwrap();
    }
    let mut connection = store.connection();
    let counters: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.unwrap();
    let kinds = [(":day:", 2, 2 * 86_400_000), (":month:", 2, 32 * 86_400_000), (":rpm:", 2, 120_000), (":tpm:", 20, 120_000), (":spent_day:", 14, 2 * 86_400_000), (":spent_month:", 14, 32 * 86_400_000)];
    for (kind, expected_total, ceiling_ms) in kinds {
        // Two keys of a kind only if the calls straddled a period's end.
        let keys: Vec<&String> = counters.iter().filter(|key| key.contains(kind)).collect();
        assert!(matches!(keys.len(), 1 | 2), "{kind}: {counters:?}");
        let mut total = 0i64;
        for key in keys {
            let ttl_ms: i64 = redis::cmd("PTTL").arg(key).query_async(&mut connection).await.unwrap();
            assert!(ttl_ms > 0 && ttl_ms <= ceiling_ms, "{key}: TTL {ttl_ms} ms");
            let value: i64 = redis::cmd("GET").arg(key).query_async(&mut connection).await.unwrap();
            total += value;
        }
        assert_eq!(total, expected_total, "{kind}");
    }
}

/// A charge's record in Redis outlives the worker's lag (24 h) until the ledger has the charge;
/// the worker's ack then deletes it (the ledger has the binding and the body), and the id stays
/// remembered, from its settle, for the window (`recent_charge_ms`) and at most one bucket
/// (2 min) more — a late second settle of it charges nothing — then the ledger alone answers.
/// An id loaded from the ledger is remembered the same way; what is not acknowledged keeps its
/// record and body; a record an older version wrote ("1", no bucket) gets its id into the bucket
/// of the acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_charge_is_remembered_for_the_window_without_its_record() {
    const WINDOW_MS: i64 = 600_000;
    const BUCKET_MS: i64 = 120_000;
    let clock = midday();
    let prefix = prefix();
    let store = RedisHotStore::connect(&redis_url(), &prefix, 1).await.unwrap().with_clock(clock.clock()).remembering_charges_for(WINDOW_MS);
    let keys = KeySpace::new(&prefix, 1).unwrap();
    load(&store, "s", 1_000).await;
    let config = RedisLogConfig { consumer: "trimmer".into(), poll_idle_ms: 10, claim_idle_ms: 60_000, deliveries_max: 3, recent_charge_ms: WINDOW_MS };
    let body = StoredResponse { status: 200, content_type: "application/json".into(), body: br#"{"id":"chatcmpl-1"}"#.to_vec() };
    for id in ["kept", "written", "streamed", "legacy"] {
        assert!(held(&store.authorize(&request("s", id, 10)).await.unwrap()));
        let stored_response = (id != "streamed").then(|| body.clone());
        let fingerprint = (id != "written").then(|| format!("fp-{id}"));
        let charged = UsageEvent { stored_response: stored_response.clone(), request_fingerprint: fingerprint.clone(), ..event("s", id, 10, RequestStatus::Success) };
        let charged_at_ms = charged.created_at_ms;
        store.settle(charged).await.unwrap();
        let bound = ChargedRequest { api_key_id: "key-s".into(), charged_at_ms, request_fingerprint: fingerprint, response: stored_response };
        assert_eq!(store.charged_request("s", id).await.unwrap(), Some(bound), "{id}: bound and replayable before the ledger has it");
    }
    let mut connection = store.connection();
    // As an older version left "legacy": its record "1", no bucket.
    let settle_bucket = format!("{}:recent:s:{}", keys.account_base("s"), clock.now_ms().div_euclid(BUCKET_MS));
    let _: () = redis::cmd("SET").arg(keys.charged_key("s", "legacy")).arg("1").query_async(&mut connection).await.unwrap();
    let _: i64 = redis::cmd("SREM").arg(&settle_bucket).arg("legacy").query_async(&mut connection).await.unwrap();
    let log = RedisLog::new(store.connection(), keys.clone(), config, CancellationToken::new()).await.unwrap();
    let (acknowledged, kept): (Vec<_>, Vec<_>) = log.read_batch(10).await.unwrap().into_iter().partition(|delivery| delivery.event.request_id != "kept");
    assert_eq!((acknowledged.len(), kept.len()), (3, 1));
    let (seconds, _): (i64, i64) = redis::cmd("TIME").query_async(&mut connection).await.unwrap();
    log.ack(acknowledged).await.unwrap();
    // The acknowledgement runs on the server's clock: "legacy" is in the bucket of that moment
    // (or the next, across a bucket's end); ids settle already put in a bucket are not added twice.
    let ack_bucket = (seconds * 1000).div_euclid(BUCKET_MS);
    for id in ["legacy", "written"] {
        let mut found = false;
        for bucket in [ack_bucket, ack_bucket + 1] {
            let key = format!("{}:recent:s:{bucket}", keys.account_base("s"));
            let member: i64 = redis::cmd("SISMEMBER").arg(&key).arg(id).query_async(&mut connection).await.unwrap();
            found |= member == 1;
        }
        assert_eq!(found, id == "legacy", "{id} in the bucket of the acknowledgement");
    }

    for id in ["written", "streamed", "legacy"] {
        let record: Option<String> = redis::cmd("GET").arg(keys.charged_key("s", id)).query_async(&mut connection).await.unwrap();
        assert_eq!(record, None, "{id}: the record goes once the ledger has it");
    }
    assert_eq!(store.charged_request("s", "written").await.unwrap(), None, "a replay now reads the ledger");
    let record = store.charged_request("s", "kept").await.unwrap().unwrap();
    assert_eq!((record.request_fingerprint.as_deref(), record.response), (Some("fp-kept"), Some(body)), "what is not in the ledger keeps its binding and body");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(keys.charged_key("s", "kept")).query_async(&mut connection).await.unwrap();
    assert!(ttl_ms > 86_000_000 && ttl_ms <= 86_400_000, "a queued charge's record covers the worker's lag: {ttl_ms} ms");
    // The bucket set of the settle: one key for every id, living the window past the bucket.
    let recent = settle_bucket;
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(&recent).query_async(&mut connection).await.unwrap();
    assert_eq!(members.len(), 4, "old, kept, written, streamed: {members:?}");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&recent).query_async(&mut connection).await.unwrap();
    assert!(ttl_ms > WINDOW_MS && ttl_ms <= WINDOW_MS + BUCKET_MS, "the bucket lives past its end by the window: {ttl_ms} ms");

    // A server clock stepped back (up to a bucket) still finds what was settled before it.
    clock.advance_ms(-60_000);
    assert_eq!(store.authorize(&request("s", "written", 10)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged), "after a step back");
    clock.advance_ms(60_000);
    clock.advance_ms(WINDOW_MS - 1);
    for id in ["written", "streamed", "old", "kept"] {
        assert_eq!(store.authorize(&request("s", id, 10)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged), "{id} within the window");
    }
    let balance = store.balance("s", "key-s").await.unwrap().unwrap().balance;
    let late = store.settle(event("s", "written", 10, RequestStatus::Success)).await.unwrap();
    assert!(late.already_settled && late.balance_after == balance, "a second settle within the window charges nothing: {late:?}");
    clock.advance_ms(BUCKET_MS + 1);
    for id in ["written", "streamed", "old"] {
        assert!(held(&store.authorize(&request("s", id, 10)).await.unwrap()), "{id} is the ledger's to answer after the window");
    }
    assert_eq!(store.authorize(&request("s", "kept", 10)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged), "a charge the ledger lacks is remembered however long");
    let missing: Option<String> = redis::cmd("GET").arg(keys.charged_key("s", "never")).query_async(&mut connection).await.unwrap();
    assert_eq!(missing, None, "the ack never creates a record");
    log.ack(kept).await.unwrap();
}

/// A Redis of its own, started for one test (the shared one cannot be filled without disturbing
/// the others): `redis-server` from PATH (scripts/test installs it), killed on drop.
struct OwnRedis {
    process: std::process::Child,
    url: String,
}

impl OwnRedis {
    /// Starts it on a free port. The port is free when looked up, not when `redis-server` binds
    /// it: a test running beside this one may take it first. So the server counts as started only
    /// once the port answers with this process's id; one that exits (the port was taken) is
    /// started again on another port.
    async fn start(arguments: &[&str]) -> OwnRedis {
        let started = std::time::Instant::now();
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let process = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(arguments)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is not on PATH: run scripts/test, which installs it");
            let mut redis = OwnRedis { process, url: format!("redis://127.0.0.1:{port}") };
            loop {
                assert!(started.elapsed() < WAIT_BOUND, "redis-server did not start in {WAIT_BOUND:?}");
                if redis.process.try_wait().unwrap().is_some() {
                    break; // the port was taken: another one
                }
                if redis.answering_as_itself().await {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Whether the server on this port is this process (not another test's on a reused port).
    async fn answering_as_itself(&self) -> bool {
        let asked = async {
            let client = redis::Client::open(self.url.as_str()).ok()?;
            let mut connection = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("INFO").arg("server").query_async::<String>(&mut connection).await.ok()
        };
        // Whatever else holds the port may never answer.
        let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(1), asked).await else { return false };
        info.lines().any(|line| line.trim() == format!("process_id:{}", self.process.id()))
    }

    async fn store(&self, prefix: &str) -> RedisHotStore {
        RedisHotStore::connect(&self.url, prefix, 1).await.unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// An account's balance and held funds, and the events in its shard's stream, read directly.
async fn balance_held_and_events(connection: &mut Connection, keys: &KeySpace, account: &str) -> ((i64, i64), i64) {
    let fields: (i64, i64) = redis::cmd("HMGET").arg(keys.account_key(account)).arg("balance").arg("held").query_async(connection).await.unwrap();
    let events: i64 = redis::cmd("XLEN").arg(keys.stream(keys.shard_of(account))).query_async(connection).await.unwrap();
    (fields, events)
}

/// A Redis at `maxmemory` with `noeviction` (as DEPLOYMENT.md asks) refuses the scripts whole:
/// the store reports it as unavailable, so the gateway's `hot_store_down` policy applies, and
/// nothing is half done (no hold, no charge, no event). Freed, it works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_whole_calls_and_changes_nothing() {
    let redis = OwnRedis::start(&["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"]).await;
    let store = redis.store("full").await;
    let keys = KeySpace::new("full", 1).unwrap();
    load(&store, "f", 1_000).await;
    assert!(held(&store.authorize(&request("f", "before", 10)).await.unwrap()));
    let mut connection = store.connection();
    let filler = "x".repeat(64 * 1024);
    let mut filled = 0;
    loop {
        let set: redis::RedisResult<()> = redis::cmd("SET").arg(format!("filler:{filled}")).arg(&filler).query_async(&mut connection).await;
        match set {
            Ok(()) => filled += 1,
            Err(error) if error.to_string().contains("OOM") => break,
            Err(error) => panic!("filling Redis: {error}"),
        }
        assert!(filled < 1_000, "8 MB never filled");
    }
    // The fill stops at the first SET refused, whose own 64 KB counted: what is used may still be
    // a little under the limit, room for a script's small writes. Below what is used, it is not.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("4mb").query_async(&mut connection).await.unwrap();
    let before = balance_held_and_events(&mut connection, &keys, "f").await;
    assert_eq!(before, ((1_000, 10), 0));

    let refused = store.authorize(&request("f", "during", 10)).await;
    assert!(matches!(&refused, Err(StoreError::Unavailable(message)) if message.contains("OOM")), "{refused:?}");
    let refused = store.settle(event("f", "before", 7, RequestStatus::Success)).await;
    assert!(matches!(&refused, Err(StoreError::Unavailable(message)) if message.contains("OOM")), "{refused:?}");
    assert_eq!(balance_held_and_events(&mut connection, &keys, "f").await, before, "a refused call changes nothing");

    let _: i64 = redis::cmd("DEL").arg((0..filled).map(|index| format!("filler:{index}")).collect::<Vec<_>>()).query_async(&mut connection).await.unwrap();
    let settled = store.settle(event("f", "before", 7, RequestStatus::Success)).await.unwrap();
    assert_eq!((settled.balance_before, settled.balance_after), (Money::from_nanos(1_000), Money::from_nanos(993)));
    assert_eq!(balance_held_and_events(&mut connection, &keys, "f").await, ((993, 0), 1));
}
