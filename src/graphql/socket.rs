//! GraphQL over WebSocket: `GET /graphql` upgraded with the subprotocol
//! `graphql-transport-ws`, the protocol of the `graphql-ws` library.
//!
//! The upgrade is `/ws`'s ([`crate::ws::open`]): Origin, token (a `bearer.<jwt>`
//! subprotocol, `Authorization`, `?access_token=`), ban and socket caps are checked
//! before it, so `connection_init`'s payload plays no part in authentication. The
//! socket counts toward the caps but joins no room; expiry closes it with 4401, kick,
//! ban and revocation with 4403 (its [`SocketKind`] spells parley's codes so).
//!
//! Threads: the socket's reader thread (the [`Protocol`] below) parses each message,
//! answers pings and queues operations; the socket's pump thread, started when the
//! socket opens and stopped and joined by the reader when it ends, runs them: it checks
//! each document against the [`limits`] (parsing needs the pump's larger stack), polls
//! each operation's response stream (woken through a [`Signal`]) and writes `next`,
//! `error` and `complete` messages. Both write through the socket's [`Peer`], which never
//! blocks: a client that does not read is dropped (1008), as a `/ws` client is. The
//! pump also closes a socket that sends no `connection_init` in time (4408).

use super::http::{is_request_error, Body};
use super::limits::{self, Checked};
use super::{charge_writes, request_error, schema, Gql, Signal};
use crate::actions::Actor;
use crate::app::App;
use crate::error::ApiError;
use crate::peer::{text_frame, Peer, SocketKind};
use crate::sync::lock;
use crate::ws::{self, Protocol};
use async_graphql::futures_util::stream::BoxStream;
use async_graphql::futures_util::StreamExt;
use async_graphql::parser::types::OperationType;
use async_graphql::{Response, ServerError};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::Request;

/// The subprotocol.
pub const SUBPROTOCOL: &str = "graphql-transport-ws";
/// Most operations running at once on one socket.
pub const MAX_OPERATIONS: usize = 32;
/// Most responses one operation writes before the others get their turn.
const FAIR_SHARE: usize = 64;
/// Stack of the pump thread (resolvers and async-graphql's execution run on it).
const PUMP_STACK: usize = 512 * 1024;

/// The protocol's own close codes.
mod code {
    pub const INVALID_MESSAGE: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const INIT_TIMEOUT: u16 = 4408;
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    pub const TOO_MANY_INITS: u16 = 4429;
    pub const INTERNAL: u16 = 4500;
}

/// Checks and upgrades a `GET /graphql` WebSocket request.
pub fn upgrade(app: &Arc<App>, request: Request) {
    ws::open(
        app,
        request,
        SUBPROTOCOL,
        SocketKind::GraphQl,
        Session::start,
    );
}

/// Whether a `/graphql` request asks for a WebSocket (else it is a plain query).
pub fn wants_upgrade(request: &Request) -> bool {
    crate::request::header_value(request, "Upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// What the reader hands the pump.
enum Command {
    Start {
        id: String,
        seq: u64,
        request: Box<async_graphql::Request>,
        actor: Actor,
    },
    Stop(String),
}

/// What the reader and the pump share.
#[derive(Default)]
struct State {
    acked: bool,
    stopped: bool,
    commands: VecDeque<Command>,
    /// Running operations: id → the sequence number of its `subscribe`, so an
    /// operation that ends by itself does not touch a later one with the same id.
    active: HashMap<String, u64>,
}

struct Shared {
    state: std::sync::Mutex<State>,
    signal: Arc<Signal>,
}

impl Shared {
    fn command(&self, c: Command) {
        lock(&self.state).commands.push_back(c);
        self.signal.notify();
    }
}

/// One socket's `graphql-transport-ws` session, on its reader thread.
struct Session {
    app: Arc<App>,
    peer: Arc<Peer>,
    actor: Actor,
    shared: Arc<Shared>,
    pump: Option<JoinHandle<()>>,
    /// `--msg-rate`: `subscribe` messages and renewals count.
    rate: ws::MessageRate,
    initialised: bool,
    next_seq: u64,
}

impl Session {
    fn start(app: &Arc<App>, peer: &Arc<Peer>) -> Session {
        let shared = Arc::new(Shared {
            state: Default::default(),
            signal: Arc::new(Signal::default()),
        });
        let (app2, peer2, shared2) = (app.clone(), peer.clone(), shared.clone());
        let pump = std::thread::Builder::new()
            .name(format!("gql-pump-{}", peer.id))
            .stack_size(PUMP_STACK)
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pump(&app2, &peer2, &shared2)
                }));
                if ran.is_err() {
                    log::error!("GraphQL socket {} pump panicked; closing it", peer2.id);
                    peer2.close(code::INTERNAL, "internal error");
                }
            });
        let pump = match pump {
            Ok(handle) => Some(handle),
            Err(e) => {
                log::error!("could not start a GraphQL pump thread: {e}");
                peer.close(code::INTERNAL, "internal error");
                None
            }
        };
        Session {
            app: app.clone(),
            actor: ws::socket_actor(peer),
            peer: peer.clone(),
            shared,
            pump,
            rate: ws::MessageRate::new(app),
            initialised: false,
            next_seq: 0,
        }
    }

    fn send(&self, v: &Value) {
        self.peer.send(&text_frame(&v.to_string()));
    }

    fn refuse(&self, id: &str, errors: &[ServerError]) {
        self.send(&json!({"id": id, "type": "error", "payload": errors}));
    }

    fn on_message(&mut self, msg: &Value) -> Result<(), (u16, String)> {
        let invalid = |what: &str| (code::INVALID_MESSAGE, format!("Invalid message: {what}"));
        let kind = msg
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("no type"))?;
        match kind {
            "connection_init" => {
                if self.initialised {
                    return Err((
                        code::TOO_MANY_INITS,
                        "Too many initialisation requests".into(),
                    ));
                }
                self.initialised = true;
                lock(&self.shared.state).acked = true;
                self.send(&json!({"type": "connection_ack"}));
            }
            "ping" => self.ping(msg.get("payload")),
            "pong" => {}
            "subscribe" => {
                if !self.initialised {
                    return Err((code::UNAUTHORIZED, "Unauthorized".into()));
                }
                let id = msg
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("no id"))?;
                let payload = msg
                    .get("payload")
                    .cloned()
                    .ok_or_else(|| invalid("no payload"))?;
                let body: Body =
                    serde_json::from_value(payload).map_err(|e| invalid(&e.to_string()))?;
                self.subscribe(id, body)?;
            }
            "complete" => {
                let id = msg
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("no id"))?;
                if lock(&self.shared.state).active.remove(id).is_some() {
                    self.shared.command(Command::Stop(id.to_owned()));
                }
            }
            other => return Err(invalid(&format!("unknown type {other:?}"))),
        }
        Ok(())
    }

    /// A `ping`; one whose payload carries `access_token` renews the socket's login.
    fn ping(&mut self, payload: Option<&Value>) {
        let token = payload
            .and_then(|p| p.get("access_token"))
            .and_then(Value::as_str);
        let Some(token) = token else {
            return self.send(&json!({"type": "pong"}));
        };
        let renewed = self
            .rate
            .take()
            .and_then(|()| ws::renew(&self.app, &self.peer, token));
        let answer = match renewed {
            Ok(id) => {
                self.actor.sid = id.sid;
                json!({"expires_at": crate::clock::unix_to_rfc3339(id.expires_at)})
            }
            Err(e) => json!({"error": e.code.as_str()}),
        };
        self.send(&json!({"type": "pong", "payload": answer}));
    }

    fn subscribe(&mut self, id: &str, body: Body) -> Result<(), (u16, String)> {
        if lock(&self.shared.state).active.contains_key(id) {
            return Err((
                code::SUBSCRIBER_EXISTS,
                format!("Subscriber for {id} already exists"),
            ));
        }
        let admitted = self.rate.take().and_then(|()| {
            if lock(&self.shared.state).active.len() >= MAX_OPERATIONS {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_OPERATIONS} operations may run at once on one socket"
                )));
            }
            body.into_request()
        });
        let request = match admitted {
            Ok(request) => request,
            Err(e) => {
                self.refuse(id, &[request_error(e)]);
                return Ok(());
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        lock(&self.shared.state).active.insert(id.to_owned(), seq);
        self.shared.command(Command::Start {
            id: id.to_owned(),
            seq,
            request: Box::new(request),
            actor: self.actor.clone(),
        });
        Ok(())
    }
}

impl Protocol for Session {
    fn on_text(&mut self, text: &str) {
        let outcome = match serde_json::from_str::<Value>(text) {
            Ok(msg) if msg.is_object() => self.on_message(&msg),
            _ => Err((
                code::INVALID_MESSAGE,
                "Invalid message: not a JSON object".into(),
            )),
        };
        if let Err((code, reason)) = outcome {
            self.peer.close(code, &reason);
        }
    }

    fn on_binary(&mut self) {
        self.peer.close(
            code::INVALID_MESSAGE,
            "Invalid message: binary frames are not used",
        );
    }

    fn end(&mut self) -> Vec<String> {
        lock(&self.shared.state).stopped = true;
        self.shared.signal.notify();
        if let Some(pump) = self.pump.take() {
            let _ = pump.join();
        }
        Vec::new()
    }
}

/// An operation the pump runs.
struct Running {
    id: String,
    seq: u64,
    kind: OperationType,
    responses: BoxStream<'static, Response>,
    first: bool,
}

/// The pump thread: starts and stops operations as the reader asks, and writes what
/// their streams produce, until the socket ends.
fn pump(app: &Arc<App>, peer: &Arc<Peer>, shared: &Shared) {
    let waker = Waker::from(shared.signal.clone());
    let mut cx = Context::from_waker(&waker);
    let init_deadline = Instant::now() + app.cfg.graphql_init_timeout;
    let mut running: Vec<Running> = Vec::new();
    loop {
        let (commands, acked) = {
            let mut st = lock(&shared.state);
            if st.stopped {
                return;
            }
            (std::mem::take(&mut st.commands), st.acked)
        };
        if !acked && Instant::now() >= init_deadline {
            peer.close(code::INIT_TIMEOUT, "Connection initialisation timeout");
            return;
        }
        for command in commands {
            match command {
                Command::Start {
                    id,
                    seq,
                    request,
                    actor,
                } => {
                    if let Some(op) = start(app, peer, shared, id, seq, *request, actor) {
                        running.push(op);
                    }
                }
                Command::Stop(id) => running.retain(|r| r.id != id),
            }
        }
        running.retain_mut(|op| step(op, &mut cx, peer, shared));
        let wait = if acked {
            Duration::from_secs(60)
        } else {
            init_deadline.saturating_duration_since(Instant::now())
        };
        shared.signal.wait(wait);
    }
}

/// Checks an operation (the document's limits, a mutation's writes) and starts it; a
/// refused one gets its `error` message. Runs on the pump, whose stack the parser
/// needs.
fn start(
    app: &Arc<App>,
    peer: &Arc<Peer>,
    shared: &Shared,
    id: String,
    seq: u64,
    mut request: async_graphql::Request,
    actor: Actor,
) -> Option<Running> {
    let checked = limits::check(&mut request).and_then(|Checked { kind, root_fields }| {
        if kind == OperationType::Mutation {
            charge_writes(app, &actor, root_fields).map_err(|e| vec![request_error(e)])?;
        }
        Ok(kind)
    });
    let op = Running {
        id,
        seq,
        kind: OperationType::Query,
        responses: Box::pin(async_graphql::futures_util::stream::empty()),
        first: true,
    };
    let kind = match checked {
        Ok(kind) => kind,
        Err(errors) => {
            finish(&op, shared);
            let v = json!({"id": op.id, "type": "error", "payload": errors});
            peer.send(&text_frame(&v.to_string()));
            return None;
        }
    };
    let request = request.data(Gql {
        app: app.clone(),
        actor,
        peer: Some(peer.clone()),
    });
    Some(Running {
        kind,
        responses: schema().execute_stream(request),
        ..op
    })
}

/// Writes what one operation has ready; false once it is over.
fn step(op: &mut Running, cx: &mut Context<'_>, peer: &Arc<Peer>, shared: &Shared) -> bool {
    for _ in 0..FAIR_SHARE {
        match op.responses.poll_next_unpin(cx) {
            Poll::Pending => return true,
            Poll::Ready(Some(response)) => {
                // An operation refused before it ran — a request error, or a
                // subscription whose resolver failed (an unknown room) — is one
                // `error` message, and nothing follows it.
                let refused = op.first
                    && (is_request_error(&response)
                        || (op.kind == OperationType::Subscription
                            && response.data == async_graphql::Value::Null
                            && !response.errors.is_empty()));
                op.first = false;
                if refused {
                    finish(op, shared);
                    let v = json!({"id": op.id, "type": "error", "payload": response.errors});
                    peer.send(&text_frame(&v.to_string()));
                    return false;
                }
                let v = json!({"id": op.id, "type": "next", "payload": response});
                peer.send(&text_frame(&v.to_string()));
            }
            Poll::Ready(None) => {
                if finish(op, shared) {
                    let v = json!({"id": op.id, "type": "complete"});
                    peer.send(&text_frame(&v.to_string()));
                }
                return false;
            }
        }
    }
    // More may be ready: come back after the others had their turn.
    shared.signal.notify();
    true
}

/// Forgets a finished operation's id; false if the client had completed it already.
fn finish(op: &Running, shared: &Shared) -> bool {
    let mut st = lock(&shared.state);
    match st.active.get(&op.id) {
        Some(seq) if *seq == op.seq => {
            st.active.remove(&op.id);
            true
        }
        _ => false,
    }
}
