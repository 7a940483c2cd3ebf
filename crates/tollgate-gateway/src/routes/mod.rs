//! Handlers: extract, call the service, shape the answer.

pub mod admin;
pub mod client;
pub mod ops;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;

/// Parses an optional RFC 3339 query parameter.
///
/// # Errors
/// `InvalidRequest` naming the parameter.
pub fn time_param(name: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .map(|text| {
            OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|_| ApiError::InvalidRequest(format!("{name} must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z")))
        })
        .transpose()
}
