//! The ledger conformance suite: the same checks against every `Ledger` backend — SQLite (a
//! fresh file per test) and PostgreSQL (a fresh database per test on the server named by
//! `TOLLGATE_TEST_POSTGRES_URL`, which `scripts/test` starts; without it these tests fail, they
//! do not skip).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use tollgate_core::{Money, Price};
use tollgate_store::Ledger;
use tollgate_store::StoreError;
use tollgate_store::model::{
    AccountKind, AccountPatch, AccountStatus, FundKind, NewAccount, NewApiKey, NewFund, NewPrice, RecordOutcome,
    RequestStatus, StoredResponse, SummaryGroup, SummaryQuery, TopUpStatus, UsageEvent, UsageQuery, AccountQuery, PriceHistoryQuery, TopUpQuery,
};
use tollgate_store::postgres::PgLedger;
use tollgate_store::sqlite::SqliteLedger;
use tollgate_store::retention::Pruned;
use tollgate_store::verify::check_account;

mod support;
use support::{event, fresh_postgres_url, new_account};

async fn sqlite() -> Arc<dyn Ledger> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-ledger-{}.db", uuid::Uuid::new_v4().simple()));
    Arc::new(SqliteLedger::connect(&format!("sqlite://{}", path.display()), 4).await.unwrap())
}

/// A fresh database on the test server.
async fn postgres() -> Arc<dyn Ledger> {
    Arc::new(PgLedger::connect(&fresh_postgres_url("ledger").await, 8).await.unwrap())
}

/// A usage row names the price row it was priced with; one that names a price the ledger lacks
/// is refused with the whole batch (the usage writer then isolates and parks that event).
async fn an_unknown_price_rolls_back_the_whole_batch(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let price = Price { input_per_mtok: Money::from_nanos(1), output_per_mtok: Money::from_nanos(1), cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO };
    let known = ledger.put_prices(vec![NewPrice { provider: "mock".into(), model: "demo-gpt".into(), customer_type: "standard".into(), price }]).await.unwrap()[0].id;
    let priced = |request: &str, price_id: i64| UsageEvent { price_id: Some(price_id), ..event("a", request, 10, RequestStatus::Success) };
    let result = ledger.record_usage_batch(&[priced("r1", known), priced("r2", known + 1_000)]).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    assert!(ledger.usage_rows(UsageQuery { limit: 10, ..UsageQuery::default() }).await.unwrap().is_empty());
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::ZERO);

    assert_eq!(ledger.record_usage_batch(&[priced("r1", known), priced("r3", known)]).await.unwrap(), vec![RecordOutcome::Inserted; 2]);
    let rows = ledger.usage_rows(UsageQuery { limit: 10, ..UsageQuery::default() }).await.unwrap();
    assert_eq!(rows.iter().map(|row| row.price_id).collect::<Vec<_>>(), vec![Some(known); 2]);
    assert_sound(&*ledger, "a").await;
}

/// One `#[tokio::test]` per backend for each conformance check.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(super::sqlite().await).await; })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(super::postgres().await).await; })*
        }
    };
}

conformance!(
    accounts_are_created_once_and_patched,
    customer_types_are_listed_once_each,
    keys_are_found_by_hash_and_revoked,
    the_newest_price_wins,
    a_topup_confirmed_twice_adds_once,
    a_reference_applies_once,
    a_refund_cannot_exceed_the_balance,
    usage_batches_skip_duplicates_and_failures_do_not_block_retries,
    an_unknown_account_rolls_back_the_whole_batch,
    an_unknown_price_rolls_back_the_whole_batch,
    concurrent_writers_keep_the_chain_and_the_sum,
    writers_racing_on_the_same_events_charge_each_once,
    pages_return_each_row_once,
    summaries_match_the_rows,
    summaries_equal_an_independent_fold_for_every_grouping,
    accounts_are_paged_by_id_and_found_by_part_of_id_or_name,
    monthly_totals_chain_from_one_month_to_the_next,
    operations_claim_each_job_period_once_and_keep_the_outbox,
    counter_seeds_hold_the_current_periods,
    a_fund_change_beyond_the_hot_store_range_is_refused_before_commit,
    stored_responses_are_pruned_from_the_head_in_batches,
    upstream_attempts_are_pruned_from_the_head_in_batches,
    added_channels_are_kept_once_and_removed_with_their_state,
);

async fn account(ledger: &dyn Ledger, id: &str) {
    ledger.create_account(new_account(id)).await.unwrap();
}

async fn deposit(ledger: &dyn Ledger, id: &str, nanos: i64, reference: &str) {
    let topup = ledger.create_topup(id, Money::from_nanos(nanos), reference).await.unwrap();
    ledger.confirm_topup(&topup.id).await.unwrap();
}


async fn assert_sound(ledger: &dyn Ledger, id: &str) {
    let check = check_account(ledger, id).await.unwrap();
    assert!(check.is_sound(), "I2/I4 broken: {check:?}");
}

async fn accounts_are_created_once_and_patched(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let again = ledger
        .create_account(NewAccount { id: "a".into(), kind: AccountKind::Tenant, name: "x".into(), customer_type: "t".into(), credit_limit: Money::ZERO, daily_request_quota: None, monthly_request_quota: None, low_balance_threshold: None })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))));
    let patched = ledger
        .update_account("a", AccountPatch { status: Some(AccountStatus::Suspended), daily_request_quota: Some(Some(5)), ..AccountPatch::default() })
        .await
        .unwrap();
    assert_eq!((patched.status, patched.daily_request_quota, patched.customer_type.as_str()), (AccountStatus::Suspended, Some(5), "standard"));
    let cleared = ledger.update_account("a", AccountPatch { daily_request_quota: Some(None), ..AccountPatch::default() }).await.unwrap();
    assert_eq!(cleared.daily_request_quota, None);
    assert!(matches!(ledger.update_account("nobody", AccountPatch::default()).await, Err(StoreError::NotFound { .. })));
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::ZERO);
}

async fn customer_types_are_listed_once_each(ledger: Arc<dyn Ledger>) {
    assert!(ledger.customer_types().await.unwrap().is_empty());
    account(&*ledger, "a").await;
    account(&*ledger, "b").await;
    let premium = NewAccount { id: "c".into(), kind: AccountKind::Tenant, name: "n".into(), customer_type: "premium".into(), credit_limit: Money::ZERO, daily_request_quota: None, monthly_request_quota: None, low_balance_threshold: None };
    ledger.create_account(premium).await.unwrap();
    assert_eq!(ledger.customer_types().await.unwrap(), ["premium", "standard"]);
}

async fn keys_are_found_by_hash_and_revoked(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let key = NewApiKey {
        id: "k1".into(),
        account_id: "a".into(),
        name: "k".into(),
        key_hash: "hash-1".into(),
        prefix: "tg_1".into(),
        budget_daily: None,
        budget_monthly: Some(Money::from_nanos(7)),
        budget_total: None,
        rpm: Some(3),
        tpm: None,
        allowed_models: Some(vec!["demo-gpt".into()]),
        session_lock: Some(tollgate_store::model::SessionLockMode::Reject),
        expires_at: None,
    };
    ledger.create_key(key.clone()).await.unwrap();
    let found = ledger.key_by_hash("hash-1").await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), found.budget_monthly, found.rpm, found.allowed_models.clone()), ("k1", Some(Money::from_nanos(7)), Some(3), Some(vec!["demo-gpt".to_string()])));
    assert_eq!(found.session_lock, Some(tollgate_store::model::SessionLockMode::Reject));
    assert!(ledger.key_by_hash("hash-2").await.unwrap().is_none());
    let revoked = ledger.revoke_key("k1").await.unwrap();
    let revoked_again = ledger.revoke_key("k1").await.unwrap();
    assert_eq!(revoked.revoked_at, revoked_again.revoked_at, "revocation is idempotent");
    assert!(matches!(ledger.create_key(NewApiKey { id: "k2".into(), account_id: "nobody".into(), key_hash: "h".into(), ..key }).await, Err(StoreError::NotFound { .. })));
}

async fn added_channels_are_kept_once_and_removed_with_their_state(ledger: Arc<dyn Ledger>) {
    use tollgate_store::model::{AddedChannel, ChannelState};
    let added = AddedChannel {
        model: "m".into(),
        channel: "backup".into(),
        provider: "p2".into(),
        upstream_model: None,
        priority: -1,
        weight: 3,
        concurrent_requests_max: Some(8),
        requests_per_minute_max: Some(600),
        // Past u32 and i32: kept whole.
        tokens_per_minute_max: Some(40_000_000_000),
        created_at_ms: 1_700_000_000_000,
    };
    ledger.add_channel(added.clone()).await.unwrap();
    let other = AddedChannel { channel: "other".into(), upstream_model: Some("m-2".into()), concurrent_requests_max: None, requests_per_minute_max: None, tokens_per_minute_max: None, ..added.clone() };
    ledger.add_channel(other.clone()).await.unwrap();
    assert!(matches!(ledger.add_channel(AddedChannel { weight: 9, ..added.clone() }).await, Err(StoreError::Conflict(_))), "one name per model");
    assert_eq!(ledger.added_channels().await.unwrap(), [added.clone(), other.clone()], "kept as given, the first not overwritten");
    let state = ChannelState { model: "m".into(), channel: "backup".into(), enabled: false, reason: None, updated_at_ms: 1 };
    ledger.set_channel_state(state).await.unwrap();
    assert!(ledger.remove_channel("m", "backup").await.unwrap());
    assert!(!ledger.remove_channel("m", "backup").await.unwrap(), "removed once");
    assert_eq!(ledger.added_channels().await.unwrap(), [other]);
    assert!(ledger.channel_states().await.unwrap().is_empty(), "its disabled state went with it");
    ledger.add_channel(added.clone()).await.unwrap();
    assert!(ledger.added_channels().await.unwrap().contains(&added), "a removed name can be added again");
}

async fn the_newest_price_wins(ledger: Arc<dyn Ledger>) {
    let price = |input: i64| Price { input_per_mtok: Money::from_nanos(input), output_per_mtok: Money::from_nanos(1), cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO };
    let new = |model: &str, input: i64| NewPrice { provider: "p".into(), model: model.into(), customer_type: "t".into(), price: price(input) };
    ledger.put_prices(vec![new("m", 1), new("other", 9)]).await.unwrap();
    let second = ledger.put_prices(vec![new("m", 2)]).await.unwrap();
    let current = ledger.current_prices().await.unwrap();
    assert_eq!(current.len(), 2);
    let m = current.iter().find(|row| row.model == "m").unwrap();
    assert_eq!((m.id, m.price.input_per_mtok), (second[0].id, Money::from_nanos(2)));
    assert!(matches!(ledger.put_prices(vec![new("bad", -1)]).await, Err(StoreError::Invalid(_))));
    // The history keeps the superseded row, newest first, and is narrowed by what is given.
    let history = |model: Option<&str>, limit: u32| PriceHistoryQuery { model: model.map(str::to_string), limit, ..PriceHistoryQuery::default() };
    let of_m = ledger.price_history(history(Some("m"), 10)).await.unwrap();
    assert_eq!(of_m.iter().map(|row| row.price.input_per_mtok.nanos()).collect::<Vec<_>>(), [2, 1]);
    assert!(of_m[0].id > of_m[1].id && of_m[0].effective_from >= of_m[1].effective_from);
    assert_eq!(ledger.price_history(history(None, 10)).await.unwrap().len(), 3);
    let newest = ledger.price_history(history(None, 1)).await.unwrap();
    assert_eq!(newest.len(), 1, "the limit holds");
    assert_eq!(newest[0].id, second[0].id);
    let other_tier = PriceHistoryQuery { customer_type: Some("other".into()), limit: 10, ..PriceHistoryQuery::default() };
    assert!(ledger.price_history(other_tier).await.unwrap().is_empty());
}

async fn a_topup_confirmed_twice_adds_once(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let topup = ledger.create_topup("a", Money::from_nanos(500), "pay-1").await.unwrap();
    assert_eq!(topup.status, TopUpStatus::Pending);
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::ZERO);
    let (first, fund) = ledger.confirm_topup(&topup.id).await.unwrap();
    let (second, same_fund) = ledger.confirm_topup(&topup.id).await.unwrap();
    assert_eq!((first.status, second.status), (TopUpStatus::Confirmed, TopUpStatus::Confirmed));
    assert_eq!(fund, same_fund);
    let balance = ledger.account_balance("a").await.unwrap().unwrap();
    assert_eq!((balance.balance, balance.last_fund_seq), (Money::from_nanos(500), fund.ledger_seq));
    assert_eq!(ledger.create_topup("a", Money::from_nanos(500), "pay-1").await.unwrap().id, topup.id);
    assert!(matches!(ledger.create_topup("a", Money::from_nanos(501), "pay-1").await, Err(StoreError::Conflict(_))));
    assert!(matches!(ledger.create_topup("a", Money::ZERO, "pay-2").await, Err(StoreError::Invalid(_))));
    // Listed newest first, by status and account: a top-up left pending can be found.
    account(&*ledger, "b").await;
    let left = ledger.create_topup("a", Money::from_nanos(7), "pay-3").await.unwrap();
    let other = ledger.create_topup("b", Money::from_nanos(9), "pay-4").await.unwrap();
    let list = |account_id: Option<&str>, status: Option<TopUpStatus>| TopUpQuery { account_id: account_id.map(str::to_string), status, limit: 10 };
    let ids = |topups: Vec<tollgate_store::model::TopUp>| topups.into_iter().map(|topup| topup.id).collect::<Vec<_>>();
    assert_eq!(ids(ledger.topups(list(Some("a"), Some(TopUpStatus::Pending))).await.unwrap()), [left.id.as_str()]);
    assert_eq!(ids(ledger.topups(list(Some("a"), Some(TopUpStatus::Confirmed))).await.unwrap()), [topup.id.as_str()]);
    assert_eq!(ids(ledger.topups(list(None, Some(TopUpStatus::Pending))).await.unwrap()).len(), 2);
    assert!(ids(ledger.topups(list(None, None)).await.unwrap()).contains(&other.id));
    assert_eq!(ledger.topups(TopUpQuery { limit: 1, ..TopUpQuery::default() }).await.unwrap().len(), 1);
    assert_sound(&*ledger, "a").await;
}

async fn a_reference_applies_once(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000, "d").await;
    let adjustment = NewFund { account_id: "a".into(), kind: FundKind::Adjustment, amount: Money::from_nanos(-30), reference_id: "adj".into(), reason: Some("r".into()), operator_id: Some("ops".into()) };
    assert!(ledger.record_fund(adjustment.clone()).await.unwrap().newly_applied);
    assert!(!ledger.record_fund(adjustment.clone()).await.unwrap().newly_applied);
    assert!(matches!(ledger.record_fund(NewFund { amount: Money::from_nanos(-31), ..adjustment }).await, Err(StoreError::Conflict(_))));
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(970));
    let after_first = ledger.fund_transactions_after("a", 1).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].amount, Money::from_nanos(-30));
    assert_sound(&*ledger, "a").await;
}

async fn a_refund_cannot_exceed_the_balance(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 100, "d").await;
    let refund = |nanos: i64, reference: &str| NewFund { account_id: "a".into(), kind: FundKind::Refund, amount: Money::from_nanos(nanos), reference_id: reference.into(), reason: None, operator_id: None };
    assert!(matches!(ledger.record_fund(refund(-101, "r1")).await, Err(StoreError::Invalid(_))));
    assert!(matches!(ledger.record_fund(refund(5, "r2")).await, Err(StoreError::Invalid(_))), "a refund moves money out");
    ledger.record_fund(refund(-100, "r3")).await.unwrap();
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::ZERO);
    assert_sound(&*ledger, "a").await;
}

/// Issue 19 item 11: the ledger refuses a fund transaction whose amount or resulting balance the
/// hot store cannot hold (±`Money::HOT_STORE_MAX`), before it commits. It once committed them;
/// the hot store then refused to apply them every second for good, and every later fund change
/// of the account waited behind them.
async fn a_fund_change_beyond_the_hot_store_range_is_refused_before_commit(ledger: Arc<dyn Ledger>) {
    let max = Money::HOT_STORE_MAX.nanos();
    let adjustment = |account: &str, nanos: i64, reference: &str| NewFund { account_id: account.into(), kind: FundKind::Adjustment, amount: Money::from_nanos(nanos), reference_id: reference.into(), reason: Some("r".into()), operator_id: Some("ops".into()) };
    fn refused<T>(result: Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::Invalid(_)))
    }
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", max - 10, "d").await;
    assert!(refused(ledger.record_fund(adjustment("a", max + 1, "too-big")).await), "an amount beyond the range");
    assert!(refused(ledger.record_fund(adjustment("a", -max - 1, "too-small")).await), "a negative amount beyond the range");
    assert!(refused(ledger.record_fund(adjustment("a", 11, "over")).await), "a balance beyond the range");
    let topup = ledger.create_topup("a", Money::from_nanos(11), "pay-over").await.unwrap();
    assert!(refused(ledger.confirm_topup(&topup.id).await), "a confirmed top-up is a fund transaction too");
    ledger.record_fund(adjustment("a", 10, "to-the-edge")).await.unwrap();
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::HOT_STORE_MAX);
    assert_eq!(ledger.fund_transactions_after("a", 0).await.unwrap().len(), 2, "nothing refused was committed");
    assert_sound(&*ledger, "a").await;

    account(&*ledger, "b").await;
    ledger.record_fund(adjustment("b", -max, "down-to-the-edge")).await.unwrap();
    assert!(refused(ledger.record_fund(adjustment("b", -1, "under")).await), "a balance below the range");
    assert_eq!(ledger.account_balance("b").await.unwrap().unwrap().balance, Money::from_nanos(-max));
    assert_sound(&*ledger, "b").await;
}

/// The body stored with a charged request, if any.
async fn stored_body(ledger: &dyn Ledger, account_id: &str, request_id: &str) -> Option<Vec<u8>> {
    ledger.charged_request(account_id, request_id).await.unwrap()?.response.map(|stored| stored.body)
}

async fn usage_batches_skip_duplicates_and_failures_do_not_block_retries(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000, "d").await;
    let mut with_body = event("a", "r1", 10, RequestStatus::Success);
    with_body.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: b"{\"ok\":1}".to_vec() });
    with_body.request_fingerprint = Some("f1".into());
    let outcomes = ledger
        .record_usage_batch(&[with_body.clone(), event("a", "r1", 10, RequestStatus::Success), event("a", "r2", 0, RequestStatus::Failed)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Inserted, RecordOutcome::Duplicate, RecordOutcome::Inserted]);
    // A failed attempt does not count as charged, and a request id is charged per account.
    assert!(ledger.request_charged("a", "r1").await.unwrap());
    assert!(!ledger.request_charged("a", "r2").await.unwrap(), "only a failed row");
    assert!(!ledger.request_charged("b", "r1").await.unwrap());
    assert_eq!(ledger.record_usage_batch(&[with_body]).await.unwrap(), vec![RecordOutcome::Duplicate], "a re-delivered batch applies nothing");
    assert_eq!(ledger.record_usage_batch(&[event("a", "r2", 25, RequestStatus::Success)]).await.unwrap(), vec![RecordOutcome::Inserted]);
    assert!(ledger.request_charged("a", "r2").await.unwrap());
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(965));
    // A re-delivered charge between new ones: it is skipped, and the new ones take the next
    // ledger positions with no gap.
    // Its stored responses go with the rows that were written, each to its own request.
    let with_body_as = |request_id: &str, body: &[u8]| {
        let mut charged = event("a", request_id, 5, RequestStatus::Success);
        charged.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: body.to_vec() });
        charged
    };
    let mixed = [with_body_as("r3", b"three"), event("a", "r1", 10, RequestStatus::Success), with_body_as("r4", b"four")];
    assert_eq!(ledger.record_usage_batch(&mixed).await.unwrap(), vec![RecordOutcome::Inserted, RecordOutcome::Duplicate, RecordOutcome::Inserted]);
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(955));
    assert_eq!(stored_body(&*ledger, "a", "r1").await.unwrap(), b"{\"ok\":1}".to_vec());
    assert_eq!(stored_body(&*ledger, "a", "r3").await.unwrap(), b"three".to_vec());
    assert_eq!(stored_body(&*ledger, "a", "r4").await.unwrap(), b"four".to_vec());
    assert!(stored_body(&*ledger, "a", "r2").await.is_none(), "a failed attempt's row has no body, its charged retry stored none");
    // A failed attempt and its charged retry in one batch: the body belongs to the charged row.
    let retried = [event("a", "r5", 0, RequestStatus::Failed), with_body_as("r5", b"five")];
    assert_eq!(ledger.record_usage_batch(&retried).await.unwrap(), vec![RecordOutcome::Inserted, RecordOutcome::Inserted]);
    assert_eq!(stored_body(&*ledger, "a", "r5").await.unwrap(), b"five".to_vec());
    // A charged id is bound to its key and request fingerprint, with or without a body; a row
    // written without a fingerprint (an older gateway's) is bound to its key alone.
    let bound = ledger.charged_request("a", "r1").await.unwrap().unwrap();
    assert_eq!((bound.api_key_id.as_str(), bound.request_fingerprint.as_deref()), ("key", Some("f1")));
    let streamed = UsageEvent { api_key_id: "key-2".into(), request_fingerprint: Some("f6".into()), ..event("a", "r6", 5, RequestStatus::Success) };
    ledger.record_usage_batch(&[streamed]).await.unwrap();
    let bound = ledger.charged_request("a", "r6").await.unwrap().unwrap();
    assert_eq!((bound.api_key_id.as_str(), bound.request_fingerprint.as_deref(), bound.response), ("key-2", Some("f6"), None));
    assert_eq!(ledger.charged_request("a", "r3").await.unwrap().unwrap().request_fingerprint, None);
    assert_eq!(ledger.charged_request("b", "r1").await.unwrap(), None, "an id is charged per account");
    let mut charged = ledger.charged_request_ids_since("a", time::OffsetDateTime::UNIX_EPOCH).await.unwrap();
    charged.sort();
    assert_eq!(charged, ["r1", "r2", "r3", "r4", "r5", "r6"].map(String::from).to_vec());
    assert_sound(&*ledger, "a").await;
}

/// Issue 22 item 2: a batch deletes at most its size of the oldest bodies older than the cut-off,
/// with their byte count; never a newer body, never the usage row (the id stays charged, with
/// its time); the head's first newer row ends the run.
async fn stored_responses_are_pruned_from_the_head_in_batches(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000, "d").await;
    let t0 = 1_769_903_970_000;
    let charged_at = |index: i64, body_bytes: usize| {
        let mut charged = event("a", &format!("r{index}"), 1, RequestStatus::Success);
        charged.created_at_ms = t0 + index;
        charged.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: vec![b'x'; body_bytes] });
        charged
    };
    // r0..r7 at t0 + index, bodies of 100 + index bytes; r8 streamed (no body).
    let mut events: Vec<UsageEvent> = (0..8).map(|index| charged_at(index, 100 + usize::try_from(index).unwrap())).collect();
    events.push(UsageEvent { created_at_ms: t0 + 8, ..event("a", "r8", 1, RequestStatus::Success) });
    ledger.record_usage_batch(&events).await.unwrap();
    assert_eq!(ledger.oldest_stored_response_ms().await.unwrap(), Some(t0));

    // Cut-off t0 + 5: r0..r4 go, two at a time, then the head (r5) is too new.
    let mut pruned = Vec::new();
    for _ in 0..4 {
        pruned.push(ledger.prune_stored_responses(t0 + 5, 2).await.unwrap());
    }
    assert_eq!(pruned.iter().map(|batch| batch.rows).collect::<Vec<_>>(), vec![2, 2, 1, 0]);
    assert_eq!(pruned.iter().map(|batch| batch.bytes).collect::<Vec<_>>(), vec![100 + 101, 102 + 103, 104, 0]);
    ledger.compact_step(1_024).await.unwrap();
    assert_eq!(ledger.oldest_stored_response_ms().await.unwrap(), Some(t0 + 5));
    for index in 0..5 {
        let record = ledger.charged_request("a", &format!("r{index}")).await.unwrap().expect("the id is still charged");
        assert_eq!((record.charged_at_ms, record.response), (t0 + index, None), "r{index}: row kept, body gone");
    }
    for index in 5..8 {
        assert_eq!(stored_body(&*ledger, "a", &format!("r{index}")).await.unwrap().len(), 100 + usize::try_from(index).unwrap(), "r{index} is newer than the cut-off");
    }
    // A body written out of order (r9, charged at t0, after r5..r7) is pruned with the head
    // rows it is among; behind a head that is too new it waits — late, never early.
    let late = UsageEvent { created_at_ms: t0, ..charged_at(9, 10) };
    ledger.record_usage_batch(&[late]).await.unwrap();
    assert_eq!(ledger.prune_stored_responses(t0 + 6, 1).await.unwrap(), Pruned { rows: 1, bytes: 105 }, "r5");
    assert_eq!(ledger.prune_stored_responses(t0 + 6, 1).await.unwrap(), Pruned::default(), "r6 heads the rest");
    assert_eq!(stored_body(&*ledger, "a", "r9").await.unwrap().len(), 10, "r9 waits behind r6");
    assert_eq!(ledger.prune_stored_responses(t0 + 7, 10).await.unwrap(), Pruned { rows: 2, bytes: 106 + 10 }, "r6 and r9 among the head");
    assert_eq!(ledger.prune_stored_responses(t0 + 100, 10).await.unwrap(), Pruned { rows: 1, bytes: 107 });
    assert_eq!(ledger.oldest_stored_response_ms().await.unwrap(), None);
    assert_eq!(ledger.usage_rows(UsageQuery { limit: 20, ..UsageQuery::default() }).await.unwrap().len(), 10, "every usage row stays");
    assert_sound(&*ledger, "a").await;
}

async fn upstream_attempts_are_pruned_from_the_head_in_batches(ledger: Arc<dyn Ledger>) {
    use tollgate_store::model::UpstreamAttempt;
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000, "d").await;
    let t0 = 1_769_903_970_000;
    let attempt = |channel: &str, served: bool| UpstreamAttempt {
        channel: channel.into(),
        provider: "p".into(),
        upstream_model: "m".into(),
        status_code: Some(if served { 200 } else { 503 }),
        served,
        error: (!served).then(|| "status".into()),
        latency_ms: 5,
        first_byte_ms: None,
        upstream_usage: None,
    };
    // r0..r4 at t0 + index, each a failover: two attempts.
    let events: Vec<UsageEvent> = (0..5)
        .map(|index| UsageEvent { created_at_ms: t0 + index, attempts: vec![attempt("first", false), attempt("second", true)], ..event("a", &format!("r{index}"), 1, RequestStatus::Success) })
        .collect();
    ledger.record_usage_batch(&events).await.unwrap();
    let kept = |ledger: Arc<dyn Ledger>| async move {
        let mut kept = Vec::new();
        for index in 0..5 {
            kept.push(ledger.upstream_attempts("a", &format!("r{index}")).await.unwrap().len());
        }
        kept
    };
    assert_eq!(kept(Arc::clone(&ledger)).await, [2, 2, 2, 2, 2]);
    // Cut-off t0 + 3: r0..r2's six attempts go, four at a time; r3 heads the rest.
    let batches = [ledger.prune_upstream_attempts(t0 + 3, 4).await.unwrap(), ledger.prune_upstream_attempts(t0 + 3, 4).await.unwrap(), ledger.prune_upstream_attempts(t0 + 3, 4).await.unwrap()];
    assert_eq!(batches, [4, 2, 0]);
    assert_eq!(kept(Arc::clone(&ledger)).await, [0, 0, 0, 2, 2], "r3 and r4 are newer than the cut-off");
    assert_eq!(ledger.usage_rows(UsageQuery { limit: 20, ..UsageQuery::default() }).await.unwrap().len(), 5, "every usage row stays");
    assert_sound(&*ledger, "a").await;
}

async fn an_unknown_account_rolls_back_the_whole_batch(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let result = ledger.record_usage_batch(&[event("a", "r1", 10, RequestStatus::Success), event("ghost", "r2", 10, RequestStatus::Success)]).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))));
    assert!(ledger.usage_rows(UsageQuery { limit: 10, ..UsageQuery::default() }).await.unwrap().is_empty());
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::ZERO);
}

async fn concurrent_writers_keep_the_chain_and_the_sum(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    account(&*ledger, "b").await;
    let mut tasks = Vec::new();
    for writer in 0..6 {
        let ledger = Arc::clone(&ledger);
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                deposit(&*ledger, "a", 100, &format!("d-{writer}-{round}")).await;
                let batch = vec![
                    event("a", &format!("u-{writer}-{round}"), 7, RequestStatus::Success),
                    event("b", &format!("u-{writer}-{round}"), 3, RequestStatus::Success),
                    event("a", &format!("f-{writer}-{round}"), 0, RequestStatus::Failed),
                ];
                ledger.record_usage_batch(&batch).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(60 * (100 - 7)));
    assert_eq!(ledger.account_balance("b").await.unwrap().unwrap().balance, Money::from_nanos(-60 * 3));
    assert_sound(&*ledger, "a").await;
    assert_sound(&*ledger, "b").await;
}

/// Two writers handed the same events at once (a batch re-delivered to another consumer while
/// the first still writes it): each charge lands once, whichever writer wins, and the loser
/// skips what the winner wrote (in PostgreSQL it inserts first and reads only when refused).
async fn writers_racing_on_the_same_events_charge_each_once(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    account(&*ledger, "b").await;
    let mut tasks = Vec::new();
    for writer in 0..4 {
        let ledger = Arc::clone(&ledger);
        tasks.push(tokio::spawn(async move {
            let mut inserted = 0;
            for round in 0..10 {
                let mut batch = vec![
                    event("a", &format!("shared-{round}"), 7, RequestStatus::Success),
                    event("b", &format!("shared-{round}"), 3, RequestStatus::Success),
                    event("a", &format!("own-{writer}-{round}"), 1, RequestStatus::Success),
                ];
                let mut body = event("b", &format!("body-{round}"), 2, RequestStatus::Success);
                body.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: format!("{round}").into_bytes() });
                batch.push(body);
                let outcomes = ledger.record_usage_batch(&batch).await.unwrap();
                assert_eq!(outcomes[2], RecordOutcome::Inserted, "a writer's own event is new");
                inserted += outcomes.iter().filter(|outcome| **outcome == RecordOutcome::Inserted).count();
            }
            inserted
        }));
    }
    let mut inserted = 0;
    for task in tasks {
        inserted += task.await.unwrap();
    }
    // Each round: three shared charges once, and each writer's own one.
    assert_eq!(inserted, 10 * (3 + 4));
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(-10 * (7 + 4)));
    assert_eq!(ledger.account_balance("b").await.unwrap().unwrap().balance, Money::from_nanos(-10 * (3 + 2)));
    for round in 0..10 {
        assert_eq!(stored_body(&*ledger, "b", &format!("body-{round}")).await.unwrap(), format!("{round}").into_bytes());
    }
    assert_sound(&*ledger, "a").await;
    assert_sound(&*ledger, "b").await;
}

async fn pages_return_each_row_once(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let batch: Vec<UsageEvent> = (0..25).map(|index| event("a", &format!("r{index}"), 1, RequestStatus::Success)).collect();
    ledger.record_usage_batch(&batch).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut inserted_meanwhile = 0;
    loop {
        let page = ledger.usage_rows(UsageQuery { account_id: Some("a".into()), limit: 7, cursor, ..UsageQuery::default() }).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|pair| pair[0].id > pair[1].id), "newest first");
        cursor = page.last().map(|row| row.id);
        seen.extend(page.into_iter().map(|row| row.request_id));
        // Rows written while a client pages (newer, larger ids) neither repeat nor shift rows.
        let more: Vec<UsageEvent> = (0..3).map(|index| event("a", &format!("late{inserted_meanwhile}-{index}"), 1, RequestStatus::Success)).collect();
        ledger.record_usage_batch(&more).await.unwrap();
        inserted_meanwhile += 1;
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a row came twice: {seen:?}");
    assert_eq!(seen.len(), 25, "exactly the rows that existed when paging began: {seen:?}");
    assert!(seen.iter().all(|request| request.starts_with('r')));
    assert_sound(&*ledger, "a").await;
}

async fn summaries_match_the_rows(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    let mut other_model = event("a", "r3", 100, RequestStatus::Success);
    other_model.model = "demo-claude".into();
    ledger.record_usage_batch(&[event("a", "r1", 10, RequestStatus::Success), event("a", "r2", 20, RequestStatus::Success), other_model, event("a", "r4", 0, RequestStatus::Failed)]).await.unwrap();
    let by_model = ledger.summary(summary_query(Some("a"), &[SummaryGroup::Model], 100, 0)).await.unwrap();
    let groups: Vec<(&str, u64, Money)> = by_model.iter().map(|row| (row.group.as_str(), row.requests, row.cost)).collect();
    assert_eq!(groups, vec![("demo-claude", 1, Money::from_nanos(100)), ("demo-gpt", 2, Money::from_nanos(30))]);
    let by_day = ledger.summary(summary_query(Some("a"), &[SummaryGroup::Day], 100, 0)).await.unwrap();
    assert_eq!((by_day.len(), by_day[0].group.as_str(), by_day[0].cost, by_day[0].input_tokens), (1, "2026-01-31", Money::from_nanos(130), 30));
}

/// A group's requests, input, cached input, cache write and output tokens, and cost in nanos.
type Totals = (u64, u64, u64, u64, u64, i64);

fn summary_query(account_id: Option<&str>, group_by: &[SummaryGroup], limit: u32, offset: u64) -> SummaryQuery {
    SummaryQuery { account_id: account_id.map(str::to_string), start: None, end: None, group_by: group_by.to_vec(), limit, offset }
}

/// The database's totals against a fold written here, over random rows spread across days
/// (either side of midnight), models, keys and two accounts, for every grouping of one or two
/// dimensions, read in pages of 3 and within a time range.
async fn summaries_equal_an_independent_fold_for_every_grouping(ledger: Arc<dyn Ledger>) {
    use std::collections::BTreeMap;

    use rand::{RngExt, SeedableRng};

    account(&*ledger, "a").await;
    account(&*ledger, "b").await;
    let mut random = rand::rngs::StdRng::seed_from_u64(24);
    let day_ms = 86_400_000_i64;
    let first_day = 1_769_904_000_000 / day_ms; // 2026-02-01
    let mut events = Vec::new();
    for index in 0..120 {
        let status = if random.random_range(0..10) == 0 { RequestStatus::Failed } else { RequestStatus::Success };
        let mut row = event(if random.random_bool(0.7) { "a" } else { "b" }, &format!("r{index}"), random.random_range(0..5_000_000_000), status);
        row.model = ["m-1", "m-2", "m/3"][random.random_range(0..3)].into();
        row.api_key_id = ["k1", "k2"][random.random_range(0..2)].into();
        // Days 0..5; some rows in the first and last second of a day.
        let day = first_day + random.random_range(0..5);
        let within = match random.random_range(0..4) {
            0 => 0,
            1 => day_ms - 1,
            _ => random.random_range(0..day_ms),
        };
        row.created_at_ms = day * day_ms + within;
        row.usage.input_tokens = random.random_range(0..100_000);
        row.usage.cached_input_tokens = random.random_range(0..1_000);
        row.usage.cache_write_tokens = random.random_range(0..1_000);
        row.usage.output_tokens = random.random_range(0..100_000);
        events.push(row);
    }
    ledger.record_usage_batch(&events).await.unwrap();
    let day_text = |ms: i64| {
        let date = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap().date();
        format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
    };
    let start = time::OffsetDateTime::from_unix_timestamp((first_day + 1) * 86_400).unwrap();
    let end = time::OffsetDateTime::from_unix_timestamp((first_day + 4) * 86_400).unwrap();
    let groupings: Vec<Vec<SummaryGroup>> = SummaryGroup::ALL
        .iter()
        .flat_map(|first| std::iter::once(vec![*first]).chain(SummaryGroup::ALL.iter().filter(move |second| *second != first).map(move |second| vec![*first, *second])))
        .collect();
    for account_id in [Some("a"), None] {
        for range in [None, Some((start, end))] {
            for group_by in &groupings {
                // The fold: (values in order) -> (requests, input, cached, write, output, cost).
                let mut expected: BTreeMap<Vec<String>, Totals> = BTreeMap::new();
                for row in events.iter().filter(|row| row.status != RequestStatus::Failed) {
                    if account_id.is_some_and(|id| row.account_id != id) {
                        continue;
                    }
                    if let Some((start, end)) = range
                        && !(row.created_at_ms >= start.unix_timestamp() * 1000 && row.created_at_ms < end.unix_timestamp() * 1000)
                    {
                        continue;
                    }
                    let values: Vec<String> = group_by
                        .iter()
                        .map(|group| match group {
                            SummaryGroup::Model => row.model.clone(),
                            SummaryGroup::Key => row.api_key_id.clone(),
                            SummaryGroup::Day => day_text(row.created_at_ms),
                        })
                        .collect();
                    let total = expected.entry(values).or_default();
                    total.0 += 1;
                    total.1 += row.usage.input_tokens;
                    total.2 += row.usage.cached_input_tokens;
                    total.3 += row.usage.cache_write_tokens;
                    total.4 += row.usage.output_tokens;
                    total.5 += row.cost.nanos();
                }
                let mut pages = Vec::new();
                loop {
                    let mut query = summary_query(account_id, group_by, 3, pages.len() as u64);
                    if let Some((start, end)) = range {
                        (query.start, query.end) = (Some(start), Some(end));
                    }
                    let page = ledger.summary(query).await.unwrap();
                    let full = page.len() == 3;
                    pages.extend(page);
                    if !full {
                        break;
                    }
                }
                let got: BTreeMap<Vec<String>, Totals> = pages
                    .iter()
                    .map(|row| {
                        let values: Vec<String> = group_by
                            .iter()
                            .map(|group| match group {
                                SummaryGroup::Model => row.model.clone().unwrap(),
                                SummaryGroup::Key => row.api_key_id.clone().unwrap(),
                                SummaryGroup::Day => row.day.clone().unwrap(),
                            })
                            .collect();
                        assert_eq!(row.group, values.join(", "));
                        (values, (row.requests, row.input_tokens, row.cached_input_tokens, row.cache_write_tokens, row.output_tokens, row.cost.nanos()))
                    })
                    .collect();
                assert_eq!(got.len(), pages.len(), "a group came twice across pages: {group_by:?}");
                let order: Vec<&Vec<String>> = got.keys().collect();
                let paged_order: Vec<Vec<String>> = pages.iter().map(|row| row.group.split(", ").map(str::to_string).collect()).collect();
                assert_eq!(order, paged_order.iter().collect::<Vec<_>>(), "pages in the grouping's order: {group_by:?}");
                assert_eq!(got, expected, "{account_id:?} {range:?} {group_by:?}");
            }
        }
    }
}

async fn accounts_are_paged_by_id_and_found_by_part_of_id_or_name(ledger: Arc<dyn Ledger>) {
    for (id, name) in [("acme-1", "Acme Corp"), ("acme-2", "Second"), ("beta", "ACME_labs"), ("gamma", "100% real"), ("delta", "plain")] {
        ledger.create_account(NewAccount { name: name.into(), ..new_account(id) }).await.unwrap();
    }
    let ids = |accounts: Vec<tollgate_store::model::Account>| accounts.into_iter().map(|account| account.id).collect::<Vec<_>>();
    let page = |search: Option<&str>, after: Option<&str>, limit: u32| AccountQuery { search: search.map(str::to_string), after: after.map(str::to_string), limit };
    assert_eq!(ids(ledger.accounts_page(page(None, None, 2)).await.unwrap()), ["acme-1", "acme-2"]);
    assert_eq!(ids(ledger.accounts_page(page(None, Some("acme-2"), 2)).await.unwrap()), ["beta", "delta"]);
    assert_eq!(ids(ledger.accounts_page(page(None, Some("delta"), 2)).await.unwrap()), ["gamma"]);
    // Case-insensitive, in the id or the name.
    assert_eq!(ids(ledger.accounts_page(page(Some("AcMe"), None, 10)).await.unwrap()), ["acme-1", "acme-2", "beta"]);
    assert_eq!(ids(ledger.accounts_page(page(Some("acme"), Some("acme-1"), 10)).await.unwrap()), ["acme-2", "beta"]);
    // LIKE's wildcards are matched as themselves.
    assert_eq!(ids(ledger.accounts_page(page(Some("_"), None, 10)).await.unwrap()), ["beta"]);
    assert_eq!(ids(ledger.accounts_page(page(Some("%"), None, 10)).await.unwrap()), ["gamma"]);
    assert!(ledger.accounts_page(page(Some("nobody"), None, 10)).await.unwrap().is_empty());
}

/// Unix ms of the first instant of a month (UTC).
fn month_start(year: i32, month: u8) -> i64 {
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), 1).unwrap();
    i64::try_from(date.with_time(time::Time::MIDNIGHT).assume_utc().unix_timestamp_nanos() / 1_000_000).unwrap()
}

async fn monthly_totals_chain_from_one_month_to_the_next(ledger: Arc<dyn Ledger>) {
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 5_000, "first").await;
    // Usage in three past months (as a worker writing late would: rows carry their request's time).
    let months = [(2026, 1), (2026, 2), (2026, 3)];
    let mut events = Vec::new();
    for (index, (year, month)) in months.iter().enumerate() {
        for request in 0..=index {
            let mut usage = event("a", &format!("m{month}-{request}"), 10 * (index as i64 + 1), RequestStatus::Success);
            usage.created_at_ms = month_start(*year, *month) + 1_000 * request as i64;
            events.push(usage);
        }
    }
    ledger.record_usage_batch(&events).await.unwrap();
    ledger
        .record_fund(NewFund { account_id: "a".into(), kind: FundKind::Refund, amount: Money::from_nanos(-7), reference_id: "r".into(), reason: Some("test".into()), operator_id: None })
        .await
        .unwrap();

    let now = time::OffsetDateTime::now_utc();
    let mut periods = vec![(2025, 12)];
    let (mut year, mut month) = (2026, 1);
    while (year, month) <= (now.year(), u8::from(now.month())) {
        periods.push((year, month));
        (year, month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    }
    let mut previous_closing = Money::ZERO;
    let mut usage_count = 0;
    for (year, month) in &periods {
        let (next_year, next_month) = if *month == 12 { (year + 1, 1) } else { (*year, month + 1) };
        let totals = ledger.period_totals("a", month_start(*year, *month), month_start(next_year, next_month)).await.unwrap();
        assert_eq!(totals.opening_balance, previous_closing, "{year}-{month}: opening = previous closing");
        let moved = totals.deposits.amount.checked_add(totals.refunds.amount).unwrap().checked_add(totals.adjustments.amount).unwrap();
        assert_eq!(totals.closing_balance, totals.opening_balance.checked_add(moved).unwrap().checked_sub(totals.usage.amount).unwrap());
        if let Some(index) = months.iter().position(|past| past == &(*year, *month)) {
            assert_eq!(totals.usage.count, index as u64 + 1, "{year}-{month}");
            assert_eq!(totals.usage.amount, Money::from_nanos(10 * (index as i64 + 1) * (index as i64 + 1)));
        }
        usage_count += totals.usage.count;
        previous_closing = totals.closing_balance;
    }
    assert_eq!(usage_count, 6);
    let balance = ledger.account_balance("a").await.unwrap().unwrap().balance;
    assert_eq!(previous_closing, balance, "this month's closing balance is the ledger's");
    assert_eq!(balance, Money::from_nanos(5_000 - 7 - (10 + 40 + 90)));
    assert_sound(&*ledger, "a").await;
}

async fn operations_claim_each_job_period_once_and_keep_the_outbox(ledger: Arc<dyn Ledger>) {
    // A period is claimed once; a live lease blocks every other claim; a finished run frees it.
    let first = ledger.claim_job("j", 1_000, "one", 60_000).await.unwrap().expect("claimed");
    assert_eq!(ledger.claim_job("j", 2_000, "two", 60_000).await.unwrap(), None, "the lease is live");
    assert!(ledger.renew_job("j", first, 60_000).await.unwrap());
    ledger.finish_job("j", 1_000, first, "done").await.unwrap();
    assert_eq!(ledger.claim_job("j", 1_000, "two", 60_000).await.unwrap(), None, "the period ran");
    let second = ledger.claim_job("j", 2_000, "two", 60_000).await.unwrap().expect("next period");
    assert!(second > first, "fencing tokens grow");
    assert!(!ledger.renew_job("j", first, 60_000).await.unwrap(), "a stale holder cannot renew");
    let runs = ledger.job_runs(Some("j"), 10).await.unwrap();
    assert_eq!(runs.iter().map(|run| (run.period_start, run.holder.as_str())).collect::<Vec<_>>(), vec![(2_000, "two"), (1_000, "one")]);
    assert_eq!(runs[1].outcome.as_deref(), Some("done"));

    // Money changes queue their events in their own transaction.
    account(&*ledger, "a").await;
    ledger.update_account("a", AccountPatch { low_balance_threshold: Some(Some(Money::from_nanos(50))), ..AccountPatch::default() }).await.unwrap();
    deposit(&*ledger, "a", 100, "d").await;
    ledger.record_usage_batch(&[event("a", "x", 60, RequestStatus::Success)]).await.unwrap();
    ledger.record_usage_batch(&[event("a", "y", 30, RequestStatus::Success)]).await.unwrap();
    let events = ledger.outbox_events(Some("a"), 10).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|event| event.event_type.as_str()).collect();
    assert_eq!(kinds, vec!["balance.low", "fund.posted"], "one crossing (100 → 40), already below after (40 → 10)");
    let due = ledger.due_outbox(i64::MAX, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    let low = events[0].id;
    let attempt = |number, code| tollgate_store::operations::DeliveryAttempt { outbox_id: low, attempt: number, url: "http://x".into(), status_code: Some(code), error: None, duration_ms: 1, attempted_at: 5 };
    ledger.record_delivery(&attempt(1, 500), tollgate_store::operations::DeliveryNext::RetryAt(i64::MAX - 1)).await.unwrap();
    let still_due = ledger.due_outbox(i64::MAX - 2, 10).await.unwrap();
    assert_eq!(still_due.iter().map(|event| event.event_type.as_str()).collect::<Vec<_>>(), vec!["fund.posted"], "the failed event waits for its retry");
    ledger.record_delivery(&attempt(2, 200), tollgate_store::operations::DeliveryNext::Delivered).await.unwrap();
    let delivered = ledger.outbox_events(Some("a"), 10).await.unwrap().into_iter().find(|event| event.id == low).unwrap();
    assert_eq!((delivered.status.as_str(), delivered.attempts), ("delivered", 2));
    assert_eq!(ledger.deliveries(Some(low), 10).await.unwrap().len(), 2);
}

/// The counters a cold hot store starts from: this day's and month's requests and spend of the
/// account and its keys, failures not counted, other accounts' keys not included.
async fn counter_seeds_hold_the_current_periods(ledger: Arc<dyn Ledger>) {
    for id in ["a", "b"] {
        account(&*ledger, id).await;
        deposit(&*ledger, id, 1_000, &format!("d-{id}")).await;
    }
    let key = |id: &str, account: &str| NewApiKey {
        id: id.into(),
        account_id: account.into(),
        name: "k".into(),
        key_hash: format!("hash-{id}"),
        prefix: "tg_1".into(),
        budget_daily: None,
        budget_monthly: None,
        budget_total: None,
        rpm: None,
        tpm: None,
        allowed_models: None,
        session_lock: None,
        expires_at: None,
    };
    ledger.create_key(key("ka", "a")).await.unwrap();
    ledger.create_key(key("kb", "b")).await.unwrap();
    let now_ms = i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap();
    let at = |account: &str, key: &str, request: &str, cost: i64, status: RequestStatus, created_at_ms: i64| UsageEvent {
        api_key_id: key.into(),
        created_at_ms,
        ..event(account, request, cost, status)
    };
    let last_month = now_ms - 40 * 86_400_000;
    ledger
        .record_usage_batch(&[
            at("a", "ka", "r1", 10, RequestStatus::Success, now_ms),
            at("a", "ka", "r2", 15, RequestStatus::Success, now_ms),
            at("a", "ka", "r3", 0, RequestStatus::Failed, now_ms),
            at("a", "ka", "r4", 100, RequestStatus::Success, last_month),
            at("b", "kb", "r5", 7, RequestStatus::Success, now_ms),
        ])
        .await
        .unwrap();
    let seed = ledger.counter_seed("a", now_ms).await.unwrap();
    let periods = tollgate_store::clock::Periods::at(now_ms);
    assert_eq!((seed.day, seed.month), (periods.day, periods.month));
    assert_eq!((seed.requests_today, seed.requests_this_month), (2, 2));
    assert_eq!(seed.keys.len(), 1, "only the account's own keys: {seed:?}");
    let spend = &seed.keys[0];
    assert_eq!(spend.api_key_id, "ka");
    assert_eq!(
        (spend.spent_today, spend.spent_this_month, spend.spent_total),
        (Money::from_nanos(25), Money::from_nanos(25), Money::from_nanos(125))
    );
}

/// Writes go through a connection of their own; with `sqlite::memory:` both must open the same
/// database, or the writer would find no tables and the readers none of its rows.
#[tokio::test]
async fn an_in_memory_sqlite_ledger_reads_what_it_writes() {
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::connect("sqlite::memory:", 4).await.unwrap());
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000, "d").await;
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(1_000));
    assert_sound(&*ledger, "a").await;
}

/// Issue 22 item 4: the SQLite file shrinks once pruned bodies are compacted, and a file made
/// before incremental auto-vacuum is converted when opened.
#[tokio::test]
async fn a_pruned_sqlite_ledger_gives_its_space_back() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-compact-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", path.display());
    // An older file: no auto-vacuum mode, made without the ledger.
    let plain = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(url.parse::<sqlx::sqlite::SqliteConnectOptions>().unwrap().create_if_missing(true)).await.unwrap();
    sqlx::query("CREATE TABLE before_pruning (x INTEGER)").execute(&plain).await.unwrap();
    let pages = async |pool: &sqlx::SqlitePool| -> i64 { sqlx::query_scalar("PRAGMA page_count").fetch_one(pool).await.unwrap() };
    assert_eq!(sqlx::query_scalar::<_, i64>("PRAGMA auto_vacuum").fetch_one(&plain).await.unwrap(), 0);
    plain.close().await;

    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::connect(&url, 2).await.unwrap());
    let reader = sqlx::SqlitePool::connect(&url).await.unwrap();
    assert_eq!(sqlx::query_scalar::<_, i64>("PRAGMA auto_vacuum").fetch_one(&reader).await.unwrap(), 2, "converted to incremental");
    account(&*ledger, "a").await;
    deposit(&*ledger, "a", 1_000_000, "d").await;
    let events: Vec<UsageEvent> = (0..200)
        .map(|index| {
            let mut charged = event("a", &format!("r{index}"), 1, RequestStatus::Success);
            charged.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: vec![b'x'; 32 * 1024] });
            charged
        })
        .collect();
    ledger.record_usage_batch(&events).await.unwrap();
    let full = pages(&reader).await;
    let mut rows = 0;
    loop {
        let batch = ledger.prune_stored_responses(i64::MAX, 64).await.unwrap();
        rows += batch.rows;
        if batch.rows < 64 {
            break;
        }
    }
    assert_eq!(rows, 200);
    assert_eq!(pages(&reader).await, full, "deleting alone keeps the pages");
    // Step by step: each gives back at most its pages, and says how many free ones remain.
    let free_before: i64 = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&reader).await.unwrap();
    let remaining = ledger.compact_step(100).await.unwrap();
    assert_eq!(i64::try_from(remaining).unwrap(), free_before - 100, "one step of 100 pages");
    let after_step = pages(&reader).await;
    // The file also loses the pointer-map page that indexed the pages cut off, if one was.
    assert!((full - 101..=full - 100).contains(&after_step), "one step of 100 pages: {full} → {after_step}");
    let mut steps = 1;
    while ledger.compact_step(100).await.unwrap() > 0 {
        steps += 1;
    }
    let compacted = pages(&reader).await;
    assert!(compacted * 4 < full, "200 bodies of 32 KiB freed: {full} pages → {compacted} in {steps} steps");
    assert_sound(&*ledger, "a").await;
}
