//! The Prometheus recorder, installed once per process, and the families the dashboard
//! (deploy/grafana) and the alert rules (deploy/prometheus) read.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tollgate_core::{UsageAnomaly, UsageSource};
use tollgate_store::hot::Refusal;
use tollgate_store::model::PriceRow;

use crate::routing::Route;
use crate::routing::breaker::BreakerState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Bucket bounds of every histogram, in seconds: from a lock taken in half a millisecond to a
/// job of five minutes. Histograms (not summaries) so that percentiles can be aggregated
/// across gateways.
const BUCKETS_SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The process-wide handle; the first call installs the recorder.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            // Fails only on an empty list, which this is not.
            let builder = match builder.set_buckets(BUCKETS_SECONDS) {
                Ok(builder) => builder,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a test harness); metrics then go
            // there and this handle renders nothing, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

const TOKEN_KINDS: &[&str] = &["input", "cached_input", "cache_write", "output", "reasoning"];
const AFFINITY_RESULTS: &[&str] = &["hit", "miss", "pinned_unavailable"];
const SESSION_LOCK_RESULTS: &[&str] = &["acquired", "waited", "refused", "unavailable"];
const LEDGER_CHARGING_STEPS: &[&str] = &["authorize", "settle", "void"];
const WEBHOOK_OUTCOMES: &[&str] = &["delivered", "retry", "gave_up", "expired"];

/// Registers, at zero, every family the dashboard and the rules read, for the label values
/// known at start (routed models and channels, priced tiers): a series that appears only at
/// its first event leaves panels empty and hides that first event from `rate()`. The
/// backlog gauges and the hot store's mode start at 0, their state in embedded mode and until
/// services mode's first reading. The reconciliation's gauges are left to its first run: a
/// zero "last run" would claim one that never happened (and trip the staleness alert).
pub fn register_families(routes: &[std::sync::Arc<Route>], prices: &[PriceRow]) {
    for name in [
        "tollgate_voids_total",
        "tollgate_holds_expired_total",
        "tollgate_hold_exceeded_total",
        "tollgate_hold_exceeded_nanos_total",
        "tollgate_usage_dead_letters_total",
        "tollgate_usage_batch_failures_total",
        "tollgate_stored_responses_pruned_total",
        "tollgate_upstream_attempts_pruned_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for name in ["tollgate_hot_store_mode", "tollgate_usage_stream_lag_entries", "tollgate_usage_pending_entries", "tollgate_usage_dead_letter_entries"] {
        let _registered = metrics::gauge!(name);
    }
    for outcome in ["success", "stream"] {
        metrics::counter!("tollgate_requests_total", "outcome" => outcome).absolute(0);
    }
    for stream in ["true", "false"] {
        let _registered = metrics::histogram!("tollgate_request_duration_seconds", "stream" => stream);
    }
    // Label values from the types that produce them, so a new variant is registered too.
    let usage_sources = UsageSource::ALL.map(UsageSource::as_str);
    let anomalies = UsageAnomaly::ALL.map(UsageAnomaly::as_str);
    for (family, label, values) in [
        ("tollgate_authorize_refused_total", "reason", &Refusal::REASONS[..]),
        ("tollgate_charges_total", "usage_source", &usage_sources[..]),
        ("tollgate_session_lock_total", "result", SESSION_LOCK_RESULTS),
        ("tollgate_ledger_charging_total", "step", LEDGER_CHARGING_STEPS),
        ("tollgate_webhook_deliveries_total", "outcome", WEBHOOK_OUTCOMES),
        ("tollgate_usage_anomalies_total", "kind", &anomalies[..]),
    ] {
        for value in values {
            metrics::counter!(family, label => *value).absolute(0);
        }
    }
    for family in ["tollgate_authorize_seconds", "tollgate_settle_seconds", "tollgate_session_lock_acquire_seconds", "tollgate_usage_batch_seconds"] {
        let _registered = metrics::histogram!(family);
    }
    for route in routes {
        let model = route.model.clone();
        metrics::counter!("tollgate_failovers_total", "model" => model.clone()).absolute(0);
        metrics::counter!("tollgate_no_channel_available_total", "model" => model.clone()).absolute(0);
        for result in AFFINITY_RESULTS {
            metrics::counter!("tollgate_affinity_total", "model" => model.clone(), "result" => *result).absolute(0);
        }
        for kind in TOKEN_KINDS {
            metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => *kind).absolute(0);
        }
        for channel in &route.channels {
            let _registered = metrics::gauge!("tollgate_breaker_open", "model" => model.clone(), "channel" => channel.spec.name.clone());
            for to in BreakerState::LABELS {
                metrics::counter!("tollgate_breaker_transitions_total", "model" => model.clone(), "channel" => channel.spec.name.clone(), "to" => to).absolute(0);
            }
        }
    }
    register_spend(prices);
}

/// The spend series of every priced (model, tier), at zero: at start and when prices change.
pub fn register_spend(prices: &[PriceRow]) {
    for price in prices {
        metrics::counter!("tollgate_spend_nanos_total", "model" => price.model.clone(), "customer_type" => price.customer_type.clone()).absolute(0);
    }
}
