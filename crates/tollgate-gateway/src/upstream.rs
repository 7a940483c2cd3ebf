//! Upstream providers and the model routes that lead to them.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tollgate_protocol::Protocol;

use crate::config::{ClientFileReferences, ClientUrls, GatewayConfig, ProviderKind};
use crate::routing::breaker::BreakerPolicy;
use crate::routing::{Channel, ChannelSpec, Route, SharedChannels};
use tollgate_store::model::{AddedChannel, ChannelState};

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

/// A model as configured: its price provider, its configured channels, its session lock.
struct ConfiguredModel {
    model: String,
    provider: Provider,
    /// The name the upstream knows the model by, unless a channel says otherwise.
    upstream_model: String,
    channels: Vec<ChannelSpec>,
    session_lock: crate::config::SessionLockMode,
}

/// Why a channel cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum AddedChannelError {
    #[error("the model is not routed")]
    ModelNotRouted,
    #[error("{0}")]
    Invalid(String),
}

/// The routing table: the configured channels of each model and those operators added
/// (`/internal/channels`), rebuilt on every change; a request keeps the route it started with.
pub struct Upstreams {
    providers: HashMap<String, Provider>,
    configured: Vec<ConfiguredModel>,
    routes: RwLock<Arc<HashMap<String, Arc<Route>>>>,
    policy: BreakerPolicy,
    shared: Option<SharedChannels>,
    /// One reload at a time, from the ledger's read to the new table: two at once could let
    /// the older read land last.
    reloading: tokio::sync::Mutex<()>,
}

impl Upstreams {
    /// # Errors
    /// A provider whose `api_key_env` names a variable that is not set.
    pub fn from_config(config: &GatewayConfig, shared: Option<SharedChannels>) -> Result<Upstreams, String> {
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
        let mut configured = Vec::new();
        for route in &config.models {
            let provider = provider_named(&route.provider, &route.model)?;
            let upstream_model = route.upstream_model.clone().unwrap_or_else(|| route.model.clone());
            let channels = if route.channels.is_empty() {
                vec![ChannelSpec {
                    name: route.provider.clone(),
                    provider: provider.clone(),
                    upstream_model: upstream_model.clone(),
                    priority: 0,
                    weight: 1,
                    concurrent_requests_max: None,
                    rates: crate::routing::rate::RateLimits::default(),
                    enabled: true,
                    added: false,
                }]
            } else {
                route
                    .channels
                    .iter()
                    .map(|channel| {
                        Ok(ChannelSpec {
                            name: channel.name.clone().unwrap_or_else(|| channel.provider.clone()),
                            provider: provider_named(&channel.provider, &route.model)?,
                            upstream_model: channel.upstream_model.clone().unwrap_or_else(|| upstream_model.clone()),
                            priority: channel.priority,
                            weight: channel.weight,
                            concurrent_requests_max: channel.concurrent_requests_max,
                            rates: channel.limits().rates(),
                            enabled: !channel.disabled,
                            added: false,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?
            };
            configured.push(ConfiguredModel { model: route.model.clone(), provider, upstream_model, channels, session_lock: route.session_lock });
        }
        let routing = &config.routing;
        let policy = BreakerPolicy {
            failures: routing.breaker_failures,
            window_ms: i64::try_from(routing.breaker_window_ms).unwrap_or(i64::MAX),
            open_ms: i64::try_from(routing.breaker_open_ms).unwrap_or(i64::MAX),
        };
        let upstreams = Upstreams { providers, configured, routes: RwLock::default(), policy, shared, reloading: tokio::sync::Mutex::new(()) };
        upstreams.apply(&[], &[]);
        Ok(upstreams)
    }

    pub fn route(&self, model: &str) -> Option<Arc<Route>> {
        self.table().get(model).cloned()
    }

    fn table(&self) -> Arc<HashMap<String, Arc<Route>>> {
        // Replaced whole, never changed in place: a poisoned lock still holds a whole table.
        Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The channel an operator asks to add to `model`, checked as a configured one would be.
    ///
    /// # Errors
    /// The model is not routed; a field is invalid ([`crate::config::check_channel`]), the
    /// provider is unknown or speaks another protocol, or the name is taken by a configured
    /// channel of the model.
    pub fn added_spec(&self, added: &AddedChannel) -> Result<ChannelSpec, AddedChannelError> {
        let model = self.configured.iter().find(|model| model.model == added.model).ok_or(AddedChannelError::ModelNotRouted)?;
        let limits = crate::config::ChannelLimits {
            concurrent_requests_max: added.concurrent_requests_max,
            requests_per_minute_max: added.requests_per_minute_max,
            tokens_per_minute_max: added.tokens_per_minute_max,
        };
        crate::config::check_channel(&added.channel, added.upstream_model.as_deref(), added.weight, limits)
            .map_err(AddedChannelError::Invalid)?;
        let provider = self.providers.get(&added.provider).ok_or_else(|| AddedChannelError::Invalid(format!("unknown provider {}", added.provider)))?;
        if provider.kind != model.provider.kind {
            return Err(AddedChannelError::Invalid(format!("provider {} speaks another protocol than the model's provider {}", provider.name, model.provider.name)));
        }
        if model.channels.iter().any(|channel| channel.name == added.channel) {
            return Err(AddedChannelError::Invalid(format!("model {} has a configured channel {}", added.model, added.channel)));
        }
        Ok(ChannelSpec {
            name: added.channel.clone(),
            provider: provider.clone(),
            upstream_model: added.upstream_model.clone().unwrap_or_else(|| model.upstream_model.clone()),
            priority: added.priority,
            weight: added.weight,
            concurrent_requests_max: added.concurrent_requests_max,
            rates: limits.rates(),
            enabled: true,
            added: true,
        })
    }

    /// Reads what operators added and set on channels, and rebuilds the routes with it.
    ///
    /// # Errors
    /// The ledger could not be read; the routes stay as they are.
    pub async fn reload(&self, ledger: &dyn tollgate_store::Ledger) -> Result<(), tollgate_store::StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let states = ledger.channel_states().await?;
        let added = ledger.added_channels().await?;
        self.apply(&states, &added);
        Ok(())
    }

    /// Rebuilds every route from the configuration, the channels operators added and what they
    /// set on channels. A channel that did not change keeps its live state (breaker, requests
    /// in flight, `Retry-After`); an added one that no longer fits the configuration (its
    /// provider gone, its name now configured) is left out, with a warning.
    fn apply(&self, states: &[ChannelState], added: &[AddedChannel]) {
        let current = self.table();
        let mut routes = HashMap::new();
        for model in &self.configured {
            let mut specs = model.channels.clone();
            for channel in added.iter().filter(|channel| channel.model == model.model) {
                match self.added_spec(channel) {
                    Ok(spec) => specs.push(spec),
                    Err(error) => tracing::warn!(model = model.model, channel = channel.channel, %error, "an added channel is left out"),
                }
            }
            let kept = current.get(&model.model);
            let channels: Vec<Arc<Channel>> = specs
                .into_iter()
                .map(|spec| {
                    let same = kept.and_then(|route| route.channels.iter().find(|channel| channel.spec.same_as(&spec)));
                    same.cloned().unwrap_or_else(|| {
                        let channel = Channel::new(&model.model, spec);
                        Arc::new(match &self.shared {
                            Some(shared) => channel.with_shared_state(shared.clone()),
                            None => channel,
                        })
                    })
                })
                .collect();
            for channel in &channels {
                let set = states.iter().find(|state| state.model == model.model && state.channel == channel.spec.name);
                channel.set_enabled(set.map_or(channel.spec.enabled, |state| state.enabled));
            }
            let route = Route { model: model.model.clone(), provider: model.provider.clone(), channels, session_lock: model.session_lock };
            routes.insert(model.model.clone(), Arc::new(route));
        }
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
    }

    /// What every breaker obeys.
    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// Every channel of every model, as routed now.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.table().values().flat_map(|route| route.channels.iter().cloned()).collect()
    }

    /// Every routed model, sorted.
    pub fn models(&self) -> Vec<Arc<Route>> {
        let mut routes: Vec<Arc<Route>> = self.table().values().cloned().collect();
        routes.sort_by(|left, right| left.model.cmp(&right.model));
        routes
    }
}
