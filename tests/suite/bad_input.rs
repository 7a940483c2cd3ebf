//! Bad input (issue 6, item 5): every malformed, hostile or broken request — from the client, the
//! operator or the upstream — gets the contract's status and code with a message a person can act
//! on, nothing is charged that should not be, and the gateway keeps serving afterwards.
//!
//! Refusals are tables (a name, the request, the expectation); cases of another kind (raw TCP
//! clients, streams) are functions of their own.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Small limits so oversized bodies and hangs are cheap to provoke.
const BODY_BYTES_MAX: usize = 16 * 1024;
const UPSTREAM_TIMEOUT_MS: u64 = 2_000;
const STREAM_IDLE_TIMEOUT_MS: u64 = 2_000;
/// Longer than either timeout: an upstream this slow is a hang.
const HANG_MS: u64 = 10_000;

/// Long enough for the trickled body below (ten pieces, 50 ms apart), short for a stalled one.
const BODY_TIMEOUT_MS: u64 = 3_000;

async fn start_gateway() -> TestGateway {
    TestGateway::start_with(|config| {
        config.limits.request_body_bytes_max = BODY_BYTES_MAX;
        config.limits.upstream_timeout_ms = UPSTREAM_TIMEOUT_MS;
        config.limits.stream_idle_timeout_ms = STREAM_IDLE_TIMEOUT_MS;
        config.limits.request_body_timeout_ms = BODY_TIMEOUT_MS;
    })
    .await
}

/// Which error shape an endpoint answers with.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `{"error": {"message", "type", "code"}}`.
    OpenAi,
    /// `{"type": "error", "error": {"type", "message", "code"}}` (`/v1/messages`).
    Anthropic,
}

/// One refusal: what is sent and what must come back.
struct Case {
    name: &'static str,
    request: reqwest::RequestBuilder,
    status: u16,
    code: &'static str,
    shape: Shape,
}

fn case(name: &'static str, request: reqwest::RequestBuilder, status: u16, code: &'static str) -> Case {
    Case { name, request, status, code, shape: Shape::OpenAi }
}

fn anthropic_case(name: &'static str, request: reqwest::RequestBuilder, status: u16, code: &'static str) -> Case {
    Case { name, request, status, code, shape: Shape::Anthropic }
}

/// Sends each case and checks status, shape, code and that the message is not empty.
async fn run_cases(cases: Vec<Case>) {
    for case in cases {
        let response = case.request.send().await.unwrap_or_else(|error| panic!("{}: {error}", case.name));
        let status = response.status().as_u16();
        assert!(response.headers().contains_key("x-request-id"), "{}: every response carries X-Request-ID", case.name);
        if status == 413 {
            // The unread rest of the body leaves the connection unusable: the client is told.
            assert_eq!(response.headers().get("connection").map(|value| value.as_bytes()), Some(&b"close"[..]), "{}", case.name);
        }
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{}: error body is not JSON: {text:?}", case.name));
        assert_error(case.name, status, &body, case.status, case.code, case.shape);
    }
}

fn assert_error(name: &str, status: u16, body: &Value, expected_status: u16, expected_code: &str, shape: Shape) {
    assert_eq!((status, body["error"]["code"].as_str()), (expected_status, Some(expected_code)), "{name}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.trim().is_empty(), "{name}: the message is empty: {body}");
    assert!(body["error"]["type"].is_string(), "{name}: the error has a type: {body}");
    match shape {
        Shape::OpenAi => assert!(body.get("type").is_none(), "{name}: OpenAI-shaped: {body}"),
        Shape::Anthropic => assert_eq!(body["type"], "error", "{name}: Anthropic-shaped: {body}"),
    }
}

/// Balance, hold and upstream traffic before a batch of bad requests, to compare after it.
struct Snapshot {
    balance: Money,
    upstream_requests: u64,
}

impl Snapshot {
    async fn take(gateway: &TestGateway, key: &str) -> Snapshot {
        Snapshot { balance: gateway.balance_of(key).await, upstream_requests: gateway.upstream_requests().await }
    }

    /// Nothing charged, nothing left held; and, for refusals the gateway makes itself, nothing
    /// forwarded.
    async fn assert_unchanged(&self, gateway: &TestGateway, key: &str, forwarded: bool) {
        let balance = gateway.balance(key).await;
        assert_eq!(money(&balance["balance"]), self.balance, "nothing was charged");
        assert_eq!(balance["held"], "0", "no hold is left behind");
        if !forwarded {
            assert_eq!(gateway.upstream_requests().await, self.upstream_requests, "nothing was forwarded");
        }
    }
}

/// After the bad requests, a normal one is served and charged exactly, and the ledger is sound.
async fn assert_still_serving(gateway: &TestGateway, account: &str, key: &str) {
    let before = gateway.balance_of(key).await;
    let response = gateway.chat(key, chat_body("still there?"), None).await;
    assert_eq!(response.status(), 200, "the gateway keeps serving");
    let cost = header_money(&response, "x-tollgate-cost");
    assert_eq!(cost, expected_cost(tiktoken_prompt_tokens(&chat_body("still there?")["messages"]), 16));
    assert_eq!(before.checked_sub(gateway.balance_of(key).await).unwrap(), cost);
    gateway.assert_ledger_sound(account).await;
}

fn with_fields(base: Value, fields: Value) -> Value {
    let mut body = base;
    merge(&mut body, fields);
    body
}

fn messages_body() -> Value {
    json!({"model": "demo-claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_requests_are_refused_before_anything_is_held_or_forwarded() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = Snapshot::take(&gateway, &key).await;
    let chat_url = format!("{}/v1/chat/completions", gateway.url);
    let messages_url = format!("{}/v1/messages", gateway.url);
    let embeddings_url = format!("{}/v1/embeddings", gateway.url);
    let chat = || gateway.http.post(&chat_url).bearer_auth(&key);
    let chat_json = |fields: Value| chat().json(&with_fields(chat_body("hi"), fields));
    let messages = || gateway.http.post(&messages_url).header("x-api-key", &key).header("anthropic-version", "2023-06-01");
    let embeddings = || gateway.http.post(&embeddings_url).bearer_auth(&key);
    let valid = serde_json::to_string(&chat_body("hi")).unwrap();
    let nested = format!("{{\"model\":\"demo-gpt\",\"messages\":[{{\"role\":\"user\",\"content\":{}{}}}]}}", "[".repeat(5_000), "]".repeat(5_000));
    let mut invalid_utf8 = br#"{"model":"demo-gpt","messages":[{"role":"user","content":""#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe\xfd\"}]}");
    let header = |bytes: &[u8]| HeaderValue::from_bytes(bytes).unwrap();

    let cases = vec![
        // Malformed and truncated JSON.
        case("truncated JSON", chat().body(valid[..valid.len() / 2].to_string()), 400, "invalid_request"),
        case("not JSON at all", chat().body("model=demo-gpt&messages=hi"), 400, "invalid_request"),
        case("empty body", chat().body(""), 400, "invalid_request"),
        case("a JSON array", chat().body(format!("[{valid}]")), 400, "invalid_request"),
        case("a JSON string", chat().body("\"demo-gpt\""), 400, "invalid_request"),
        case("JSON null", chat().body("null"), 400, "invalid_request"),
        case("trailing garbage after the object", chat().body(format!("{valid}}}")), 400, "invalid_request"),
        case("invalid UTF-8 inside a string", chat().body(invalid_utf8), 400, "invalid_request"),
        case("nesting deeper than the parser allows", chat().body(nested), 400, "invalid_request"),
        // Missing fields and wrong types.
        case("model missing", chat().json(&json!({"messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request"),
        case("model is a number", chat_json(json!({"model": 42})), 400, "invalid_request"),
        case("model is empty", chat_json(json!({"model": ""})), 400, "invalid_request"),
        case("messages is a string", chat_json(json!({"messages": "hi"})), 400, "invalid_request"),
        case("messages is empty", chat_json(json!({"messages": []})), 400, "invalid_request"),
        case("a message is not an object", chat_json(json!({"messages": ["hi"]})), 400, "invalid_request"),
        case("stream is a string", chat_json(json!({"stream": "yes"})), 400, "invalid_request"),
        case("max_tokens is a string", chat_json(json!({"max_tokens": "16"})), 400, "invalid_request"),
        // Huge and negative numbers.
        case("max_tokens negative", chat_json(json!({"max_tokens": -1})), 400, "invalid_request"),
        case("max_tokens fractional", chat_json(json!({"max_tokens": 1.5})), 400, "invalid_request"),
        case("max_tokens 1e30", chat_json(json!({"max_tokens": 1e30})), 400, "invalid_request"),
        case("max_tokens one past u64", chat().body(valid.replacen('{', "{\"max_tokens\":18446744073709551616,", 1)), 400, "invalid_request"),
        case("max_tokens u64::MAX: a hold beyond the money range", chat_json(json!({"max_tokens": u64::MAX})), 400, "invalid_request"),
        case("max_tokens a billion", chat_json(json!({"max_tokens": 1_000_000_000u64})), 402, "insufficient_balance"),
        case("max_completion_tokens negative", chat_json(json!({"max_completion_tokens": -16})), 400, "invalid_request"),
        case("n zero", chat_json(json!({"n": 0})), 400, "invalid_request"),
        case("n negative", chat_json(json!({"n": -2})), 400, "invalid_request"),
        case("n a million", chat_json(json!({"n": 1_000_000})), 400, "invalid_request"),
        case("n 128 times max_tokens u64::MAX / 2", chat_json(json!({"n": 128, "max_tokens": u64::MAX / 2})), 400, "invalid_request"),
        // Unicode and control characters in the model name.
        case("model with a NUL", chat_json(json!({"model": "demo-gpt\u{0}"})), 404, "model_not_found"),
        case("model with a newline and a header", chat_json(json!({"model": "demo-gpt\r\nX-Injected: 1"})), 404, "model_not_found"),
        case("model with right-to-left override and emoji", chat_json(json!({"model": "demo-\u{202e}gpt🚀"})), 404, "model_not_found"),
        case("model of 10 000 characters", chat_json(json!({"model": "m".repeat(10_000)})), 404, "model_not_found"),
        // Oversized bodies.
        case("body over request_body_bytes_max", chat_json(json!({"messages": [{"role": "user", "content": "x".repeat(BODY_BYTES_MAX)}]})), 413, "request_too_large"),
        case("chunked body over the limit, no Content-Length", chat().body(reqwest::Body::wrap_stream(futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; BODY_BYTES_MAX / 4]))))), 413, "request_too_large"),
        // Keys: missing, not ASCII, duplicated.
        case("no key", gateway.http.post(&chat_url).json(&chat_body("x")), 401, "invalid_api_key"),
        case("key with bytes that are not ASCII", gateway.http.post(&chat_url).header("authorization", header(b"Bearer tg_\xff\xfe")).json(&chat_body("x")), 401, "invalid_api_key"),
        case("two Authorization headers, the valid one first", chat().header("authorization", "Bearer tg_someone_else").json(&chat_body("x")), 401, "invalid_api_key"),
        case("two Authorization headers, the valid one second", gateway.http.post(&chat_url).header("authorization", "Bearer tg_someone_else").bearer_auth(&key).json(&chat_body("x")), 401, "invalid_api_key"),
        // Request ids: duplicated, not ASCII, control characters, too long.
        case("two X-Request-ID headers", chat().header("x-request-id", "dup-a").header("x-request-id", "dup-b").json(&chat_body("x")), 400, "invalid_request"),
        case("X-Request-ID not ASCII", chat().header("x-request-id", header("req-é".as_bytes())).json(&chat_body("x")), 400, "invalid_request"),
        case("X-Request-ID with a tab", chat().header("x-request-id", "req\tid").json(&chat_body("x")), 400, "invalid_request"),
        case("X-Request-ID with a space", chat().header("x-request-id", "req id").json(&chat_body("x")), 400, "invalid_request"),
        case("X-Request-ID of 129 characters", chat().header("x-request-id", "r".repeat(129)).json(&chat_body("x")), 400, "invalid_request"),
        // Anthropic Messages: the same refusals, Anthropic-shaped.
        anthropic_case("messages: truncated JSON", messages().body("{\"model\":\"demo-claude\",\"max_tok"), 400, "invalid_request"),
        anthropic_case("messages: max_tokens missing", messages().json(&json!({"model": "demo-claude", "messages": [{"role": "user", "content": "hi"}]})), 400, "invalid_request"),
        anthropic_case("messages: max_tokens negative", messages().json(&with_fields(messages_body(), json!({"max_tokens": -5}))), 400, "invalid_request"),
        anthropic_case("messages: system is a number", messages().json(&with_fields(messages_body(), json!({"system": 7}))), 400, "invalid_request"),
        anthropic_case("messages: model with control characters", messages().json(&with_fields(messages_body(), json!({"model": "demo-claude\u{7}\u{1b}[31m"}))), 404, "model_not_found"),
        anthropic_case("messages: body over the limit", messages().json(&with_fields(messages_body(), json!({"system": "y".repeat(BODY_BYTES_MAX)}))), 413, "request_too_large"),
        anthropic_case("messages: no key", gateway.http.post(&messages_url).header("anthropic-version", "2023-06-01").json(&messages_body()), 401, "invalid_api_key"),
        anthropic_case("messages: X-Request-ID with a tab", messages().header("x-request-id", "req\tid").json(&messages_body()), 400, "invalid_request"),
        // Embeddings.
        case("embeddings: input is an object", embeddings().json(&json!({"model": "demo-embedding", "input": {"text": "x"}})), 400, "invalid_request"),
        case("embeddings: input is empty", embeddings().json(&json!({"model": "demo-embedding", "input": []})), 400, "invalid_request"),
        case("embeddings: token ids negative", embeddings().json(&json!({"model": "demo-embedding", "input": [[1, -2, 3]]})), 400, "invalid_request"),
        case("embeddings: streamed", embeddings().json(&json!({"model": "demo-embedding", "input": "x", "stream": true})), 400, "invalid_request"),
    ];
    assert!(cases.len() >= 30);
    run_cases(cases).await;
    before.assert_unchanged(&gateway, &key, false).await;
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_operator_input_is_refused_and_moves_no_money() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = Snapshot::take(&gateway, &key).await;
    let rows_before = gateway.assert_ledger_sound(&account).await["rows"].as_array().unwrap().len();
    let admin = |method: Method, path: &str| gateway.http.request(method, format!("{}/internal{path}", gateway.url)).bearer_auth(ADMIN_TOKEN);
    let topup = |amount: Value| admin(Method::POST, "/topups").json(&json!({"account_id": account, "amount": amount, "reference_id": format!("bad-{}", unique_name("t"))}));
    let refund = |amount: Value| admin(Method::POST, &format!("/accounts/{account}/refunds")).json(&json!({"amount": amount, "reason": "test", "reference_id": unique_name("r")}));
    let adjustment = |amount: Value| {
        admin(Method::POST, &format!("/accounts/{account}/adjustments")).json(&json!({"amount": amount, "reason": "test", "operator_id": "ops", "reference_id": unique_name("a")}))
    };
    let price = |fields: Value| {
        let row = with_fields(json!({"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": "0", "output_per_mtok": "0"}), fields);
        admin(Method::PUT, "/prices").json(&json!([row]))
    };
    let new_key = |fields: Value| admin(Method::POST, &format!("/accounts/{account}/keys")).json(&with_fields(json!({"name": "k"}), fields));
    let new_account = |fields: Value| admin(Method::POST, "/accounts").json(&with_fields(json!({"kind": "user", "name": "n", "customer_type": TIER}), fields));

    let cases = vec![
        // Top-ups: over-precise, signed, not a decimal string, out of range.
        case("top-up of ten fractional digits", topup(json!("1.0000000001")), 400, "invalid_request"),
        case("top-up with trailing zeros past nine digits", topup(json!("1.0000000000")), 400, "invalid_request"),
        case("top-up negative", topup(json!("-5")), 400, "invalid_request"),
        case("top-up with a plus sign", topup(json!("+5")), 400, "invalid_request"),
        case("top-up zero", topup(json!("0")), 400, "invalid_request"),
        case("top-up as a JSON number", topup(json!(5)), 400, "invalid_request"),
        case("top-up with an exponent", topup(json!("1e3")), 400, "invalid_request"),
        case("top-up with spaces", topup(json!(" 5 ")), 400, "invalid_request"),
        case("top-up in full-width digits", topup(json!("５")), 400, "invalid_request"),
        case("top-up beyond the money range", topup(json!("99999999999999999999")), 400, "invalid_request"),
        case("top-up of an empty string", topup(json!("")), 400, "invalid_request"),
        case(
            "top-up reference with a control character",
            admin(Method::POST, "/topups").json(&json!({"account_id": account, "amount": "5", "reference_id": "ref\u{7}"})),
            400,
            "invalid_request",
        ),
        case("top-up, truncated JSON", admin(Method::POST, "/topups").body(format!("{{\"account_id\":\"{account}\",\"amount\":\"5")), 400, "invalid_request"),
        case("top-up with an unknown field", admin(Method::POST, "/topups").json(&json!({"account_id": account, "amount": "5", "reference_id": "x", "bonus": "100"})), 400, "invalid_request"),
        // Refunds and adjustments.
        case("refund negative", refund(json!("-1")), 400, "invalid_request"),
        case("refund over-precise", refund(json!("0.0000000001")), 400, "invalid_request"),
        case("refund as a JSON number", refund(json!(0.5)), 400, "invalid_request"),
        case("adjustment over-precise", adjustment(json!("-0.0000000001")), 400, "invalid_request"),
        case("adjustment as a JSON number", adjustment(json!(-5)), 400, "invalid_request"),
        case("adjustment of minus zero", adjustment(json!("-0")), 400, "invalid_request"),
        case("adjustment beyond the money range", adjustment(json!("-9223372037")), 400, "invalid_request"),
        case("adjustment with an exponent", adjustment(json!("-1e2")), 400, "invalid_request"),
        // Prices.
        case("price negative", price(json!({"input_per_mtok": "-2.5"})), 400, "invalid_request"),
        case("price over-precise", price(json!({"output_per_mtok": "10.0000000001"})), 400, "invalid_request"),
        case("price as a JSON number", price(json!({"input_per_mtok": 2.5})), 400, "invalid_request"),
        case("per-request price with a sign", price(json!({"per_request": "+0.01"})), 400, "invalid_request"),
        case("price for a model with a NUL", price(json!({"model": "demo-gpt\u{0}"})), 400, "invalid_request"),
        case("price list empty", admin(Method::PUT, "/prices").json(&json!([])), 400, "invalid_request"),
        // Keys and accounts: names and ids with control characters, signed budgets.
        case("key name with a NUL", new_key(json!({"name": "k\u{0}"})), 400, "invalid_request"),
        case("key name empty", new_key(json!({"name": ""})), 400, "invalid_request"),
        case("key budget negative", new_key(json!({"budget_total": "-1"})), 400, "invalid_request"),
        case("key rpm negative", new_key(json!({"rpm": -1})), 400, "invalid_request"),
        case("account id not ASCII", new_account(json!({"id": "acct_é"})), 400, "invalid_request"),
        case("account name with a newline", new_account(json!({"name": "a\nb"})), 400, "invalid_request"),
        case("account credit limit negative", new_account(json!({"credit_limit": "-100"})), 400, "invalid_request"),
        case("account credit limit as a JSON number", new_account(json!({"credit_limit": 100})), 400, "invalid_request"),
        // Issue 19 item 11: past ±(2^53 − 1) nano-units the hot store cannot hold an amount; it
        // is refused here, not committed to fail on every apply or authorize after.
        case("top-up beyond what the hot store holds", topup(json!("9007199.254740992")), 400, "invalid_request"),
        case("refund beyond what the hot store holds", refund(json!("9007199.254740992")), 400, "invalid_request"),
        case("adjustment beyond what the hot store holds", adjustment(json!("-9007199.254740992")), 400, "invalid_request"),
        case("key budget beyond what the hot store holds", new_key(json!({"budget_total": "9007199.254740992"})), 400, "invalid_request"),
        case("credit limit beyond what the hot store holds", new_account(json!({"credit_limit": "9007199.254740992"})), 400, "invalid_request"),
        // Quotes with impossible usage; oversized and ambiguous operator requests.
        case(
            "quote with negative tokens",
            admin(Method::POST, "/billing/quote").json(&json!({"model": "demo-gpt", "customer_type": TIER, "usage": {"input_tokens": -1, "output_tokens": 1}})),
            400,
            "invalid_request",
        ),
        case("operator body over the limit", admin(Method::PUT, "/prices").body(format!("[{}]", " ".repeat(BODY_BYTES_MAX))), 413, "request_too_large"),
        case(
            "two Authorization headers on the operator API",
            admin(Method::POST, "/topups").header("authorization", "Bearer wrong").json(&json!({"account_id": account, "amount": "5", "reference_id": "two-auth"})),
            401,
            "unauthorized",
        ),
    ];
    assert!(cases.len() >= 30);
    run_cases(cases).await;
    before.assert_unchanged(&gateway, &key, false).await;
    let statement = gateway.assert_ledger_sound(&account).await;
    assert_eq!(statement["rows"].as_array().unwrap().len(), rows_before, "no fund row was written");
    // The prices are untouched: a normal request is still charged at them.
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_and_hangs_are_refused_and_never_charged() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = Snapshot::take(&gateway, &key).await;
    let chat = |mock: Value, stream: bool| gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&with_fields(chat_body("upstream?"), json!({"mock": mock, "stream": stream})));
    let messages = |mock: Value, stream: bool| gateway.messages_request(&key).json(&with_fields(messages_body(), json!({"mock": mock, "stream": stream})));
    let embeddings = |mock: Value| gateway.http.post(format!("{}/v1/embeddings", gateway.url)).bearer_auth(&key).json(&json!({"model": "demo-embedding", "input": "x", "mock": mock}));

    let cases = vec![
        case("upstream 500", chat(json!({"fail_status": 500}), false), 502, "upstream_error"),
        case("upstream 503", chat(json!({"fail_status": 503}), false), 502, "upstream_error"),
        case("upstream 429", chat(json!({"fail_status": 429}), false), 502, "upstream_error"),
        case("upstream refuses our credentials (401)", chat(json!({"fail_status": 401}), false), 502, "upstream_error"),
        case("upstream 400 passes through", chat(json!({"fail_status": 400}), false), 400, "upstream_error"),
        case("upstream body cut mid-JSON", chat(json!({"fail_after_chunks": 1}), false), 502, "upstream_error"),
        case("upstream hangs", chat(json!({"latency_ms": HANG_MS}), false), 504, "upstream_timeout"),
        case("stream: upstream 500 before the first byte", chat(json!({"fail_status": 500}), true), 502, "upstream_error"),
        case("stream: upstream hangs before the first byte", chat(json!({"latency_ms": HANG_MS}), true), 504, "upstream_timeout"),
        anthropic_case("messages: upstream 529", messages(json!({"fail_status": 529}), false), 502, "upstream_error"),
        anthropic_case("messages: upstream body cut mid-JSON", messages(json!({"fail_after_chunks": 0}), false), 502, "upstream_error"),
        anthropic_case("messages: upstream hangs", messages(json!({"latency_ms": HANG_MS}), false), 504, "upstream_timeout"),
        anthropic_case("messages stream: upstream 500", messages(json!({"fail_status": 500}), true), 502, "upstream_error"),
        case("embeddings: upstream 500", embeddings(json!({"fail_status": 500})), 502, "upstream_error"),
    ];
    run_cases(cases).await;
    before.assert_unchanged(&gateway, &key, true).await;
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

/// The prompt tokens of a chat body, as OpenAI's own tokenizer counts them (a literal of the
/// fixture, not the gateway's count).
fn reference_prompt_tokens(body: &Value) -> u64 {
    tiktoken_prompt_tokens(&body["messages"])
}

/// Garbage usage is never trusted into an error, an overflow or a free request: the request is
/// charged what the tokenizer counted (the mock sends 16 output tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_upstream_usage_is_charged_by_the_tokenizer_count() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let prompt = reference_prompt_tokens(&chat_body("garbage usage"));
    let garbage = [
        ("a string", json!("lots")),
        ("negative counts", json!({"prompt_tokens": -5, "completion_tokens": -16, "total_tokens": -21})),
        ("fractional counts", json!({"prompt_tokens": 1.5, "completion_tokens": 2.5})),
        ("counts as strings", json!({"prompt_tokens": "7", "completion_tokens": "16"})),
        ("counts beyond u64", json!({"prompt_tokens": 1e30, "completion_tokens": 1e30})),
        ("an array", json!([1, 2, 3])),
        ("an empty object", json!({})),
        ("completion missing", json!({"prompt_tokens": prompt})),
    ];
    for (name, usage) in garbage {
        for stream in [false, true] {
            let before = gateway.balance_of(&key).await;
            let body = with_fields(chat_body("garbage usage"), json!({"stream": stream, "mock": {"usage_override": usage}}));
            let response = gateway.chat(&key, body, None).await;
            assert_eq!(response.status(), 200, "{name}");
            let text = response.text().await.unwrap();
            if stream {
                assert!(text.ends_with("data: [DONE]\n\n"), "{name}: the stream completes: {text}");
            }
            let charged = before.checked_sub(gateway.balance_of(&key).await).unwrap();
            assert_eq!(charged, expected_cost(prompt, 16), "{name} (stream {stream}): charged by the tokenizer count");
        }
    }
    let statement = gateway.assert_ledger_sound(&account).await;
    let sources: Vec<&str> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage" && row["status"] != "failed").map(|row| row["usage_source"].as_str().unwrap()).collect();
    assert!(sources.iter().all(|source| *source == "tokenizer"), "{sources:?}");
    assert_eq!(gateway.balance(&key).await["held"], "0");
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

/// Reads a streamed response to its end; returns the text and whether it ended in an error.
async fn read_stream(response: reqwest::Response) -> (String, bool) {
    use futures_util::StreamExt;
    let mut text = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

/// Malformed events from the upstream are passed on untouched (the gateway does not rewrite
/// bodies) and do not disturb the charge, which still comes from the upstream's usage. An event
/// that never ends is cut at the size limit, and with no output yet nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_events_are_passed_on_and_charged_from_usage() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let prompt = reference_prompt_tokens(&chat_body("malformed"));
    let malformed = [
        ("data that is not JSON", "data: {\"choices\": [\n\n".to_string()),
        ("a line without a field name", "this is not an event\n\n".to_string()),
        ("a comment and an unknown field", ": keep-alive\nretry: x\nfoo: bar\n\n".to_string()),
        ("an early [DONE] lookalike", "data:  [DONE]x\n\n".to_string()),
        ("control characters and unicode", "data: \u{0}\u{1b}[2J\u{202e}🚀\n\n".to_string()),
    ];
    for (name, garbage) in malformed {
        let before = gateway.balance_of(&key).await;
        let body = with_fields(chat_body("malformed"), json!({"stream": true, "mock": {"malformed_sse": garbage}}));
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 200, "{name}");
        let (text, failed) = read_stream(response).await;
        assert!(!failed && text.ends_with("data: [DONE]\n\n"), "{name}: the stream completes: {text}");
        assert!(text.contains(&garbage), "{name}: passed on as sent");
        let charged = before.checked_sub(gateway.balance_of(&key).await).unwrap();
        assert_eq!(charged, expected_cost(prompt, 16), "{name}: charged from the upstream's usage");
    }

    // Anthropic-shaped, the same.
    let before = gateway.balance_of(&key).await;
    let response = gateway
        .messages_request(&key)
        .json(&with_fields(messages_body(), json!({"stream": true, "mock": {"malformed_sse": "event: message_stop\ndata: {oops\n\n"}})))
        .send()
        .await
        .unwrap();
    let (text, failed) = read_stream(response).await;
    assert!(!failed && text.ends_with("data: {\"type\":\"message_stop\"}\n\n"), "{text}");
    assert!(text.contains("\"output_tokens\":16"));
    assert!(before.checked_sub(gateway.balance_of(&key).await).unwrap().is_positive(), "charged from the usage");

    // An event that never ends: cut at the gateway's 1 MiB event limit, before any output.
    let before = gateway.balance_of(&key).await;
    let endless = format!("data: {}", "x".repeat(1_100_000));
    let body = with_fields(chat_body("malformed"), json!({"stream": true, "mock": {"malformed_sse": endless}}));
    let (text, _) = read_stream(gateway.chat(&key, body, None).await).await;
    assert!(!text.contains("[DONE]"), "an endless event does not complete the stream");
    assert_eq!(gateway.balance_of(&key).await, before, "no output, nothing charged");

    assert_eq!(gateway.balance(&key).await["held"], "0");
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

/// Streams the upstream cuts or abandons: charged for the content that went through, by the
/// tokenizer; with no content, nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_hung_streams_are_charged_for_what_went_through() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let prompt = reference_prompt_tokens(&chat_body("cut me"));
    let cases = [
        ("cut before any content", json!({"fail_after_chunks": 0}), 0),
        ("cut after five chunks", json!({"fail_after_chunks": 5}), 5),
        ("hangs before any content", json!({"output_tokens": 3, "chunk_interval_ms": HANG_MS}), 0),
        ("cut after the last chunk, before usage and [DONE]", json!({"fail_after_chunks": 16}), 16),
    ];
    for (name, mock, output_tokens) in cases {
        let before = gateway.balance_of(&key).await;
        let body = with_fields(chat_body("cut me"), json!({"stream": true, "mock": mock}));
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 200, "{name}");
        let (text, _) = read_stream(response).await;
        assert!(!text.contains("[DONE]"), "{name}: an incomplete stream does not end as complete: {text}");
        let charged = before.checked_sub(gateway.balance_of(&key).await).unwrap();
        let expected = if output_tokens == 0 { Money::ZERO } else { expected_cost(prompt, output_tokens) };
        assert_eq!(charged, expected, "{name}");
    }
    let statement = gateway.assert_ledger_sound(&account).await;
    let statuses: Vec<&str> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage" && row["status"] != "failed").map(|row| row["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["upstream_interrupted", "upstream_interrupted"]);
    assert_eq!(gateway.balance(&key).await["held"], "0");
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}

/// Writes an HTTP/1.1 request by hand: the head, then the body in pieces with a pause between.
async fn send_slowly(address: &str, key: &str, body: &[u8], content_length: usize, pieces: usize, pause: Duration) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(body.len().div_ceil(pieces).max(1)) {
        socket.write_all(piece).await.unwrap();
        socket.flush().await.unwrap();
        tokio::time::sleep(pause).await;
    }
    socket
}

/// Reads a `Connection: close` response to its end: (status, body).
async fn read_response(socket: &mut TcpStream) -> (u16, Value) {
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status: {head}"));
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Slow clients over raw TCP: a body trickled in is served and charged once; a client that stops
/// mid-body holds nothing while it stalls, is told 408 when the body timeout passes, and 400
/// (not 413) when it gives up; a declared
/// length over the limit is refused before the body is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_clients_hold_nothing_and_are_charged_at_most_once() {
    let gateway = start_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let address = gateway.url.trim_start_matches("http://").to_string();
    let body = serde_json::to_vec(&chat_body("sent one byte at a time, nearly")).unwrap();

    // Trickled in over ten pieces: served, charged exactly once.
    let before = gateway.balance_of(&key).await;
    let mut socket = send_slowly(&address, &key, &body, body.len(), 10, Duration::from_millis(50)).await;
    let (status, response) = read_response(&mut socket).await;
    assert_eq!(status, 200, "{response}");
    let cost = expected_cost(tiktoken_prompt_tokens(&chat_body("sent one byte at a time, nearly")["messages"]), 16);
    assert_eq!(response["usage"]["completion_tokens"], 16);
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), cost);

    // Stops half-way and keeps the connection open: nothing is held meanwhile, others are
    // served, and after request_body_timeout_ms it is told 408 and the connection is closed.
    let before = gateway.balance_of(&key).await;
    let mut stalled = send_slowly(&address, &key, &body[..body.len() / 2], body.len(), 1, Duration::ZERO).await;
    let served = gateway.chat(&key, chat_body("meanwhile"), None).await;
    assert_eq!(served.status(), 200, "a stalled client does not block others");
    let cost = header_money(&served, "x-tollgate-cost");
    let balance = gateway.balance(&key).await;
    assert_eq!(balance["held"], "0", "a request whose body has not arrived holds nothing");
    assert_eq!(before.checked_sub(money(&balance["balance"])).unwrap(), cost);
    let (status, response) = read_response(&mut stalled).await;
    assert_error("stalled body", status, &response, 408, "invalid_request", Shape::OpenAi);

    // Stops half-way and closes its side: a 400, nothing charged.
    let before = gateway.balance_of(&key).await;
    let mut socket = send_slowly(&address, &key, &body[..body.len() / 2], body.len(), 1, Duration::ZERO).await;
    socket.shutdown().await.unwrap();
    let (status, response) = read_response(&mut socket).await;
    assert_error("body cut short", status, &response, 400, "invalid_request", Shape::OpenAi);

    // Declares a body over the limit and has sent none of it yet: refused at once, not waited for.
    let mut socket = send_slowly(&address, &key, &[], BODY_BYTES_MAX * 4, 1, Duration::ZERO).await;
    let (status, response) = read_response(&mut socket).await;
    assert_error("declared oversized body", status, &response, 413, "request_too_large", Shape::OpenAi);

    let balance = gateway.balance(&key).await;
    assert_eq!(money(&balance["balance"]), before);
    assert_eq!(balance["held"], "0");
    assert_still_serving(&gateway, &account, &key).await;
    gateway.stop().await;
}
