//! Pass-through policy (issue 21 item 9): what a client may have the upstream fetch or open
//! with the operator's account. By default a URL to this machine or a private network and a
//! file in the provider account are refused — 400 `invalid_request` naming the field and the
//! policy, nothing held, nothing sent upstream — and public URLs are served.

use serde_json::{Value, json};
use tollgate_gateway::config::ClientFileReferences;

use crate::common::*;

/// A gateway whose mock provider also serves `demo-gemini`, priced, with the provider's
/// policy adjusted; an account and key.
async fn start(adjust: impl FnOnce(&mut tollgate_gateway::config::ProviderConfig)) -> (TestGateway, String, String) {
    let gateway = TestGateway::start_with(|config| {
        config.models.push(serde_json::from_value(json!({"model": "demo-gemini", "provider": "mock"})).unwrap());
        adjust(&mut config.providers[0]);
    })
    .await;
    gateway.set_prices(&[("demo-gemini", TIER)]).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    (gateway, account, key)
}

/// A request in each protocol whose media part names `url` (OpenAI `image_url`, an Anthropic
/// document's URL source, a Gemini `fileUri`), sent; with the field a refusal names.
async fn send_each_protocol(gateway: &TestGateway, key: &str, url: &str) -> Vec<(&'static str, reqwest::Response)> {
    let openai = json!({"model": "demo-gpt", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]});
    let anthropic = json!({"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": url}}, {"type": "text", "text": "Summarise."}]}]});
    let gemini = json!({"contents": [{"role": "user", "parts": [
        {"fileData": {"mimeType": "application/pdf", "fileUri": url}}, {"text": "Summarise."}]}]});
    vec![
        ("image_url.url", gateway.chat(key, openai, None).await),
        ("source.url", gateway.messages_request(key).json(&anthropic).send().await.unwrap()),
        (
            "fileData.fileUri",
            gateway.http.post(format!("{}/v1beta/models/demo-gemini:generateContent", gateway.url)).header("x-goog-api-key", key).json(&gemini).send().await.unwrap(),
        ),
    ]
}

async fn assert_refused(response: reqwest::Response, field: &str, policy: &str) {
    assert_eq!(response.status(), 400, "{field}");
    let error: Value = response.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(field) && message.contains(policy), "{field}: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_to_private_addresses_are_refused_in_every_protocol_and_nothing_is_held() {
    let (gateway, account, key) = start(|_| {}).await;
    let before = gateway.balance_of(&key).await;
    let upstream_before = gateway.upstream_requests().await;
    for url in ["http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://0x7f.1:8000/v1/models", "http://[::ffff:10.0.0.1]/a.pdf", "http://metadata.google.internal/", "file:///etc/passwd"] {
        for (field, response) in send_each_protocol(&gateway, &key, url).await {
            assert_refused(response, field, "client_urls = \"public_only\"").await;
        }
    }
    assert_eq!(gateway.upstream_requests().await, upstream_before, "nothing reached the upstream");
    assert_eq!(gateway.balance_of(&key).await, before, "nothing charged");
    assert_eq!(gateway.balance(&key).await["held"], "0");
    let statement = gateway.assert_ledger_sound(&account).await;
    assert!(statement["rows"].as_array().unwrap().iter().all(|row| row["kind"] != "usage"), "no usage rows: {statement}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_urls_are_served_in_every_protocol() {
    let (gateway, account, key) = start(|_| {}).await;
    let before = gateway.balance_of(&key).await;
    for (field, response) in send_each_protocol(&gateway, &key, "https://example.com/report.pdf").await {
        assert_eq!(response.status(), 200, "{field}: {}", response.text().await.unwrap_or_default());
    }
    assert!(gateway.balance_of(&key).await < before, "served and charged");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

/// `client_urls = "refuse"` refuses even a public URL; `allow` passes a private one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_policy_can_refuse_all_or_allow_all() {
    let (gateway, _, key) = start(|provider| provider.client_urls = tollgate_gateway::config::ClientUrls::Refuse).await;
    for (field, response) in send_each_protocol(&gateway, &key, "https://example.com/report.pdf").await {
        assert_refused(response, field, "client_urls = \"refuse\"").await;
    }
    gateway.stop().await;
    let (gateway, _, key) = start(|provider| provider.client_urls = tollgate_gateway::config::ClientUrls::Allow).await;
    for (field, response) in send_each_protocol(&gateway, &key, "http://10.0.0.1/report.pdf").await {
        assert_eq!(response.status(), 200, "{field}");
    }
    gateway.stop().await;
}

/// Files in the provider account — an OpenAI or Anthropic `file_id`, a Gemini `gs://` URI — are
/// refused by default and served under `client_file_references = "allow"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_references_follow_the_providers_policy() {
    let openai = json!({"model": "demo-gpt", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-operators-batch-input"}}, {"type": "text", "text": "Read it out."}]}]});
    let anthropic = json!({"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}, {"type": "text", "text": "Describe."}]}]});
    let gemini = json!({"contents": [{"role": "user", "parts": [
        {"fileData": {"mimeType": "text/plain", "fileUri": "gs://operator-backups/ledger.sql"}}, {"text": "Read it out."}]}]});
    for (policy, served) in [(ClientFileReferences::Refuse, false), (ClientFileReferences::Allow, true)] {
        let (gateway, _, key) = start(|provider| provider.client_file_references = policy).await;
        let upstream_before = gateway.upstream_requests().await;
        let responses = [
            ("file.file_id", gateway.chat(&key, openai.clone(), None).await),
            ("source.file_id", gateway.messages_request(&key).json(&anthropic).send().await.unwrap()),
            (
                "fileData.fileUri",
                gateway.http.post(format!("{}/v1beta/models/demo-gemini:generateContent", gateway.url)).header("x-goog-api-key", &key).json(&gemini).send().await.unwrap(),
            ),
        ];
        for (field, response) in responses {
            if served {
                assert_eq!(response.status(), 200, "{field}");
            } else {
                assert_refused(response, field, "client_file_references = \"refuse\"").await;
            }
        }
        let forwarded = gateway.upstream_requests().await - upstream_before;
        assert_eq!(forwarded, if served { 3 } else { 0 });
        assert_eq!(gateway.balance(&key).await["held"], "0");
        gateway.stop().await;
    }
}
