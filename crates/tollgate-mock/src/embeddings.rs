//! OpenAI Embeddings: `POST /v1/embeddings`.
//!
//! Each input gets a deterministic 8-dimensional vector derived from a hash
//! of the input. `encoding_format: "base64"` is honoured (little-endian f32).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::SharedState;
use crate::common::{
    ApiError, Behaviour, Flavor, MockOverrides, bad_body, json_response, json_string, next_id,
    truncated_json_response,
};
use tollgate_core::tokens::{count_text, encoding_for_model};

const F: Flavor = Flavor::OpenAi;
const REQUEST_ID: &str = "x-request-id";
/// Dimensions of every embedding.
pub(crate) const DIMS: usize = 8;
/// OpenAI's limit on inputs per request.
const MAX_INPUTS: usize = 2048;

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    mock: Option<MockOverrides>,
}

/// One input: text, or pre-tokenised ids.
enum Input<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

fn inputs(input: &Value) -> Result<Vec<Input<'_>>, &'static str> {
    const MSG: &str = "input: expected a string, an array of strings, or token arrays";
    let is_token = |v: &Value| v.as_u64().is_some();
    match input {
        Value::String(s) => Ok(vec![Input::Text(s)]),
        Value::Array(items) if items.is_empty() => Err("input: must not be empty"),
        Value::Array(items) if items.iter().all(is_token) => Ok(vec![Input::Tokens(items)]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(toks) if toks.iter().all(is_token) => Ok(Input::Tokens(toks)),
                _ => Err(MSG),
            })
            .collect(),
        _ => Err(MSG),
    }
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic vector in [-1, 1)^8; every component is exactly
/// representable as an `f32`.
pub(crate) fn vector_for_seed(seed: u64) -> [f32; DIMS] {
    let mut state = seed;
    let mut out = [0f32; DIMS];
    for v in &mut out {
        let bits = (splitmix64(&mut state) >> 40) as u32; // 24 bits
        *v = (f64::from(bits) / f64::from(1u32 << 23) - 1.0) as f32;
    }
    out
}

fn seed(input: &Input<'_>) -> u64 {
    match input {
        Input::Text(s) => fnv1a(FNV_OFFSET, s.as_bytes()),
        Input::Tokens(toks) => toks.iter().fold(fnv1a(FNV_OFFSET, b"tokens"), |h, t| {
            fnv1a(h, &t.as_u64().unwrap_or(0).to_le_bytes())
        }),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8], out: &mut String) {
    for chunk in bytes.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sym = |shift: u32| char::from(B64[((n >> shift) & 63) as usize]);
        out.push(sym(18));
        out.push(sym(12));
        out.push(if chunk.len() > 1 { sym(6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(0) } else { '=' });
    }
}

pub(crate) async fn embeddings(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: EmbeddingsRequest = serde_json::from_slice(&body).map_err(|e| bad_body(F, &e))?;
    let behaviour = Behaviour::resolve(&state.config, &headers, state.overrides_for(req.mock), F)?;
    behaviour.check_api_key(crate::common::bearer_token(&headers), F)?;
    behaviour.check_injected_failure(F)?;
    let items = inputs(&req.input).map_err(|msg| ApiError::bad_request(F, msg))?;
    if items.len() > MAX_INPUTS {
        return Err(ApiError::bad_request(
            F,
            format!("input: at most {MAX_INPUTS} inputs per request"),
        ));
    }
    let base64_format = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                F,
                format!("encoding_format: expected \"float\" or \"base64\", got {other:?}"),
            ));
        }
    };

    let enc = encoding_for_model(&req.model);
    let prompt_tokens = items
        .iter()
        .map(|i| match i {
            Input::Text(s) => count_text(enc, s),
            Input::Tokens(t) => t.len() as u64,
        })
        .fold(0u64, u64::saturating_add);

    let mut out = String::with_capacity(128 + items.len() * 160);
    out.push_str(r#"{"object":"list","data":["#);
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"object":"embedding","index":{index},"embedding":"#
        );
        let vector = vector_for_seed(seed(item));
        if base64_format {
            let mut raw = [0u8; DIMS * 4];
            for (dst, v) in raw.chunks_mut(4).zip(vector) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            out.push('"');
            base64(&raw, &mut out);
            out.push('"');
        } else {
            out.push('[');
            for (i, v) in vector.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{v}");
            }
            out.push(']');
        }
        out.push('}');
    }
    let _ = write!(out, r#"],"model":{}"#, json_string(&req.model));
    if !behaviour.omit_usage {
        match &behaviour.usage_override {
            Some(u) => {
                let _ = write!(out, r#","usage":{u}"#);
            }
            None => {
                let _ = write!(
                    out,
                    r#","usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}"#
                );
            }
        }
    }
    out.push('}');

    behaviour.first_byte_delay().await;
    let id = next_id("emb-mock-");
    Ok(if behaviour.fail_after_chunks.is_some() {
        truncated_json_response(out, REQUEST_ID, &id)
    } else {
        json_response(out, REQUEST_ID, &id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        let enc = |b: &[u8]| {
            let mut s = String::new();
            base64(b, &mut s);
            s
        };
        assert_eq!(enc(b""), "");
        assert_eq!(enc(b"f"), "Zg==");
        assert_eq!(enc(b"fo"), "Zm8=");
        assert_eq!(enc(b"foo"), "Zm9v");
        assert_eq!(enc(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn vectors_are_deterministic_and_distinct() {
        let a = vector_for_seed(seed(&Input::Text("a")));
        let a2 = vector_for_seed(seed(&Input::Text("a")));
        let b = vector_for_seed(seed(&Input::Text("b")));
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
