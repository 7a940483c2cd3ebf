//! SIGTERM while 50 streams are open: the gateway stops accepting, lets every stream finish,
//! charges each exactly once, and exits 0 (`tollgate verify` finds nothing lost).

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::*;

const STREAMS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_50_open_streams_lets_all_finish_and_bills_all() {
    let dir = TempDir::new();
    let mock_shutdown = tokio_util::sync::CancellationToken::new();
    let mock_url = start_mock(tollgate_mock::MockConfig::default(), mock_shutdown.clone()).await;
    let database_url = test_database_url(&dir).await;
    let config_path = dir.0.join("tollgate.toml");
    let backend = backend_toml();
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:0\"\ninternal_listen = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\ndatabase_url = \"{database_url}\"\n{backend}\n\
             [[providers]]\nname = \"mock\"\nkind = \"mock\"\nbase_url = \"{mock_url}\"\n\n[[models]]\nmodel = \"demo-gpt\"\nprovider = \"mock\"\n"
        ),
    )
    .unwrap();
    let mut gateway = start_binary(&config_path, &[]).await;
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: String, body: Value| http.request(method, format!("{}{path}", gateway.internal)).bearer_auth(ADMIN_TOKEN).json(&body).send();
    let prices = json!([{"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": "2.5", "output_per_mtok": "10"}]);
    assert_eq!(admin(reqwest::Method::PUT, "/internal/prices".into(), prices).await.unwrap().status(), 200);
    let account = format!("acct_{}", uuid::Uuid::new_v4().simple());
    admin(reqwest::Method::POST, "/internal/accounts".into(), json!({"id": account, "kind": "user", "name": "drain", "customer_type": TIER})).await.unwrap();
    let topup: Value = admin(reqwest::Method::POST, "/internal/topups".into(), json!({"account_id": account, "amount": "10", "reference_id": "drain"})).await.unwrap().json().await.unwrap();
    admin(reqwest::Method::POST, format!("/internal/topups/{}/confirm", topup["id"].as_str().unwrap()), json!({})).await.unwrap();
    let created: Value = admin(reqwest::Method::POST, format!("/internal/accounts/{account}/keys"), json!({"name": "k"})).await.unwrap().json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();

    // 50 streams of 40 chunks, 50 ms apart: each runs about 2 s.
    let mut body = chat_body("drain me");
    body["stream"] = json!(true);
    body["mock"] = json!({"output_tokens": 40, "chunk_interval_ms": 50});
    let mut streams = Vec::new();
    for index in 0..STREAMS {
        let request_id = format!("drain-{index}");
        let response = http
            .post(format!("{}/v1/chat/completions", gateway.public))
            .bearer_auth(&key)
            .header("X-Request-ID", &request_id)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut chunks = response.bytes_stream();
        let first = chunks.next().await.unwrap().unwrap();
        streams.push((request_id, String::from_utf8_lossy(&first).into_owned(), chunks));
    }

    // Every stream is open and has started: now SIGTERM, while they run.
    let pid = gateway.child.id().unwrap();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let readers = streams.into_iter().map(|(request_id, mut received, mut chunks)| {
        tokio::spawn(async move {
            while let Some(chunk) = chunks.next().await {
                received.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
            (request_id, received)
        })
    });
    let mut finished = Vec::new();
    for reader in readers.collect::<Vec<_>>() {
        let (request_id, received) = reader.await.unwrap();
        assert!(received.trim_end().ends_with("data: [DONE]"), "{request_id} did not finish: {received}");
        assert_eq!(received.matches(" hello").count(), 40, "{request_id} lost chunks");
        finished.push(request_id);
    }
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), gateway.child.wait()).await.expect("no exit within 60 s of SIGTERM").unwrap();
    assert_eq!(status.code(), Some(0));

    // Every stream was charged exactly once, and the ledger is sound.
    let charged: String = finished.iter().map(|request_id| format!("{account} {request_id}\n")).collect();
    let charged_path = dir.0.join("charged.txt");
    std::fs::write(&charged_path, charged).unwrap();
    let (code, stdout, stderr) = tollgate(&["verify", "--config", config_path.to_str().unwrap(), "--charged", charged_path.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("charged per the client     {STREAMS}")), "{stdout}");
    mock_shutdown.cancel();
}
