//! I1 and I6 in embedded mode: SIGKILL the gateway mid-load, restart it on the same ledger.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::*;

fn spawn_gateway(config_path: &std::path::Path, listen: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(config_path)
        .args(["--listen", listen])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_ready(http: &reqwest::Client, url: &str) {
    for _ in 0..200 {
        if let Ok(response) = http.get(format!("{url}/readyz")).send().await
            && response.status() == 200 {
                return;
            }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway at {url} never became ready");
}

/// Sends one request; returns true once the client has received the whole response: a
/// non-streaming body in full, or a stream's terminal event. A stream is served from its
/// terminal event on, even if the connection is lost after it: the gateway sends that event only
/// once the charge is durable (I1), so this is the window a late settle would lose a charge in.
async fn one_request(http: &reqwest::Client, url: &str, key: &str, request_id: &str, stream: bool) -> bool {
    let mut body = chat_body(&" hello".repeat(PROMPT_WORDS));
    body["max_tokens"] = json!(OUTPUT_TOKENS);
    body["mock"] = json!({"output_tokens": OUTPUT_TOKENS});
    if stream {
        body["stream"] = json!(true);
        body["mock"]["chunk_interval_ms"] = json!(3);
    }
    let sent = http.post(format!("{url}/v1/chat/completions")).bearer_auth(key).header("X-Request-ID", request_id).json(&body).send().await;
    let Ok(mut response) = sent else { return false };
    if response.status() != 200 {
        return false;
    }
    if !stream {
        return matches!(response.text().await, Ok(text) if serde_json::from_str::<Value>(&text).is_ok());
    }
    let mut received = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        received.extend_from_slice(&chunk);
        if received.windows(DONE.len()).any(|window| window == DONE) {
            return true;
        }
    }
    false
}

/// The terminal event of an OpenAI stream.
const DONE: &[u8] = b"data: [DONE]";

/// Every request's prompt is " hello" this many times: as many tokens in every encoding.
const PROMPT_WORDS: usize = 4;
/// Its prompt tokens by OpenAI's rule for chat messages, which the mock follows: 3 priming the
/// reply, 3 for the message, 1 for its role ("user"), then the content. Counted here, not by the
/// gateway's tokenizer, so a completed request's charge is known in advance.
const PROMPT_TOKENS: u64 = PROMPT_WORDS as u64 + 7;
/// Its completion: the mock generates this many tokens, and the request's cap is the same.
const OUTPUT_TOKENS: u64 = 16;

/// A gateway as its own process (so it can be killed), on a fresh ledger, with the mock upstream
/// in this process.
struct ProcessGateway {
    _dir: TempDir,
    config_path: std::path::PathBuf,
    listen: String,
    url: String,
    http: reqwest::Client,
    child: tokio::process::Child,
    mock_shutdown: CancellationToken,
}

impl ProcessGateway {
    /// Starts the process with short hold expiry, so killed requests' holds clear quickly.
    async fn start() -> ProcessGateway {
        let dir = TempDir::new();
        let mock_shutdown = CancellationToken::new();
        let mock_url = start_mock(tollgate_mock::MockConfig::default(), mock_shutdown.clone()).await;
        let config_path = dir.0.join("tollgate.toml");
        let config = format!(
            "{}database_url = \"{}\"\n[limits]\nhold_ttl_ms = 5000\nstream_duration_ms_max = 2000\nupstream_timeout_ms = 2000\nsettle_timeout_ms = 2000\nhold_sweep_interval_ms = 200\n[[providers]]\nname = \"mock\"\nkind = \"mock\"\nbase_url = \"{mock_url}\"\n[[models]]\nmodel = \"demo-gpt\"\nprovider = \"mock\"\n",
            backend_toml(),
            test_database_url(&dir).await
        );
        std::fs::write(&config_path, config).unwrap();
        let listen = format!("127.0.0.1:{}", restartable_port());
        let url = format!("http://{listen}");
        let http = reqwest::Client::new();
        let child = spawn_gateway(&config_path, &listen);
        wait_ready(&http, &url).await;
        ProcessGateway { _dir: dir, config_path, listen, url, http, child, mock_shutdown }
    }

    /// Starts the process again on the same ledger (after it died).
    async fn restart(&mut self) {
        self.child = spawn_gateway(&self.config_path, &self.listen);
        wait_ready(&self.http, &self.url).await;
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// Prices demo-gpt, opens a credited account, returns a key for it.
    async fn account(&self, account_id: &str, amount: &str) -> String {
        self.admin(reqwest::Method::PUT, "/internal/prices", Some(json!([{"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK}]))).await;
        self.admin(reqwest::Method::POST, "/internal/accounts", Some(json!({"id": account_id, "kind": "user", "name": "n", "customer_type": TIER}))).await;
        let topup = self.admin(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account_id, "amount": amount, "reference_id": format!("{account_id}-credit")}))).await;
        self.admin(reqwest::Method::POST, &format!("/internal/topups/{}/confirm", topup["id"].as_str().unwrap()), None).await;
        let created = self.admin(reqwest::Method::POST, &format!("/internal/accounts/{account_id}/keys"), Some(json!({"name": "k"}))).await;
        created["key"].as_str().unwrap().to_string()
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
        self.mock_shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_and_doubles_nothing() {
    let mut gateway = ProcessGateway::start().await;
    let key = gateway.account("crash", "1000").await;
    let (http, url) = (gateway.http.clone(), gateway.url.clone());
    let admin = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = http.request(method, format!("{url}{path}")).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };

    // Load: 8 clients, half the requests streaming, until the kill.
    let completed = Arc::new(Mutex::new(HashSet::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for client in 0..8 {
        let (http, url, key, completed, sent, stop) = (http.clone(), url.clone(), key.clone(), completed.clone(), sent.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sequence = 0;
            while !stop.is_cancelled() {
                let request_id = format!("crash-{client}-{sequence}");
                sent.lock().unwrap().push(request_id.clone());
                if one_request(&http, &url, &key, &request_id, sequence % 2 == 0).await {
                    completed.lock().unwrap().insert(request_id);
                }
                sequence += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.child.start_kill().unwrap();
    gateway.child.wait().await.unwrap();
    stop.cancel();
    for client in clients {
        client.await.unwrap();
    }
    let completed = completed.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(completed.len() > 20, "the load ran ({} completed)", completed.len());

    // Restart on the same ledger and check every invariant from the outside.
    gateway.restart().await;
    // Embedded: holds died with the process. Redis: they expire (hold_ttl_ms 5 s) and the worker
    // drains the streams; wait until quiet.
    let started = std::time::Instant::now();
    let account: Value = loop {
        let account: Value = admin(reqwest::Method::GET, "/internal/accounts/crash", None).await.unwrap().json().await.unwrap();
        let quiet = account["held"] == "0" && account["balance"] == account["ledger_balance"];
        if quiet || started.elapsed() > Duration::from_secs(15) {
            break account;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(account["held"], "0", "holds of killed requests are released");
    let mut rows_per_request: HashMap<String, Vec<Value>> = HashMap::new();
    let mut cursor: Option<i64> = None;
    loop {
        let mut path = "/internal/billing/transactions?account_id=crash&limit=1000".to_string();
        if let Some(cursor) = cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page: Value = admin(reqwest::Method::GET, &path, None).await.unwrap().json().await.unwrap();
        for row in page["data"].as_array().unwrap() {
            if row["status"] == "failed" {
                assert_eq!(money(&row["cost"]), Money::ZERO, "a failed request costs nothing: {row}");
            } else {
                rows_per_request.entry(row["request_id"].as_str().unwrap().to_string()).or_default().push(row.clone());
            }
        }
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    // A row is not enough: a completed request is charged in full, as served, from the
    // upstream's usage — not as a client that went away, not by estimate.
    let full = expected_cost(PROMPT_TOKENS, OUTPUT_TOKENS);
    for request_id in &completed {
        let rows = rows_per_request.get(request_id).map_or(&[][..], Vec::as_slice);
        assert_eq!(rows.len(), 1, "I1: completed request {request_id} is charged exactly once: {rows:?}");
        let row = &rows[0];
        let charged = (row["status"].as_str(), row["usage_source"].as_str(), row["usage"]["input_tokens"].as_u64(), row["usage"]["output_tokens"].as_u64(), money(&row["cost"]));
        assert_eq!(charged, (Some("success"), Some("upstream"), Some(PROMPT_TOKENS), Some(OUTPUT_TOKENS), full), "completed request {request_id} is charged its full answer: {row}");
    }
    for (request_id, rows) in &rows_per_request {
        assert_eq!(rows.len(), 1, "nothing is charged twice: {request_id} {rows:?}");
        assert!(money(&rows[0]["cost"]) <= full, "a request the kill cut off is charged at most its full answer: {}", rows[0]);
    }
    assert!(rows_per_request.keys().all(|id| sent.contains(id)));

    assert_eq!(money(&account["balance"]), money(&account["ledger_balance"]), "I2 after restart");
    let statement: Value = admin(reqwest::Method::GET, "/internal/accounts/crash/statement", None).await.unwrap().json().await.unwrap();
    assert_chain(&statement);
    let mut sum = Money::ZERO;
    for row in statement["rows"].as_array().unwrap() {
        sum = sum.checked_add(money(&row["amount"])).unwrap();
    }
    assert_eq!(sum, money(&account["ledger_balance"]), "I2: Σ fund − Σ usage");
    // And it still serves and charges after the restart.
    assert!(one_request(&http, &url, &key, "after-restart", false).await);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish_and_charges_it() {
    let mut gateway = ProcessGateway::start().await;
    let key = gateway.account("term", "10").await;
    let (http, url) = (gateway.http.clone(), gateway.url.clone());

    let mut body = chat_body("a slow stream");
    body["stream"] = json!(true);
    body["mock"] = json!({"output_tokens": 40, "chunk_interval_ms": 20});
    let response = http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).header("X-Request-ID", "graceful").json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let pid = gateway.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let text = response.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "the in-flight stream finished after SIGTERM");
    assert_eq!(text.matches("hello").count(), 40);
    let status = gateway.child.wait().await.unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");

    gateway.restart().await;
    // Services mode: the usage stream may still be draining into the ledger.
    let started = std::time::Instant::now();
    let page = loop {
        let page = gateway.admin(reqwest::Method::GET, "/internal/billing/transactions?account_id=term", None).await;
        if !page["data"].as_array().unwrap().is_empty() || started.elapsed() > Duration::from_secs(5) {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rows = page["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0]["request_id"].as_str(), rows[0]["status"].as_str(), rows[0]["usage"]["output_tokens"].as_u64()), (Some("graceful"), Some("success"), Some(40)));
    gateway.stop().await;
}

/// Quotas and budgets outlive the process: a restarted gateway (embedded: its hot store was in
/// memory) starts its counters from the ledger's, so a used-up daily quota stays used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_daily_quota() {
    let mut gateway = ProcessGateway::start().await;
    let key = gateway.account("quota", "10").await;
    gateway.admin(reqwest::Method::PATCH, "/internal/accounts/quota", Some(json!({"daily_request_quota": 2}))).await;
    let (http, url) = (gateway.http.clone(), gateway.url.clone());
    for id in ["q1", "q2"] {
        assert!(one_request(&http, &url, &key, id, false).await, "request {id} within the quota");
    }
    let status = |response: reqwest::Response| response.status().as_u16();
    let refused = http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).json(&chat_body("third")).send().await.unwrap();
    assert_eq!(status(refused), 429, "the quota is used up before the restart");

    let pid = gateway.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(gateway.child.wait().await.unwrap().success());
    gateway.restart().await;

    let response = http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).json(&chat_body("after restart")).send().await.unwrap();
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "daily_quota_exceeded", "{body}");
    let balance: Value = http.get(format!("{url}/v1/balance")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(balance["daily_requests_used"], 2, "{balance}");
    gateway.stop().await;
}
