//! The session lock (seed 001): at most one request of a conversation at a time, for the
//! models configured with it (`models.session_lock`): `reject` refuses a second request of a
//! busy session with 409 `session_busy`; `wait` lets it wait for the lock, at most
//! `routing.session_lock_wait_ms`, then refuses it.
//!
//! The lock lives in the hot store beside the account (Redis `SET NX PX` with the holder's
//! token; in embedded mode the process's own map), for `routing.session_lock_ttl_ms`, renewed
//! while its request runs (a stream may run for minutes) and released by compare-and-delete
//! when the request ends; a holder that dies leaves it to expire. Each grant carries a fencing
//! number, larger than any before for the account, handed to the client
//! (`X-Tollgate-Session-Fence`). A hot store that cannot answer lets the request through
//! unlocked (counted): the lock orders a conversation, it does not guard money.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::SessionLockMode;
use crate::error::ApiError;
use crate::state::AppState;

/// The pause between two tries of a waiting request: short at first, longer as it waits.
const WAIT_STEP_MIN: Duration = Duration::from_millis(2);
const WAIT_STEP_MAX: Duration = Duration::from_millis(50);

/// A session lock a request holds until it is dropped.
pub struct SessionLockGuard {
    state: AppState,
    account_id: String,
    session: String,
    token: String,
    pub fence: u64,
    renewal: CancellationToken,
}

/// How the hot store names a session for its lock: a digest of the session key.
pub fn lock_session_name(session_key: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(session_key.as_bytes())[..16])
}

/// Takes the session's lock as `mode` says, or refuses the request.
///
/// # Errors
/// 409 `session_busy` when another request holds it (at once under `reject`, after the wait
/// under `wait`).
pub async fn acquire(state: &AppState, mode: SessionLockMode, account_id: &str, session_key: &str) -> Result<Option<SessionLockGuard>, ApiError> {
    if mode == SessionLockMode::Off {
        return Ok(None);
    }
    let routing = &state.config.routing;
    let session = lock_session_name(session_key);
    let token = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(if mode == SessionLockMode::Wait { routing.session_lock_wait_ms } else { 0 });
    let mut step = WAIT_STEP_MIN;
    let mut waited = false;
    let fence = loop {
        match state.hot.lock_session(account_id, &session, &token, routing.session_lock_ttl_ms).await {
            Ok(Some(fence)) => break fence,
            Ok(None) if Instant::now() + step <= deadline => {
                waited = true;
                tokio::time::sleep(step).await;
                step = (step * 2).min(WAIT_STEP_MAX);
            }
            Ok(None) => {
                metrics::counter!("tollgate_session_lock_total", "result" => "refused").increment(1);
                // The lock goes when the running request ends, which nobody can say: soon.
                return Err(ApiError::SessionBusy { retry_after_secs: 1 });
            }
            Err(error) => {
                metrics::counter!("tollgate_session_lock_total", "result" => "unavailable").increment(1);
                tracing::warn!(account_id, %error, "the session lock could not be taken; the request goes unlocked");
                return Ok(None);
            }
        }
    };
    metrics::histogram!("tollgate_session_lock_acquire_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("tollgate_session_lock_total", "result" => if waited { "waited" } else { "acquired" }).increment(1);
    let renewal = CancellationToken::new();
    let guard = SessionLockGuard { state: state.clone(), account_id: account_id.to_string(), session, token, fence, renewal: renewal.clone() };
    state.tasks.spawn(renew(state.clone(), guard.account_id.clone(), guard.session.clone(), guard.token.clone(), renewal));
    Ok(Some(guard))
}

/// Renews the lock every third of its TTL until cancelled (the request ended).
async fn renew(state: AppState, account_id: String, session: String, token: String, cancelled: CancellationToken) {
    let ttl_ms = state.config.routing.session_lock_ttl_ms;
    let period = Duration::from_millis((ttl_ms / 3).max(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = cancelled.cancelled() => return,
        }
        match state.hot.renew_session_lock(&account_id, &session, &token, ttl_ms).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(account_id, "a session lock expired under its request (released by an operator, or renewals failed); another request may run beside it");
                return;
            }
            Err(error) => tracing::warn!(account_id, %error, "renewing a session lock failed; retried"),
        }
    }
}

impl Drop for SessionLockGuard {
    fn drop(&mut self) {
        self.renewal.cancel();
        let (state, account_id, session, token) = (self.state.clone(), self.account_id.clone(), self.session.clone(), self.token.clone());
        self.state.tasks.spawn(async move {
            if let Err(error) = state.hot.unlock_session(&account_id, &session, Some(&token)).await {
                tracing::warn!(account_id, %error, "releasing a session lock failed; it expires on its own");
            }
        });
    }
}
