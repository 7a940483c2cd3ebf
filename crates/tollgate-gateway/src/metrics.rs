//! The Prometheus recorder, installed once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide handle; the first call installs the recorder.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a test harness); metrics then go
            // there and this handle renders nothing, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    /// Every `tollgate_*` metric the shipped alert rules (docs/alerts.yml) use is one some
    /// crate records: a renamed metric must not silently disarm an alert.
    #[test]
    fn alert_rules_name_only_metrics_that_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let rules = std::fs::read_to_string(root.join("docs/alerts.yml")).unwrap();
        let mut sources = String::new();
        let mut pending = vec![root.join("crates")];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    sources.push_str(&std::fs::read_to_string(path).unwrap());
                }
            }
        }
        let named: Vec<&str> = rules
            .split(|character: char| !(character.is_ascii_alphanumeric() || character == '_'))
            .filter(|word| word.starts_with("tollgate_"))
            .collect();
        assert!(named.len() >= 8, "the rules name the metrics they watch: {named:?}");
        for metric in named {
            assert!(sources.contains(&format!("\"{metric}\"")), "docs/alerts.yml names {metric}, which no crate records");
        }
    }
}
