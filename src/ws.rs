//! One WebSocket's life: the checks before the upgrade, the upgrade itself, and the
//! thread that reads the client's frames and acts on them.
//!
//! Nothing is upgraded until the Origin, the token, the ban state and the socket
//! limits have all passed; a refusal is a plain HTTP answer with the JSON error. After
//! the upgrade the socket has one thread, its reader (this module; tiny_http's
//! connection thread goes back to its pool), and everything written to it goes
//! through its [`Peer`].
//!
//! Both WebSocket doors use [`open`]: `/ws` with parley's chat protocol ([`Conn`]),
//! `/graphql` with `graphql-transport-ws` ([`crate::graphql`]). They share the checks,
//! the socket caps, the read loop and the ending; each brings its own [`Protocol`].

use crate::actions::{self, Actor};
use crate::app::App;
use crate::auth::{AuthError, Identity};
use crate::error::ApiError;
use crate::fanout::Target;
use crate::hub::{Joined, PresenceMode};
use crate::limits::{Noted, TokenBucket};
use crate::metrics::{inc, METRICS};
use crate::model::Page;
use crate::peer::{close, text_frame, text_frame_of, Frame, Peer, QueueLimits, SocketKind};
use crate::protocol::{self, error_event, event, ClientMsg, PresenceChoice};
use crate::request::{
    bearer_token, client_ip, header_value, origin_allowed, query_param, with_header, Reply,
};
use crate::store::audit::AuditEntry;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::{ReadWrite, Request, Response};
use tungstenite::protocol::{Message, Role, WebSocketConfig, WebSocketContext};

/// The subprotocol parley speaks.
pub const SUBPROTOCOL: &str = "parley.v1";
/// Writes (send, dm, delete) one socket may have in the writer's queue; its reader
/// waits past that, so a flood from one socket is held back by TCP, not queued.
const MAX_PENDING: usize = 64;
/// How long a closing socket may take to flush before it is cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What a socket does with what its client sends: parley's chat protocol ([`Conn`]) or
/// GraphQL's. It runs on the socket's reader thread.
pub trait Protocol {
    /// A text message arrived.
    fn on_text(&mut self, text: &str);
    /// A binary message arrived.
    fn on_binary(&mut self);
    /// The socket is ending: stop whatever the protocol runs, and name the rooms the
    /// socket leaves.
    fn end(&mut self) -> Vec<String>;
}

/// Checks and upgrades a `GET /ws` request, then starts the socket's reader thread.
pub fn upgrade(app: &Arc<App>, request: Request) {
    open(app, request, SUBPROTOCOL, SocketKind::Chat, Conn::new);
}

/// Checks and upgrades a WebSocket request (answering `subprotocol` when the client
/// offers it), then starts the socket's reader thread, which speaks the protocol
/// `start` makes.
///
/// The socket is registered (findable by kick, ban, announce and broadcasts) before
/// the 101 goes out, but nothing is written to it until the 101 has been sent.
pub fn open<P: Protocol>(
    app: &Arc<App>,
    request: Request,
    subprotocol: &'static str,
    kind: SocketKind,
    start: impl FnOnce(&Arc<App>, &Arc<Peer>) -> P + Send + 'static,
) {
    let ip = client_ip(&request, &app.cfg.trusted_proxies);
    let (identity, accept, offered) = match admit(app, &request, subprotocol, kind) {
        Ok(ok) => ok,
        Err(Refusal::Anonymous(e)) => return reject_anonymous(app, request, e, ip),
        Err(Refusal::Known(e, user)) => return reject(app, request, &e, ip, user),
    };
    let Some(peer) = attach(app, &request, &identity, ip.clone(), kind) else {
        app.hub.unreserve(identity.user_id, kind);
        let _ = request.respond(Reply::error(&ApiError::internal()).into_response());
        return;
    };
    let mut response = with_header(Response::empty(101), "Sec-WebSocket-Accept", &accept);
    if offered {
        response = with_header(response, "Sec-WebSocket-Protocol", subprotocol);
    }
    let stream = request.upgrade("websocket", response);
    peer.start_writing();
    // Done here rather than on the socket's own thread, whose stack (resident for the
    // socket's whole life) stays smaller for it.
    audit_socket(app, &peer, "ws_connect");
    let (app2, peer2) = (app.clone(), peer.clone());
    let name = match kind {
        SocketKind::Chat => "ws",
        SocketKind::GraphQl => "gql",
    };
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-{}", peer.id))
        .stack_size(app.cfg.socket_thread_stack)
        .spawn(move || {
            let mut protocol = start(&app2, &peer2);
            run(&app2, peer2, stream, &mut protocol)
        });
    if let Err(e) = spawned {
        log::error!("could not start a socket thread: {e}");
        app.hub.unregister(&peer, &[]);
        app.known_sockets.release(&peer.fd_numbers);
        peer.kill();
    }
}

/// Why an upgrade was refused, and whether we know who asked.
enum Refusal {
    /// Before a valid token: bad Origin, not an upgrade, no token or a bad one.
    Anonymous(ApiError),
    /// A valid token, but a banned user or no socket slot: the refusal is the user's.
    Known(ApiError, String),
}

/// The pre-upgrade checks plus a reserved socket slot.
fn admit(
    app: &App,
    request: &Request,
    subprotocol: &str,
    kind: SocketKind,
) -> Result<(Identity, String, bool), Refusal> {
    let (identity, accept, offered) = check(app, request, subprotocol)?;
    app.hub.reserve(identity.user_id, kind).map_err(|hit| {
        let e = ApiError::rate_limited(format!("too many sockets ({hit:?})"), 5);
        Refusal::Known(e, identity.username.clone())
    })?;
    Ok((identity, accept, offered))
}

/// Finds the connection's socket and registers its peer (not yet writable).
fn attach(
    app: &App,
    request: &Request,
    identity: &Identity,
    ip: Option<String>,
    kind: SocketKind,
) -> Option<Arc<Peer>> {
    let peer_addr = request.remote_addr().copied()?;
    let sock = match app.known_sockets.adopt(request.socket_fds()) {
        Ok(adopted) => adopted,
        Err(e) => {
            log::error!("socket of the connection from {peer_addr} not taken: {e}");
            return None;
        }
    };
    let mut peer = Peer::new(
        app.hub.next_id(),
        kind,
        identity,
        peer_addr,
        sock,
        app.flush_queue.clone(),
        QueueLimits {
            frames: app.cfg.send_queue,
            bytes: app.cfg.send_queue_bytes,
        },
    );
    // Behind a trusted proxy, the audit trail names the client, not the proxy.
    if let Some(ip) = ip {
        peer.ip = ip;
    }
    let peer = Arc::new(peer);
    app.hub.register(peer.clone());
    app.expiry.watch(&peer);
    Some(peer)
}

fn reject(app: &App, request: Request, e: &ApiError, ip: Option<String>, user: String) {
    count_refusal(e);
    audit_refusal(app, e, ip, Some(user));
    let _ = request.respond(Reply::error(e).into_response());
}

/// Anonymous refusals cost the server as little as possible: past
/// `UPGRADE_REFUSALS_PER_MINUTE` per address they become 429s answered after the
/// tarpit's pause, and their audit rows are folded to one per address and minute
/// ([`crate::limits::Folds`]).
fn reject_anonymous(app: &App, request: Request, e: ApiError, ip: Option<String>) {
    let address = ip.as_deref().unwrap_or("-");
    let limited = app.upgrade_refusals.check(address).err();
    let e = match limited {
        Some(secs) => ApiError::rate_limited("too many refused upgrades from this address", secs),
        None => e,
    };
    count_refusal(&e);
    if app.folds.note("ws_rejected", address) == Noted::First {
        audit_refusal(app, &e, ip, None);
    }
    let answer = move || {
        let _ = request.respond(Reply::error(&e).into_response());
    };
    match limited {
        Some(_) => app.tarpit.hold(answer),
        None => answer(),
    }
}

fn count_refusal(e: &ApiError) {
    let counter = match e.http_status() {
        401 => &METRICS.upgrades_rejected_unauthorized,
        403 => &METRICS.upgrades_rejected_forbidden,
        400 | 405 => &METRICS.upgrades_rejected_invalid,
        _ => &METRICS.upgrades_rejected_limit,
    };
    inc(counter);
}

fn audit_refusal(app: &App, e: &ApiError, ip: Option<String>, actor: Option<String>) {
    app.store.audit(AuditEntry {
        actor,
        action: "ws_rejected",
        target: None,
        ip,
        detail: json!({"status": e.http_status(), "reason": e.message}),
    });
}

/// Origin, handshake headers and token, in the order docs/socket.md gives. Returns who
/// the socket is for, the `Sec-WebSocket-Accept` value, and whether `subprotocol` was
/// offered.
fn check(app: &App, rq: &Request, subprotocol: &str) -> Result<(Identity, String, bool), Refusal> {
    let (token, accept, offered) = handshake(app, rq, subprotocol).map_err(Refusal::Anonymous)?;
    let identity = app
        .auth
        .authenticate(&app.store, &token)
        .map_err(|e| match e {
            // A banned user's token is genuine: its name is the refused actor.
            AuthError::Banned => match app.auth.decode_access(&token) {
                Ok(id) => Refusal::Known(e.into(), id.username),
                Err(_) => Refusal::Anonymous(e.into()),
            },
            other => Refusal::Anonymous(other.into()),
        })?;
    Ok((identity, accept, offered))
}

/// The checks before the token's: Origin, the handshake headers, a token present.
/// Returns the token, the `Sec-WebSocket-Accept` value and whether `subprotocol` was
/// offered.
fn handshake(
    app: &App,
    rq: &Request,
    subprotocol: &str,
) -> Result<(String, String, bool), ApiError> {
    check_origin(app, rq)?;
    if *rq.method() != tiny_http::Method::Get {
        return Err(ApiError::method_not_allowed());
    }
    let key = header_value(rq, "Sec-WebSocket-Key");
    let upgrade = header_value(rq, "Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version = header_value(rq, "Sec-WebSocket-Version") == Some("13");
    let (Some(key), true, true) = (key, upgrade, version) else {
        return Err(ApiError::bad_request(
            "expected a WebSocket upgrade (version 13)",
        ));
    };
    let offered: Vec<&str> = rq
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Sec-WebSocket-Protocol"))
        .flat_map(|h| h.value.as_str().split(','))
        .map(str::trim)
        .collect();
    let token = offered
        .iter()
        .find_map(|p| p.strip_prefix("bearer."))
        .map(str::to_owned)
        .or_else(|| bearer_token(rq).map(str::to_owned))
        .or_else(|| query_param(rq.url(), "access_token"));
    let token = token.ok_or(AuthError::Missing)?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok((token, accept, offered.contains(&subprotocol)))
}

/// Absent Origin (native clients) passes; present, it must be our own origin or allowed.
fn check_origin(app: &App, rq: &Request) -> Result<(), ApiError> {
    match origin_allowed(rq, &app.cfg.allow_origins, &app.cfg.trusted_proxies) {
        Some(false) => Err(ApiError::forbidden("origin not allowed")),
        None | Some(true) => Ok(()),
    }
}

/// tiny_http's stream for reading; what tungstenite writes by itself (pongs) is caught
/// here and sent through the peer, the socket's only writer.
struct Duplex {
    inner: Box<dyn ReadWrite + Send>,
    replies: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.replies.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket's per-connection state, owned by its reader thread.
struct Conn {
    app: Arc<App>,
    peer: Arc<Peer>,
    actor: Actor,
    /// Joined rooms by name, with their ids.
    rooms: Vec<crate::model::Room>,
    /// `--msg-rate`.
    rate: MessageRate,
}

/// The actor behind a socket: its user, its current login, its address.
pub fn socket_actor(peer: &Peer) -> Actor {
    let identity = Identity {
        user_id: peer.user_id,
        username: peer.username.clone(),
        sid: peer.sid(),
        expires_at: peer.expires_at(),
    };
    Actor::new(&identity, Some(peer.ip.clone()))
}

/// `--msg-rate` for one socket: the messages per second it may send (all, if off).
pub struct MessageRate(Option<TokenBucket>);

impl MessageRate {
    /// A full budget.
    pub fn new(app: &App) -> MessageRate {
        let per_second = app.cfg.msg_rate;
        MessageRate((per_second > 0).then(|| TokenBucket::new(per_second, Duration::from_secs(1))))
    }

    /// Counts one message; `rate_limited` past the budget.
    pub fn take(&mut self) -> Result<(), ApiError> {
        match self.0.as_mut().map(|b| b.take(Instant::now())) {
            Some(Err(wait)) => Err(ApiError::rate_limited(
                "too many messages; slow down",
                wait.as_secs() + 1,
            )),
            _ => Ok(()),
        }
    }
}

/// Reads the socket until it closes, then lets go of it: leaves its rooms (telling
/// who is left), records the disconnect, and closes the connection once what is
/// queued is written (or a bounded wait passed).
fn run<P: Protocol>(
    app: &Arc<App>,
    peer: Arc<Peer>,
    stream: Box<dyn ReadWrite + Send>,
    protocol: &mut P,
) {
    let config = WebSocketConfig::default()
        .read_buffer_size(app.cfg.ws_read_buffer)
        .max_message_size(Some(app.cfg.max_frame_bytes))
        .max_frame_size(Some(app.cfg.max_frame_bytes));
    let mut ctx = WebSocketContext::new(Role::Server, Some(config));
    let mut io = Duplex {
        inner: stream,
        replies: Vec::new(),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_loop(&peer, protocol, &mut ctx, &mut io)
    }));
    if outcome.is_err() {
        log::error!("socket {} handler panicked; closing it", peer.id);
        peer.close(1011, "internal error");
    }
    let rooms = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| protocol.end()))
        .unwrap_or_default();
    for (room, tell) in app.hub.unregister(&peer, &rooms) {
        presence(app, &peer, &room, "offline", tell);
    }
    audit_socket(app, &peer, "ws_disconnect");
    peer.wait_drained(DRAIN_TIMEOUT);
    peer.kill();
    // The numbers are reused once tiny_http closes the connection (dropping `io`).
    app.known_sockets.release(&peer.fd_numbers);
    drop(io);
}

fn read_loop(
    peer: &Arc<Peer>,
    protocol: &mut impl Protocol,
    ctx: &mut WebSocketContext,
    io: &mut Duplex,
) {
    loop {
        let msg = ctx.read(io);
        if msg.is_ok() {
            peer.heard();
        }
        // A socket closed by the server (kick, ban, revocation, expiry, too slow) acts
        // no more, even if its client keeps sending: the close frame may take a while
        // to reach a client that does not read, but nothing it sends after the close
        // counts.
        if !peer.is_open() {
            return;
        }
        if matches!(msg, Ok(Message::Ping(_))) {
            // tungstenite queues the pong and would write it only at the next read,
            // which waits for the client's next frame: write it out now.
            let _ = ctx.flush(io);
        }
        if !io.replies.is_empty() && peer.is_open() {
            let bytes: Frame = std::mem::take(&mut io.replies).into();
            peer.send(&bytes);
        }
        io.replies.clear();
        match msg {
            Ok(Message::Text(text)) => protocol.on_text(text.as_str()),
            Ok(Message::Binary(_)) => protocol.on_binary(),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(Message::Close(_)) => {
                peer.close(close::NORMAL, "");
                return;
            }
            Err(tungstenite::Error::Capacity(_)) => {
                peer.close(close::TOO_BIG, "message too big");
                return;
            }
            Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => {
                peer.close(close::PROTOCOL, "protocol error");
                return;
            }
            Err(_) => {
                peer.mark_closed();
                return;
            }
        }
    }
}

/// Records a socket's connect or disconnect.
fn audit_socket(app: &App, peer: &Peer, action: &'static str) {
    let detail = match peer.kind {
        SocketKind::Chat => json!({"socket": peer.id}),
        SocketKind::GraphQl => json!({"socket": peer.id, "protocol": "graphql-transport-ws"}),
    };
    app.store.audit(AuditEntry {
        actor: Some(peer.username.clone()),
        action,
        target: None,
        ip: Some(peer.ip.clone()),
        detail,
    });
}

/// Moves a socket to a newer access token of the same user (the chat protocol's
/// `refresh`, GraphQL's renewal `ping`) and returns the token's identity. An invalid
/// token is `unauthorized`, another user's `forbidden`; the socket then keeps its old
/// token.
pub fn renew(app: &App, peer: &Peer, token: &str) -> Result<Identity, ApiError> {
    let id = app
        .auth
        .authenticate(&app.store, token)
        .map_err(|e| match e {
            AuthError::Banned => ApiError::forbidden("user is banned"),
            AuthError::Store(s) => s.into(),
            _ => ApiError::unauthorized("invalid access token"),
        })?;
    if id.user_id != peer.user_id {
        return Err(ApiError::forbidden("token belongs to another user"));
    }
    peer.reauthenticate(id.sid.clone(), id.expires_at);
    Ok(id)
}

impl Protocol for Conn {
    fn on_text(&mut self, text: &str) {
        match protocol::parse(text) {
            Ok((msg, reference)) => {
                if let Err(e) = self.rate.take() {
                    return self.reply_error(&e, &reference);
                }
                if let Err(e) = self.act(msg, &reference) {
                    self.reply_error(&e, &reference);
                }
            }
            Err((e, reference)) => self.reply_error(&e, &reference),
        }
    }

    fn on_binary(&mut self) {
        let e = ApiError::bad_request("binary frames are not supported");
        self.reply_error(&e, &Value::Null);
    }

    fn end(&mut self) -> Vec<String> {
        self.rooms.iter().map(|r| r.name.clone()).collect()
    }
}

impl Conn {
    fn new(app: &Arc<App>, peer: &Arc<Peer>) -> Conn {
        Conn {
            app: app.clone(),
            actor: socket_actor(peer),
            peer: peer.clone(),
            rooms: Vec::new(),
            rate: MessageRate::new(app),
        }
    }

    fn send_json(&self, json: &str) {
        self.peer.send(&text_frame(json));
    }

    fn reply_error(&self, e: &ApiError, reference: &Value) {
        self.send_json(&error_event(e, reference));
    }

    fn act(&mut self, msg: ClientMsg, reference: &Value) -> Result<(), ApiError> {
        match msg {
            ClientMsg::Ping => {
                self.send_json(&json!({"type": "pong", "ref": reference}).to_string());
                Ok(())
            }
            ClientMsg::Join {
                room,
                since,
                presence,
            } => {
                let mode = match presence.unwrap_or_default() {
                    PresenceChoice::Each => PresenceMode::Each,
                    PresenceChoice::Batch => PresenceMode::Batch,
                    PresenceChoice::Count => PresenceMode::Count,
                };
                self.join(&room, since, mode, reference)
            }
            ClientMsg::Leave { room } => self.leave(&room, reference),
            ClientMsg::Send {
                room,
                body,
                client_id,
            } => self.send(&room, body, client_id, reference),
            ClientMsg::Dm {
                to,
                body,
                client_id,
            } => self.dm(&to, body, client_id, reference),
            ClientMsg::History {
                room,
                before,
                after,
                limit,
            } => {
                let messages =
                    actions::room_history(&self.app, &room, Page::new(before, after, limit))?;
                let v = json!({"type": "history", "room": room, "messages": messages, "ref": reference});
                self.send_json(&v.to_string());
                Ok(())
            }
            ClientMsg::Online { room, after, limit } => {
                let online = actions::room_online(&self.app, &room, after.as_deref(), limit)?;
                let v = json!({"type": "online", "room": room, "online": online, "ref": reference});
                self.send_json(&v.to_string());
                Ok(())
            }
            ClientMsg::Refresh { access_token } => self.refresh(&access_token, reference),
            ClientMsg::Delete { id } => {
                let Some(pending) = self.peer.begin_request(MAX_PENDING) else {
                    return Ok(());
                };
                let (peer, reference) = (self.peer.clone(), reference.clone());
                actions::delete_message(&self.app, &self.actor, id, move |res| {
                    drop(pending);
                    if let Err(e) = res {
                        peer.send(&text_frame(&error_event(&e, &reference)));
                    }
                })
            }
            ClientMsg::Kick { user } => actions::kick(&self.app, &self.actor, &user).map(|_| ()),
            ClientMsg::Announce { body, roles } => {
                actions::announce(&self.app, &self.actor, &body, roles).map(|_| ())
            }
        }
    }

    fn join(
        &mut self,
        name: &str,
        since: Option<i64>,
        mode: PresenceMode,
        reference: &Value,
    ) -> Result<(), ApiError> {
        let room = actions::find_room(&self.app, name)?;
        let already = self.rooms.iter().any(|r| r.id == room.id);
        // Live frames wait until `joined` (and any replay) is out: a message fanned out
        // the moment the socket enters the room must not overtake the reply.
        self.peer.hold();
        let mut joined = self.app.hub.join(&self.peer, name, mode);
        if let Some(tell) = joined.tell.take() {
            presence(&self.app, &self.peer, name, "online", tell);
        }
        if !already {
            self.rooms.push(room.clone());
        }
        self.peer
            .send_direct(&joined_frame(name, &joined, reference));
        let replayed_up_to = match since {
            Some(since) => self.replay(&room, since),
            None => i64::MIN,
        };
        self.peer.release(name, replayed_up_to);
        Ok(())
    }

    /// Sends every stored message of `room` after `since`, in id order, straight to
    /// this socket; returns the last id sent.
    fn replay(&self, room: &crate::model::Room, since: i64) -> i64 {
        let mut last = since;
        loop {
            let page = Page::new(None, Some(last), Some(Page::MAX_LIMIT));
            let batch = match self.app.store.room_history(room, page) {
                Ok(b) => b,
                Err(e) => {
                    self.reply_error(&e.into(), &Value::Null);
                    return last;
                }
            };
            for m in &batch {
                self.peer.send_direct(&text_frame(&event("message", m)));
                last = m.id;
            }
            if batch.len() < Page::MAX_LIMIT as usize || !self.peer.wait_for_room(DRAIN_TIMEOUT) {
                return last;
            }
        }
    }

    fn leave(&mut self, name: &str, reference: &Value) -> Result<(), ApiError> {
        let before = self.rooms.len();
        self.rooms.retain(|r| r.name != name);
        if before == self.rooms.len() {
            return Err(ApiError::bad_request(format!("not in room {name:?}")));
        }
        if let Some(Some(tell)) = self.app.hub.leave(&self.peer, name) {
            presence(&self.app, &self.peer, name, "offline", tell);
        }
        self.send_json(&json!({"type": "left", "room": name, "ref": reference}).to_string());
        Ok(())
    }

    fn send(
        &self,
        name: &str,
        body: String,
        client_id: Option<String>,
        reference: &Value,
    ) -> Result<(), ApiError> {
        let Some(room) = self.rooms.iter().find(|r| r.name == name).cloned() else {
            actions::find_room(&self.app, name)?;
            return Err(ApiError::bad_request(format!(
                "join room {name:?} before sending to it"
            )));
        };
        let Some(pending) = self.peer.begin_request(MAX_PENDING) else {
            return Ok(());
        };
        let (app, peer, reference) = (self.app.clone(), self.peer.clone(), reference.clone());
        let actor = &self.actor;
        actions::send_message(&self.app, actor, room, body, client_id, move |res| {
            drop(pending);
            ack(&app, peer, res.map(|m| m.id()), &reference)
        })
    }

    fn dm(
        &self,
        to: &str,
        body: String,
        client_id: Option<String>,
        reference: &Value,
    ) -> Result<(), ApiError> {
        let Some(pending) = self.peer.begin_request(MAX_PENDING) else {
            return Ok(());
        };
        let (app, peer, reference) = (self.app.clone(), self.peer.clone(), reference.clone());
        actions::send_dm(&self.app, &self.actor, to, body, client_id, move |res| {
            drop(pending);
            ack(&app, peer, res.map(|m| m.id()), &reference)
        })
    }

    fn refresh(&mut self, token: &str, reference: &Value) -> Result<(), ApiError> {
        let id = renew(&self.app, &self.peer, token)?;
        self.actor.sid = id.sid;
        let expires_at = crate::clock::unix_to_rfc3339(id.expires_at);
        let v = json!({"type": "refreshed", "expires_at": expires_at, "ref": reference});
        self.send_json(&v.to_string());
        Ok(())
    }
}

/// The `joined` reply, built by hand around the pre-rendered online list: in a busy
/// room it is the biggest part of the reply, and a storm of joins builds it once per
/// join.
fn joined_frame(room: &str, joined: &Joined, reference: &Value) -> Frame {
    let (room_json, ref_json) = (Value::from(room).to_string(), reference.to_string());
    let count = joined.online_count.to_string();
    let list = joined.online_json.as_deref();
    text_frame_of(&[
        r#"{"type":"joined","room":"#,
        &room_json,
        if list.is_some() { r#","online":"# } else { "" },
        list.unwrap_or(""),
        r#","online_count":"#,
        &count,
        r#","ref":"#,
        &ref_json,
        "}",
    ])
}

/// Tells `tell` (the room's other sockets at that moment) that `peer`'s user came
/// online in `room` or went offline.
fn presence(app: &App, peer: &Peer, room: &str, status: &'static str, tell: Vec<Arc<Peer>>) {
    crate::presence::announce(app, &peer.username, room, status, tell);
}

/// Acknowledges a stored message, or reports why it was not stored. Runs on the writer
/// thread after the commit and goes through the fan-out, so the ack follows the
/// message's own broadcast.
fn ack(app: &App, peer: Arc<Peer>, res: Result<i64, ApiError>, reference: &Value) {
    let text = match res {
        Ok(id) => json!({"type": "ack", "ref": reference, "id": id}).to_string(),
        Err(e) => error_event(&e, reference),
    };
    app.fanout
        .deliver(vec![(Target::Peer(peer), text_frame(&text))]);
}
