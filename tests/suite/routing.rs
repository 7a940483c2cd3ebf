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
        let shutdown = CancellationToken::new();
        let primary = Upstream::start(&shutdown).await;
        let backup = Upstream::start(&shutdown).await;
        let dir = TempDir::new();
        let database_url = test_database_url(&dir).await;
        let gateway = routed_gateway(&primary, &backup, dir, database_url, adjust).await;
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
        let listed = self.gateway.admin_ok(Method::GET, "/internal/channels", None).await;
        listed["channels"].as_array().unwrap().iter().find(|channel| channel["model"] == MODEL && channel["channel"] == name).unwrap().clone()
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
async fn routed_gateway(primary: &Upstream, backup: &Upstream, dir: TempDir, database_url: String, adjust: impl FnOnce(&mut tollgate_gateway::GatewayConfig)) -> TestGateway {
    let (primary_url, backup_url) = (format!("{}/v1", primary.base), format!("{}/v1", backup.base));
    let gateway = TestGateway::start_on(dir, database_url, |config| {
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
    let routed = Routed::start(|config| {
        config.routing.breaker_failures = 2;
        config.routing.breaker_open_ms = 400;
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

    // Its time come, one request probes it; still failing, it opens again and the probe's
    // request is served by the backup.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(routed.chat(json!({}), "probe-fails").await.status(), 200);
    assert_eq!(routed.counts().await, (3, 4));
    assert_eq!(routed.channel("primary").await["breaker"], "open");
    assert_eq!(routed.chat(json!({}), "open-again").await.status(), 200);
    assert_eq!(routed.counts().await, (3, 5));

    // Healed: the next probe succeeds and closes it; the primary serves again.
    routed.primary.behave(json!({})).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(routed.chat(json!({}), "probe-succeeds").await.status(), 200);
    assert_eq!(routed.counts().await, (4, 5));
    assert_eq!(routed.channel("primary").await["breaker"], "closed");
    assert_eq!(routed.chat(json!({}), "closed").await.status(), 200);
    assert_eq!(routed.counts().await, (5, 5));
    assert_eq!(routed.usage_rows().await.len(), 7, "every request charged once");
    routed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_channel_times_out_to_the_next_and_retry_after_keeps_a_channel_out() {
    let routed = Routed::start(|config| config.routing.attempt_first_byte_timeout_ms = Some(300)).await;
    routed.primary.behave(json!({"latency_ms": 3_000})).await;
    let started = std::time::Instant::now();
    assert_eq!(routed.chat(json!({"stream": true}), "slow-1").await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(2_500), "did not wait for the slow channel");
    let attempts = routed.attempts("slow-1").await;
    assert_eq!(attempts[0]["error"], "timeout");
    assert_eq!(attempts[1]["channel"], "backup");

    // 429 with Retry-After: 1 s — the channel is left out until then, for every request.
    routed.primary.behave(json!({"fail_status": 429, "retry_after_secs": 1})).await;
    let primary_before = routed.primary.requests().await;
    assert_eq!(routed.chat(json!({}), "limited-1").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 1);
    assert!(routed.channel("primary").await["retry_after_until"].is_string());
    assert_eq!(routed.chat(json!({}), "limited-2").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 1, "left out while its Retry-After runs");
    routed.primary.behave(json!({})).await;
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(routed.chat(json!({}), "limited-3").await.status(), 200);
    assert_eq!(routed.primary.requests().await, primary_before + 2, "back once it passed");
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

/// Services mode: two gateways share their breakers through Redis and their channel states
/// through the ledger — failures seen by one keep the other off the channel, an operator's
/// word given to one reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_their_breakers_and_channel_states() {
    let redis_url = std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let database_url = fresh_postgres_database().await;
    let shutdown = CancellationToken::new();
    let (primary, backup) = (Upstream::start(&shutdown).await, Upstream::start(&shutdown).await);
    let prefix = unique_name("t");
    let shared = |config: &mut tollgate_gateway::GatewayConfig, run_worker: bool| {
        config.redis_url = Some(redis_url.clone());
        config.redis_prefix = prefix.clone();
        config.run_worker = run_worker;
        config.routing.breaker_failures = 2;
        config.routing.breaker_open_ms = 60_000;
        config.routing.breaker_sync_ms = 100;
    };
    let first = routed_gateway(&primary, &backup, TempDir::new(), database_url.clone(), |config| shared(config, true)).await;
    let second = routed_gateway(&primary, &backup, TempDir::new(), database_url, |config| shared(config, false)).await;
    let account = first.account("1", json!({})).await;
    let key = first.key(&account, json!({})).await;
    let chat = |gateway: &TestGateway| {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "route me"}]});
        gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&body).send()
    };
    let breaker_on = |gateway: &TestGateway, channel: &'static str| {
        let request = gateway.http.get(format!("{}/internal/channels", gateway.url)).bearer_auth(ADMIN_TOKEN).send();
        async move {
            let listed: Value = request.await.unwrap().json().await.unwrap();
            listed["channels"].as_array().unwrap().iter().find(|entry| entry["channel"] == channel).unwrap().clone()
        }
    };

    // The primary fails twice through the first gateway: its breaker opens, in Redis too.
    primary.behave(json!({"fail_status": 500})).await;
    for _ in 0..2 {
        assert_eq!(chat(&first).await.unwrap().status(), 200);
    }
    assert_eq!(breaker_on(&first, "primary").await["breaker"], "open");
    let started = std::time::Instant::now();
    while breaker_on(&second, "primary").await["breaker"] != "open" {
        assert!(started.elapsed() < Duration::from_secs(5), "the second gateway never learned the breaker opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second, which never saw a failure, leaves the primary alone.
    let primary_before = primary.requests().await;
    assert_eq!(chat(&second).await.unwrap().status(), 200);
    assert_eq!(primary.requests().await, primary_before);

    // An operator disables the backup through the first; the second hears of it.
    first.admin_ok(Method::POST, &format!("/internal/channels/{MODEL}/backup/disable"), None).await;
    let started = std::time::Instant::now();
    while breaker_on(&second, "backup").await["enabled"] != false {
        assert!(started.elapsed() < Duration::from_secs(5), "the second gateway never learned the backup was disabled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing left to serve: refused before any hold, on either gateway.
    let backup_before = backup.requests().await;
    for gateway in [&first, &second] {
        let response = chat(gateway).await.unwrap();
        assert_eq!(response.status(), 502);
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!((primary.requests().await, backup.requests().await), (primary_before, backup_before));
    first.assert_ledger_sound(&account).await;
    second.stop().await;
    first.stop().await;
}
