//! GraphQL: queries and mutations over HTTP (`POST /graphql`, `GET /graphql?query=`)
//! and subscriptions over WebSocket (`GET /graphql` upgraded with the subprotocol
//! `graphql-transport-ws`), as docs/graphql.md describes them.
//!
//! # Why async-graphql
//! The requirements are depth and complexity limits, introspection, subscriptions and
//! an SDL export. async-graphql (7, default features off) has all of them built in:
//! `limit_depth`, `limit_complexity` (with per-field costs, so a list costs its
//! `limit` times its selection), `limit_recursive_depth` and `limit_directives`,
//! introspection, `Schema::sdl`, and subscriptions as plain `Stream`s that any
//! executor can poll. juniper's `execute_sync` needs no runtime, but juniper has no
//! depth or complexity limits and its subscriptions need its async executor anyway
//! (and its `graphql-transport-ws` crate brings tokio). async-graphql needs no runtime
//! either: its futures are driven here by [`block_on`] (a thread parked on a condvar)
//! and by each socket's pump thread; tokio is not in the build. It costs about 1 MB of
//! binary more than juniper would.
//!
//! # Layers
//! [`schema`] holds the types and resolvers; every resolver calls [`crate::actions`],
//! so validation, permissions (and their audit rows), rate limits and broadcasts are
//! those of REST and the socket. [`limits`] checks a document before async-graphql
//! sees it. [`http`] answers requests; [`socket`] speaks `graphql-transport-ws`.
//! Live events reach subscriptions through [`crate::events`], beside the fan-out.
//!
//! # Threads
//! HTTP requests run on the HTTP worker that took them ([`block_on`]). A subscription
//! socket has its reader thread (started by [`crate::ws::open`], as `/ws` sockets
//! have) and one pump thread of its own that runs its operations; the reader starts
//! the pump when the socket opens and stops and joins it when the socket ends. No
//! other thread is added.

pub mod http;
pub mod limits;
pub mod schema;
pub mod socket;

use crate::actions::Actor;
use crate::app::App;
use crate::error::ApiError;
use crate::peer::Peer;
use async_graphql::{ErrorExtensions, ServerError};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

pub use socket::upgrade;

/// The schema's type.
pub type Schema = async_graphql::Schema<schema::Query, schema::Mutation, schema::Subscription>;

/// The schema, built once, with the limits of [`limits`].
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::build(schema::Query, schema::Mutation, schema::Subscription)
            .limit_depth(limits::MAX_DEPTH)
            .limit_complexity(limits::MAX_COMPLEXITY)
            .limit_recursive_depth(limits::MAX_NESTING)
            .limit_directives(limits::MAX_DIRECTIVES)
            .finish()
    })
}

/// The schema in SDL (`parley graphql-schema`).
pub fn sdl() -> String {
    schema().sdl()
}

/// What every resolver gets: who acts, and on a socket, the socket.
pub struct Gql {
    /// The server.
    pub app: Arc<App>,
    /// The caller.
    pub actor: Actor,
    /// The subscription socket the operation runs on (`None` over HTTP).
    pub peer: Option<Arc<Peer>>,
}

/// An [`ApiError`] as a GraphQL error: its message, and its code in
/// `extensions.code` (with `retryAfter` for `rate_limited`).
pub fn graphql_error(e: ApiError) -> async_graphql::Error {
    let (code, retry_after) = (e.code.as_str(), e.retry_after);
    async_graphql::Error::new(e.message).extend_with(|_, ext| {
        ext.set("code", code);
        if let Some(secs) = retry_after {
            ext.set("retryAfter", secs);
        }
    })
}

/// [`graphql_error`] for errors found before execution (no place in the document).
pub fn request_error(e: ApiError) -> ServerError {
    let err = graphql_error(e);
    let mut out = ServerError::new(err.message, None);
    out.extensions = err.extensions;
    out
}

/// Counts a mutation's root fields (each a write: `sendMessage`, `ban`, ...) against
/// the user's `--msg-rate` budget, before anything runs: all of them or, if they do
/// not all fit, none (the refused request has spent nothing).
pub fn charge_writes(app: &App, actor: &Actor, writes: usize) -> Result<(), ApiError> {
    let n = u32::try_from(writes).unwrap_or(u32::MAX);
    crate::actions::check_write_rate_n(app, actor, n)
}

/// Wakes a thread that waits on it; a wake-up before the wait is not lost.
#[derive(Default)]
pub struct Signal {
    woken: Mutex<bool>,
    changed: Condvar,
}

impl Signal {
    /// Wakes the waiting thread (or the next wait).
    pub fn notify(&self) {
        *crate::sync::lock(&self.woken) = true;
        self.changed.notify_one();
    }

    /// Waits until notified or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let mut woken = crate::sync::lock(&self.woken);
        if !*woken {
            woken = crate::sync::wait_timeout(&self.changed, woken, timeout);
        }
        *woken = false;
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// Runs a future to completion on this thread: polls it, and sleeps until its waker
/// says there is progress to make. (The whole executor parley needs for requests.)
pub fn block_on<F: Future>(future: F) -> F::Output {
    let signal = Arc::new(Signal::default());
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        signal.wait(Duration::from_secs(60));
    }
}
