//! The web console: plain HTML, CSS and JavaScript modules (no build step), embedded in the
//! binary at compile time and served under `/console/`. The pages call the same client and
//! operator APIs as any other client, with the key or token the person types in; the console
//! holds no privilege of its own.
//!
//! `TOLLGATE_CONSOLE_DIR` serves the same files from a directory instead, read at each request,
//! so that the console can be edited without rebuilding; only the files listed here are served
//! either way.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::error::ApiError;

/// Every file of the console: name, media type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../console/index.html")),
    ("console.css", "text/css; charset=utf-8", include_bytes!("../console/console.css")),
    ("console.js", "text/javascript; charset=utf-8", include_bytes!("../console/console.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../console/api.js")),
    ("charts.js", "text/javascript; charset=utf-8", include_bytes!("../console/charts.js")),
];

/// Scripts, styles and requests only from the gateway itself; no inline script, no framing.
/// The console writes data into pages as text, never as markup, and this stops what a bug there
/// could still let through.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /` and `GET /console`: to the console's page.
pub async fn to_console() -> Redirect {
    Redirect::to("/console/")
}

/// `GET /console/`: the page.
pub async fn index() -> Result<Response, ApiError> {
    file("index.html").await
}

/// `GET /console/{file}`.
pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    file(&name).await
}

async fn file(name: &str) -> Result<Response, ApiError> {
    let (name, media_type, embedded) =
        FILES.iter().find(|(known, _, _)| *known == name).ok_or_else(|| ApiError::NotFound(format!("the console has no file {name}")))?;
    let bytes = match std::env::var_os("TOLLGATE_CONSOLE_DIR") {
        Some(directory) => tokio::fs::read(std::path::Path::new(&directory).join(name))
            .await
            .map_err(|error| ApiError::Internal(format!("console file {name} from TOLLGATE_CONSOLE_DIR: {error}")))?,
        None => embedded.to_vec(),
    };
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    // The files change with the binary: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Ok(response)
}
