//! How long a full reconciliation takes at scale: fills a fresh PostgreSQL database with
//! `accounts` accounts and `rows_per_account` usage rows each (bulk SQL), optionally loads every
//! account into Redis, then times reconciliation runs and prints a table.
//!
//! cargo run --release -p tollgate-worker --example reconcile_scale -- <postgres-url-of-a-server> [redis-url] [accounts] [rows-per-account]

use std::sync::Arc;
use std::time::Instant;

use tollgate_core::Money;
use tollgate_store::hot::{AccountSnapshot, CounterSeed};
use tollgate_store::postgres::PgLedger;
use tollgate_store::redis_store::RedisHotStore;
use tollgate_store::HotStore;
use tollgate_worker::reconcile::Reconciler;

const DEPOSIT_NANOS: i64 = 1_000_000_000;
const COST_NANOS: i64 = 1_000;
/// Accounts loaded into Redis at once.
const LOADERS: usize = 64;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let server = arguments.first().ok_or("usage: reconcile_scale <postgres-url> [redis-url|-] [accounts] [rows-per-account]")?;
    let redis_url = arguments.get(1).filter(|url| url.as_str() != "-").cloned();
    let accounts: i64 = arguments.get(2).map_or(Ok(100_000), |text| text.parse())?;
    let rows_per_account: i64 = arguments.get(3).map_or(Ok(10), |text| text.parse())?;

    let name = format!("reconcile_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
    let (base, _) = server.rsplit_once('/').ok_or("the URL names no database")?;
    let url = format!("{base}/{name}");
    let ledger = PgLedger::connect(&url, 8).await?;

    let started = Instant::now();
    fill(&ledger, accounts, rows_per_account).await?;
    let fill_seconds = started.elapsed().as_secs_f64();
    println!("| step | accounts | usage rows | seconds |");
    println!("| --- | ---: | ---: | ---: |");
    let rows = accounts * rows_per_account;
    println!("| fill PostgreSQL (bulk SQL) | {accounts} | {rows} | {fill_seconds:.1} |");

    let run = timed("reconcile: ledger only (rows vs account_balance)", accounts, rows, Reconciler { ledger: &ledger, hot: None, hot_store_name: "none" }.run(false)).await?;
    if run.drifts_found != 0 || run.accounts_checked != accounts as u64 {
        return Err(format!("expected {accounts} clean accounts, got {run:?}").into());
    }

    if let Some(redis_url) = redis_url {
        let prefix = format!("rs{}", &name[10..18]);
        let hot = Arc::new(RedisHotStore::connect(&redis_url, &prefix, 16).await?);
        let started = Instant::now();
        load(&ledger, Arc::clone(&hot), accounts).await?;
        println!("| load every account into Redis | {accounts} | | {:.1} |", started.elapsed().as_secs_f64());
        let reconciler = Reconciler { ledger: &ledger, hot: Some(&*hot), hot_store_name: "redis" };
        let run = timed("reconcile: ledger and Redis", accounts, rows, reconciler.run(false)).await?;
        if run.drifts_found != 0 {
            return Err(format!("drift in a clean database: {run:?}").into());
        }
        // Ten accounts drift (account_balance +1 nano); a fixing run finds and repairs exactly them.
        sqlx::query("UPDATE account_balance SET balance = balance + 1 WHERE account_id IN (SELECT 'acct_' || i FROM generate_series(1, 10) i)").execute(ledger.pool()).await?;
        let run = timed("reconcile --fix with 10 drifted accounts", accounts, rows, reconciler.run(true)).await?;
        if run.drifts_found != 10 || run.accounts_repaired != 10 || run.total_drift != Money::from_nanos(10) {
            return Err(format!("expected 10 repaired drifts of 1 nano: {run:?}").into());
        }
    }
    Ok(())
}

async fn timed(
    step: &str,
    accounts: i64,
    rows: i64,
    run: impl std::future::Future<Output = tollgate_store::StoreResult<tollgate_store::operations::ReconciliationRun>>,
) -> Result<tollgate_store::operations::ReconciliationRun, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let run = run.await?;
    println!("| {step} | {accounts} | {rows} | {:.2} |", started.elapsed().as_secs_f64());
    Ok(run)
}

/// Consistent rows: each account has one deposit and `rows_per_account` charges, chained.
async fn fill(ledger: &PgLedger, accounts: i64, rows_per_account: i64) -> Result<(), Box<dyn std::error::Error>> {
    let pool = ledger.pool();
    sqlx::query(
        "INSERT INTO accounts (id, kind, name, customer_type, status, credit_limit, created_at, updated_at)
         SELECT 'acct_' || i, 'user', 'scale', 'standard', 'active', 0, 0, 0 FROM generate_series(1, $1) i",
    )
    .bind(accounts)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO fund_transactions (account_id, kind, amount, balance_before, balance_after, ledger_seq, reference_id, created_at)
         SELECT 'acct_' || i, 'deposit', $2, 0, $2, 1, 'deposit-' || i, 0 FROM generate_series(1, $1) i",
    )
    .bind(accounts)
    .bind(DEPOSIT_NANOS)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO usage_log (request_id, account_id, api_key_id, provider, model, customer_type, input_tokens, cached_input_tokens,
             cache_write_tokens, output_tokens, reasoning_tokens, usage_source, cost, balance_before, balance_after, ledger_seq, status,
             latency_ms, created_at)
         SELECT 'req_' || i || '_' || j, 'acct_' || i, 'key', 'mock', 'demo-gpt', 'standard', 10, 0, 0, 5, 0, 'upstream', $3,
             $2 - (j - 1) * $3, $2 - j * $3, j + 1, 'success', 1, 0
         FROM generate_series(1, $1) i, generate_series(1, $4) j",
    )
    .bind(accounts)
    .bind(DEPOSIT_NANOS)
    .bind(COST_NANOS)
    .bind(rows_per_account)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO account_balance (account_id, balance, last_fund_seq, ledger_seq, updated_at)
         SELECT 'acct_' || i, $2 - $4 * $3, 1, $4 + 1, 0 FROM generate_series(1, $1) i",
    )
    .bind(accounts)
    .bind(DEPOSIT_NANOS)
    .bind(COST_NANOS)
    .bind(rows_per_account)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// Loads every account into Redis as the gateway does on first use.
async fn load(ledger: &PgLedger, hot: Arc<RedisHotStore>, accounts: i64) -> Result<(), Box<dyn std::error::Error>> {
    let balances: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT account_id, balance, last_fund_seq FROM account_balance").fetch_all(ledger.pool()).await?;
    if balances.len() as i64 != accounts {
        return Err(format!("{} balances for {accounts} accounts", balances.len()).into());
    }
    let queue = Arc::new(tokio::sync::Mutex::new(balances));
    let mut loaders = tokio::task::JoinSet::new();
    for _ in 0..LOADERS {
        let (queue, hot) = (Arc::clone(&queue), Arc::clone(&hot));
        loaders.spawn(async move {
            loop {
                let Some((account_id, balance, last_fund_seq)) = queue.lock().await.pop() else { return Ok::<(), tollgate_store::StoreError>(()) };
                hot.load_account(AccountSnapshot { unlogged: Vec::new(), account_id, balance: Money::from_nanos(balance), last_fund_seq, charged_request_ids: Vec::new(), counters: CounterSeed::default() }).await?;
            }
        });
    }
    while let Some(loaded) = loaders.join_next().await {
        loaded??;
    }
    Ok(())
}
