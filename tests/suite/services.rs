//! Services mode at scale: several gateways share one Redis hot store and one PostgreSQL
//! ledger, a separate worker process role moves the usage streams into the ledger.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::*;

fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis")
}

/// Points a configuration at shared Redis keys, with the worker elsewhere.
fn shared(config: &mut tollgate_gateway::GatewayConfig, redis_url: &str, prefix: &str) {
    config.redis_url = Some(redis_url.to_string());
    config.redis_prefix = prefix.to_string();
    config.run_worker = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_and_one_worker_never_overspend() {
    let database_url = fresh_postgres_database().await;
    let (redis_url, prefix) = (redis_url(), unique_name("t"));
    let first = TestGateway::start_on(TempDir::new(), database_url.clone(), |config| shared(config, &redis_url, &prefix)).await;
    let second = TestGateway::start_on(TempDir::new(), database_url.clone(), |config| shared(config, &redis_url, &prefix)).await;
    let worker_shutdown = CancellationToken::new();
    let mut worker_config = test_config(database_url, &first.mock_url);
    worker_config.redis_url = Some(redis_url.clone());
    worker_config.redis_prefix = prefix.clone();
    worker_config.worker_name = unique_name("worker");
    let worker = tokio::spawn(tollgate_gateway::server::run_worker(worker_config, worker_shutdown.clone()));

    // With max_tokens equal to the output, the hold equals the cost: the balance covers 100.
    let mut body = chat_body("shared balance");
    body["max_tokens"] = json!(16);
    let probe_account = first.account("1", json!({})).await;
    let probe = first.chat(&first.key(&probe_account, json!({})).await, body.clone(), None).await;
    let cost = header_money(&probe, "x-tollgate-cost");
    let account = first.account(&Money::from_nanos(cost.nanos() * 100).to_string(), json!({})).await;
    let key = first.key(&account, json!({})).await;
    let forwarded_before = first.upstream_requests().await + second.upstream_requests().await;

    let mut requests = Vec::new();
    for index in 0..1000 {
        let url = if index % 2 == 0 { &first.url } else { &second.url };
        let request = first.http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).json(&body);
        requests.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            response.status().as_u16()
        }));
    }
    let mut succeeded = 0;
    for request in requests {
        match request.await.unwrap() {
            200 => succeeded += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(succeeded, 100, "exactly what the balance covers (I3)");
    let forwarded = first.upstream_requests().await + second.upstream_requests().await - forwarded_before;
    assert_eq!(forwarded, 100, "nothing reached an upstream without a hold");
    // Quiet: Redis balance = account_balance = Σ fund − Σ usage (I2), chain whole (I4).
    let statement = second.assert_ledger_sound(&account).await;
    let charged = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").count();
    assert_eq!(charged, 100);
    assert_eq!(second.balance_of(&key).await, Money::ZERO);
    second.assert_ledger_sound(&probe_account).await;

    worker_shutdown.cancel();
    worker.await.unwrap().unwrap();
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_charges_accounts_on_every_shard() {
    let cluster_url = std::env::var("TOLLGATE_TEST_REDIS_CLUSTER_URL").expect("TOLLGATE_TEST_REDIS_CLUSTER_URL is not set: run scripts/test");
    let database_url = fresh_postgres_database().await;
    let gateway = TestGateway::start_on(TempDir::new(), database_url, |config| {
        config.redis_url = Some(cluster_url.clone());
        config.redis_prefix = unique_name("t");
    })
    .await;
    let mut accounts = Vec::new();
    for _ in 0..24 {
        let account = gateway.account("1", json!({})).await;
        let key = gateway.key(&account, json!({})).await;
        let response = gateway.chat(&key, chat_body("cluster"), None).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        accounts.push(account);
    }
    for account in &accounts {
        let statement: Value = gateway.assert_ledger_sound(account).await;
        assert_eq!(statement["rows"].as_array().unwrap().len(), 2, "a deposit and a charge");
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    gateway.stop().await;
}

/// SIGKILL the standalone worker while it writes, restart it: every charge reaches the ledger
/// exactly once (I1), and the ledger agrees with Redis (I2, I4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_and_doubles_nothing() {
    let database_url = fresh_postgres_database().await;
    let (redis_url, prefix) = (redis_url(), unique_name("t"));
    let gateway = TestGateway::start_on(TempDir::new(), database_url.clone(), |config| shared(config, &redis_url, &prefix)).await;
    let config_path = gateway.dir.0.join("worker.toml");
    let worker_name = unique_name("worker");
    std::fs::write(
        &config_path,
        format!("database_url = \"{database_url}\"\nredis_url = \"{redis_url}\"\nredis_prefix = \"{prefix}\"\nworker_name = \"{worker_name}\"\n"),
    )
    .unwrap();
    let spawn_worker = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["worker", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let account = gateway.account("100", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut worker = spawn_worker();
    let mut request_ids = Vec::new();
    let mut load = Vec::new();
    for index in 0..400 {
        let request_id = format!("w-{index}");
        request_ids.push(request_id.clone());
        let request = gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).header("X-Request-ID", request_id).json(&chat_body("worker crash"));
        load.push(tokio::spawn(async move { request.send().await.unwrap().status().as_u16() }));
        if index == 200 {
            // Killed while events stream in and batches are being written.
            tokio::time::sleep(Duration::from_millis(30)).await;
            worker.start_kill().unwrap();
            worker.wait().await.unwrap();
        }
    }
    for request in load {
        assert_eq!(request.await.unwrap(), 200);
    }
    let mut worker = spawn_worker();
    let statement = gateway.assert_ledger_sound(&account).await;
    let mut charged: Vec<String> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").map(|row| row["request_id"].as_str().unwrap().to_string()).collect();
    charged.sort();
    request_ids.sort();
    assert_eq!(charged, request_ids, "every charge persisted exactly once");
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    gateway.stop().await;
}
