//! Connections without a deadline (issue 21 item 1): a client that sends half a request head,
//! nothing at all, or nothing more after a response, is disconnected after
//! `limits.header_read_timeout_ms`; past `limits.connections_max` (or the per-address bound) a
//! new connection is closed unanswered and counted. Raw sockets, so the bytes on the wire are
//! what is checked.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// How long a connection the gateway should close may take to be closed: far above the
/// timeouts set here, so a loaded machine makes the test slow, not red; far below "for ever".
const CLOSE_BOUND: Duration = Duration::from_secs(10);

const HEALTH_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// A gateway that closes a connection with no request in flight after half a second.
async fn impatient_gateway() -> TestGateway {
    TestGateway::start_with(|config| config.limits.header_read_timeout_ms = 500).await
}

/// Opens a connection, sends `bytes` and nothing more, and reads until the gateway closes it.
async fn closed_after_sending(gateway: &TestGateway, bytes: &[u8], what: &str) -> Vec<u8> {
    let mut stream = connect(gateway).await;
    stream.write_all(bytes).await.unwrap();
    read_until_closed(&mut stream, what).await
}

async fn connect(gateway: &TestGateway) -> TcpStream {
    TcpStream::connect(gateway.url.trim_start_matches("http://")).await.unwrap()
}

/// Reads until the gateway closes the connection (end of stream or a reset); what it sent
/// before. Fails if it is still open after [`CLOSE_BOUND`].
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let reading = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
            }
        }
    };
    if tokio::time::timeout(CLOSE_BOUND, reading).await.is_err() {
        panic!("{what}: the connection is still open after {CLOSE_BOUND:?}");
    }
    received
}

/// One HTTP/1.1 response (head and `Content-Length` body) read off a kept-alive connection;
/// `None` when the gateway closed the connection instead of answering.
async fn read_response(stream: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        match tokio::time::timeout(CLOSE_BOUND, stream.read(&mut buffer)).await.expect("no response and no close") {
            Ok(0) | Err(_) => return None,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
    let length: usize = head.lines().find_map(|line| line.strip_prefix("content-length:")).expect("a content-length").trim().parse().unwrap();
    while received.len() < head_end + length {
        let read = tokio::time::timeout(CLOSE_BOUND, stream.read(&mut buffer)).await.expect("the body").unwrap();
        assert!(read > 0, "closed mid-body");
        received.extend_from_slice(&buffer[..read]);
    }
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// A connection the gateway admitted and answered on, kept open (idle, keep-alive). A
/// connection refused because a slot is not free yet (a client's close not yet seen) is retried.
async fn served_connection(gateway: &TestGateway) -> TcpStream {
    let started = std::time::Instant::now();
    loop {
        let mut stream = connect(gateway).await;
        if stream.write_all(HEALTH_REQUEST).await.is_ok()
            && let Some(response) = read_response(&mut stream).await
        {
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            return stream;
        }
        assert!(started.elapsed() < WAIT_BOUND, "no connection served within {WAIT_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tollgate_connections_refused_total{reason}` read through an open connection (a new one
/// would be refused while the cap is full); 0 before the first refusal.
async fn refusals(stream: &mut TcpStream, reason: &str) -> u64 {
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let response = read_response(stream).await.expect("metrics answered");
    let series = format!("tollgate_connections_refused_total{{reason=\"{reason}\"}} ");
    response.lines().find_map(|line| line.strip_prefix(&series)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_is_disconnected_after_the_header_read_timeout() {
    let gateway = impatient_gateway().await;
    let received = closed_after_sending(&gateway, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", "half a request head").await;
    assert!(received.is_empty() || received.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&received));
    gateway.stop().await;
}

/// A connection that never sends a byte is not yet HTTP/1 or HTTP/2 (the server waits for the
/// HTTP/2 preface to tell), so no HTTP/1 timer covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_disconnected_after_the_header_read_timeout() {
    let gateway = impatient_gateway().await;
    assert!(closed_after_sending(&gateway, b"", "a silent connection").await.is_empty());
    gateway.stop().await;
}

/// HTTP/2 (prior knowledge): the preface and SETTINGS, then no request. The gateway's pings
/// alone would not close it (a live client answers them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_disconnected_after_the_header_read_timeout() {
    let gateway = impatient_gateway().await;
    // The preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let received = closed_after_sending(&gateway, preface, "an idle HTTP/2 connection").await;
    // The gateway spoke HTTP/2 (its SETTINGS frame first), then went away.
    assert_eq!(received.get(3), Some(&4), "{received:?}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_disconnected_after_the_header_read_timeout() {
    let gateway = impatient_gateway().await;
    let mut stream = connect(&gateway).await;
    stream.write_all(HEALTH_REQUEST).await.unwrap();
    let response = read_response(&mut stream).await.expect("an answer");
    assert!(response.starts_with("HTTP/1.1 200") && !response.to_lowercase().contains("connection: close"), "{response}");
    assert!(read_until_closed(&mut stream, "an idle keep-alive connection").await.is_empty());
    gateway.stop().await;
}

/// The idle bound counts from a response's end: a stream that runs four times longer than it
/// is not cut, and its connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_header_read_timeout_is_not_cut() {
    let gateway = impatient_gateway().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = chat_body("take your time");
    body["stream"] = json!(true);
    body["mock"] = json!({"output_tokens": 40, "chunk_interval_ms": 50});
    let response = gateway.chat(&key, body, None).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches(" hello").count(), 40);
    gateway.stop().await;
}

/// The cap: `connections_max` idle connections open, the next is closed unanswered and
/// counted; once one closes, a new connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_connections_max_a_connection_is_closed_unanswered_and_counted() {
    let gateway = TestGateway::start_with(|config| config.limits.connections_max = 4).await;
    assert_refused_over(gateway, 4, "connections_max").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_connections_per_address_max_a_connection_is_closed_unanswered_and_counted() {
    let gateway = TestGateway::start_with(|config| config.limits.connections_per_address_max = 2).await;
    assert_refused_over(gateway, 2, "per_address").await;
}

async fn assert_refused_over(mut gateway: TestGateway, bound: usize, reason: &str) {
    // The harness's client keeps the connection it set prices on: close it.
    gateway.http = reqwest::Client::new();
    let mut open = Vec::new();
    for _ in 0..bound {
        open.push(served_connection(&gateway).await);
    }
    let before = refusals(&mut open[0], reason).await;
    let mut over = connect(&gateway).await;
    // The gateway may close before the request is written (then the write fails); either way
    // not a byte of an answer comes back.
    let _ = over.write_all(HEALTH_REQUEST).await;
    let received = read_until_closed(&mut over, "a connection over the bound").await;
    assert!(received.is_empty(), "answered over the bound: {}", String::from_utf8_lossy(&received));
    assert!(refusals(&mut open[0], reason).await > before, "the refusal is counted under reason={reason}");
    open.truncate(bound - 1);
    drop(served_connection(&gateway).await);
    drop(open);
    gateway.stop().await;
}
