//! Refusals: each with its contract code, and nothing charged.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

use crate::common::*;

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers().get("retry-after").expect("a retry-after header").to_str().unwrap().parse().unwrap()
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_is_402_and_changes_nothing() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("0.0001", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance(&key).await;
    let (status, code) = error_code(gateway.chat(&key, chat_body("too expensive"), None).await).await;
    assert_eq!((status, code.as_str()), (402, "insufficient_balance"));
    assert_eq!(gateway.balance(&key).await, before);
    let statement = gateway.assert_ledger_sound(&account).await;
    assert!(statement["rows"].as_array().unwrap().iter().all(|row| row["kind"] != "usage"));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_model_is_refused_and_price_and_plan_changes_apply_to_the_next_request() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = chat_body("price?");
    body["model"] = json!("unpriced-gpt");
    let response = gateway.chat(&key, body, None).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "price_not_configured");
    assert!(error["error"]["message"].as_str().unwrap().contains("mock:unpriced-gpt"));

    // Price change: doubled prices apply to the very next request.
    let first = gateway.chat(&key, chat_body("same"), None).await;
    let first_cost = header_money(&first, "x-tollgate-cost");
    gateway
        .admin_ok(reqwest::Method::PUT, "/internal/prices", Some(json!([{"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": "5", "output_per_mtok": "20"}])))
        .await;
    let second = gateway.chat(&key, chat_body("same"), None).await;
    assert_eq!(header_money(&second, "x-tollgate-cost"), Money::from_nanos(first_cost.nanos() * 2));

    // Plan switch: a tier without a price is refused at once; once priced, it is charged at its price.
    gateway.admin_ok(reqwest::Method::PATCH, &format!("/internal/accounts/{account}"), Some(json!({"customer_type": "premium"}))).await;
    let (status, code) = error_code(gateway.chat(&key, chat_body("same"), None).await).await;
    assert_eq!((status, code.as_str()), (400, "price_not_configured"));
    gateway
        .admin_ok(reqwest::Method::PUT, "/internal/prices", Some(json!([{"provider": "mock", "model": "demo-gpt", "customer_type": "premium", "input_per_mtok": "1.25", "output_per_mtok": "5"}])))
        .await;
    let third = gateway.chat(&key, chat_body("same"), None).await;
    assert_eq!(header_money(&third, "x-tollgate-cost"), Money::from_nanos(first_cost.nanos() / 2));
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_at_once() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let created = gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/keys"), Some(json!({"name": "k"}))).await;
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("tg_"));
    assert_eq!(gateway.chat(key, chat_body("ok"), None).await.status(), 200);
    let key_id = created["id"].as_str().unwrap();
    gateway.admin_ok(reqwest::Method::DELETE, &format!("/internal/keys/{key_id}"), None).await;
    let (status, code) = error_code(gateway.chat(key, chat_body("still?"), None).await).await;
    assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
    let (status, code) = error_code(gateway.chat("tg_unknown", chat_body("x"), None).await).await;
    assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota_and_key_budget_give_their_429_codes() {
    // At midday, on a clock that stays there: on the wall clock the third request, made after
    // midnight, was a new day's and was served.
    let clock = ManualClock::at_time(datetime!(2099-06-15 12:00:00 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |_| {}).await;
    let account = gateway.account("1", json!({"daily_request_quota": 2})).await;
    let key = gateway.key(&account, json!({})).await;
    for _ in 0..2 {
        assert_eq!(gateway.chat(&key, chat_body("q"), None).await.status(), 200);
    }
    let response = gateway.chat(&key, chat_body("q"), None).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(retry_after(&response), 43_200, "12 h to the day's end");
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (429, "daily_quota_exceeded"));
    let balance = gateway.balance(&key).await;
    assert_eq!(balance["daily_requests_used"], 2);

    // A key whose total budget covers one request's hold but not two.
    let other = gateway.account("1", json!({})).await;
    let one = gateway.chat(&gateway.key(&other, json!({})).await, chat_body("b"), None).await;
    let cost = header_money(&one, "x-tollgate-cost");
    let budget = Money::from_nanos(cost.nanos() + cost.nanos() / 2);
    let budgeted = gateway.key(&other, json!({"budget_total": budget.to_string()})).await;
    let mut capped = chat_body("b");
    capped["max_tokens"] = json!(16);
    assert_eq!(gateway.chat(&budgeted, capped.clone(), None).await.status(), 200);
    let (status, code) = error_code(gateway.chat(&budgeted, capped, None).await).await;
    assert_eq!((status, code.as_str()), (429, "key_budget_exceeded"));
    let remaining = gateway.balance(&budgeted).await["key"]["budget_total_remaining"].clone();
    assert_eq!(money(&remaining), budget.checked_sub(cost).unwrap());
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let gateway = TestGateway::start_with(|config| config.limits.request_body_bytes_max = 4096).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let url = format!("{}/v1/chat/completions", gateway.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (gateway.http.post(&url).bearer_auth(&key).body("{not json"), 400, "invalid_request"),
        (gateway.http.post(&url).bearer_auth(&key).body("[1,2]"), 400, "invalid_request"),
        (gateway.http.post(&url).bearer_auth(&key).json(&json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})), 404, "model_not_found"),
        (gateway.http.post(&url).bearer_auth(&key).json(&json!({"model": "demo-gpt", "messages": "x"})), 400, "invalid_request"),
        (gateway.http.post(&url).bearer_auth(&key).json(&json!({"model": "demo-gpt", "messages": [{"role": "user", "content": "x".repeat(5000)}]})), 413, "request_too_large"),
        (gateway.http.post(&url).json(&chat_body("no key")), 401, "invalid_api_key"),
    ];
    for (request, expected_status, expected_code) in cases {
        let (status, code) = error_code(request.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (expected_status, expected_code));
    }
    let balance = gateway.balance(&key).await;
    assert_eq!(money(&balance["balance"]), Money::from_nanos(Money::NANOS_PER_UNIT));
    assert_eq!(balance["held"], "0");
    gateway.stop().await;
}

/// Issue 19 item 3: a feature the provider bills beyond token prices (OpenAI's priority tier,
/// Anthropic's server tools and long-context beta) is refused as price_not_configured, naming
/// it, before anything is held or forwarded; the operator never pays for it unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_billed_beyond_token_prices_are_refused_by_name() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let forwarded = gateway.upstream_requests().await;
    let mut body = chat_body("hi");
    body["service_tier"] = json!("priority");
    let (status, code) = error_code(gateway.chat(&key, body, None).await).await;
    assert_eq!((status, code.as_str()), (400, "price_not_configured"));
    let search = json!({"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]});
    let response = gateway.messages_request(&key).json(&search).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("web_search_20250305"), "{error}");
    let plain = json!({"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let response = gateway.messages_request(&key).header("anthropic-beta", "context-1m-2025-08-07").json(&plain).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(gateway.upstream_requests().await, forwarded, "nothing was forwarded");
    assert_eq!(gateway.balance_of(&key).await, Money::from_nanos(1_000_000_000), "nothing was held or charged");
    assert_eq!(gateway.chat(&key, chat_body("hi"), None).await.status(), 200, "the same request without it is served");
    gateway.stop().await;
}

/// A period whose end a test crosses: the account's request quota and the key's budget of that
/// period, and the fields and codes the contract names them by.
struct Period {
    quota_field: &'static str,
    quota_code: &'static str,
    used_field: &'static str,
    budget_field: &'static str,
    budget_remaining_field: &'static str,
    /// Where the request is made: the period's last millisecond.
    last_millisecond: OffsetDateTime,
    /// The length of the period after it, in seconds (a new period's retry-after).
    next_period_secs: u64,
}

const DAY: Period = Period {
    quota_field: "daily_request_quota",
    quota_code: "daily_quota_exceeded",
    used_field: "daily_requests_used",
    budget_field: "budget_daily",
    budget_remaining_field: "budget_daily_remaining",
    last_millisecond: datetime!(2099-06-15 23:59:59.999 UTC),
    next_period_secs: 86_400,
};

/// December's end, a year's too; January has 31 days.
const MONTH: Period = Period {
    quota_field: "monthly_request_quota",
    quota_code: "monthly_quota_exceeded",
    used_field: "monthly_requests_used",
    budget_field: "budget_monthly",
    budget_remaining_field: "budget_monthly_remaining",
    last_millisecond: datetime!(2099-12-31 23:59:59.999 UTC),
    next_period_secs: 31 * 86_400,
};

/// Issue 20 item 12: a request at a period's last millisecond and one at the next period's
/// first count in two periods — in the hot store (the quota and the key budget refuse before
/// the end, serve after it) and in the ledger (its usage by day, and the counters a cold hot
/// store starts from, which a restart at the new period's first millisecond reads).
async fn a_period_end_starts_quota_and_budget_afresh(period: &Period) {
    let clock = ManualClock::at_time(period.last_millisecond);
    let gateway = TestGateway::start_with_clock(&clock, |_| {}).await;
    let mut capped = chat_body("at the edge");
    // With max_tokens 16 the hold is the cost: a budget of 1.5 costs covers one request, not two.
    capped["max_tokens"] = json!(16);
    let quota_account = gateway.account("1", json!({period.quota_field: 1})).await;
    let quota_key = gateway.key(&quota_account, json!({})).await;
    let first = gateway.chat(&quota_key, capped.clone(), None).await;
    assert_eq!(first.status(), 200);
    let cost = header_money(&first, "x-tollgate-cost");
    let refused = gateway.chat(&quota_key, capped.clone(), None).await;
    assert_eq!(retry_after(&refused), 1, "1 ms before the period's end");
    assert_eq!(error_code(refused).await, (429, period.quota_code.to_string()));
    let budget = Money::from_nanos(cost.nanos() + cost.nanos() / 2);
    let budget_account = gateway.account("1", json!({})).await;
    let budget_key = gateway.key(&budget_account, json!({period.budget_field: budget.to_string()})).await;
    assert_eq!(gateway.chat(&budget_key, capped.clone(), None).await.status(), 200);
    let refused = gateway.chat(&budget_key, capped.clone(), None).await;
    assert_eq!(retry_after(&refused), 1);
    assert_eq!(error_code(refused).await, (429, "key_budget_exceeded".to_string()));

    clock.advance_ms(1);
    assert_eq!(gateway.chat(&quota_key, capped.clone(), None).await.status(), 200, "a new period's quota");
    let refused = gateway.chat(&quota_key, capped.clone(), None).await;
    assert_eq!(retry_after(&refused), period.next_period_secs);
    assert_eq!(error_code(refused).await, (429, period.quota_code.to_string()));
    assert_eq!(gateway.chat(&budget_key, capped.clone(), None).await.status(), 200, "a new period's budget");
    let balance = gateway.balance(&quota_key).await;
    assert_eq!(balance[period.used_field], 1, "{balance}");

    // The ledger dates each charge by the moment it was made.
    let last_day = period.last_millisecond.date().to_string();
    let next_day = (period.last_millisecond.date() + time::Duration::days(1)).to_string();
    for account in [&quota_account, &budget_account] {
        gateway.assert_ledger_sound(account).await;
        assert_eq!(gateway.usage_by_day(account).await, [(last_day.clone(), 1), (next_day.clone(), 1)]);
    }
    // A cold hot store starts from the ledger's counters of the new period: one request, one
    // cost, not two.
    let (dir, database_url) = gateway.stop_keeping_ledger().await;
    let gateway = TestGateway::start_on_with_clock(dir, database_url, &clock, |_| {}).await;
    let balance = gateway.balance(&quota_key).await;
    assert_eq!(balance[period.used_field], 1, "after a restart: {balance}");
    let remaining = gateway.balance(&budget_key).await["key"][period.budget_remaining_field].clone();
    assert_eq!(money(&remaining), budget.checked_sub(cost).unwrap(), "after a restart");
    let refused = gateway.chat(&quota_key, capped, None).await;
    assert_eq!(error_code(refused).await, (429, period.quota_code.to_string()));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_23_59_59_999_and_one_at_midnight_count_in_different_days() {
    a_period_end_starts_quota_and_budget_afresh(&DAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_end_starts_monthly_quota_and_budget_afresh() {
    a_period_end_starts_quota_and_budget_afresh(&MONTH).await;
}

/// A key's per-minute request limit, at a minute's last millisecond and the next one's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_boundary_starts_a_keys_rate_limit_afresh() {
    let clock = ManualClock::at_time(datetime!(2099-06-15 12:34:59.999 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |_| {}).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({"rpm": 1})).await;
    assert_eq!(gateway.chat(&key, chat_body("r"), None).await.status(), 200);
    let refused = gateway.chat(&key, chat_body("r"), None).await;
    assert_eq!(retry_after(&refused), 1);
    assert_eq!(error_code(refused).await, (429, "rate_limited".to_string()));
    clock.advance_ms(1);
    assert_eq!(gateway.chat(&key, chat_body("r"), None).await.status(), 200);
    let refused = gateway.chat(&key, chat_body("r"), None).await;
    assert_eq!(retry_after(&refused), 60);
    gateway.stop().await;
}
