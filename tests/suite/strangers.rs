//! Issue 21, items 2, 7 and 8: what a stranger without credentials costs the gateway. The
//! operator API checks its token before it reads a body; wrong tokens and refused client keys
//! are throttled per source address; a short admin token refuses to start; `serve` warns when
//! the operator API shares the public listener.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tollgate_gateway::server::Gateway;

use crate::common::*;

/// Sends a request's head declaring a body of `declared` bytes, then 10 of them, and returns
/// what the server answers meanwhile (its first bytes); `None` if nothing came in 20 s.
async fn answer_before_the_body(url: &str, method: &str, path: &str, headers: &str, declared: usize) -> Option<String> {
    let address = url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{headers}Content-Length: {declared}\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(b"{\"name\": \"").await.unwrap();
    let mut answer = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut answer)).await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&answer[..read]).into_owned())
}

/// Item 2: on the default single listener, a stranger's 4 MB body to the operator API is
/// refused with 401 as soon as its head arrives — the body is never waited for (before the
/// fix the handler read it first, up to `request_body_timeout_ms`). Client routes likewise
/// authenticate first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_before_the_body_is_read() {
    // A body timeout far beyond the 20 s the answer is waited for: only an answer given
    // without the body can arrive in time.
    let gateway = TestGateway::start_with(|config| config.limits.request_body_timeout_ms = 300_000).await;
    let declared = 4_000_000;
    for (method, path, headers) in [
        ("POST", "/internal/accounts", ""),
        ("PUT", "/internal/prices", "Authorization: Bearer wrong-token\r\n"),
        ("POST", "/internal/billing/quote", ""),
        ("POST", "/v1/chat/completions", ""),
        ("POST", "/v1/messages", "x-api-key: sk-unknown\r\n"),
        ("POST", "/v1beta/models/demo-gpt:generateContent", ""),
    ] {
        let answer = answer_before_the_body(&gateway.url, method, path, headers, declared).await;
        let answer = answer.unwrap_or_else(|| panic!("{method} {path}: no answer within 20 s; the server waits for the body"));
        assert!(answer.starts_with("HTTP/1.1 401"), "{method} {path}: {answer}");
    }
    gateway.stop().await;
}

/// Item 2: every operator route, whatever its method, refuses a missing or wrong token (the
/// check moved from the handlers to a layer; none may have been left outside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_route_needs_the_token() {
    // More wrong tokens than the per-address throttle lets through in a minute: this test is
    // about the check, not the throttle.
    let gateway = TestGateway::start_with(|config| config.limits.auth_failures_per_address_per_minute = 10_000).await;
    let routes = [
        (Method::POST, "/accounts"),
        (Method::GET, "/accounts/acct_x"),
        (Method::PATCH, "/accounts/acct_x"),
        (Method::POST, "/accounts/acct_x/keys"),
        (Method::GET, "/accounts/acct_x/keys"),
        (Method::DELETE, "/keys/key_x"),
        (Method::GET, "/prices"),
        (Method::PUT, "/prices"),
        (Method::POST, "/topups"),
        (Method::POST, "/topups/1/confirm"),
        (Method::POST, "/accounts/acct_x/refunds"),
        (Method::POST, "/accounts/acct_x/adjustments"),
        (Method::GET, "/accounts/acct_x/statement"),
        (Method::GET, "/accounts/acct_x/statements/2026-01"),
        (Method::POST, "/billing/quote"),
        (Method::GET, "/billing/transactions"),
        (Method::GET, "/billing/summary"),
        (Method::POST, "/reconcile"),
        (Method::GET, "/reconciliations"),
        (Method::GET, "/jobs"),
        (Method::GET, "/alerts"),
        (Method::GET, "/alerts/1/deliveries"),
        (Method::GET, "/accounts"),
        (Method::GET, "/prices/history"),
        (Method::GET, "/topups"),
        (Method::GET, "/channels"),
        (Method::POST, "/channels/demo-gpt"),
        (Method::DELETE, "/channels/demo-gpt/mock"),
        (Method::POST, "/channels/demo-gpt/mock/disable"),
        (Method::POST, "/channels/demo-gpt/mock/enable"),
        (Method::GET, "/billing/attempts"),
        (Method::DELETE, "/accounts/acct_x/pins"),
        (Method::DELETE, "/accounts/acct_x/sessions/s1/lock"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token-wrong-token-wrong-token")] {
            let mut request = gateway.http.request(method.clone(), format!("{}/internal{path}", gateway.url)).json(&json!({}));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with token {token:?}");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "unauthorized");
        }
    }
    gateway.stop().await;
}

/// A gateway served as the binary serves it, with each request's peer address recorded
/// (`ConnectInfo`), which the per-address throttles read.
struct AddressedGateway {
    url: String,
    gateway: Option<Gateway>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl AddressedGateway {
    async fn start(auth_failures_per_minute: u32) -> AddressedGateway {
        let dir = TempDir::new();
        let database_url = test_database_url(&dir).await;
        let shutdown = CancellationToken::new();
        let mock_url = start_mock(tollgate_mock::MockConfig::default(), shutdown.clone()).await;
        let mut config = test_config(database_url, &mock_url);
        config.limits.auth_failures_per_address_per_minute = auth_failures_per_minute;
        let gateway = Gateway::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = tollgate_gateway::app(gateway.state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let stopping = shutdown.clone();
        let served = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stopping.cancelled().await }).await.unwrap();
        });
        AddressedGateway { url, gateway: Some(gateway), shutdown, served, _dir: dir }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        (&mut self.served).await.unwrap();
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

/// A client whose connections come from `address` (any 127.0.0.0/8 address reaches the
/// gateway on 127.0.0.1): another source, as far as the gateway can tell.
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(address.parse::<IpAddr>().unwrap()).build().unwrap()
}

fn assert_throttled(status: reqwest::StatusCode, headers: &reqwest::header::HeaderMap, code: &Value, what: &str) {
    assert_eq!(status, 429, "{what}");
    assert_eq!(code, "rate_limited", "{what}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{what}: Retry-After {retry_after}");
}

/// Item 7: after `auth_failures_per_address_per_minute` wrong operator tokens, the address is
/// refused for the rest of the minute without its token being compared — the right one too;
/// the operator at another address is not locked out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_admin_tokens_are_throttled_per_address() {
    let gateway = AddressedGateway::start(5).await;
    let (stranger, operator) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    let prices = |client: &reqwest::Client, token: &str| client.get(format!("{}/internal/prices", gateway.url)).bearer_auth(token).send();
    for attempt in 1..=5 {
        let response = prices(&stranger, &format!("guess-{attempt}-0123456789abcdef0123456789")).await.unwrap();
        assert_eq!(response.status(), 401, "attempt {attempt}");
    }
    let response = prices(&stranger, "guess-6-0123456789abcdef0123456789").await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let error: Value = response.json().await.unwrap();
    assert_throttled(status, &headers, &error["error"]["code"], "the 6th wrong token");
    let right_token_from_stranger = prices(&stranger, ADMIN_TOKEN).await.unwrap();
    assert_eq!(right_token_from_stranger.status(), 429, "the address is refused, token unread");
    assert_eq!(prices(&operator, ADMIN_TOKEN).await.unwrap().status(), 200, "another address is not locked out");
    gateway.stop().await;
}

/// Item 7: refused client keys are throttled per address the same way, so a stranger cycling
/// random keys (each one a ledger query) is bounded; a key whose context is cached costs no
/// query and keeps working from that address (so does a key confirmed before, once its context
/// was dropped), and other addresses are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_keys_are_throttled_per_address() {
    let gateway = AddressedGateway::start(5).await;
    let (stranger, neighbour) = (client_from("127.0.0.1"), client_from("127.0.0.3"));
    let operator = client_from("127.0.0.2");
    let admin = |method: Method, path: &str, body: Value| operator.request(method, format!("{}/internal{path}", gateway.url)).bearer_auth(ADMIN_TOKEN).json(&body).send();
    let account = json!({"id": "acct_strangers", "kind": "user", "name": "strangers", "customer_type": TIER});
    assert_eq!(admin(Method::POST, "/accounts", account).await.unwrap().status(), 201);
    let created: Value = admin(Method::POST, "/accounts/acct_strangers/keys", json!({"name": "k"})).await.unwrap().json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let balance = |client: &reqwest::Client, key: &str| client.get(format!("{}/v1/balance", gateway.url)).bearer_auth(key).send();
    assert_eq!(balance(&stranger, &key).await.unwrap().status(), 200, "the real key, now cached");

    for attempt in 1..=5 {
        let response = balance(&stranger, &format!("tg_random_{attempt}_{}", uuid::Uuid::new_v4().simple())).await.unwrap();
        assert_eq!(response.status(), 401, "attempt {attempt}");
    }
    let response = balance(&stranger, &format!("tg_random_6_{}", uuid::Uuid::new_v4().simple())).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let error: Value = response.json().await.unwrap();
    assert_throttled(status, &headers, &error["error"]["code"], "the 6th unknown key");
    // The LLM routes too, each in its protocol's error shape.
    let messages = stranger.post(format!("{}/v1/messages", gateway.url)).header("x-api-key", "sk-ant-unknown").json(&json!({})).send().await.unwrap();
    let (status, headers) = (messages.status(), messages.headers().clone());
    let error: Value = messages.json().await.unwrap();
    assert_eq!(error["type"], "error", "Anthropic's shape: {error}");
    assert_throttled(status, &headers, &error["error"]["code"], "an unknown key on /v1/messages");
    let gemini = stranger.post(format!("{}/v1beta/models/demo-gpt:generateContent", gateway.url)).header("x-goog-api-key", "unknown").json(&json!({})).send().await.unwrap();
    let (status, headers) = (gemini.status(), gemini.headers().clone());
    let error: Value = gemini.json().await.unwrap();
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED", "Google's shape: {error}");
    assert_throttled(status, &headers, &error["error"]["details"][0]["metadata"]["code"], "an unknown key on generateContent");

    assert_eq!(balance(&stranger, &key).await.unwrap().status(), 200, "a cached key still works from the throttled address");
    // A key created drops every cached context; a key the ledger confirmed before is still
    // looked up for the throttled address (clients behind one proxy are not locked out).
    assert_eq!(admin(Method::POST, "/accounts/acct_strangers/keys", json!({"name": "k2"})).await.unwrap().status(), 201);
    assert_eq!(balance(&stranger, &key).await.unwrap().status(), 200, "a confirmed key still works after the cache was dropped");
    let response = balance(&stranger, &format!("tg_random_7_{}", uuid::Uuid::new_v4().simple())).await.unwrap();
    assert_eq!(response.status(), 429, "while a new unknown key from the throttled address is still refused");
    assert_eq!(balance(&neighbour, "tg_unknown_neighbour").await.unwrap().status(), 401, "another address is not throttled");
    gateway.stop().await;
}

/// Item 7: an admin token shorter than 32 characters stops `serve` with a message naming the
/// variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_admin_token_refuses_to_start() {
    let dir = TempDir::new();
    let database_url = format!("sqlite://{}/ledger.db", dir.0.display());
    // A backtrace asked for in the environment does not bury the message: one line, no trace.
    let env = [("TOLLGATE_ADMIN_TOKEN", "0123456789"), ("TOLLGATE_DATABASE_URL", database_url.as_str()), ("TOLLGATE_INTERNAL_LISTEN", ""), ("RUST_BACKTRACE", "1")];
    let (status, _, stderr) = tollgate(&["serve", "--listen", "127.0.0.1:0"], &env).await;
    assert_eq!(status, 1);
    assert!(stderr.contains("TOLLGATE_ADMIN_TOKEN") && stderr.contains("at least 32 characters"), "{stderr}");
    let message: Vec<&str> = stderr.lines().filter(|line| line.starts_with("error: ")).collect();
    assert_eq!(message.len(), 1, "{stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains("Stack"), "{stderr}");
}

/// Item 8: `serve` warns, once, when the operator API and `/metrics` share the public
/// listener; not with `internal_listen`, nor for `--demo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_when_the_operator_api_shares_the_public_listener() {
    const WARNING: &str = "share the public listener";
    let dir = TempDir::new();
    let database_url = format!("sqlite://{}/ledger.db", dir.0.display());
    for (args, internal_listen, warned) in [
        (vec!["serve"], "", true),
        (vec!["serve"], "127.0.0.1:0", false),
        (vec!["serve", "--demo"], "", false),
    ] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(&args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TOLLGATE_DATABASE_URL", &database_url)
            .env("TOLLGATE_INTERNAL_LISTEN", internal_listen)
            .env_remove("TOLLGATE_REDIS_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Serving means start-up is over: everything it warns about is in the log by then.
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut printed = String::new();
        while !printed.contains("http://") {
            let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut printed)).await.expect("no start in 60 s").unwrap();
            assert!(read > 0, "{args:?} exited: {printed}");
        }
        child.start_kill().unwrap();
        let mut log = String::new();
        child.stderr.take().unwrap().read_to_string(&mut log).await.unwrap();
        child.wait().await.unwrap();
        assert_eq!(log.matches(WARNING).count(), usize::from(warned), "{args:?}, internal_listen {internal_listen:?}:\n{log}");
    }
}
