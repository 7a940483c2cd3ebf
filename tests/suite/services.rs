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
            let status = response.status().as_u16();
            (status, if status == 200 { String::new() } else { response.text().await.unwrap_or_default() })
        }));
    }
    let mut succeeded = 0;
    for request in requests {
        match request.await.unwrap() {
            (200, _) => succeeded += 1,
            (402, _) => {}
            (other, body) => panic!("unexpected status {other}: {body}"),
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

/// Usage rows of an account in a PostgreSQL ledger, read directly.
async fn usage_rows(database_url: &str, account_id: &str) -> i64 {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(database_url).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_log WHERE account_id = $1").bind(account_id).fetch_one(&pool).await.unwrap();
    pool.close().await;
    count
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
    let send = |index: usize, request_ids: &mut Vec<String>| {
        let request_id = format!("w-{index}");
        request_ids.push(request_id.clone());
        let request = gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).header("X-Request-ID", request_id).json(&chat_body("worker crash"));
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };
    for index in 0..200 {
        load.push(send(index, &mut request_ids));
    }
    // Killed once it has written some of the charges and while events still stream in: the
    // ledger holds some but not all of them at the kill, or the kill proved nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while usage_rows(&database_url, &account).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the worker wrote nothing in 30 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    let at_kill = usage_rows(&database_url, &account).await;
    for index in 200..400 {
        load.push(send(index, &mut request_ids));
    }
    for request in load {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert!(0 < at_kill && at_kill < 400, "{at_kill} of 400 charges in the ledger at the kill");
    assert_eq!(usage_rows(&database_url, &account).await, at_kill, "nothing is written while the worker is down");
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

/// The same with real processes: two `tollgate serve --no-worker` and one `tollgate worker`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_and_a_worker_process_never_overspend() {
    let dir = TempDir::new();
    let database_url = fresh_postgres_database().await;
    let (redis_url, prefix) = (redis_url(), unique_name("t"));
    let mock_shutdown = CancellationToken::new();
    let mock_url = start_mock(tollgate_mock::MockConfig::default(), mock_shutdown.clone()).await;
    let config_path = dir.0.join("tollgate.toml");
    std::fs::write(
        &config_path,
        format!("database_url = \"{database_url}\"\nredis_url = \"{redis_url}\"\nredis_prefix = \"{prefix}\"\n[[providers]]\nname = \"mock\"\nkind = \"mock\"\nbase_url = \"{mock_url}\"\n[[models]]\nmodel = \"demo-gpt\"\nprovider = \"mock\"\n"),
    )
    .unwrap();
    let spawn = |arguments: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(arguments)
            .arg("--config")
            .arg(&config_path)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TOLLGATE_WORKER_NAME", unique_name("worker"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let http = reqwest::Client::new();
    let mut urls = Vec::new();
    let mut processes = Vec::new();
    for _ in 0..2 {
        let listen = format!("127.0.0.1:{}", restartable_port());
        processes.push(spawn(&["serve", "--no-worker", "--listen", &listen]));
        urls.push(format!("http://{listen}"));
    }
    for url in &urls {
        let started = std::time::Instant::now();
        while http.get(format!("{url}/readyz")).send().await.map(|response| response.status() != 200).unwrap_or(true) {
            assert!(started.elapsed() < Duration::from_secs(10), "gateway {url} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    processes.push(spawn(&["worker"]));
    let admin = |path: &str, body: Option<Value>| {
        let mut request = http.request(if body.is_some() { reqwest::Method::POST } else { reqwest::Method::GET }, format!("{}{path}", urls[0])).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    http.put(format!("{}/internal/prices", urls[0]))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!([{"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK}]))
        .send()
        .await
        .unwrap();
    // With max_tokens 16 the hold equals the cost; find it on a probe account.
    let mut body = chat_body("processes");
    body["max_tokens"] = json!(16);
    let open = |id: &'static str, amount: String| {
        let admin = &admin;
        async move {
            admin("/internal/accounts", Some(json!({"id": id, "kind": "user", "name": "n", "customer_type": TIER}))).await;
            let topup = admin("/internal/topups", Some(json!({"account_id": id, "amount": amount, "reference_id": format!("{id}-credit")}))).await;
            admin(&format!("/internal/topups/{}/confirm", topup["id"].as_str().unwrap()), Some(json!({}))).await;
            admin(&format!("/internal/accounts/{id}/keys"), Some(json!({"name": "k"}))).await["key"].as_str().unwrap().to_string()
        }
    };
    let probe_key = open("probe", "1".into()).await;
    let probe = http.post(format!("{}/v1/chat/completions", urls[0])).bearer_auth(&probe_key).json(&body).send().await.unwrap();
    let cost = header_money(&probe, "x-tollgate-cost");
    let key = open("shared", Money::from_nanos(cost.nanos() * 40).to_string()).await;
    let mut requests = Vec::new();
    for index in 0..400 {
        let request = http.post(format!("{}/v1/chat/completions", urls[index % 2])).bearer_auth(&key).json(&body);
        requests.push(tokio::spawn(async move { request.send().await.unwrap().status().as_u16() }));
    }
    let mut succeeded = 0;
    for request in requests {
        match request.await.unwrap() {
            200 => succeeded += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(succeeded, 40, "I3 across processes");
    let started = std::time::Instant::now();
    let account = loop {
        let account = admin("/internal/accounts/shared", None).await;
        if account["balance"] == account["ledger_balance"] || started.elapsed() > Duration::from_secs(10) {
            break account;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((account["balance"].as_str(), account["ledger_balance"].as_str(), account["held"].as_str()), (Some("0"), Some("0"), Some("0")), "I2 once quiet");
    let statement = admin("/internal/accounts/shared/statement", None).await;
    assert_chain(&statement);
    for mut process in processes {
        process.start_kill().unwrap();
        process.wait().await.unwrap();
    }
    mock_shutdown.cancel();
}
