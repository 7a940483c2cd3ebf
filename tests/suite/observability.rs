//! What dashboards and alerts read, seen from outside the process: every metric the Grafana
//! dashboard (deploy/grafana) and the alert rules (deploy/prometheus) name is exported by a
//! freshly started gateway binary, the new ones move with traffic, and no series carries an
//! account (the series count stays bounded by models, channels and tiers).

use serde_json::{Value, json};

use crate::common::*;

/// Every `tollgate_*` name in a text (a dashboard's queries, alert expressions).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|character: char| !(character.is_ascii_alphanumeric() || character == '_'))
        .filter(|word| word.starts_with("tollgate_"))
        .map(str::to_string)
        .collect()
}

/// The value of the series `name{labels}` (labels as printed, in any order given here), summed
/// over the series that carry all of them.
fn value(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_read_only_metrics_a_gateway_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/tollgate.json")).unwrap();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let named = metric_names(&format!("{dashboard}\n{rules}"));
    assert!(named.len() >= 30, "the dashboard and the rules name what they read: {named:?}");

    let dir = TempDir::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mock_url = start_mock(tollgate_mock::MockConfig::default(), shutdown.clone()).await;
    let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let config_path = dir.0.join("tollgate.toml");
    let config = format!(
        r#"listen = "127.0.0.1:0"
internal_listen = "127.0.0.1:0"
admin_token = "{admin_token}"
database_url = "sqlite://{}/ledger.db"

[[providers]]
name = "upstream"
kind = "openai"
base_url = "{mock_url}"

[[models]]
model = "gpt"
provider = "upstream"
"#,
        dir.0.display()
    );
    std::fs::write(&config_path, config).unwrap();
    let mut process = start_binary(&config_path, &[]).await;
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str, body: Value| http.request(method, format!("{}{path}", process.internal)).bearer_auth(&admin_token).json(&body).send();
    let scrape = || async { http.get(format!("{}/metrics", process.internal)).send().await.unwrap().text().await.unwrap() };

    let key = binary_customer(&http, &process.internal, &admin_token, "gpt", "acct_metrics").await;

    // Before any traffic, the request families exist at zero (a first event shows in rate()).
    let before = scrape().await;
    assert_eq!(value(&before, "tollgate_tokens_total", &["model=\"gpt\"", "kind=\"output\""]), 0.0, "{before}");
    assert!(before.contains("tollgate_spend_nanos_total{"), "spend starts at zero for the priced tier:\n{before}");

    // One answer, one stream, one refusal, and a reconciliation run (its gauges are its own).
    let chat = |body: Value| http.post(format!("{}/v1/chat/completions", process.public)).bearer_auth(&key).json(&body).send();
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 16});
    assert_eq!(chat(body.clone()).await.unwrap().status(), 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = chat(streamed).await.unwrap();
    assert_eq!(stream.status(), 200);
    stream.text().await.unwrap();
    let mut unrouted = body.clone();
    unrouted["model"] = json!("nowhere");
    assert_eq!(chat(unrouted).await.unwrap().status(), 404);
    assert_eq!(admin(reqwest::Method::POST, "/internal/reconcile", json!({"fix": false})).await.unwrap().status(), 200);

    let exposition = scrape().await;
    let exported = |name: &str| exposition.lines().any(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")));
    let missing: Vec<&String> = named.iter().filter(|name| !exported(name)).collect();
    assert!(missing.is_empty(), "named by the dashboard or the rules but not exported: {missing:?}\n{exposition}");

    // The new families move with what was served.
    assert!(value(&exposition, "tollgate_tokens_total", &["model=\"gpt\"", "kind=\"output\""]) > 0.0);
    assert!(value(&exposition, "tollgate_tokens_total", &["model=\"gpt\"", "kind=\"input\""]) > 0.0);
    assert!(value(&exposition, "tollgate_spend_nanos_total", &["model=\"gpt\"", &format!("customer_type=\"{TIER}\"")]) > 0.0);
    assert_eq!(value(&exposition, "tollgate_request_duration_seconds_count", &["stream=\"true\""]), 1.0);
    assert_eq!(value(&exposition, "tollgate_request_duration_seconds_count", &["stream=\"false\""]), 2.0, "the answer and the refusal");
    assert_eq!(value(&exposition, "tollgate_upstream_first_byte_seconds_count", &["model=\"gpt\"", "channel=\"upstream\""]), 2.0);
    assert_eq!(value(&exposition, "tollgate_requests_total", &["outcome=\"model_not_found\""]), 1.0);
    assert!(value(&exposition, "tollgate_reconciliation_last_run_timestamp_seconds", &[]) > 1.0e9);
    // Histograms are histograms, not summaries: percentiles aggregate across gateways.
    assert!(exposition.contains("tollgate_settle_seconds_bucket{le=\"0.005\"}"), "{exposition}");
    assert!(!exposition.contains("quantile=\""), "no summaries");
    // No series names an account or a key.
    for line in exposition.lines().filter(|line| !line.starts_with('#')) {
        let labels = line.split_once('{').and_then(|(_, rest)| rest.rsplit_once('}')).map_or("", |(labels, _)| labels);
        let names = labels.split("\",").filter_map(|pair| pair.split_once('=')).map(|(name, _)| name.trim_start_matches(','));
        for name in names {
            assert!(!name.contains("account") && !name.contains("key"), "a per-account label {name}: {line}");
        }
        assert!(!labels.contains("acct_metrics") && !labels.contains(&key), "an account's or a key's series: {line}");
    }

    terminate(&mut process.child).await;
    shutdown.cancel();
}
