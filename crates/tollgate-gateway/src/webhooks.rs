//! Delivery of the outbox's events as signed webhooks (a leased job: one instance delivers).
//!
//! Each event is POSTed as `{"id", "type", "created_at", "data"}` with
//! `X-Tollgate-Event-Id` (the event's dedupe key, the same on every attempt: receivers
//! deduplicate on it) and `X-Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>" under the secret>`. A 2xx answer delivers the event; anything else is retried
//! with exponential backoff until `attempts_max`. Every attempt is logged in
//! `webhook_deliveries`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use tollgate_store::Ledger;
use tollgate_store::clock::now_ms;
use tollgate_store::operations::{DeliveryAttempt, DeliveryNext, OutboxEvent};
use tollgate_worker::jobs::JobWork;

use crate::config::AlertsConfig;

/// Events read from the outbox per query, and queries per run at most.
const DUE_EVENTS_PER_READ: u32 = 100;
const READS_PER_RUN_MAX: usize = 20;
/// Error text kept per attempt at most.
const ERROR_CHARS_MAX: usize = 300;

/// The `X-Tollgate-Signature` value of `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) else { return format!("t={timestamp},v1=") };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The delivery job's work: drains every due event once per run.
pub fn deliver_work(ledger: Arc<dyn Ledger>, alerts: AlertsConfig) -> Option<JobWork> {
    let (url, secret) = (alerts.webhook_url.clone()?, alerts.webhook_secret.clone()?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(alerts.timeout_ms))
        // The receiver is the URL configured, not wherever it redirects.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok()?;
    let deliverer = Arc::new(Deliverer { ledger, http, alerts, url, secret });
    Some(Arc::new(move || {
        let deliverer = Arc::clone(&deliverer);
        Box::pin(async move { deliverer.drain().await })
    }))
}

struct Deliverer {
    ledger: Arc<dyn Ledger>,
    http: reqwest::Client,
    alerts: AlertsConfig,
    url: String,
    secret: String,
}

impl Deliverer {
    async fn drain(&self) -> Result<String, String> {
        let (mut delivered, mut failed) = (0u64, 0u64);
        for _ in 0..READS_PER_RUN_MAX {
            let due = self.ledger.due_outbox(now_ms(), DUE_EVENTS_PER_READ).await.map_err(|error| error.to_string())?;
            for event in &due {
                match self.deliver(event).await.map_err(|error| error.to_string())? {
                    DeliveryNext::Delivered => delivered += 1,
                    _ => failed += 1,
                }
            }
            if due.len() < DUE_EVENTS_PER_READ as usize {
                break;
            }
        }
        Ok(format!("{delivered} delivered, {failed} attempts failed"))
    }

    async fn deliver(&self, event: &OutboxEvent) -> tollgate_store::StoreResult<DeliveryNext> {
        let attempt = event.attempts + 1;
        let started = Instant::now();
        let attempted_at = now_ms();
        let mut record = DeliveryAttempt { outbox_id: event.id, attempt, url: self.url.clone(), status_code: None, error: None, duration_ms: 0, attempted_at };
        if attempted_at.saturating_sub(event.created_at) > i64::try_from(self.alerts.max_age_ms).unwrap_or(i64::MAX) {
            record.error = Some("expired before it could be delivered (alerts.max_age_ms)".into());
            self.ledger.record_delivery(&record, DeliveryNext::GaveUp).await?;
            metrics::counter!("tollgate_webhook_deliveries_total", "outcome" => "expired").increment(1);
            return Ok(DeliveryNext::GaveUp);
        }
        let body = json!({
            "id": event.dedupe_key,
            "type": event.event_type,
            "created_at": time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.created_at) * 1_000_000)
                .ok()
                .and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok()),
            "data": event.payload,
        })
        .to_string();
        let timestamp = attempted_at / 1_000;
        let sent = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Tollgate-Event", &event.event_type)
            .header("X-Tollgate-Event-Id", &event.dedupe_key)
            .header("X-Tollgate-Signature", signature(&self.secret, timestamp, body.as_bytes()))
            .body(body)
            .send()
            .await;
        let succeeded = match sent {
            Ok(response) => {
                record.status_code = Some(response.status().as_u16());
                response.status().is_success()
            }
            Err(error) => {
                record.error = Some(error.to_string().chars().take(ERROR_CHARS_MAX).collect());
                false
            }
        };
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = if succeeded {
            DeliveryNext::Delivered
        } else if attempt >= self.alerts.attempts_max {
            DeliveryNext::GaveUp
        } else {
            DeliveryNext::RetryAt(now_ms().saturating_add(backoff_ms(&self.alerts, attempt)))
        };
        self.ledger.record_delivery(&record, next).await?;
        let outcome = match next {
            DeliveryNext::Delivered => "delivered",
            DeliveryNext::RetryAt(_) => "retry",
            DeliveryNext::GaveUp => "gave_up",
        };
        metrics::counter!("tollgate_webhook_deliveries_total", "outcome" => outcome).increment(1);
        if next == DeliveryNext::GaveUp {
            tracing::error!(event = event.dedupe_key, attempts = attempt, "webhook given up");
        }
        Ok(next)
    }
}

/// The wait after failed attempt `attempt` (1-based): base, 2×base, 4×base, … up to the maximum.
fn backoff_ms(alerts: &AlertsConfig, attempt: u64) -> i64 {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(u32::MAX).min(32);
    let wait = alerts.retry_base_ms.saturating_mul(1u64 << doublings).min(alerts.retry_max_ms.max(alerts.retry_base_ms));
    i64::try_from(wait).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(secret, b"1700000000." + body, sha256).
        let signed = signature("whsec_0123456789abcdef", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(signed, "t=1700000000,v1=9f5e37cdc7ea587c7c02062d93283cad000d66a831b2a1676418696db47ed6c2");
        assert_ne!(signature("whsec_0123456789abcdef", 1, b"x"), signature("whsec_0123456789abcdef", 2, b"x"), "the timestamp is signed");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let alerts = AlertsConfig { retry_base_ms: 100, retry_max_ms: 1_000, ..AlertsConfig::default() };
        let waits: Vec<i64> = (1..=6).map(|attempt| backoff_ms(&alerts, attempt)).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1_000, 1_000]);
    }
}
