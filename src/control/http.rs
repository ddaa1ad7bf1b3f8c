//! A small HTTP/1.1 server for the control endpoints (the Prometheus metrics today; an admin API with
//! its own listener later): many connections at once on one thread, each bounded in header size and
//! in time, and a bounded number of them.
//!
//! Built on hyper 1 (server, HTTP/1 only), hyper-util (its tokio glue: TokioIo, TokioTimer),
//! http-body-util (whole bodies) and tokio (features rt, net, time: a current-thread runtime on the
//! thread that calls [`serve`]). Why not a small synchronous server such as tiny_http: it spawns a
//! thread per connection and has no read deadline, which is how a slow client held the old
//! one-connection-at-a-time endpoint. hyper's HTTP/1 parser enforces a header size limit and a
//! header-read timeout, and tokio holds hundreds of slow clients on one thread for a few KiB each.
//! The relay shards never touch this: it runs on its own thread.
//!
//! The handler is synchronous and must be cheap (it runs on the server's only thread): it gets the
//! whole request, its body already read (at most [`MAX_BODY_BYTES`]), and returns the whole response.

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::AbortHandle;

/// At most this many connections at once, and at most a sixteenth of the descriptor limit
/// ([`connection_cap`]): each costs a descriptor, which relay sockets need, and a few KiB; a scraper
/// needs one. When another arrives at the cap, a connection of the source holding the most is closed
/// (its oldest not yet answered, else its oldest), so neither idle or slow clients nor one client's
/// many kept-alive connections can lock a scraper from another address out.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// The connection cap for a process allowed `fd_limit` descriptors (at least 8).
pub(crate) fn connection_cap(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 16).unwrap_or(usize::MAX).clamp(8, MAX_CONNECTIONS)
}

/// A request's head (request line and headers) must arrive within this time. A scraper on the same
/// host or network sends it in one packet; a client trickling bytes (slowloris) is cut off here.
/// Also closes a connection idle this long, before its first request or between two.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection is closed this long after it was accepted, whatever it is doing: the bound on a
/// client that reads the response slowly or sends one request after another. Keep-alive stays on
/// within it. Scrapes take milliseconds; a scraper reconnects.
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// The largest request head, in bytes; larger ones get 431. Scrapers and API clients (a bearer token
/// included) send a few hundred bytes.
pub(crate) const MAX_HEADER_BYTES: usize = 8 * 1024;

/// hyper's read and write buffer limit per connection: its minimum (8 KiB), which holds the largest
/// head. It bounds what is buffered, not a response: a body is one chunk, queued whole.
pub(crate) const MAX_BUF_BYTES: usize = 8 * 1024;

/// The largest request body read for the handler; larger ones get 413. JSON requests to an admin
/// API are small; the metrics endpoint takes none.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// The listening socket's accept queue. A burst of connections (hundreds of idle clients at once)
/// waits there for the server, instead of overflowing the 128 of `std::net::TcpListener::bind` and
/// having a scraper's connection attempt dropped and retried only a second later.
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// How often the server checks its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How long accepting pauses after an error (e.g. out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The handler: the whole request in, the whole response out. Runs on the server's thread.
pub(crate) type Handler = dyn Fn(&Request<Bytes>) -> Response<Bytes> + Send + Sync;

/// The error of a request the server drops unanswered.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the server closed a connection that was not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// To admit a new connection past [`MAX_CONNECTIONS`].
    OverLimit,
    /// Still open [`CONNECTION_DEADLINE`] after it was accepted.
    Deadline,
    /// No complete request head within [`HEADER_READ_TIMEOUT`] of connecting (an idle client, or a
    /// slow one), or a head started and not completed in time on a kept-alive connection. (A
    /// kept-alive connection that sends nothing that long after an answer is closed quietly, uncounted.)
    HeaderTimeout,
    /// A request head over [`MAX_HEADER_BYTES`] (answered 431).
    HeaderTooLarge,
}

impl CloseReason {
    /// Every reason, in counter order.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 4] = [Self::OverLimit, Self::Deadline, Self::HeaderTimeout, Self::HeaderTooLarge];
    /// Every reason's metric label, in [`CloseReason::index`] order.
    pub(crate) const NAMES: [&'static str; 4] = ["over_limit", "deadline", "header_timeout", "header_too_large"];

    /// The index of this reason's counter.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

turnpike_proto::counters! {
    /// What the limits did, for the metrics.
    pub struct HttpCounters / HttpTotals {
        /// Connections closed by a limit, by [`CloseReason`].
        closed: counter total "turnpike_http_connections_closed_total"
            "Connections to this endpoint closed by a limit, by reason: over_limit (one of the source holding the most, to admit one past the cap), deadline (open too long), header_timeout (request head too slow), header_too_large (431)."
            [reason: CloseReason::NAMES],
    }
}

impl HttpCounters {
    fn count(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// The open connections, oldest first (ids are given in order of acceptance).
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Open>,
}

struct Open {
    /// Its source ([`crate::policy::peer::source_key`]).
    source: u128,
    /// Set once the connection has been answered.
    served: Arc<AtomicBool>,
    task: AbortHandle,
}

impl Connections {
    /// Takes out the connection to close for a new one at the cap: of the source holding the most
    /// connections (the earliest such on a tie), the oldest not yet answered, or else the oldest.
    fn evict(&mut self) -> Option<(u64, Open)> {
        let mut held: HashMap<u128, usize> = HashMap::new();
        for c in self.open.values() {
            *held.entry(c.source).or_default() += 1;
        }
        let most = self.open.values().map(|c| held[&c.source]).max()?;
        let source = self.open.values().find(|c| held[&c.source] == most)?.source;
        let mut theirs = self.open.iter().filter(|(_, c)| c.source == source);
        let id = theirs
            .clone()
            .find(|(_, c)| !c.served.load(Ordering::Relaxed))
            .or_else(|| theirs.next())
            .map(|(id, _)| *id)?;
        self.open.remove_entry(&id)
    }
}

/// Removes its connection from the table when the connection's task ends or is aborted.
struct Registered {
    id: u64,
    table: Arc<Mutex<Connections>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().open.remove(&self.id);
    }
}

/// Binds a listener for [`serve`], with an accept queue of [`LISTEN_BACKLOG`].
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Serves `listener` with `handler` until `stop` is set, on the calling thread, at most
/// `max_connections` at once; returns promptly then, closing every connection. Errs only if the runtime
/// cannot be set up.
pub(crate) fn serve(
    listener: std::net::TcpListener,
    handler: Arc<Handler>,
    counters: Arc<HttpCounters>,
    max_connections: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    listener.set_nonblocking(true)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(accept_loop(listener, handler, counters, max_connections.max(1)));
        while !stop.load(Ordering::Acquire) {
            tokio::time::sleep(STOP_POLL).await;
        }
        Ok::<(), io::Error>(())
    })?;
    // Dropping the runtime drops the accept loop and every connection's task, closing their sockets.
    drop(rt);
    Ok(())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: Arc<Handler>,
    counters: Arc<HttpCounters>,
    max_connections: usize,
) {
    let table = Arc::new(Mutex::new(Connections::default()));
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (id, victim) = {
            let mut t = table.lock();
            let victim = if t.open.len() >= max_connections { t.evict() } else { None };
            t.next_id += 1;
            (t.next_id, victim)
        };
        if let Some((_, v)) = victim {
            v.task.abort();
            counters.count(CloseReason::OverLimit);
        }
        let served = Arc::new(AtomicBool::new(false));
        let registered = Registered { id, table: Arc::clone(&table) };
        let task = tokio::spawn(connection(
            stream,
            Arc::clone(&handler),
            Arc::clone(&counters),
            Arc::clone(&served),
            registered,
        ));
        // This runtime has one thread: the task has not run yet, so it cannot have unregistered.
        if !task.is_finished() {
            let source = crate::policy::peer::source_key(from.ip());
            table.lock().open.insert(id, Open { source, served, task: task.abort_handle() });
        }
    }
}

/// Serves one connection within its limits. `_registered` unregisters it when this ends or is aborted.
async fn connection(
    stream: tokio::net::TcpStream,
    handler: Arc<Handler>,
    counters: Arc<HttpCounters>,
    served: Arc<AtomicBool>,
    _registered: Registered,
) {
    let service = Service { handler, served };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_BUF_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
        Err(_) => counters.count(CloseReason::Deadline),
        Ok(Err(e)) if e.is_timeout() => counters.count(CloseReason::HeaderTimeout),
        Ok(Err(e)) if e.is_parse_too_large() => counters.count(CloseReason::HeaderTooLarge),
        Ok(_) => {}
    }
}

/// A connection's service: reads the body, calls the handler, marks the connection answered.
struct Service {
    handler: Arc<Handler>,
    served: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    // Boxed: one allocation per request, and a named type for the connection's future to be Send.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let handler = Arc::clone(&self.handler);
        let served = Arc::clone(&self.served);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let response = match Limited::new(body, MAX_BODY_BYTES).collect().await {
                Ok(body) => handler(&Request::from_parts(parts, body.to_bytes())),
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
                }
                // The client went away or broke the framing: nothing to answer.
                Err(e) => return Err(e),
            };
            served.store(true, Ordering::Relaxed);
            Ok(response.map(Full::new))
        })
    }
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// A response with the given status, content type and body.
pub(crate) fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_source_holding_most_loses_its_oldest_unanswered_first() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _in_runtime = rt.enter();
        let mut t = Connections::default();
        // Source 7 holds four (answered and not), sources 8 and 9 one each.
        for (id, source, served) in
            [(1, 8, false), (2, 7, true), (3, 7, false), (4, 7, true), (5, 9, true), (6, 7, false)]
        {
            let task = tokio::spawn(async {}).abort_handle();
            t.open.insert(id, Open { source, served: Arc::new(AtomicBool::new(served)), task });
        }
        let order: Vec<u64> = std::iter::from_fn(|| t.evict().map(|(id, _)| id)).collect();
        // Source 7's unanswered (3, 6), its answered (2); then one each: the earliest, oldest first.
        assert_eq!(order, [3, 6, 2, 1, 4, 5]);
    }

    #[test]
    fn the_cap_follows_the_descriptor_limit() {
        assert_eq!(connection_cap(256), 16);
        assert_eq!(connection_cap(64), 8);
        assert_eq!(connection_cap(1 << 20), MAX_CONNECTIONS);
    }

    #[test]
    fn close_reasons_index_their_counters() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
