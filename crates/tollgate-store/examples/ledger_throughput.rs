//! How fast a ledger absorbs usage events: writes `--events` events for `--accounts` accounts in
//! batches of `--batch`, the way the worker does, and prints one table row.
//!
//! cargo run --release -p tollgate-store --example ledger_throughput -- <database-url> [events] [batch] [accounts]

use std::time::Instant;

use tollgate_core::{Money, Usage, UsageSource};
use tollgate_store::Ledger;
use tollgate_store::model::{AccountKind, NewAccount, RequestStatus, StoredResponse, UsageEvent};
use tollgate_store::postgres::PgLedger;
use tollgate_store::sqlite::SqliteLedger;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let url = arguments.first().ok_or("usage: ledger_throughput <database-url> [events] [batch] [accounts]")?;
    let events: usize = arguments.get(1).map_or(Ok(20_000), |text| text.parse())?;
    let batch: usize = arguments.get(2).map_or(Ok(500), |text| text.parse())?;
    let accounts: usize = arguments.get(3).map_or(Ok(100), |text| text.parse())?;
    let ledger: Box<dyn Ledger> = if url.starts_with("postgres") {
        Box::new(PgLedger::connect(url, 4).await?)
    } else {
        Box::new(SqliteLedger::connect(url, 4).await?)
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    for index in 0..accounts {
        ledger
            .create_account(NewAccount {
                id: format!("bench-{run}-{index}"),
                kind: AccountKind::User,
                name: "bench".into(),
                customer_type: "standard".into(),
                credit_limit: Money::ZERO,
                daily_request_quota: None,
                monthly_request_quota: None,
                low_balance_threshold: None,
            })
            .await?;
    }
    let body = format!(r#"{{"id":"chatcmpl-0","object":"chat.completion","model":"demo-gpt","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":14,"completion_tokens":16,"total_tokens":30}}}}"#, "hello ".repeat(16)).into_bytes();
    let all: Vec<UsageEvent> = (0..events)
        .map(|index| UsageEvent {
            request_id: format!("r{index}"),
            account_id: format!("bench-{run}-{}", index % accounts),
            api_key_id: "key".into(),
            provider: "mock".into(),
            model: "demo-gpt".into(),
            customer_type: "standard".into(),
            price_id: None,
            usage: Usage { input_tokens: 14, output_tokens: 16, ..Usage::default() },
            usage_source: UsageSource::Upstream,
            cost: Money::from_nanos(195_000),
            status: RequestStatus::Success,
            latency_ms: 2,
            created_at_ms: 1_769_903_970_000,
            hot_balance_after: Money::ZERO,
            // A chat completion's body, as embedded mode stores for every non-streaming charge.
            stored_response: Some(StoredResponse { status: 200, content_type: "application/json".into(), body: body.clone() }),
            request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
        })
        .collect();
    let started = Instant::now();
    for chunk in all.chunks(batch.max(1)) {
        ledger.record_usage_batch(chunk).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let backend = if url.starts_with("postgres") { "postgresql" } else { "sqlite" };
    println!("| backend | events | batch | accounts | seconds | usage rows/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!("| {backend} | {events} | {batch} | {accounts} | {seconds:.2} | {:.0} |", events as f64 / seconds);
    Ok(())
}
