//! A real HTTP upstream for `hybridge dev` and the end-to-end tests: one port that
//! speaks HTTP/1.1 and h2c (prior knowledge) and answers the routes in `routes`.
//!
//! It owns its listener and every connection task; it must never panic on what a
//! client sends (bad input gets a 4xx) and it knows nothing about the bridge itself.

mod pattern;
mod routes;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use pattern::pattern_byte;

/// The response header every answer of a [`DemoUpstream`] carries, valued with its name.
pub(crate) const UPSTREAM_HEADER: &str = "x-demo-upstream";

/// A running demo upstream. Dropping it does not stop it: cancel the token given to
/// [`DemoUpstream::start`], then (optionally) await [`DemoUpstream::closed`].
#[derive(Debug, Clone)]
pub struct DemoUpstream {
    local_addr: SocketAddr,
    state: Arc<routes::State>,
    tasks: TaskTracker,
}

impl DemoUpstream {
    /// Binds `addr` (port 0 allowed) and serves HTTP/1.1 and h2c on the same port
    /// until `cancel` fires. Returns once the socket accepts connections.
    ///
    /// On cancel the listener closes at once, idle connections close, and in-flight
    /// requests finish (a `/slow` wait is cut short with a 503).
    pub async fn start(
        name: &str,
        addr: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(routes::State {
            name: name.to_owned(),
            hits: AtomicU64::new(0),
            cancel: cancel.clone(),
        });
        let tasks = TaskTracker::new();
        let span = tracing::info_span!("demo_upstream", upstream = name, addr = %local_addr);
        tasks.spawn(
            accept_loop(listener, Arc::clone(&state), tasks.clone(), cancel).instrument(span),
        );
        tasks.close();
        Ok(Self {
            local_addr,
            state,
            tasks,
        })
    }

    /// The address actually bound (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The name given at start, echoed in `x-demo-upstream` and in JSON answers.
    #[cfg(test)]
    pub(crate) fn name(&self) -> &str {
        &self.state.name
    }

    /// Requests received so far, on every route except `/health`, so active health
    /// checks do not skew load-balancing counts. Counted when the request head
    /// arrives, before the answer is written.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::Relaxed)
    }

    /// Resolves once the token has fired, the listener is closed and every
    /// connection has finished.
    pub async fn closed(&self) {
        self.tasks.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<routes::State>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("demo_connection", %peer);
                tasks.spawn(
                    serve_connection(stream, Arc::clone(&state), cancel.clone()).instrument(span),
                );
            }
            Err(error) => {
                // Accept errors (EMFILE, aborted handshakes) are per connection: keep
                // serving, but do not spin if the error persists.
                tracing::warn!(%error, "accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracing::debug!("listener closed");
}

async fn serve_connection(stream: TcpStream, state: Arc<routes::State>, cancel: CancellationToken) {
    // Small request/response pairs dominate the tests; do not let Nagle delay them.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| routes::handle(Arc::clone(&state), request));
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // Client resets and `/upload-and-drop` end here; they are expected.
        tracing::debug!(error = %error, "connection ended with an error");
    }
}
