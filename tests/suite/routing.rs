//! Several upstream channels per model (issue 23): failover charged once, no retry after the
//! first byte, refusals about the request not retried, circuit breakers, `Retry-After`,
//! channels disabled through the operator API — each against real mock upstreams that a test
//! makes fail, slow down or recover while the gateway runs.

use std::str::FromStr;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tollgate_gateway::config::{ChannelConfig, ModelRoute, ProviderConfig, ProviderKind};

use crate::common::*;

const MODEL: &str = "routed-gpt";

/// A mock upstream of its own, which a test can make fail or recover.
struct Upstream {
    base: String,
    http: reqwest::Client,
}

impl Upstream {
    async fn start(shutdown: &CancellationToken) -> Upstream {
        let url = start_mock(tollgate_mock::MockConfig::default(), shutdown.clone()).await;
        Upstream { base: url.trim_end_matches("/v1").to_string(), http: reqwest::Client::new() }
    }

    /// Sets what every request to it does (`{}`: behave).
    async fn behave(&self, overrides: Value) {
        let response = self.http.put(format!("{}/mock/overrides", self.base)).json(&overrides).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    async fn requests(&self) -> u64 {
        let stats: Value = self.http.get(format!("{}/mock/stats", self.base)).send().await.unwrap().json().await.unwrap();
        stats["requests"].as_u64().unwrap()
    }
}

/// A gateway whose `routed-gpt` has two channels: `primary` (priority 1) and `backup`
/// (priority 0), each its own mock; priced under the provider `mock` like the other models.
struct Routed {
    gateway: TestGateway,
    primary: Upstream,
    backup: Upstream,
    _shutdown: CancellationToken,
    account: String,
    key: String,
}

impl Routed {
    async fn start(adjust: impl FnOnce(&mut tollgate_gateway::GatewayConfig)) -> Routed {
        Self::start_on_clock(None, adjust).await
    }

    /// On a clock the test moves: breakers and `Retry-After` measure time by the gateway's clock,
    /// so their waits are set, not slept.
    async fn start_on_clock(clock: Option<&ManualClock>, adjust: impl FnOnce(&mut tollgate_gateway::GatewayConfig)) -> Routed {
        let shutdown = CancellationToken::new();
        let primary = Upstream::start(&shutdown).await;
        let backup = Upstream::start(&shutdown).await;
        let dir = TempDir::new();
        let database_url = test_database_url(&dir).await;
        let gateway = routed_gateway(&primary, &backup, dir, database_url, clock, adjust).await;
        let account = gateway.account("1", json!({})).await;
        let key = gateway.key(&account, json!({})).await;
        Routed { gateway, primary, backup, _shutdown: shutdown, account, key }
    }

    async fn chat(&self, extra: Value, request_id: &str) -> reqwest::Response {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
        merge(&mut body, extra);
        self.gateway.chat(&self.key, body, Some(request_id)).await
    }

    /// The requests each upstream has received: (primary, backup).
    async fn counts(&self) -> (u64, u64) {
        (self.primary.requests().await, self.backup.requests().await)
    }

    /// The attempts the ledger recorded for a request (services mode: once the worker wrote them).
    async fn attempts(&self, request_id: &str) -> Vec<Value> {
        let path = format!("/internal/billing/attempts?account_id={}&request_id={request_id}", self.account);
        let started = std::time::Instant::now();
        loop {
            let listed = self.gateway.admin_ok(Method::GET, &path, None).await;
            let attempts = listed["attempts"].as_array().unwrap().clone();
            if !attempts.is_empty() || started.elapsed() > Duration::from_secs(10) {
                return attempts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn channel(&self, name: &str) -> Value {
        channel_on(&self.gateway, name).await
    }

    async fn usage_rows(&self) -> Vec<Value> {
        let statement = self.gateway.assert_ledger_sound(&self.account).await;
        statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").cloned().collect()
    }

    async fn stop(self) {
        self.gateway.stop().await;
    }
}

/// A test gateway on the given ledger whose `routed-gpt` has the channels `primary` (priority
/// 1) and `backup` (priority 0) on these two upstreams.
async fn routed_gateway(
    primary: &Upstream,
    backup: &Upstream,
    dir: TempDir,
    database_url: String,
    clock: Option<&ManualClock>,
    adjust: impl FnOnce(&mut tollgate_gateway::GatewayConfig),
) -> TestGateway {
    let (primary_url, backup_url) = (format!("{}/v1", primary.base), format!("{}/v1", backup.base));
    let gateway = TestGateway::start_on_clock(dir, database_url, clock, |config| {
        for (name, url) in [("primary", &primary_url), ("backup", &backup_url)] {
            config.providers.push(ProviderConfig {
                name: name.into(),
                kind: ProviderKind::Mock,
                base_url: url.clone(),
                api_key_env: None,
                output_cap_field: None,
                client_file_references: Default::default(),
                client_urls: Default::default(),
            });
        }
        let channel = |name: &str, priority: i32| ChannelConfig {
            name: None,
            provider: name.into(),
            upstream_model: Some("demo-gpt".into()),
            priority,
            weight: 1,
            concurrent_requests_max: None,
            requests_per_minute_max: None,
            tokens_per_minute_max: None,
            disabled: false,
        };
        config.models.push(ModelRoute {
            model: MODEL.into(),
            provider: "mock".into(),
            channels: vec![channel("primary", 1), channel("backup", 0)],
            ..ModelRoute::default()
        });
        adjust(config);
    })
    .await;
    gateway.set_prices(&[(MODEL, TIER)]).await;
    gateway
}

/// The cost of the usage an upstream reported, at the test prices.
fn cost_of(usage: &Value) -> Money {
    expected_cost(usage["input_tokens"].as_u64().unwrap(), usage["output_tokens"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_channel_fails_over_and_the_request_is_charged_once_at_the_models_price() {
    let routed = Routed::start(|_| {}).await;
    routed.primary.behave(json!({"fail_status": 503})).await;
    let before = routed.gateway.balance_of(&routed.key).await;

    let response = routed.chat(json!({}), "failover-1").await;
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], " hello".repeat(16), "the backup's answer");
    assert_eq!(routed.counts().await, (1, 1), "one attempt on each channel");

    let attempts = routed.attempts("failover-1").await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let (failed, served) = (&attempts[0], &attempts[1]);
    assert_eq!((failed["channel"].as_str(), failed["status_code"].as_u64(), failed["served"].as_bool()), (Some("primary"), Some(503), Some(false)));
    assert_eq!((failed["billed_to"].as_str(), failed["error"].as_str()), (Some("operator"), Some("status")));
    assert_eq!((served["channel"].as_str(), served["status_code"].as_u64(), served["served"].as_bool()), (Some("backup"), Some(200), Some(true)));
    assert_eq!(served["billed_to"], "customer");
    assert_eq!(served["upstream_model"], "demo-gpt");
    assert!(served["first_byte_ms"].is_u64());
    // The customer pays the model's price for what the serving channel reported: once.
    assert_eq!(cost, cost_of(&served["upstream_usage"]));
    assert_eq!(before.checked_sub(routed.gateway.balance_of(&routed.key).await).unwrap(), cost);
    let rows = routed.usage_rows().await;
    assert_eq!(rows.len(), 1, "one usage row: {rows:?}");
    assert_eq!(money(&rows[0]["amount"]), Money::ZERO.checked_sub(cost).unwrap());

    // A stream fails over the same way, before its first byte.
    let response = routed.chat(json!({"stream": true}), "failover-2").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(routed.counts().await, (2, 2));
    let attempts = routed.attempts("failover-2").await;
    assert_eq!(attempts.iter().map(|attempt| attempt["channel"].as_str().unwrap()).collect::<Vec<_>>(), ["primary", "backup"]);
    let streamed = cost_of(&attempts[1]["upstream_usage"]);
    assert_eq!(before.checked_sub(routed.gateway.balance_of(&routed.key).await).unwrap(), cost.checked_add(streamed).unwrap());
    assert_eq!(routed.usage_rows().await.len(), 2);
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_retried_after_the_first_byte_reached_the_client() {
    let routed = Routed::start(|_| {}).await;
    // The primary streams three chunks, then its connection is cut.
    routed.primary.behave(json!({"fail_after_chunks": 3})).await;
    let response = routed.chat(json!({"stream": true}), "cut-1").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap_or_default();
    assert!(!text.contains("[DONE]"), "the stream was cut: {text}");
    assert_eq!(routed.counts().await, (1, 0), "never sent to the backup once bytes flowed");
    let attempts = routed.attempts("cut-1").await;
    assert_eq!(attempts.len(), 1);
    assert_eq!((attempts[0]["channel"].as_str(), attempts[0]["served"].as_bool()), (Some("primary"), Some(true)));
    // What was relayed is charged, once, as any interrupted stream.
    let rows = routed.usage_rows().await;
    assert_eq!(rows.len(), 1);
    assert!(money(&rows[0]["amount"]).is_negative(), "{rows:?}");
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_about_the_request_is_not_retried_and_does_not_count_against_the_channel() {
    let routed = Routed::start(|config| config.routing.breaker_failures = 1).await;
    for status in [400, 404, 413, 422] {
        routed.primary.behave(json!({"fail_status": status})).await;
        let response = routed.chat(json!({}), &format!("refused-{status}")).await;
        assert_eq!(response.status(), status);
        let attempts = routed.attempts(&format!("refused-{status}")).await;
        assert_eq!(attempts.len(), 1, "{status}: {attempts:?}");
    }
    assert_eq!(routed.counts().await, (4, 0));
    assert_eq!(routed.channel("primary").await["breaker"], "closed", "one failure would have opened it");
    assert!(routed.usage_rows().await.iter().all(|row| money(&row["amount"]) == Money::ZERO), "nothing charged");
    assert_eq!(routed.gateway.balance_of(&routed.key).await, Money::from_str("1").unwrap());
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_failures_probes_once_half_open_and_closes_on_success() {
    let clock = ManualClock::at(tollgate_store::clock::now_ms());
    let routed = Routed::start_on_clock(Some(&clock), |config| {
        config.routing.breaker_failures = 2;
        config.routing.breaker_open_ms = 60_000;
    })
    .await;
    routed.primary.behave(json!({"fail_status": 500})).await;
    for index in 0..2 {
        assert_eq!(routed.chat(json!({}), &format!("breaker-{index}")).await.status(), 200);
    }
    assert_eq!(routed.counts().await, (2, 2));
    assert_eq!(routed.channel("primary").await["breaker"], "open");
    // Open: the primary is not even tried.
    assert_eq!(routed.chat(json!({}), "breaker-open").await.status(), 200);
    assert_eq!(routed.counts().await, (2, 3));
    assert_eq!(routed.attempts("breaker-open").await.len(), 1);

    // A millisecond before its time, still left out.
    clock.advance_ms(59_999);
    assert_eq!(routed.chat(json!({}), "still-open").await.status(), 200);
    assert_eq!(routed.counts().await, (2, 4));
    // Its time come, one request probes it; still failing, it opens again and the probe's
    // request is served by the backup.
    clock.advance_ms(1);
    assert_eq!(routed.chat(json!({}), "probe-fails").await.status(), 200);
    assert_eq!(routed.counts().await, (3, 5));
    assert_eq!(routed.channel("primary").await["breaker"], "open");
    assert_eq!(routed.chat(json!({}), "open-again").await.status(), 200);
    assert_eq!(routed.counts().await, (3, 6));

    // Healed: the next probe succeeds and closes it; the primary serves again.
    routed.primary.behave(json!({})).await;
    clock.advance_ms(60_000);
    assert_eq!(routed.chat(json!({}), "probe-succeeds").await.status(), 200);
    assert_eq!(routed.counts().await, (4, 6));
    assert_eq!(routed.channel("primary").await["breaker"], "closed");
    assert_eq!(routed.chat(json!({}), "closed").await.status(), 200);
    assert_eq!(routed.counts().await, (5, 6));
    assert_eq!(routed.usage_rows().await.len(), 8, "every request charged once");
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_channel_times_out_to_the_next_and_retry_after_keeps_a_channel_out() {
    let clock = ManualClock::at(tollgate_store::clock::now_ms());
    let routed = Routed::start_on_clock(Some(&clock), |config| config.routing.attempt_first_byte_timeout_ms = Some(300)).await;
    routed.primary.behave(json!({"latency_ms": 3_000})).await;
    let started = std::time::Instant::now();
    assert_eq!(routed.chat(json!({"stream": true}), "slow-1").await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(2_500), "did not wait for the slow channel");
    let attempts = routed.attempts("slow-1").await;
    assert_eq!(attempts[0]["error"], "timeout");
    assert_eq!(attempts[1]["channel"], "backup");

    // 429 with Retry-After: 30 s — the channel is left out until then, for every request.
    routed.primary.behave(json!({"fail_status": 429, "retry_after_secs": 30})).await;
    let primary_before = routed.primary.requests().await;
    assert_eq!(routed.chat(json!({}), "limited-1").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 1);
    assert!(routed.channel("primary").await["retry_after_until"].is_string());
    assert_eq!(routed.chat(json!({}), "limited-2").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 1, "left out while its Retry-After runs");
    routed.primary.behave(json!({})).await;
    clock.advance_ms(29_000);
    assert_eq!(routed.chat(json!({}), "limited-3").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 1, "still left out a second before");
    clock.advance_ms(1_000);
    assert_eq!(routed.chat(json!({}), "limited-4").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 2, "back once it passed");
    routed.stop().await;
}

/// Rate limits: a channel past its requests a minute is passed over for the next, a channel
/// past its tokens a minute too; with both full the client is told when the first has room
/// and pays nothing; from then on it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_past_their_rate_limits_are_passed_over_until_the_minute_has_room() {
    let now_ms = tollgate_store::clock::now_ms();
    let clock = ManualClock::at(now_ms - now_ms.rem_euclid(60_000) + 10_000);
    let routed = Routed::start_on_clock(Some(&clock), |config| {
        let channels = &mut config.models.last_mut().unwrap().channels;
        channels[0].requests_per_minute_max = Some(2);
        channels[1].tokens_per_minute_max = Some(1);
    })
    .await;
    for request in ["rate-1", "rate-2", "rate-3"] {
        assert_eq!(routed.chat(json!({}), request).await.status(), 200, "{request}");
    }
    assert_eq!(routed.counts().await, (2, 1), "two a minute on the primary, the third to the backup");
    let primary = routed.channel("primary").await;
    assert_eq!((&primary["requests_per_minute_max"], &primary["requests_last_minute"]), (&json!(2), &json!(2)));
    let served = routed.attempts("rate-3").await;
    assert_eq!(served.len(), 1, "a channel at its limit is not tried: {served:?}");
    let usage = &served[0]["upstream_usage"];
    let tokens = usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
    let backup = routed.channel("backup").await;
    assert_eq!((&backup["tokens_per_minute_max"], &backup["tokens_last_minute"], &backup["requests_last_minute"]), (&json!(1), &json!(tokens), &json!(1)));

    // Both full: refused before any hold, with the time the primary has room again — the next
    // minute's first millisecond, when its two weigh 2 × 59,999 / 60,000 → 1.
    let before = routed.gateway.balance_of(&routed.key).await;
    let response = routed.chat(json!({}), "rate-4").await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["retry-after"], "51");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    assert_eq!(routed.counts().await, (2, 1), "nothing sent");
    assert_eq!(routed.gateway.balance_of(&routed.key).await, before, "nothing charged");
    clock.advance_ms(50_000);
    assert_eq!(routed.chat(json!({}), "rate-5").await.status(), 502, "a millisecond early");
    clock.advance_ms(1);
    assert_eq!(routed.chat(json!({}), "rate-6").await.status(), 200);
    assert_eq!(routed.counts().await, (3, 1));
    assert_eq!(routed.usage_rows().await.len(), 4, "every served request charged once");
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_channel_fails_the_client_gets_the_error_and_pays_nothing() {
    let routed = Routed::start(|config| {
        config.routing.breaker_failures = 1;
        config.routing.breaker_open_ms = 60_000;
    })
    .await;
    routed.primary.behave(json!({"fail_status": 500})).await;
    routed.backup.behave(json!({"fail_status": 502})).await;
    let response = routed.chat(json!({}), "all-down").await;
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    assert_eq!(routed.counts().await, (1, 1));
    let attempts = routed.attempts("all-down").await;
    assert_eq!(attempts.iter().map(|attempt| attempt["status_code"].as_u64().unwrap()).collect::<Vec<_>>(), [500, 502]);
    assert!(attempts.iter().all(|attempt| attempt["billed_to"] == "operator"));

    // Both breakers open: refused before any hold or upstream call, with when to come back.
    let response = routed.chat(json!({}), "none-available").await;
    assert_eq!(response.status(), 502);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("no upstream channel"), "{error}");
    assert_eq!(routed.counts().await, (1, 1));
    assert_eq!(routed.gateway.balance_of(&routed.key).await, Money::from_str("1").unwrap());
    assert_eq!(money(&routed.gateway.balance(&routed.key).await["held"]), Money::ZERO);
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disables_and_enables_a_channel() {
    let routed = Routed::start(|_| {}).await;
    let path = format!("/internal/channels/{MODEL}/primary/disable");
    let disabled = routed.gateway.admin_ok(Method::POST, &path, Some(json!({"reason": "provider incident"}))).await;
    assert_eq!(disabled["enabled"], false);
    assert_eq!(routed.channel("primary").await["enabled"], false);
    assert_eq!(routed.chat(json!({}), "disabled-1").await.status(), 200);
    assert_eq!(routed.counts().await, (0, 1));
    routed.gateway.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/primary/enable"), None).await;
    assert_eq!(routed.chat(json!({}), "enabled-1").await.status(), 200);
    assert_eq!(routed.counts().await, (1, 1));
    // Unknown names are told apart from a change.
    let (status, _) = routed.gateway.admin(Method::POST, &format!("/internal/channels/{MODEL}/nowhere/disable"), None).await;
    assert_eq!(status, 404);
    let (status, _) = routed.gateway.admin(Method::POST, "/internal/channels/no-model/primary/disable", None).await;
    assert_eq!(status, 404);
    routed.stop().await;
}

/// A chat request of `key` through `gateway`.
async fn chat_on(gateway: &TestGateway, key: &str) -> reqwest::Response {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
    gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(key).json(&body).send().await.unwrap()
}

/// `routed-gpt`'s channel `name` as `gateway` lists it.
async fn channel_on(gateway: &TestGateway, name: &str) -> Value {
    let listed = gateway.admin_ok(Method::GET, "/internal/channels", None).await;
    listed["channels"].as_array().unwrap().iter().find(|entry| entry["model"] == MODEL && entry["channel"] == name).unwrap().clone()
}

/// Services mode: two gateways routing `routed-gpt` to these upstreams on one Redis (a prefix of
/// their own) and one fresh PostgreSQL ledger, the first running the worker; `adjust` applies to
/// both.
async fn two_gateways(primary: &Upstream, backup: &Upstream, clock: Option<&ManualClock>, adjust: impl Fn(&mut tollgate_gateway::GatewayConfig)) -> (TestGateway, TestGateway) {
    let redis_url = std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let database_url = fresh_postgres_database().await;
    let prefix = unique_name("t");
    let shared = |config: &mut tollgate_gateway::GatewayConfig, run_worker: bool| {
        config.redis_url = Some(redis_url.clone());
        config.redis_prefix = prefix.clone();
        config.run_worker = run_worker;
        adjust(config);
    };
    let first = routed_gateway(primary, backup, TempDir::new(), database_url.clone(), clock, |config| shared(config, true)).await;
    let second = routed_gateway(primary, backup, TempDir::new(), database_url, clock, |config| shared(config, false)).await;
    (first, second)
}

/// Services mode: two gateways share their breakers through Redis and their channel states
/// through the ledger — failures seen by one keep the other off the channel, an operator's
/// word given to one reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_their_breakers_and_channel_states() {
    let shutdown = CancellationToken::new();
    let (primary, backup) = (Upstream::start(&shutdown).await, Upstream::start(&shutdown).await);
    let (first, second) = two_gateways(&primary, &backup, None, |config| {
        config.routing.breaker_failures = 2;
        config.routing.breaker_open_ms = 60_000;
        config.routing.breaker_sync_ms = 100;
    })
    .await;
    let account = first.account("1", json!({})).await;
    let key = first.key(&account, json!({})).await;

    // The primary fails twice through the first gateway: its breaker opens, in Redis too.
    primary.behave(json!({"fail_status": 500})).await;
    for _ in 0..2 {
        assert_eq!(chat_on(&first, &key).await.status(), 200);
    }
    assert_eq!(channel_on(&first, "primary").await["breaker"], "open");
    let started = std::time::Instant::now();
    while channel_on(&second, "primary").await["breaker"] != "open" {
        assert!(started.elapsed() < Duration::from_secs(5), "the second gateway never learned the breaker opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second, which never saw a failure, leaves the primary alone.
    let primary_before = primary.requests().await;
    assert_eq!(chat_on(&second, &key).await.status(), 200);
    assert_eq!(primary.requests().await, primary_before);

    // An operator disables the backup through the first; the second hears of it.
    first.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/backup/disable"), None).await;
    let started = std::time::Instant::now();
    while channel_on(&second, "backup").await["enabled"] != false {
        assert!(started.elapsed() < Duration::from_secs(5), "the second gateway never learned the backup was disabled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing left to serve: refused before any hold, on either gateway.
    let backup_before = backup.requests().await;
    for gateway in [&first, &second] {
        let response = chat_on(gateway, &key).await;
        assert_eq!(response.status(), 502);
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!((primary.requests().await, backup.requests().await), (primary_before, backup_before));

    // A channel added through the second serves through the first; removed through the first,
    // it is gone from the second.
    let has_rescue = |gateway: &TestGateway| {
        let request = gateway.http.get(format!("{}/internal/channels", gateway.url)).bearer_auth(ADMIN_TOKEN).send();
        async move {
            let listed: Value = request.await.unwrap().json().await.unwrap();
            listed["channels"].as_array().unwrap().iter().any(|entry| entry["channel"] == "rescue")
        }
    };
    second.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}"), Some(json!({"name": "rescue", "provider": "backup", "upstream_model": "demo-gpt"}))).await;
    let started = std::time::Instant::now();
    while !has_rescue(&first).await {
        assert!(started.elapsed() < Duration::from_secs(5), "the first gateway never learned of the added channel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat_on(&first, &key).await.status(), 200);
    assert_eq!(backup.requests().await, backup_before + 1, "served by the added channel");
    first.admin_ok(Method::DELETE, &format!("/internal/channels/{MODEL}/rescue"), None).await;
    let started = std::time::Instant::now();
    while has_rescue(&second).await {
        assert!(started.elapsed() < Duration::from_secs(5), "the second gateway never learned the channel was removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat_on(&second, &key).await.status(), 502);
    first.assert_ledger_sound(&account).await;
    second.stop().await;
    first.stop().await;
}

impl Routed {
    async fn session_chat(&self, session: &str, request_id: &str) -> u16 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
        let request = self.gateway.http.post(format!("{}/v1/chat/completions", self.gateway.url)).bearer_auth(&self.key).header("X-Session-ID", session).header("X-Request-ID", request_id);
        request.json(&body).send().await.unwrap().status().as_u16()
    }

    /// Which upstream served the last request: the one whose count moved.
    async fn served_by(&self, before: (u64, u64)) -> &'static str {
        match self.counts().await {
            (primary, backup) if primary > before.0 && backup == before.1 => "primary",
            (primary, backup) if primary == before.0 && backup > before.1 => "backup",
            counts => panic!("both or neither upstream moved: {before:?} → {counts:?}"),
        }
    }
}

/// Services mode: two gateways keep a channel's requests a minute together through Redis —
/// the first sends three of a limit of four and the second one; after a sync period neither
/// sends it more. Then a minute on, the first alone sends four: the second, which sent the
/// channel nothing that minute, learns it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_keep_a_channels_rate_limit_together() {
    let shutdown = CancellationToken::new();
    let (primary, backup) = (Upstream::start(&shutdown).await, Upstream::start(&shutdown).await);
    // One clock for both, mid-minute: the shared counts are kept per minute of it.
    let now_ms = tollgate_store::clock::now_ms();
    let clock = ManualClock::at(now_ms - now_ms.rem_euclid(60_000) + 10_000);
    let (first, second) = two_gateways(&primary, &backup, Some(&clock), |config| {
        config.routing.breaker_sync_ms = 50;
        config.models.last_mut().unwrap().channels[0].requests_per_minute_max = Some(4);
    })
    .await;
    let account = first.account("1", json!({})).await;
    let key = first.key(&account, json!({})).await;
    for gateway in [&first, &first, &first, &second] {
        assert_eq!(chat_on(gateway, &key).await.status(), 200);
    }
    assert_eq!((primary.requests().await, backup.requests().await), (4, 0), "each gateway alone is under the limit");
    for gateway in [&first, &second] {
        let started = std::time::Instant::now();
        while channel_on(gateway, "primary").await["requests_last_minute"] != 4 {
            assert!(started.elapsed() < Duration::from_secs(5), "a gateway never learned the fleet's four requests");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for gateway in [&first, &second] {
        assert_eq!(chat_on(gateway, &key).await.status(), 200);
    }
    assert_eq!((primary.requests().await, backup.requests().await), (4, 2), "the fleet's four reached, both went to the backup");

    // Two minutes on (the last minute's four weigh nothing), four through the first alone.
    clock.advance_ms(120_000);
    for _ in 0..4 {
        assert_eq!(chat_on(&first, &key).await.status(), 200);
    }
    assert_eq!((primary.requests().await, backup.requests().await), (8, 2));
    // Not asked through the second's listing, which would move its window to this minute
    // itself: twenty sync periods for the first to add its four and the second to read them.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(chat_on(&second, &key).await.status(), 200);
    assert_eq!((primary.requests().await, backup.requests().await), (8, 3), "the second, idle on the channel, kept the fleet's limit");
    first.assert_ledger_sound(&account).await;
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_sticks_to_the_channel_that_served_it() {
    // Two channels of one priority: without a pin, requests spread by weight.
    let routed = Routed::start(|config| config.models.last_mut().unwrap().channels[0].priority = 0).await;
    for index in 0..20 {
        assert_eq!(routed.session_chat("conversation-1", &format!("sticky-{index}")).await, 200);
    }
    let counts = routed.counts().await;
    assert!(counts == (20, 0) || counts == (0, 20), "one session, one channel: {counts:?}");
    // Other sessions spread (each pinned where it first went): 20 sessions all on one channel
    // has a chance of 2⁻¹⁹.
    for index in 0..20 {
        assert_eq!(routed.session_chat(&format!("other-{index}"), &format!("other-{index}")).await, 200);
    }
    let spread = routed.counts().await;
    assert!(spread.0 > counts.0 && spread.1 > counts.1, "{counts:?} → {spread:?}");
    // OpenAI's prompt_cache_key is a session key too.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}], "prompt_cache_key": "cache-key-1"});
    let mut served = Vec::new();
    for index in 0..6 {
        let before = routed.counts().await;
        assert_eq!(routed.gateway.chat(&routed.key, body.clone(), Some(&format!("cache-key-{index}"))).await.status(), 200);
        served.push(routed.served_by(before).await);
    }
    assert!(served.iter().all(|channel| *channel == served[0]), "{served:?}");
    let metrics = routed.gateway.http.get(format!("{}/metrics", routed.gateway.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|line| line.starts_with("tollgate_affinity_total{") && line.contains("result=\"hit\"")), "pin hits counted");
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_moves_only_on_success_and_never_blocks_failover() {
    let routed = Routed::start(|_| {}).await;
    // Pinned to the primary (first by priority).
    assert_eq!(routed.session_chat("s", "pin-1").await, 200);
    assert_eq!(routed.counts().await, (1, 0));
    // The primary fails: the request fails over, and the success moves the pin to the backup.
    routed.primary.behave(json!({"fail_status": 503})).await;
    assert_eq!(routed.session_chat("s", "pin-2").await, 200);
    assert_eq!(routed.counts().await, (2, 1));
    routed.primary.behave(json!({})).await;
    let before = routed.counts().await;
    assert_eq!(routed.session_chat("s", "pin-3").await, 200);
    assert_eq!(routed.served_by(before).await, "backup", "the pin moved to the backup, over the primary's priority");
    // Everything fails: nothing succeeded, so the pin stays where it was.
    routed.primary.behave(json!({"fail_status": 500})).await;
    routed.backup.behave(json!({"fail_status": 500})).await;
    assert_eq!(routed.session_chat("s", "pin-4").await, 502);
    routed.primary.behave(json!({})).await;
    routed.backup.behave(json!({})).await;
    let before = routed.counts().await;
    assert_eq!(routed.session_chat("s", "pin-5").await, 200);
    assert_eq!(routed.served_by(before).await, "backup", "a failed request moved no pin");
    // The pinned backup fails: never blocked, the request goes to the primary, and the pin with it.
    routed.backup.behave(json!({"fail_status": 503})).await;
    assert_eq!(routed.session_chat("s", "pin-6").await, 200);
    routed.backup.behave(json!({})).await;
    let before = routed.counts().await;
    assert_eq!(routed.session_chat("s", "pin-7").await, 200);
    assert_eq!(routed.served_by(before).await, "primary");
    // A pin to a disabled channel is passed over, and the success pins the session elsewhere.
    routed.gateway.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/primary/disable"), None).await;
    assert_eq!(routed.session_chat("s", "pin-8").await, 200);
    routed.gateway.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/primary/enable"), None).await;
    let before = routed.counts().await;
    assert_eq!(routed.session_chat("s", "pin-9").await, 200);
    assert_eq!(routed.served_by(before).await, "backup");
    // The operator clears the account's pins: the session goes by priority again.
    let cleared = routed.gateway.admin_ok(Method::DELETE, &format!("/internal/accounts/{}/pins", routed.account), None).await;
    assert_eq!(cleared["pins_cleared"], true);
    let before = routed.counts().await;
    assert_eq!(routed.session_chat("s", "pin-10").await, 200);
    assert_eq!(routed.served_by(before).await, "primary");
    // Every request charged once (the one that failed everywhere, nothing).
    let rows = routed.usage_rows().await;
    assert_eq!(rows.iter().filter(|row| money(&row["amount"]).is_negative()).count(), 9, "{rows:?}");
    routed.stop().await;
}

/// A stream that runs about `ms` (16 chunks), started and left running; its response once done.
fn slow_stream(routed: &Routed, key: &str, session: &str, ms: u64) -> tokio::task::JoinHandle<(u16, Option<u64>, String)> {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}], "stream": true, "mock": {"chunk_interval_ms": ms / 16}});
    let request = routed.gateway.http.post(format!("{}/v1/chat/completions", routed.gateway.url)).bearer_auth(key).header("X-Session-ID", session).json(&body);
    tokio::spawn(async move {
        let response = request.send().await.unwrap();
        let fence = response.headers().get("x-tollgate-session-fence").map(|value| value.to_str().unwrap().parse().unwrap());
        (response.status().as_u16(), fence, response.text().await.unwrap())
    })
}

/// A non-streaming request of a session: (status, fence, error code).
async fn session_request(routed: &Routed, key: &str, session: &str) -> (u16, Option<u64>, Value) {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
    let response = routed.gateway.http.post(format!("{}/v1/chat/completions", routed.gateway.url)).bearer_auth(key).header("X-Session-ID", session).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    if status == 409 {
        assert_eq!(response.headers()["retry-after"], "1");
    }
    let fence = response.headers().get("x-tollgate-session-fence").map(|value| value.to_str().unwrap().parse().unwrap());
    (status, fence, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the session's lock is free again (its release runs just after the response).
async fn until_free(routed: &Routed, session: &str) -> (u16, Option<u64>, Value) {
    let started = std::time::Instant::now();
    loop {
        let answer = session_request(routed, &routed.key, session).await;
        if answer.0 != 409 || started.elapsed() > Duration::from_secs(3) {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_session_refuses_a_second_request_until_the_first_ends() {
    let routed = Routed::start(|config| config.models.last_mut().unwrap().session_lock = tollgate_gateway::config::SessionLockMode::Reject).await;
    let running = slow_stream(&routed, &routed.key, "conversation", 1_600);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, error) = session_request(&routed, &routed.key, "conversation").await;
    assert_eq!(status, 409);
    assert_eq!(error["error"]["code"], "session_busy");
    // Another session, and a request with no session, are not held up.
    assert_eq!(session_request(&routed, &routed.key, "another").await.0, 200);
    assert_eq!(routed.chat(json!({}), "no-session").await.status(), 200);
    let (status, first_fence, text) = running.await.unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("[DONE]"));
    let (status, next_fence, _) = until_free(&routed, "conversation").await;
    assert_eq!(status, 200);
    assert!(next_fence.unwrap() > first_fence.unwrap(), "fencing numbers grow: {first_fence:?} then {next_fence:?}");
    // The refused request held nothing and was charged nothing: four requests, four charges.
    assert_eq!(routed.usage_rows().await.len(), 4);
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_session_request_runs_when_the_lock_is_free() {
    let routed = Routed::start(|config| {
        config.models.last_mut().unwrap().session_lock = tollgate_gateway::config::SessionLockMode::Wait;
        config.routing.session_lock_wait_ms = 5_000;
    })
    .await;
    let running = slow_stream(&routed, &routed.key, "conversation", 800);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_eq!(session_request(&routed, &routed.key, "conversation").await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited for the stream: {:?}", started.elapsed());
    assert_eq!(running.await.unwrap().0, 200);
    let metrics = routed.gateway.http.get(format!("{}/metrics", routed.gateway.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|line| line.starts_with("tollgate_session_lock_total{") && line.contains("result=\"waited\"")), "waits counted");

    // A client that gives up while it waits leaves nothing behind: once the lock is free its
    // request is neither sent upstream nor charged.
    let running = slow_stream(&routed, &routed.key, "conversation", 800);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
    let impatient = routed.gateway.http.post(format!("{}/v1/chat/completions", routed.gateway.url)).bearer_auth(&routed.key).header("X-Session-ID", "conversation").timeout(Duration::from_millis(150));
    assert!(impatient.json(&body).send().await.is_err(), "the client gave up");
    assert_eq!(running.await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(routed.counts().await, (3, 0), "the abandoned request never went upstream");
    assert_eq!(routed.usage_rows().await.len(), 3);
    assert_eq!(money(&routed.gateway.balance(&routed.key).await["held"]), Money::ZERO);
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lock_expires_and_an_operator_can_release_a_stuck_one() {
    use tollgate_gateway::routing::session_lock::lock_session_name;
    let routed = Routed::start(|config| config.models.last_mut().unwrap().session_lock = tollgate_gateway::config::SessionLockMode::Reject).await;
    // A gateway that took the lock and died: nobody renews or releases it.
    let name = lock_session_name("orphaned");
    assert!(routed.gateway.hot.lock_session(&routed.account, &name, "dead-gateway", 400).await.unwrap().is_some());
    assert_eq!(session_request(&routed, &routed.key, "orphaned").await.0, 409);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(session_request(&routed, &routed.key, "orphaned").await.0, 200, "released by its TTL");
    // A stuck holder: the operator releases it.
    let stuck = until_free(&routed, "orphaned").await;
    assert_eq!(stuck.0, 200);
    assert!(routed.gateway.hot.lock_session(&routed.account, &name, "stuck-gateway", 60_000).await.unwrap().is_some());
    assert_eq!(session_request(&routed, &routed.key, "orphaned").await.0, 409);
    let released = routed.gateway.admin_ok(Method::DELETE, &format!("/internal/accounts/{}/sessions/orphaned/lock", routed.account), None).await;
    assert_eq!(released["released"], true);
    assert_eq!(session_request(&routed, &routed.key, "orphaned").await.0, 200);
    // The stuck holder's late release finds another's lock and leaves it alone.
    until_free(&routed, "orphaned").await;
    assert!(routed.gateway.hot.lock_session(&routed.account, &name, "newer-holder", 60_000).await.unwrap().is_some());
    assert!(!routed.gateway.hot.unlock_session(&routed.account, &name, Some("stuck-gateway")).await.unwrap());
    assert_eq!(session_request(&routed, &routed.key, "orphaned").await.0, 409, "the newer holder still has it");
    routed.stop().await;
}

/// A key may lock its sessions on a model that does not, and a key may turn the model's lock
/// off for itself; the lock is the account's, by session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sets_its_own_session_lock_over_the_models() {
    let routed = Routed::start(|_| {}).await;
    let locking = routed.gateway.key(&routed.account, json!({"session_lock": "reject"})).await;
    let listed = routed.gateway.admin_ok(Method::GET, &format!("/internal/accounts/{}/keys", routed.account), None).await;
    let modes: Vec<Value> = listed["data"].as_array().unwrap().iter().map(|key| key["session_lock"].clone()).collect();
    assert!(modes.contains(&json!("reject")) && modes.contains(&Value::Null), "{listed}");
    // A request the client names, charged before the session gets busy.
    let named = || {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
        let url = format!("{}/v1/chat/completions", routed.gateway.url);
        routed.gateway.http.post(url).bearer_auth(&locking).header("X-Session-ID", "conversation").header("X-Request-ID", "named-in-session").json(&body).send()
    };
    let first = named().await.unwrap();
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    let running = slow_stream(&routed, &locking, "conversation", 1_200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, error) = session_request(&routed, &locking, "conversation").await;
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("session_busy")), "the locking key's second request");
    // Its retry while the session is busy is a replay, not a refusal: it asks for no new work.
    let retry = named().await.unwrap();
    assert_eq!((retry.status().as_u16(), retry.headers().get("idempotent-replayed").map(|value| value.to_str().unwrap().to_string())), (200, Some("true".into())), "a charged request's retry in a busy session");
    assert_eq!(retry.text().await.unwrap(), first_body, "the replay is the first answer");
    assert_eq!(session_request(&routed, &routed.key, "conversation").await.0, 200, "a key without a lock on an unlocked model goes through");
    let (status, fence, _) = running.await.unwrap();
    assert_eq!(status, 200);
    assert!(fence.is_some(), "the locking key's request was handed a fence");
    let (status, body) = routed.gateway.admin(Method::POST, &format!("/internal/accounts/{}/keys", routed.account), Some(json!({"name": "k", "session_lock": "sometimes"}))).await;
    assert_eq!(status, 400, "{body}");
    routed.stop().await;

    // The model locks; a key that says `off` is not held up.
    let routed = Routed::start(|config| config.models.last_mut().unwrap().session_lock = tollgate_gateway::config::SessionLockMode::Reject).await;
    let unlocked = routed.gateway.key(&routed.account, json!({"session_lock": "off"})).await;
    let running = slow_stream(&routed, &routed.key, "conversation", 1_200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(session_request(&routed, &routed.key, "conversation").await.0, 409, "the model's lock");
    let (status, fence, _) = session_request(&routed, &unlocked, "conversation").await;
    assert_eq!((status, fence), (200, None), "the key's `off` wins: no lock, no fence");
    assert_eq!(running.await.unwrap().0, 200);
    routed.stop().await;
}

/// A channel added through the operator API serves at once, keeps its place in the order,
/// obeys disable/enable, survives a restart (it is in the ledger), and goes when removed; a
/// configured channel cannot be removed, only disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_adds_a_channel_that_serves_at_once_and_removes_it() {
    let only_primary = |config: &mut tollgate_gateway::GatewayConfig| {
        config.models.last_mut().unwrap().channels.retain(|channel| channel.provider == "primary");
        // A provider of another protocol, which no channel of an OpenAI model may use.
        config.providers.push(ProviderConfig {
            name: "claude".into(),
            kind: ProviderKind::Anthropic,
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key_env: None,
            output_cap_field: None,
            client_file_references: Default::default(),
            client_urls: Default::default(),
        });
    };
    let routed = Routed::start(only_primary).await;
    routed.primary.behave(json!({"fail_status": 503})).await;
    assert_eq!(routed.chat(json!({}), "before-1").await.status(), 502, "the only channel fails");

    let path = format!("/internal/channels/{MODEL}");
    let rescue = json!({"name": "rescue", "provider": "backup", "upstream_model": "demo-gpt", "priority": -1, "weight": 2});
    let (status, added) = routed.gateway.admin(Method::POST, &path, Some(rescue.clone())).await;
    assert_eq!(status, 201, "{added}");
    assert_eq!((added["channel"].as_str(), added["added"].as_bool(), added["upstream_model"].as_str()), (Some("rescue"), Some(true), Some("demo-gpt")));
    let listed = routed.channel("rescue").await;
    assert_eq!((listed["priority"].as_i64(), listed["weight"].as_u64(), listed["enabled"].as_bool(), listed["breaker"].as_str()), (Some(-1), Some(2), Some(true), Some("closed")));
    assert_eq!(routed.channel("primary").await["added"], false);

    // It serves at once, after the configured primary (higher priority) failed.
    let (primary_before, _) = routed.counts().await;
    assert_eq!(routed.chat(json!({}), "added-1").await.status(), 200);
    assert_eq!(routed.counts().await, (primary_before + 1, 1));
    let attempts = routed.attempts("added-1").await;
    assert_eq!(attempts.iter().map(|attempt| attempt["channel"].as_str().unwrap()).collect::<Vec<_>>(), ["primary", "rescue"]);

    // What is refused, and how.
    for (body, expected) in [
        (rescue.clone(), 409),
        (json!({"name": "primary", "provider": "backup"}), 400),
        (json!({"name": "other", "provider": "nowhere"}), 400),
        (json!({"name": "other", "provider": "claude"}), 400),
        (json!({"name": "bad name!", "provider": "backup"}), 400),
        (json!({"name": "other", "provider": "backup", "weight": 0}), 400),
        (json!({"name": "other", "provider": "backup", "concurrent_requests_max": 0}), 400),
        (json!({"name": "other", "provider": "backup", "colour": "red"}), 400),
    ] {
        let (status, answer) = routed.gateway.admin(Method::POST, &path, Some(body.clone())).await;
        assert_eq!(status, expected, "{body} → {answer}");
    }
    assert_eq!(routed.gateway.admin(Method::POST, "/internal/channels/no-model", Some(json!({"name": "x", "provider": "backup"}))).await.0, 404);

    // Disabled and enabled like a configured one.
    routed.gateway.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/rescue/disable"), None).await;
    assert_eq!(routed.chat(json!({}), "added-2").await.status(), 502);
    routed.gateway.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/rescue/enable"), None).await;
    assert_eq!(routed.chat(json!({}), "added-3").await.status(), 200);

    // Still there after a restart: it is in the ledger.
    let Routed { gateway, primary, backup, _shutdown, account, key } = routed;
    let (dir, database_url) = gateway.stop_keeping_ledger().await;
    let gateway = routed_gateway(&primary, &backup, dir, database_url, None, only_primary).await;
    let routed = Routed { gateway, primary, backup, _shutdown, account, key };
    assert_eq!(routed.channel("rescue").await["added"], true);
    assert_eq!(routed.chat(json!({}), "after-restart").await.status(), 200);

    // A configured channel is not removed; the added one is, once.
    let (status, answer) = routed.gateway.admin(Method::DELETE, &format!("{path}/primary"), None).await;
    assert_eq!(status, 409, "{answer}");
    let removed = routed.gateway.admin_ok(Method::DELETE, &format!("{path}/rescue"), None).await;
    assert_eq!(removed["removed"], true);
    assert_eq!(routed.gateway.admin(Method::DELETE, &format!("{path}/rescue"), None).await.0, 404);
    let listed = routed.gateway.admin_ok(Method::GET, "/internal/channels", None).await;
    assert!(!listed["channels"].as_array().unwrap().iter().any(|channel| channel["channel"] == "rescue"), "{listed}");
    assert_eq!(routed.chat(json!({}), "after-removal").await.status(), 502, "gone from routing");
    // Every request was charged once or not at all.
    assert_eq!(routed.usage_rows().await.iter().filter(|row| money(&row["amount"]) != Money::ZERO).count(), 3);
    routed.stop().await;
}
