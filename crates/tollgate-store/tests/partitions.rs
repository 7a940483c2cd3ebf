//! PostgreSQL's usage log by month (migration 0008, issue 22 item 3): rows land in their month's
//! partition, a month without one is caught by the default partition and moved out when its
//! partition is made (also while writers write), a request id is charged once across every
//! month, and an existing database converts with every row, charge and body kept. Needs the test
//! server (`TOLLGATE_TEST_POSTGRES_URL`, started by `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::borrow::Cow;
use std::sync::Arc;

use sqlx::PgPool;
use tollgate_core::Money;
use tollgate_store::Ledger;
use tollgate_store::model::{RecordOutcome, RequestStatus, StoredResponse, UsageEvent};
use tollgate_store::postgres::PgLedger;
use tollgate_store::retention::Retention;
use tollgate_store::verify::check_account;

mod support;
use support::{event, fresh_postgres_url, funded_account};

/// 2026-01-15, 2026-03-10, 2031-05-05 (UTC), as Unix ms.
const JANUARY: i64 = 1_768_435_200_000;
const MARCH: i64 = 1_773_100_800_000;
const FAR: i64 = 1_935_705_600_000;

async fn ledger_and_pool() -> (Arc<PgLedger>, PgPool) {
    let url = fresh_postgres_url("partitions").await;
    let ledger = Arc::new(PgLedger::connect(&url, 8).await.unwrap());
    let pool = ledger.pool().clone();
    (ledger, pool)
}

fn dated(account: &str, request: &str, cost: i64, at_ms: i64) -> UsageEvent {
    UsageEvent { created_at_ms: at_ms, ..event(account, request, cost, RequestStatus::Success) }
}

/// (partition, request id) of every usage row, by request id.
async fn placement(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT tableoid::regclass::TEXT, request_id FROM usage_log ORDER BY request_id").fetch_all(pool).await.unwrap()
}

async fn assert_sound(ledger: &dyn Ledger, account: &str) {
    let check = check_account(ledger, account).await.unwrap();
    assert!(check.is_sound(), "I2/I4 broken: {check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_in_their_month_and_a_month_without_a_partition_is_moved_out_of_the_default() {
    let (ledger, pool) = ledger_and_pool().await;
    funded_account(&*ledger, "a", 1_000).await;
    let made = ledger.ensure_usage_partitions(JANUARY, 2).await.unwrap();
    assert!(made.partitioned);
    assert_eq!(made.made, ["2026-01", "2026-02", "2026-03"], "this month and two ahead");
    assert!(["2026-01", "2026-02", "2026-03"].iter().all(|month| made.months.iter().any(|kept| kept == month)), "{made:?}");
    assert_eq!(ledger.ensure_usage_partitions(JANUARY, 2).await.unwrap().made, Vec::<String>::new(), "made once");

    let batch = [dated("a", "r1", 10, JANUARY), dated("a", "r2", 20, MARCH), dated("a", "r3", 30, FAR)];
    assert_eq!(ledger.record_usage_batch(&batch).await.unwrap(), vec![RecordOutcome::Inserted; 3]);
    let expected_before = [("usage_log_2026_01", "r1"), ("usage_log_2026_03", "r2"), ("usage_log_default", "r3")];
    assert_eq!(placement(&pool).await, expected_before.map(|(table, request)| (table.to_string(), request.to_string())));

    // The far month gets its partition because it has rows in the default, not because it is
    // ahead of the clock; its row moves with it, keeping its id and its charge.
    let far_row_id: i64 = sqlx::query_scalar("SELECT id FROM usage_log WHERE request_id = 'r3'").fetch_one(&pool).await.unwrap();
    let after = ledger.ensure_usage_partitions(JANUARY, 2).await.unwrap();
    assert_eq!((after.made, after.default_rows), (vec!["2031-05".to_string()], 0));
    let expected_after = [("usage_log_2026_01", "r1"), ("usage_log_2026_03", "r2"), ("usage_log_2031_05", "r3")];
    assert_eq!(placement(&pool).await, expected_after.map(|(table, request)| (table.to_string(), request.to_string())));
    assert_eq!(sqlx::query_scalar::<_, i64>("SELECT id FROM usage_log WHERE request_id = 'r3'").fetch_one(&pool).await.unwrap(), far_row_id);
    assert!(ledger.request_charged("a", "r3").await.unwrap());
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(940));
    assert_sound(&*ledger, "a").await;
}

/// I1 no longer rests on a unique index of usage_log (a partitioned table's cannot span months):
/// a retry charged in another month, alone or in a batch with new charges, is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_charged_once_across_months() {
    let (ledger, pool) = ledger_and_pool().await;
    ledger.ensure_usage_partitions(JANUARY, 2).await.unwrap();
    funded_account(&*ledger, "a", 1_000).await;
    let mut first = dated("a", "r1", 10, JANUARY);
    first.stored_response = Some(StoredResponse { status: 200, content_type: "application/json".into(), body: b"january".to_vec() });
    assert_eq!(ledger.record_usage_batch(&[first]).await.unwrap(), vec![RecordOutcome::Inserted]);
    let outcomes = ledger.record_usage_batch(&[dated("a", "r1", 10, MARCH), dated("a", "r7", 5, MARCH)]).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Duplicate, RecordOutcome::Inserted]);
    assert_eq!(ledger.record_usage_batch(&[dated("a", "r1", 10, FAR)]).await.unwrap(), vec![RecordOutcome::Duplicate], "in the default partition too");
    // A failed attempt does not take the id; its charged retry in a later month does.
    let failed = UsageEvent { created_at_ms: JANUARY, ..event("a", "r8", 0, RequestStatus::Failed) };
    assert_eq!(ledger.record_usage_batch(&[failed, dated("a", "r8", 7, MARCH)]).await.unwrap(), vec![RecordOutcome::Inserted; 2]);
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(978));
    let charged: Vec<(String, i64)> = sqlx::query_as("SELECT request_id, created_at FROM charged_requests ORDER BY request_id").fetch_all(&pool).await.unwrap();
    assert_eq!(charged, vec![("r1".to_string(), JANUARY), ("r7".to_string(), MARCH), ("r8".to_string(), MARCH)]);
    let replayed = ledger.charged_request("a", "r1").await.unwrap().unwrap();
    assert_eq!((replayed.charged_at_ms, replayed.response.map(|response| response.body)), (JANUARY, Some(b"january".to_vec())));
    assert_sound(&*ledger, "a").await;
}

/// Making a partition takes a lock the writers wait on; rows written meanwhile into the month
/// it makes (so into the default partition, until it exists) all end in it, none lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_made_while_writers_write_its_month_loses_no_row() {
    let (ledger, pool) = ledger_and_pool().await;
    funded_account(&*ledger, "a", 1_000_000).await;
    let writer = {
        let ledger = Arc::clone(&ledger);
        tokio::spawn(async move {
            for batch in 0..40 {
                let events: Vec<UsageEvent> = (0..5).map(|index| dated("a", &format!("w{batch}-{index}"), 1, FAR + batch * 1_000)).collect();
                assert_eq!(ledger.record_usage_batch(&events).await.unwrap(), vec![RecordOutcome::Inserted; 5]);
                tokio::task::yield_now().await;
            }
        })
    };
    // Until the first row exists there is nothing to move; then the far month is made (its rows
    // are in the default partition, which is how it is found).
    while sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_log").fetch_one(&pool).await.unwrap() == 0 {
        tokio::task::yield_now().await;
    }
    let made = ledger.ensure_usage_partitions(JANUARY, 1).await.unwrap();
    assert!(made.made.contains(&"2031-05".to_string()), "{made:?}");
    writer.await.unwrap();
    ledger.ensure_usage_partitions(JANUARY, 1).await.unwrap();
    let tables: Vec<(String, i64)> =
        sqlx::query_as("SELECT tableoid::regclass::TEXT, COUNT(*) FROM usage_log GROUP BY 1 ORDER BY 1").fetch_all(&pool).await.unwrap();
    assert_eq!(tables, vec![("usage_log_2031_05".to_string(), 200)]);
    let charged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM charged_requests").fetch_one(&pool).await.unwrap();
    assert_eq!(charged, 200);
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(1_000_000 - 200));
    assert_sound(&*ledger, "a").await;
}

/// A database made by the migrations before 0008, with rows in three months (one far ahead), a
/// failed attempt and its charged retry, and a stored body: after 0008 every row is in its
/// month's partition with its id, each charge is in charged_requests, the body is replayed, the
/// chain is sound, a charged id stays charged and new ids continue after the old ones (a sequence: gaps, never a reuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_database_converts_with_every_row_charge_and_body() {
    let url = fresh_postgres_url("convert").await;
    let pool = PgPool::connect(&url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = Cow::Owned(before.migrations.iter().filter(|migration| migration.version < 8).cloned().collect());
    assert_eq!(before.migrations.len(), 7);
    before.run(&pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO accounts (id, kind, name, customer_type, status, credit_limit, created_at, updated_at)
             VALUES ('a', 'user', 'n', 'standard', 'active', 0, 1, 1);
         INSERT INTO fund_transactions (account_id, kind, amount, balance_before, balance_after, ledger_seq, reference_id, created_at)
             VALUES ('a', 'deposit', 1000, 0, 1000, 1, 'd', 1);
         INSERT INTO account_balance (account_id, balance, last_fund_seq, ledger_seq, updated_at) VALUES ('a', 960, 1, 5, 1);
         INSERT INTO usage_log (request_id, account_id, api_key_id, provider, model, customer_type, input_tokens, cached_input_tokens,
                 cache_write_tokens, output_tokens, reasoning_tokens, usage_source, cost, balance_before, balance_after, ledger_seq,
                 status, latency_ms, created_at, request_fingerprint) VALUES
             ('r1', 'a', 'key', 'mock', 'demo-gpt', 'standard', 10, 0, 0, 5, 0, 'upstream', 10, 1000, 990, 2, 'success', 3, 1768435200000, 'f1'),
             ('r2', 'a', 'key', 'mock', 'demo-gpt', 'standard', 10, 0, 0, 0, 0, 'upstream', 0, 990, 990, 3, 'failed', 3, 1768521600000, NULL),
             ('r2', 'a', 'key', 'mock', 'demo-gpt', 'standard', 10, 0, 0, 5, 0, 'upstream', 25, 990, 965, 4, 'success', 3, 1770076800000, NULL),
             ('r3', 'a', 'key', 'mock', 'demo-gpt', 'standard', 10, 0, 0, 5, 0, 'upstream', 5, 965, 960, 5, 'success', 3, 1935705600000, NULL);
         INSERT INTO stored_responses (usage_id, status, content_type, body, created_at)
             SELECT id, 200, 'application/json', 'one'::BYTEA, created_at FROM usage_log WHERE request_id = 'r1';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let old_ids: Vec<(String, i64)> = sqlx::query_as("SELECT request_id || ':' || status, id FROM usage_log ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;

    let ledger = PgLedger::connect(&url, 4).await.unwrap();
    let pool = ledger.pool().clone();
    let new_ids: Vec<(String, i64)> = sqlx::query_as("SELECT request_id || ':' || status, id FROM usage_log ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(new_ids, old_ids);
    let tables: Vec<(String, String)> =
        sqlx::query_as("SELECT tableoid::regclass::TEXT, request_id || ':' || status FROM usage_log ORDER BY id").fetch_all(&pool).await.unwrap();
    let expected = [("usage_log_2026_01", "r1:success"), ("usage_log_2026_01", "r2:failed"), ("usage_log_2026_02", "r2:success"), ("usage_log_2031_05", "r3:success")];
    assert_eq!(tables, expected.map(|(table, row)| (table.to_string(), row.to_string())));
    let charged: Vec<(String, i64)> = sqlx::query_as("SELECT request_id, created_at FROM charged_requests ORDER BY request_id").fetch_all(&pool).await.unwrap();
    assert_eq!(charged, vec![("r1".to_string(), JANUARY), ("r2".to_string(), 1_770_076_800_000), ("r3".to_string(), FAR)]);

    let replayed = ledger.charged_request("a", "r1").await.unwrap().unwrap();
    assert_eq!((replayed.request_fingerprint.as_deref(), replayed.response.map(|response| response.body)), (Some("f1"), Some(b"one".to_vec())));
    assert_sound(&ledger, "a").await;
    let outcomes = ledger.record_usage_batch(&[dated("a", "r2", 25, MARCH), dated("a", "r9", 1, MARCH)]).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Duplicate, RecordOutcome::Inserted]);
    let new_id: i64 = sqlx::query_scalar("SELECT id FROM usage_log WHERE request_id = 'r9'").fetch_one(&pool).await.unwrap();
    assert!(new_id > old_ids.iter().map(|(_, id)| *id).max().unwrap(), "ids continue after the old ones: {new_id}");
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(959));
    assert_sound(&ledger, "a").await;
}

/// What an archive will leave (design in docs/RETENTION.md): an id whose usage row is gone stays
/// charged — `charged_requests` answers — while there is no record left to replay; a retry is
/// a duplicate, never a second charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_stays_charged_when_its_usage_row_is_gone() {
    let (ledger, pool) = ledger_and_pool().await;
    ledger.ensure_usage_partitions(JANUARY, 2).await.unwrap();
    funded_account(&*ledger, "a", 1_000).await;
    assert_eq!(ledger.record_usage_batch(&[dated("a", "r1", 10, JANUARY)]).await.unwrap(), vec![RecordOutcome::Inserted]);
    sqlx::query("ALTER TABLE usage_log DETACH PARTITION usage_log_2026_01").execute(&pool).await.unwrap();
    assert!(ledger.request_charged("a", "r1").await.unwrap());
    assert_eq!(ledger.charged_request("a", "r1").await.unwrap(), None, "no row, no record to replay");
    assert_eq!(ledger.record_usage_batch(&[dated("a", "r1", 10, MARCH)]).await.unwrap(), vec![RecordOutcome::Duplicate]);
    assert_eq!(ledger.account_balance("a").await.unwrap().unwrap().balance, Money::from_nanos(990));
}
