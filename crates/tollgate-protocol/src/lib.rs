//! The client-facing protocols as billing reads them, with no HTTP, store or runtime attached,
//! so the parsers can be tested and fuzzed on their own (see `fuzz/` at the repository root).
//!
//! - [`protocol`]: [`Protocol`], what the OpenAI, Anthropic and Gemini protocols mean for
//!   billing — request facts ([`ParsedRequest`]), the body rewrite for the upstream, usage from
//!   responses, and [`StreamInspector`], which decides each stream event's fate
//!   ([`EventAction`]) and collects usage; [`gemini`] for Google's URL-borne facts.
//! - [`sse`]: [`SseSplitter`], the byte-exact server-sent event splitter streams go through.
//! - [`error`]: [`ProtocolError`], what a request is refused with.

pub mod error;
pub mod protocol;
pub mod sse;

pub use error::ProtocolError;
pub use protocol::{EventAction, OpenAiCapField, ParsedRequest, Protocol, StreamInspector, UpstreamBody, UrlFacts, gemini};
pub use sse::{EventTooLarge, SseEvent, SseSplitter};
