//! Serving one listener, with bounds on its connections. `axum::serve` runs hyper without a
//! timer, so a connection that sent half a request head, or nothing, or sat idle between
//! requests was held for ever, and any number of them could be open. Here:
//!
//! - open connections are capped (`limits.connections_max`, and optionally per client address,
//!   `limits.connections_per_address_max`): past the cap an accepted socket is closed at once,
//!   unanswered, and counted in `tollgate_connections_refused_total{reason}`;
//! - a connection with no request in flight for `limits.header_read_timeout_ms` is closed:
//!   HTTP/1 by hyper's header-read timer, and any connection (one that never sends a byte, one
//!   still sending the HTTP/2 preface, an idle HTTP/2 one) by a watch of its requests in flight;
//! - HTTP/2 connections are pinged, and their concurrent streams bounded;
//! - every request carries its peer's address as `ConnectInfo<SocketAddr>`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{Builder, UpgradeableConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LimitsConfig;

/// HTTP/2 connections are pinged this often, so a peer that vanished is noticed...
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and closed when a ping goes unanswered this long.
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests in flight at once on one HTTP/2 connection (hyper's default is 200); more are
/// refused with `REFUSED_STREAM`, which clients retry.
const HTTP2_STREAMS_MAX: u32 = 100;
/// After an accept error that is not one connection's own (EMFILE: out of file descriptors),
/// the pause before accepting again, as axum's: retrying at once would spin on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The bounds one listener keeps (from `[limits]`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// A connection with no request in flight this long is closed (`header_read_timeout_ms`).
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub connections_max: usize,
    /// Open connections from one IP address at most; 0: no such bound.
    pub per_address_max: usize,
}

impl From<&LimitsConfig> for ConnectionLimits {
    fn from(limits: &LimitsConfig) -> Self {
        ConnectionLimits {
            idle_timeout: Duration::from_millis(limits.header_read_timeout_ms),
            connections_max: limits.connections_max,
            per_address_max: limits.connections_per_address_max,
        }
    }
}

type Connection = UpgradeableConnection<'static, TokioIo<TcpStream>, RequestService, TokioExecutor>;

/// Serves `router` on `listener` until `shutdown` fires; then stops accepting and waits for the
/// open connections: idle ones close at once, in-flight requests and streams finish. Dropping
/// the future (the shutdown drain's deadline) closes every connection still open.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnectionLimits, shutdown: CancellationToken) {
    let admission = Admission::new(limits);
    let builder = http_builder(limits.idle_timeout);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                pause_after_accept_error(&error).await;
                continue;
            }
        };
        // Over a bound, the socket is dropped here: closed before a byte is read or written.
        let Some(admitted) = admission.admit(peer.ip()) else { continue };
        no_delay(&stream);
        let (requests, requests_watch) = watch::channel(0);
        let service = RequestService { router: router.clone(), peer, requests: Arc::new(requests) };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        connections.spawn(run_connection(connection, requests_watch, limits.idle_timeout, shutdown.clone(), admitted));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

fn http_builder(idle_timeout: Duration) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    // In hyper 1.12 (proto/h1/conn.rs, `poll_read_head`) this timer starts whenever the
    // connection waits for a request head: after the connection opens, and again when a
    // response is done and the connection goes idle (`State::idle` sets `notify_read` for it).
    // So it bounds a half-sent head and an idle keep-alive connection alike. Without a timer
    // (axum::serve's case) it is off.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(HTTP2_STREAMS_MAX);
    builder
}

/// Serves one connection until it ends, the gateway shuts down, or it has been idle too long.
/// Both of the latter close it gracefully (HTTP/1: after the response in progress; HTTP/2: a
/// GOAWAY, open streams finish); an idle one that is still open `idle_timeout` after that is
/// dropped.
async fn run_connection(connection: Connection, requests: watch::Receiver<usize>, idle_timeout: Duration, shutdown: CancellationToken, admitted: Admitted) {
    let _admitted = admitted;
    let mut connection = pin!(connection);
    let mut idle = pin!(idle_for(requests, idle_timeout));
    let mut closing = false;
    let mut drop_at: Option<Instant> = None;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = &mut idle, if drop_at.is_none() => {
                if !closing {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                drop_at = Some(Instant::now() + idle_timeout);
            }
            () = tokio::time::sleep_until(drop_at.unwrap_or_else(Instant::now)), if drop_at.is_some() => return,
        }
    }
}

/// Returns once the connection has had no request in flight for `timeout` (from its start or
/// its last response's end).
async fn idle_for(mut requests: watch::Receiver<usize>, timeout: Duration) {
    loop {
        let quiet = *requests.borrow_and_update() == 0;
        let changed = requests.changed();
        let changed = if quiet {
            match tokio::time::timeout(timeout, changed).await {
                Ok(changed) => changed,
                Err(_elapsed) => return,
            }
        } else {
            changed.await
        };
        // The service is gone, so the connection is too.
        if changed.is_err() {
            return;
        }
    }
}

async fn pause_after_accept_error(error: &std::io::Error) {
    use std::io::ErrorKind;
    // One connection's own failure (reset before it was accepted): nothing to wait for.
    if matches!(error.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; pausing before the next accept");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Sets TCP_NODELAY: responses go out in small writes (SSE events, a head then a body), and
/// without it each small write after another waits for the client's delayed ACK, up to 40 ms.
/// A socket that refuses is served anyway, only slower.
fn no_delay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
    }
}

/// The router, as hyper calls it for one connection.
#[derive(Clone)]
struct RequestService {
    /// A clone is an `Arc`'s: connections share the route table (axum::serve given a plain
    /// Router rebuilt it per connection, about 18 KB that a long stream kept for its life).
    router: Router,
    peer: SocketAddr,
    /// Requests in flight on this connection, for `idle_for`.
    requests: Arc<watch::Sender<usize>>,
}

impl hyper::service::Service<Request<Incoming>> for RequestService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let in_flight = RequestInFlight::begin(&self.requests);
        let mut router = self.router.clone();
        Box::pin(async move {
            let response = tower_service::Service::call(&mut router, request).await?;
            Ok(response.map(|body| TrackedBody { body, _in_flight: in_flight }))
        })
    }
}

/// Counts a request in flight from its head until its response body is done or dropped.
struct RequestInFlight(Arc<watch::Sender<usize>>);

impl RequestInFlight {
    fn begin(requests: &Arc<watch::Sender<usize>>) -> RequestInFlight {
        requests.send_modify(|count| *count += 1);
        RequestInFlight(Arc::clone(requests))
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// A response body that keeps its request counted in flight until it is done: a stream may
/// run for minutes after its handler returned.
struct TrackedBody {
    body: Body,
    _in_flight: RequestInFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Who may open one more connection: a slot under `connections_max` and, when bounded, one
/// under `per_address_max` for the peer's address.
struct Admission {
    connections: Arc<Semaphore>,
    per_address_max: usize,
    /// Open connections by address (only addresses with one open); a std mutex, held for a
    /// map update only.
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    fn new(limits: ConnectionLimits) -> Admission {
        Admission {
            connections: Arc::new(Semaphore::new(limits.connections_max.min(Semaphore::MAX_PERMITS))),
            per_address_max: limits.per_address_max,
            per_address: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A connection's admission, or `None` (counted) when it is over a bound.
    fn admit(&self, address: IpAddr) -> Option<Admitted> {
        let address_slot = match self.per_address_max {
            0 => None,
            max => match AddressSlot::take(&self.per_address, address.to_canonical(), max) {
                Some(slot) => Some(slot),
                None => return refuse("per_address"),
            },
        };
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            return refuse("connections_max");
        };
        metrics::gauge!("tollgate_connections_open").increment(1.0);
        Some(Admitted { _permit: permit, _address_slot: address_slot })
    }
}

fn refuse(reason: &'static str) -> Option<Admitted> {
    // Counted, not logged: a flood would flood the log too.
    metrics::counter!("tollgate_connections_refused_total", "reason" => reason).increment(1);
    None
}

/// An open connection's place under the bounds, given back when it closes.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _address_slot: Option<AddressSlot>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!("tollgate_connections_open").decrement(1.0);
    }
}

struct AddressSlot {
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl AddressSlot {
    fn take(per_address: &Arc<Mutex<HashMap<IpAddr, usize>>>, address: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = per_address.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(address).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { per_address: Arc::clone(per_address), address })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.per_address.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limits(per_address_max: usize) -> ConnectionLimits {
        ConnectionLimits { idle_timeout: Duration::from_secs(10), connections_max: 3, per_address_max }
    }

    /// Handlers (the failed-authentication bound, logs) read the client's address from the
    /// request; both listeners are served by `serve`.
    #[tokio::test]
    async fn each_request_carries_its_peer_address() {
        let router = Router::new().route("/", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(serve(listener, router, limits(0), shutdown.clone()));
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let peer = stream.local_addr().unwrap().to_string();
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with(&peer), "{response} (client {peer})");
        shutdown.cancel();
        serving.await.unwrap();
    }

    #[test]
    fn an_address_at_its_bound_is_refused_until_one_of_its_connections_closes() {
        let admission = Admission::new(limits(2));
        let (first, second) = (IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)), IpAddr::from(Ipv4Addr::new(192, 0, 2, 2)));
        let first_one = admission.admit(first).expect("first connection");
        let _first_two = admission.admit(first).expect("second connection");
        assert!(admission.admit(first).is_none(), "a third from one address");
        let second_one = admission.admit(second).expect("another address");
        assert!(admission.admit(second).is_none(), "connections_max (3) reached");
        drop(first_one);
        let _first_three = admission.admit(first).expect("a slot came back");
        drop(second_one);
        assert_eq!(admission.per_address.lock().unwrap().get(&second), None, "an address with nothing open is forgotten");
    }
}
