//! Per account, a request id is charged at most once.

use std::time::Duration;

use serde_json::{Value, json};
use time::macros::datetime;

use crate::common::*;

fn usage_rows(statement: &Value) -> Vec<Value> {
    statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage" && row["status"] != "failed").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_success_is_replayed_not_charged() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let first = gateway.chat(&key, chat_body("once"), Some("retry-me")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-request-id"], "retry-me");
    let cost = header_money(&first, "x-tollgate-cost");
    let first_body = first.text().await.unwrap();
    let balance = gateway.balance_of(&key).await;
    let second = gateway.chat(&key, chat_body("once"), Some("retry-me")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.text().await.unwrap(), first_body, "the stored response is replayed");
    assert_eq!(gateway.balance_of(&key).await, balance, "the retry was not charged");
    let statement = gateway.assert_ledger_sound(&account).await;
    let rows = usage_rows(&statement);
    assert_eq!(rows.len(), 1);
    assert_eq!(money(&rows[0]["amount"]), Money::ZERO.checked_sub(cost).unwrap());

    // A streaming retry of a charged id is refused, not replayed.
    let mut stream_body = chat_body("once");
    stream_body["stream"] = json!(true);
    let streamed = gateway.chat(&key, stream_body, Some("retry-me")).await;
    assert_eq!(streamed.status(), 409);
    let error: Value = streamed.json().await.unwrap();
    assert_eq!(error["error"]["code"], "duplicate_request");

    // The ledger has the row now (checked above): a retry is still replayed, byte for byte. In
    // services mode the worker's acknowledgement has left Redis only the record, not the body,
    // so the body comes from the ledger.
    let later = gateway.chat(&key, chat_body("once"), Some("retry-me")).await;
    assert_eq!(later.headers()["idempotent-replayed"], "true");
    assert_eq!(later.text().await.unwrap(), first_body);
    assert_eq!(gateway.balance_of(&key).await, balance);
    gateway.stop().await;
}

/// An id belongs to the key that first used it and to that request (issue 19 item 5): another
/// key sending it, or the same key with another body, gets 422 `request_id_reused` — not the
/// stored answer (which would hand key B what key A asked, past B's `allowed_models`), not a
/// forward, not a charge. The same request from the same key is still replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_bound_to_its_key_and_its_request() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let first_key = gateway.key(&account, json!({})).await;
    let other_key = gateway.key(&account, json!({})).await;
    let claude_only_key = gateway.key(&account, json!({"allowed_models": ["demo-claude"]})).await;
    let first = gateway.chat(&first_key, chat_body("mine"), Some("bound")).await;
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    let (balance, forwarded) = (gateway.balance_of(&first_key).await, gateway.upstream_requests().await);

    let mut streamed = chat_body("mine");
    streamed["stream"] = json!(true);
    let mut other_cap = chat_body("mine");
    other_cap["max_tokens"] = json!(7);
    let attempts = [
        (&other_key, chat_body("mine"), "the same request from another key"),
        (&other_key, streamed.clone(), "its streaming retry from another key"),
        (&first_key, chat_body("not mine"), "another body"),
        (&first_key, other_cap, "another cap"),
    ];
    for (key, body, what) in attempts {
        let response = gateway.chat(key, body, Some("bound")).await;
        assert_eq!(response.status(), 422, "{what}");
        assert!(response.headers().get("idempotent-replayed").is_none(), "{what}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "request_id_reused", "{what}");
        assert!(!error.to_string().contains("chatcmpl"), "{what}: nothing of the stored answer");
    }
    // A key allowed only another model, on another endpoint: the stored demo-gpt answer would
    // pass its allowed_models by. Anthropic's shape for the refusal.
    let messages = gateway
        .messages_request(&claude_only_key)
        .header("X-Request-ID", "bound")
        .json(&json!({"model": "demo-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "mine"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 422);
    let error: Value = messages.json().await.unwrap();
    assert_eq!((error["type"].as_str(), error["error"]["type"].as_str()), (Some("error"), Some("invalid_request_error")));

    let streamed_retry = gateway.chat(&first_key, streamed, Some("bound")).await;
    assert_eq!(streamed_retry.status(), 409, "a streaming retry of the same request, as ever");
    let retry = gateway.chat(&first_key, chat_body("mine"), Some("bound")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), first_body);
    assert_eq!(gateway.upstream_requests().await, forwarded, "nothing was forwarded");
    assert_eq!(gateway.balance_of(&first_key).await, balance, "nothing was charged");
    assert_eq!(usage_rows(&gateway.assert_ledger_sound(&account).await).len(), 1);
    gateway.stop().await;
}

/// The hot store remembers a charged id for an hour once the ledger has it; the ledger, for good.
/// A client that sends an id again after the hot store has forgotten it is still answered from
/// the ledger: not forwarded, not charged. (A gateway on a fresh hot store, with the charge
/// dated 2 h back, is that later day.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_hot_stores_window_is_still_not_charged() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let first = gateway.chat(&key, chat_body("long ago"), Some("last-week")).await;
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    gateway.assert_ledger_sound(&account).await;
    let (dir, database_url) = gateway.stop_keeping_ledger().await;

    let later = TestGateway::start_on(dir, database_url, |_| {}).await;
    edit_ledger(&later, "UPDATE usage_log SET created_at = created_at - 7200000 WHERE account_id = ?", &account).await;
    let balance = later.balance_of(&key).await;
    let retry = later.chat(&key, chat_body("long ago"), Some("last-week")).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(header_money(&retry, "x-tollgate-cost"), Money::ZERO);
    assert_eq!(retry.text().await.unwrap(), first_body, "the ledger's stored response");
    let mut stream_body = chat_body("long ago");
    stream_body["stream"] = json!(true);
    let streamed = later.chat(&key, stream_body, Some("last-week")).await;
    assert_eq!(streamed.status(), 409);
    let error: Value = streamed.json().await.unwrap();
    assert_eq!(error["error"]["code"], "duplicate_request");
    assert_eq!(later.upstream_requests().await, 0, "nothing was forwarded");
    assert_eq!(later.balance_of(&key).await, balance, "nothing was charged");

    // A new id the client names is forwarded and charged as ever.
    let new = later.chat(&key, chat_body("new"), Some("this-week")).await;
    assert_eq!(new.status(), 200);
    assert!(new.headers().get("idempotent-replayed").is_none());
    let statement = later.assert_ledger_sound(&account).await;
    assert_eq!(usage_rows(&statement).len(), 2);
    later.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_while_the_first_is_in_flight_gets_409() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut slow = chat_body("slow");
    slow["mock"] = json!({"latency_ms": 600});
    let first = {
        let gateway_url = gateway.url.clone();
        let key = key.clone();
        let http = gateway.http.clone();
        let slow = slow.clone();
        tokio::spawn(async move {
            http.post(format!("{gateway_url}/v1/chat/completions")).bearer_auth(key).header("X-Request-ID", "twice").json(&slow).send().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = gateway.chat(&key, slow, Some("twice")).await;
    assert_eq!(second.status(), 409);
    let error: Value = second.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_in_progress");
    assert_eq!(first.await.unwrap().status(), 200);
    let statement = gateway.assert_ledger_sound(&account).await;
    assert_eq!(usage_rows(&statement).len(), 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_failure_is_forwarded_as_new() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut failing = chat_body("flaky");
    failing["mock"] = json!({"fail_status": 503});
    assert_eq!(gateway.chat(&key, failing, Some("flaky-1")).await.status(), 502);
    let retry = gateway.chat(&key, chat_body("flaky"), Some("flaky-1")).await;
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let statement = gateway.assert_ledger_sound(&account).await;
    assert_eq!(usage_rows(&statement).len(), 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_id_is_refused() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let too_long = "x".repeat(129);
    let response = gateway.chat(&key, chat_body("hi"), Some(&too_long)).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_request");
    gateway.stop().await;
}

const DAY_MS: i64 = 86_400_000;

/// The 409 a retry gets, with its message.
async fn refused_as_duplicate(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 409);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "duplicate_request", "{error}");
    error["error"]["message"].as_str().unwrap().to_string()
}

/// Issue 22 item 1: within `limits.replay_window_ms` of its charge a retry is replayed; from the
/// window's end on it gets 409 `duplicate_request` — decided by the charge's time, the body
/// still stored (no prune job runs here) — and is never forwarded or charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_replayed_within_the_window_and_refused_after_it() {
    let clock = ManualClock::at_time(datetime!(2099-06-15 12:00:00 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |config| {
        config.limits.replay_window_ms = 86_400_000;
        config.jobs.prune_interval_ms = 0;
    })
    .await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let first = gateway.chat(&key, chat_body("windowed"), Some("windowed")).await;
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    let balance = gateway.balance_of(&key).await;

    clock.advance_ms(DAY_MS - 1);
    let last_moment = gateway.chat(&key, chat_body("windowed"), Some("windowed")).await;
    assert_eq!(last_moment.status(), 200, "the window's last millisecond");
    assert_eq!(last_moment.headers()["idempotent-replayed"], "true");
    assert_eq!(last_moment.text().await.unwrap(), first_body);

    clock.advance_ms(1);
    let message = refused_as_duplicate(gateway.chat(&key, chat_body("windowed"), Some("windowed")).await).await;
    assert!(message.contains("replay window"), "{message}");
    clock.advance_ms(30 * DAY_MS);
    refused_as_duplicate(gateway.chat(&key, chat_body("windowed"), Some("windowed")).await).await;
    // Another body under the id is still told apart from a retry, inside the window or not.
    assert_eq!(gateway.chat(&key, chat_body("other"), Some("windowed")).await.status(), 422);
    assert_eq!(gateway.upstream_requests().await, 1, "nothing was forwarded again");
    assert_eq!(gateway.balance_of(&key).await, balance, "nothing was charged again");
    assert_eq!(usage_rows(&gateway.assert_ledger_sound(&account).await).len(), 1);
    gateway.stop().await;
}

/// A window of 0 keeps no bodies: a retry of a charged id gets 409 at once, and is not charged;
/// a gateway restarted with a window finds no body to replay either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replay_window_no_response_is_kept() {
    let gateway = TestGateway::start_with(|config| config.limits.replay_window_ms = 0).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    assert_eq!(gateway.chat(&key, chat_body("unkept"), Some("unkept")).await.status(), 200);
    let balance = gateway.balance_of(&key).await;
    let message = refused_as_duplicate(gateway.chat(&key, chat_body("unkept"), Some("unkept")).await).await;
    assert!(message.contains("replay window"), "{message}");
    gateway.assert_ledger_sound(&account).await;
    let (dir, database_url) = gateway.stop_keeping_ledger().await;

    let windowed = TestGateway::start_on(dir, database_url, |_| {}).await;
    let message = refused_as_duplicate(windowed.chat(&key, chat_body("unkept"), Some("unkept")).await).await;
    assert!(message.contains("not available"), "no body was stored: {message}");
    assert_eq!(windowed.balance_of(&key).await, balance);
    assert_eq!(windowed.upstream_requests().await, 0);
    windowed.stop().await;
}

/// Issue 22 item 2: the `prune` job keeps the bodies inside the window and deletes them once
/// it has passed — on the clock charges are dated by — and says so in its runs; the ids stay
/// charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prune_job_deletes_bodies_past_the_window() {
    let clock = ManualClock::at_time(datetime!(2099-06-15 12:00:00 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |config| {
        config.limits.replay_window_ms = 86_400_000;
        config.jobs.prune_interval_ms = 200;
        config.jobs.prune_batch_rows = 2;
    })
    .await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    for index in 0..5 {
        assert_eq!(gateway.chat(&key, chat_body("pruned"), Some(&format!("pruned-{index}"))).await.status(), 200);
    }
    let balance = gateway.balance_of(&key).await;
    // Each finished run says "N stored responses pruned (B bytes) in K batches; …".
    let runs_so_far = async || -> (usize, u64, Vec<String>) {
        let runs = gateway.admin_ok(reqwest::Method::GET, "/internal/jobs?job=prune&limit=1000", None).await;
        let outcomes: Vec<String> = runs["data"].as_array().unwrap().iter().filter_map(|run| run["outcome"].as_str().map(String::from)).collect();
        let pruned = outcomes.iter().filter_map(|outcome| outcome.split(' ').next()?.parse::<u64>().ok()).sum();
        (outcomes.len(), pruned, outcomes)
    };
    let (runs_before, _, _) = runs_so_far().await;
    wait_until("two more prune runs", || async { runs_so_far().await.0 >= runs_before + 2 }).await;
    let (_, pruned, outcomes) = runs_so_far().await;
    assert_eq!(pruned, 0, "nothing inside the window: {outcomes:?}");
    let replayed = gateway.chat(&key, chat_body("pruned"), Some("pruned-0")).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");

    clock.advance_ms(DAY_MS);
    wait_until("the prune job deletes the five bodies", || async { runs_so_far().await.1 >= 5 }).await;
    let (_, pruned, outcomes) = runs_so_far().await;
    assert_eq!(pruned, 5, "each body pruned once: {outcomes:?}");
    for index in 0..5 {
        refused_as_duplicate(gateway.chat(&key, chat_body("pruned"), Some(&format!("pruned-{index}"))).await).await;
    }
    assert_eq!(gateway.balance_of(&key).await, balance, "the ids stay charged");
    assert_eq!(usage_rows(&gateway.assert_ledger_sound(&account).await).len(), 5);
    gateway.stop().await;
}
