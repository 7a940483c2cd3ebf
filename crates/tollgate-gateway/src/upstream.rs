//! Upstream providers and the model routes that lead to them.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_protocol::Protocol;

use crate::config::{ClientFileReferences, ClientUrls, GatewayConfig, ProviderKind};
use crate::routing::breaker::BreakerPolicy;
use crate::routing::{Channel, ChannelSpec, Route, SharedBreakers};

/// A provider ready to call: its base URL and (resolved once from its env var) API key.
#[derive(Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    /// OpenAI protocol: where the gateway's output cap goes when a client sets none.
    pub openai_cap_field: tollgate_protocol::OpenAiCapField,
    /// What its clients may name for it to fetch or open ([`crate::passthrough`]).
    pub client_file_references: ClientFileReferences,
    pub client_urls: ClientUrls,
    /// Never logged; `Debug` is not derived for this reason.
    api_key: Option<String>,
}

impl Provider {
    /// A provider without credentials, for unit tests of what is built on one.
    #[cfg(test)]
    pub fn for_tests(name: &str, kind: ProviderKind, base_url: &str) -> Provider {
        Provider {
            name: name.into(),
            kind,
            base_url: base_url.into(),
            openai_cap_field: tollgate_protocol::OpenAiCapField::MaxTokens,
            client_file_references: ClientFileReferences::default(),
            client_urls: ClientUrls::default(),
            api_key: None,
        }
    }

    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// The protocol this provider speaks for a client protocol, if it can serve it.
    pub fn serves(&self, protocol: Protocol) -> bool {
        matches!(
            (self.kind, protocol),
            (ProviderKind::Openai | ProviderKind::Mock, Protocol::OpenAiChat | Protocol::OpenAiEmbeddings)
                | (ProviderKind::Anthropic | ProviderKind::Mock, Protocol::AnthropicMessages)
                | (ProviderKind::Gemini | ProviderKind::Vertex | ProviderKind::Mock, Protocol::GeminiGenerate)
        )
    }

    /// Adds this provider's credentials, the way it expects them, to an upstream request.
    pub fn authorize(&self, request: reqwest::RequestBuilder, protocol: Protocol) -> reqwest::RequestBuilder {
        let Some(api_key) = self.api_key() else {
            return request;
        };
        match (self.kind, protocol) {
            (ProviderKind::Anthropic, _) | (ProviderKind::Mock, Protocol::AnthropicMessages) => request.header("x-api-key", api_key),
            (ProviderKind::Gemini, _) | (ProviderKind::Mock, Protocol::GeminiGenerate) => request.header("x-goog-api-key", api_key),
            (ProviderKind::Openai | ProviderKind::Vertex, _)
            | (ProviderKind::Mock, Protocol::OpenAiChat | Protocol::OpenAiEmbeddings) => request.bearer_auth(api_key),
        }
    }
}

/// The routing table, built once from the configuration.
pub struct Upstreams {
    routes: HashMap<String, Arc<Route>>,
    policy: BreakerPolicy,
}

impl Upstreams {
    /// # Errors
    /// A provider whose `api_key_env` names a variable that is not set.
    pub fn from_config(config: &GatewayConfig, shared: Option<SharedBreakers>) -> Result<Upstreams, String> {
        let mut providers = HashMap::new();
        for provider in &config.providers {
            let api_key = match &provider.api_key_env {
                Some(variable) => Some(std::env::var(variable).map_err(|_| {
                    format!("provider {}: environment variable {variable} is not set", provider.name)
                })?),
                None => None,
            };
            providers.insert(
                provider.name.clone(),
                Provider {
                    name: provider.name.clone(),
                    kind: provider.kind,
                    base_url: provider.base_url.trim_end_matches('/').to_string(),
                    openai_cap_field: provider.openai_cap_field(),
                    client_file_references: provider.client_file_references,
                    client_urls: provider.client_urls,
                    api_key,
                },
            );
        }
        let provider_named = |name: &str, model: &str| {
            providers.get(name).cloned().ok_or_else(|| format!("model {model} routes to unknown provider {name}"))
        };
        let mut routes = HashMap::new();
        for route in &config.models {
            let provider = provider_named(&route.provider, &route.model)?;
            let default_upstream_model = route.upstream_model.clone().unwrap_or_else(|| route.model.clone());
            let specs = if route.channels.is_empty() {
                vec![ChannelSpec {
                    name: route.provider.clone(),
                    provider: provider.clone(),
                    upstream_model: default_upstream_model,
                    priority: 0,
                    weight: 1,
                    concurrent_requests_max: None,
                    enabled: true,
                }]
            } else {
                route
                    .channels
                    .iter()
                    .map(|channel| {
                        Ok(ChannelSpec {
                            name: channel.name.clone().unwrap_or_else(|| channel.provider.clone()),
                            provider: provider_named(&channel.provider, &route.model)?,
                            upstream_model: channel.upstream_model.clone().unwrap_or_else(|| default_upstream_model.clone()),
                            priority: channel.priority,
                            weight: channel.weight,
                            concurrent_requests_max: channel.concurrent_requests_max,
                            enabled: !channel.disabled,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?
            };
            let channels = specs
                .into_iter()
                .map(|spec| {
                    let channel = Channel::new(&route.model, spec);
                    Arc::new(match &shared {
                        Some(shared) => channel.with_shared_breaker(shared.clone()),
                        None => channel,
                    })
                })
                .collect();
            routes.insert(route.model.clone(), Arc::new(Route { model: route.model.clone(), provider, channels, session_lock: route.session_lock }));
        }
        let routing = &config.routing;
        let policy = BreakerPolicy {
            failures: routing.breaker_failures,
            window_ms: i64::try_from(routing.breaker_window_ms).unwrap_or(i64::MAX),
            open_ms: i64::try_from(routing.breaker_open_ms).unwrap_or(i64::MAX),
        };
        Ok(Upstreams { routes, policy })
    }

    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(model)
    }

    /// Applies what operators set on channels; a channel without an operator's word is as
    /// configured.
    pub fn apply_channel_states(&self, states: &[tollgate_store::model::ChannelState]) {
        for route in self.routes.values() {
            for channel in &route.channels {
                let set = states.iter().find(|state| state.model == route.model && state.channel == channel.name);
                channel.set_enabled(set.map_or(channel.configured_enabled, |state| state.enabled));
            }
        }
    }

    /// What every breaker obeys.
    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// Every channel of every model.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.routes.values().flat_map(|route| route.channels.iter().cloned()).collect()
    }

    /// Every routed model, sorted.
    pub fn models(&self) -> Vec<&Arc<Route>> {
        let mut routes: Vec<&Arc<Route>> = self.routes.values().collect();
        routes.sort_by(|left, right| left.model.cmp(&right.model));
        routes
    }
}
