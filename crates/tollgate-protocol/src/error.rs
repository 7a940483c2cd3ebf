//! Why a request cannot be read for billing. The gateway maps each variant to the contract's
//! status and code (`From<ProtocolError> for ApiError`); the messages reach clients as written.

/// A request the protocol layer refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A field billing needs is missing or malformed; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    /// The URL names something the gateway does not serve (a Gemini method other than
    /// `generateContent` and `streamGenerateContent`, or no method at all).
    #[error("{0}")]
    NotFound(String),
}
