//! Upstream providers and the model routes that lead to them.

use std::collections::HashMap;

use tollgate_protocol::Protocol;

use crate::config::{ClientFileReferences, ClientUrls, GatewayConfig, ProviderKind};

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

/// Where a model goes.
#[derive(Clone)]
pub struct Route {
    pub model: String,
    pub upstream_model: String,
    pub provider: Provider,
}

/// The routing table, built once from the configuration.
pub struct Upstreams {
    routes: HashMap<String, Route>,
}

impl Upstreams {
    /// # Errors
    /// A provider whose `api_key_env` names a variable that is not set.
    pub fn from_config(config: &GatewayConfig) -> Result<Upstreams, String> {
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
        let mut routes = HashMap::new();
        for route in &config.models {
            let provider = providers
                .get(&route.provider)
                .cloned()
                .ok_or_else(|| format!("model {} routes to unknown provider {}", route.model, route.provider))?;
            let upstream_model = route.upstream_model.clone().unwrap_or_else(|| route.model.clone());
            routes.insert(route.model.clone(), Route { model: route.model.clone(), upstream_model, provider });
        }
        Ok(Upstreams { routes })
    }

    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model)
    }

    /// Every routed model, sorted.
    pub fn models(&self) -> Vec<&Route> {
        let mut routes: Vec<&Route> = self.routes.values().collect();
        routes.sort_by(|left, right| left.model.cmp(&right.model));
        routes
    }
}
