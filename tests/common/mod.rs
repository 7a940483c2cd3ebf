//! The integration-test harness: a real gateway on a loopback port, in front of a real mock
//! upstream on another, with a fresh SQLite ledger per test. Everything goes over HTTP.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::str::FromStr;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
pub use tollgate_core::Money;
pub use tollgate_store::clock::ManualClock;
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::{ModelRoute, ProviderConfig, ProviderKind};
use tollgate_gateway::server::Gateway;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const TIER: &str = "standard";
/// Demo-like prices: input 2.50, output 10.00, cached input 1.25 per million tokens.
pub const INPUT_PER_MTOK: &str = "2.5";
pub const OUTPUT_PER_MTOK: &str = "10";

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("tollgate-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh PostgreSQL database on the test server (`TOLLGATE_TEST_POSTGRES_URL`).
pub async fn fresh_postgres_database() -> String {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL").expect("TOLLGATE_TEST_POSTGRES_URL is not set: run scripts/test, which starts PostgreSQL");
    let name = format!("it_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// The ledger a test gateway uses: a fresh SQLite file in `dir`, or — when
/// `TOLLGATE_TEST_LEDGER=postgres` (set by `scripts/test` for its second pass) — a fresh
/// database on the server named by `TOLLGATE_TEST_POSTGRES_URL`.
pub async fn test_database_url(dir: &TempDir) -> String {
    if std::env::var("TOLLGATE_TEST_LEDGER").as_deref() == Ok("postgres") {
        return fresh_postgres_database().await;
    }
    format!("sqlite://{}/ledger.db", dir.0.display())
}

/// Starts a mock upstream on a free loopback port; returns its `/v1` base URL.
pub async fn start_mock(config: tollgate_mock::MockConfig, shutdown: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(tollgate_mock::serve(listener, config, async move { shutdown.cancelled().await }));
    format!("http://{address}/v1")
}

/// The routes every test gateway has: two priced demo models and one never priced.
pub fn test_config(database_url: String, mock_base_url: &str) -> GatewayConfig {
    let mut config = GatewayConfig { database_url, admin_token: Some(ADMIN_TOKEN.into()), ..GatewayConfig::default() };
    config.providers.push(ProviderConfig { name: "mock".into(), kind: ProviderKind::Mock, base_url: mock_base_url.into(), api_key_env: None, output_cap_field: None, client_file_references: Default::default(), client_urls: Default::default() });
    for model in ["demo-gpt", "demo-claude", "demo-embedding", "unpriced-gpt"] {
        config.models.push(ModelRoute { model: model.into(), provider: "mock".into(), upstream_model: None, ..ModelRoute::default() });
    }
    config.limits.hold_sweep_interval_ms = 200;
    // Reconciliation runs when a test asks for it (tests/suite/reconcile.rs runs the job).
    config.jobs.reconcile_interval_ms = 0;
    if let Some(redis_url) = services_redis_url() {
        config.redis_url = Some(redis_url);
        config.redis_prefix = unique_name("t");
        config.worker_name = unique_name("worker");
    }
    config
}

/// `TOLLGATE_TEST_HOT=redis` (set by `scripts/test` for its services pass): test gateways use
/// the Redis hot store at `TOLLGATE_TEST_REDIS_URL`, each with its own key prefix.
pub fn services_redis_url() -> Option<String> {
    if std::env::var("TOLLGATE_TEST_HOT").as_deref() != Ok("redis") {
        return None;
    }
    Some(std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_HOT=redis needs TOLLGATE_TEST_REDIS_URL"))
}

pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A loopback port for a server the test kills and starts again on the same port. It lies
/// below the kernel's ephemeral range, so no `bind(0)` elsewhere in the run (clients, other
/// servers) can take it between the kill and the restart; it is random, free when chosen, and
/// never handed out twice in this process.
pub fn restartable_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let random = u16::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..2].try_into().unwrap());
        let port = low + random % (high - low);
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

/// The TOML lines that put a gateway process on the test backends (see `test_config`).
pub fn backend_toml() -> String {
    match services_redis_url() {
        Some(url) => format!("redis_url = \"{url}\"\nredis_prefix = \"{}\"\nworker_name = \"{}\"\n", unique_name("t"), unique_name("worker")),
        None => String::new(),
    }
}

/// A gateway running in this process over real HTTP.
pub struct TestGateway {
    pub url: String,
    pub mock_url: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
    pub dir: TempDir,
    pub database_url: String,
    pub config: GatewayConfig,
    /// The gateway's own hot store, for tests that reach under the HTTP surface.
    pub hot: std::sync::Arc<dyn tollgate_store::HotStore>,
    /// The gateway's state, for tests that read what it did (not for driving it).
    pub state: tollgate_gateway::state::AppState,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let dir = TempDir::new();
        let database_url = test_database_url(&dir).await;
        Self::start_on(dir, database_url, adjust).await
    }

    /// A gateway on a given ledger (several gateways may share one PostgreSQL ledger).
    pub async fn start_on(dir: TempDir, database_url: String, adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        Self::start_on_clock(dir, database_url, None, adjust).await
    }

    /// A gateway on a given ledger, on a set clock or the system's.
    pub async fn start_on_clock(dir: TempDir, database_url: String, clock: Option<&ManualClock>, adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let shutdown = CancellationToken::new();
        // Recording the last request lets tests see what the gateway forwarded (fidelity suite).
        let mock = tollgate_mock::MockConfig { record_last_request: true, ..tollgate_mock::MockConfig::default() };
        let mock_url = start_mock(mock, shutdown.clone()).await;
        let mut config = test_config(database_url.clone(), &mock_url);
        adjust(&mut config);
        let gateway = match clock {
            Some(clock) => Gateway::start_with_clock(config.clone(), clock.clock()).await.unwrap(),
            None => Gateway::start(config.clone()).await.unwrap(),
        };
        let hot = std::sync::Arc::clone(&gateway.state.hot);
        let state = gateway.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = shutdown.clone();
        let served = tokio::spawn(async move {
            gateway.serve(listener, token).await.unwrap();
        });
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        let gateway = TestGateway { url, mock_url, http, shutdown, served: Some(served), dir, database_url, config, hot, state };
        gateway.set_prices(&[("demo-gpt", TIER), ("demo-claude", TIER), ("demo-embedding", TIER)]).await;
        gateway
    }

    /// Stops the gateway the way SIGTERM does and waits until it is down.
    pub async fn stop(self) {
        self.stop_keeping_ledger().await;
    }

    /// [`stop`](Self::stop), handing back the ledger (its directory and URL) for a next gateway.
    pub async fn stop_keeping_ledger(mut self) -> (TempDir, String) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
        (self.dir, self.database_url)
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn admin_ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.admin(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path} → {status}: {value}");
        value
    }

    pub async fn set_prices(&self, models: &[(&str, &str)]) {
        let prices: Vec<Value> = models
            .iter()
            .map(|(model, tier)| json!({"provider": "mock", "model": model, "customer_type": tier,
                "input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK, "cached_input_per_mtok": "1.25"}))
            .collect();
        self.admin_ok(reqwest::Method::PUT, "/internal/prices", Some(Value::Array(prices))).await;
    }

    /// Creates an account, credits it with `balance` (a confirmed top-up), returns its id.
    pub async fn account(&self, balance: &str, extra: Value) -> String {
        let id = format!("acct_{}", uuid::Uuid::new_v4().simple());
        let mut body = json!({"id": id, "kind": "user", "name": "test", "customer_type": TIER});
        merge(&mut body, extra);
        self.admin_ok(reqwest::Method::POST, "/internal/accounts", Some(body)).await;
        if Money::from_str(balance).unwrap().is_positive() {
            self.top_up(&id, balance, &format!("initial-{id}")).await;
        }
        id
    }

    pub async fn top_up(&self, account_id: &str, amount: &str, reference_id: &str) -> Value {
        let topup = self
            .admin_ok(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account_id, "amount": amount, "reference_id": reference_id})))
            .await;
        let id = topup["id"].as_str().unwrap().to_string();
        self.admin_ok(reqwest::Method::POST, &format!("/internal/topups/{id}/confirm"), None).await
    }

    /// Issues a key for the account; returns the secret.
    pub async fn key(&self, account_id: &str, extra: Value) -> String {
        let mut body = json!({"name": "test key"});
        merge(&mut body, extra);
        let created = self.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account_id}/keys"), Some(body)).await;
        created["key"].as_str().unwrap().to_string()
    }

    pub async fn chat(&self, key: &str, body: Value, request_id: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(format!("{}/v1/chat/completions", self.url)).bearer_auth(key).json(&body);
        if let Some(request_id) = request_id {
            request = request.header("X-Request-ID", request_id);
        }
        request.send().await.unwrap()
    }

    /// A `/v1/messages` request authenticated the way the anthropic SDK does it (`x-api-key`,
    /// `anthropic-version`); the caller adds the body and sends it.
    pub fn messages_request(&self, key: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}/v1/messages", self.url)).header("x-api-key", key).header("anthropic-version", "2023-06-01")
    }

    /// Generation requests the mock upstream has received.
    pub async fn upstream_requests(&self) -> u64 {
        let base = self.mock_url.trim_end_matches("/v1");
        let stats: Value = self.http.get(format!("{base}/mock/stats")).send().await.unwrap().json().await.unwrap();
        stats["requests"].as_u64().unwrap()
    }

    pub async fn balance(&self, key: &str) -> Value {
        let response = self.http.get(format!("{}/v1/balance", self.url)).bearer_auth(key).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn balance_of(&self, key: &str) -> Money {
        money(&self.balance(key).await["balance"])
    }

    /// Waits until the ledger agrees with the hot store (the worker caught up), then checks I2
    /// and I4 for the account through the statement.
    pub async fn assert_ledger_sound(&self, account_id: &str) -> Value {
        // With Redis the worker writes the ledger after the response: wait until it is quiet.
        let started = std::time::Instant::now();
        let (account, live, ledger) = loop {
            let account = self.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account_id}"), None).await;
            let (live, ledger) = (money(&account["balance"]), money(&account["ledger_balance"]));
            if live == ledger || started.elapsed() > std::time::Duration::from_secs(10) {
                break (account, live, ledger);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(live, ledger, "hot balance equals ledger balance (I2): {account}");
        let statement = self.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account_id}/statement"), None).await;
        assert_chain(&statement);
        let rows = statement["rows"].as_array().unwrap();
        let mut sum = Money::ZERO;
        for row in rows {
            sum = sum.checked_add(money(&row["amount"])).unwrap();
        }
        assert_eq!(sum, ledger, "Σ fund − Σ usage equals the balance (I2)");
        statement
    }
}

/// I4: each row's balance_before is the previous row's balance_after, from zero.
pub fn assert_chain(statement: &Value) {
    let mut previous = Money::ZERO;
    for row in statement["rows"].as_array().unwrap() {
        let before = money(&row["balance_before"]);
        let after = money(&row["balance_after"]);
        assert_eq!(before, previous, "chain broken at {row}");
        assert_eq!(before.checked_add(money(&row["amount"])).unwrap(), after, "row arithmetic at {row}");
        previous = after;
    }
}

pub fn money(value: &Value) -> Money {
    Money::from_str(value.as_str().unwrap_or_else(|| panic!("not a money string: {value}"))).unwrap()
}

pub fn header_money(response: &reqwest::Response, name: &str) -> Money {
    Money::from_str(response.headers().get(name).unwrap_or_else(|| panic!("missing {name}")).to_str().unwrap()).unwrap()
}

pub fn merge(target: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
        target.extend(extra);
    }
}

/// The cost the prices above give a usage, computed independently of the gateway: per token,
/// input costs 2500 nano-units and output 10000, so no rounding is involved.
pub fn expected_cost(prompt_tokens: u64, completion_tokens: u64) -> Money {
    Money::from_nanos(i64::try_from(prompt_tokens * 2_500 + completion_tokens * 10_000).unwrap())
}

pub fn chat_body(content: &str) -> Value {
    json!({"model": "demo-gpt", "messages": [{"role": "user", "content": content}]})
}

/// Runs the binary to completion: (exit status, stdout, stderr).
pub async fn tollgate(args: &[&str], extra_env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args).env("RUST_LOG", "warn").kill_on_drop(true);
    for variable in ["TOLLGATE_DATABASE_URL", "TOLLGATE_REDIS_URL", "TOLLGATE_PRICING_CHECK", "TOLLGATE_LISTEN"] {
        command.env_remove(variable);
    }
    for (name, value) in extra_env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), command.output()).await.expect("tollgate did not finish in 60 s").unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

/// Runs an SQL statement on the gateway's ledger database, as an operator's slip would.
pub async fn edit_ledger(gateway: &TestGateway, sql: &str, account_id: &str) {
    let url = &gateway.database_url;
    if url.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await.unwrap();
        let sql = sql.replace('?', "$1");
        let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(account_id).execute(&pool).await.unwrap();
        assert_eq!(done.rows_affected(), 1);
        pool.close().await;
    } else {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(url).await.unwrap();
        let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).bind(account_id).execute(&pool).await.unwrap();
        assert_eq!(done.rows_affected(), 1);
        pool.close().await;
    }
}

/// The `tollgate` binary serving a config file (with `listen` and `internal_listen` on port 0),
/// its two addresses read from what it prints; logs at debug level to its stderr.
pub struct BinaryGateway {
    pub child: tokio::process::Child,
    pub public: String,
    pub internal: String,
    pub stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    /// What it printed while starting.
    pub printed: String,
    /// Its stderr (the log), read all along so a full pipe never blocks it; complete once
    /// the process has exited.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    log_reader: tokio::task::JoinHandle<()>,
}

impl BinaryGateway {
    /// The whole log, after the process has exited.
    pub async fn finished_log(self) -> String {
        self.log_reader.await.unwrap();
        self.log.lock().unwrap().clone()
    }
}

pub async fn start_binary(config_path: &std::path::Path, env: &[(&str, &str)]) -> BinaryGateway {
    use tokio::io::AsyncBufReadExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .env_remove("TOLLGATE_DATABASE_URL")
        .env_remove("TOLLGATE_REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let log_sink = std::sync::Arc::clone(&log);
    let log_reader = tokio::spawn(async move {
        let mut line = String::new();
        while stderr.read_line(&mut line).await.is_ok_and(|read| read > 0) {
            log_sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let (mut public, mut internal, mut printed) = (None, None, String::new());
    while public.is_none() || internal.is_none() {
        let mut line = String::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), stdout.read_line(&mut line)).await.expect("the gateway did not start in 30 s").unwrap();
        assert!(read > 0, "the gateway exited: {printed}");
        printed.push_str(&line);
        let address = line.rsplit_once("http://").map(|(_, address)| format!("http://{}", address.trim()));
        if line.starts_with("Tollgate listening on") {
            public = address;
        } else if line.starts_with("operator API") {
            internal = address;
        }
    }
    BinaryGateway { child, public: public.unwrap(), internal: internal.unwrap(), stdout, printed, log, log_reader }
}

/// Through a binary gateway's operator API: a price for `model` at [`TIER`], an account
/// `account_id` topped up with 1 unit, and a key of it, which is returned.
pub async fn binary_customer(http: &reqwest::Client, internal: &str, admin_token: &str, model: &str, account_id: &str) -> String {
    let admin = |method: reqwest::Method, path: &str, body: Value| http.request(method, format!("{internal}{path}")).bearer_auth(admin_token).json(&body).send();
    let prices = json!([{"provider": "upstream", "model": model, "customer_type": TIER, "input_per_mtok": "2.5", "output_per_mtok": "10"}]);
    assert_eq!(admin(reqwest::Method::PUT, "/internal/prices", prices).await.unwrap().status(), 200);
    let account = json!({"id": account_id, "kind": "user", "name": account_id, "customer_type": TIER});
    assert_eq!(admin(reqwest::Method::POST, "/internal/accounts", account).await.unwrap().status(), 201);
    let topup: Value = admin(reqwest::Method::POST, "/internal/topups", json!({"account_id": account_id, "amount": "1", "reference_id": format!("{account_id}-1")})).await.unwrap().json().await.unwrap();
    let confirm = format!("/internal/topups/{}/confirm", topup["id"].as_str().unwrap());
    assert_eq!(admin(reqwest::Method::POST, &confirm, json!({})).await.unwrap().status(), 200);
    let created: Value = admin(reqwest::Method::POST, &format!("/internal/accounts/{account_id}/keys"), json!({"name": "k"})).await.unwrap().json().await.unwrap();
    created["key"].as_str().unwrap().to_string()
}

/// Sends SIGTERM and waits (at most 60 s) for the exit status.
pub async fn terminate(child: &mut tokio::process::Child) -> Option<i32> {
    let pid = child.id().unwrap();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait()).await.expect("no exit within 60 s of SIGTERM").unwrap();
    status.code()
}

/// The fixture of token counts made by OpenAI's Python `tiktoken` (scripts/tiktoken-fixtures):
/// the independent oracle the charges are checked against, not the gateway's own tokenizer.
fn tiktoken_fixture() -> &'static Value {
    static FIXTURE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| serde_json::from_str(include_str!("../fixtures/tiktoken.json")).unwrap())
}

/// The prompt tokens of `messages` for the demo models (cl100k_base), by OpenAI's chat formula,
/// as Python tiktoken counted them: what the mock upstream must report and the gateway charge.
pub fn tiktoken_prompt_tokens(messages: &Value) -> u64 {
    let found = tiktoken_fixture()["prompts"].as_array().unwrap().iter().find(|case| case["encoding"] == "cl100k_base" && case["messages"] == *messages);
    found.unwrap_or_else(|| panic!("{messages} is not in tests/fixtures/tiktoken.json: add it to scripts/tiktoken-fixtures and run it"))["tokens"].as_u64().unwrap()
}

/// The tokens of a text for the demo models (cl100k_base), as Python tiktoken counted them.
pub fn tiktoken_text_tokens(text: &str) -> u64 {
    let found = tiktoken_fixture()["texts"].as_array().unwrap().iter().find(|case| case["encoding"] == "cl100k_base" && case["text"] == text);
    found.unwrap_or_else(|| panic!("{text:?} is not in tests/fixtures/tiktoken.json: add it to scripts/tiktoken-fixtures and run it"))["tokens"].as_u64().unwrap()
}

/// A set environment variable whose value a header can carry, standing in for an upstream key:
/// tests cannot set variables (`unsafe` is forbidden), and the gateway reads keys from them.
pub fn upstream_key_variable() -> (String, String) {
    let usable = |value: &str| !value.is_empty() && value.len() <= 256 && value.bytes().all(|byte| byte.is_ascii_graphic());
    let preferred = ["CARGO_PKG_NAME", "USER", "HOME", "PATH"];
    preferred
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| usable(value)).map(|value| (name.to_string(), value)))
        .or_else(|| std::env::vars().find(|(_, value)| usable(value)))
        .expect("some environment variable is set")
}

/// How long [`wait_until`] waits before it fails: generous, so that a loaded machine makes a
/// test slow, not red.
pub const WAIT_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// Polls `condition` until it holds, failing with `what` after [`WAIT_BOUND`]: for what takes
/// its own time (a notification's hop, a job's next period), instead of a sleep and a guess.
pub async fn wait_until<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !condition().await {
        assert!(started.elapsed() < WAIT_BOUND, "{what}: not so within {WAIT_BOUND:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Gateways on a clock the test sets ([`ManualClock`]): it dates their charges and their hot
/// store counts periods and expires holds by it, so a test puts requests at 23:59:59.999 and
/// 00:00:00.000 on purpose. The ledger dates what it writes itself (fund transactions) by the
/// system clock, so a set clock in the future keeps deposits before the charges.
impl TestGateway {
    pub async fn start_with_clock(clock: &ManualClock, adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let dir = TempDir::new();
        let database_url = test_database_url(&dir).await;
        Self::start_on_with_clock(dir, database_url, clock, adjust).await
    }

    /// [`TestGateway::start_on`] on a set clock (a restart on the same ledger: a cold hot store).
    pub async fn start_on_with_clock(dir: TempDir, database_url: String, clock: &ManualClock, adjust: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        Self::start_on_clock(dir, database_url, Some(clock), adjust).await
    }

    /// The account's usage in the ledger by UTC day, as (day, requests), oldest first.
    pub async fn usage_by_day(&self, account_id: &str) -> Vec<(String, u64)> {
        let summary = self.admin_ok(reqwest::Method::GET, &format!("/internal/billing/summary?group_by=day&account_id={account_id}"), None).await;
        let mut days: Vec<(String, u64)> =
            summary["data"].as_array().unwrap().iter().map(|row| (row["group"].as_str().unwrap().to_string(), row["requests"].as_u64().unwrap())).collect();
        days.sort();
        days
    }
}
