//! Rooms, room messages and direct messages: listing, creating, history, sending.

use super::{audit_by, check_body, check_client_id, find_room, require, valid_room_name, Actor};
use crate::app::App;
use crate::clock;
use crate::error::ApiError;
use crate::events::Event;
use crate::fanout::Target;
use crate::metrics::{inc, METRICS};
use crate::model::{DirectMessage, Message, Page, Room, Stored};
use crate::store::messages::Sender;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

/// A room with its live online count.
#[derive(Debug, Serialize)]
pub struct RoomView {
    /// Name.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// Distinct users online.
    pub online: usize,
}

/// `GET /api/rooms`.
///
/// Paged by name: `limit` defaults to 200 and is clamped to 1–1000; `after` continues
/// a listing.
pub fn list_rooms(
    app: &App,
    after: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<RoomView>, ApiError> {
    let limit = limit.unwrap_or(200).clamp(1, 1000) as u32;
    Ok(app
        .store
        .rooms(after, limit)?
        .into_iter()
        .map(|r| RoomView {
            online: app.hub.online_count(&r.name),
            name: r.name,
            created_at: r.created_at,
        })
        .collect())
}

/// `POST /api/rooms`.
pub fn create_room(app: &App, actor: &Actor, name: &str) -> Result<RoomView, ApiError> {
    require(app, actor, "room.create", Some(name))?;
    if !valid_room_name(name) {
        return Err(ApiError::bad_request(
            "room name must be 1 to 64 characters of a-z 0-9 _ -",
        ));
    }
    app.room_limiter
        .check(&actor.user_id.to_string())
        .map_err(|secs| ApiError::rate_limited("too many rooms created; wait a while", secs))?;
    let room = app
        .store
        .create_room(name, actor.user_id, clock::now_rfc3339())?;
    audit_by(app, actor, "room_create", Some(&room.name), json!({}));
    Ok(RoomView {
        online: 0,
        name: room.name,
        created_at: room.created_at,
    })
}

/// `GET /api/rooms/{name}/online`: a page of the users online in a room, by name.
///
/// `limit` defaults to 200 and is clamped to 1–1000; `after` continues a listing. A
/// client that joined with counts (or any client of a big room) pages the names here
/// instead of receiving them all with `joined`.
pub fn room_online(
    app: &App,
    room: &str,
    after: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<String>, ApiError> {
    let room = find_room(app, room)?;
    let limit = limit.unwrap_or(200).clamp(1, 1000) as usize;
    Ok(app.hub.online_page(&room.name, after, limit))
}

/// A page of a room's history.
pub fn room_history(app: &App, room: &str, page: Page) -> Result<Vec<Message>, ApiError> {
    let room = find_room(app, room)?;
    Ok(app.store.room_history(&room, page)?)
}

/// A page of the conversation between the actor and `other`.
pub fn dm_history(
    app: &App,
    actor: &Actor,
    other: &str,
    page: Page,
) -> Result<Vec<DirectMessage>, ApiError> {
    let other = app
        .store
        .user_by_name(other)?
        .ok_or_else(|| ApiError::not_found(format!("no user named {other:?}")))?;
    Ok(app.store.dm_history(actor.user_id, other.id, page)?)
}

/// The sender of a message from `actor`, with its once-only key.
fn sender(actor: &Actor, client_id: Option<String>) -> Result<Sender, ApiError> {
    check_client_id(client_id.as_deref())?;
    Ok(Sender {
        id: actor.user_id,
        name: actor.username.clone(),
        client_id,
    })
}

/// The actor's conversations: the latest DM with each other user, most recent first.
pub fn conversations(app: &App, actor: &Actor) -> Result<Vec<Conversation>, ApiError> {
    let me = actor.username.as_str();
    Ok(app
        .store
        .conversations(actor.user_id, 200)?
        .into_iter()
        .map(|last| Conversation {
            user: if last.from == me {
                &last.to
            } else {
                &last.from
            }
            .clone(),
            last,
        })
        .collect())
}

/// One conversation (`GET /api/dms`).
#[derive(Debug, Serialize)]
pub struct Conversation {
    /// The other user.
    pub user: String,
    /// The latest DM between them.
    pub last: DirectMessage,
}

/// Stores a room message; once durable it is broadcast to the room (in commit order)
/// and then `done` runs — the socket's ack, or a REST/GraphQL reply. A repeat of the
/// actor's `client_id` is neither stored nor broadcast: `done` gets the first id.
pub fn send_message(
    app: &Arc<App>,
    actor: &Actor,
    room: Room,
    body: String,
    client_id: Option<String>,
    done: impl FnOnce(Result<Stored<Message>, ApiError>) + Send + 'static,
) -> Result<(), ApiError> {
    check_body(&body, app.cfg.max_message_chars)?;
    let from = sender(actor, client_id)?;
    let app2 = app.clone();
    app.store.insert_message(room, from, body, move |res| {
        let res = res.map_err(ApiError::from).inspect(|stored| {
            if let Stored::New(msg) = stored {
                inc(&METRICS.messages_stored);
                broadcast_message(&app2, msg);
            }
        });
        done(res)
    });
    Ok(())
}

/// Hands a stored room message to the room's sockets on this node and to its
/// subscriptions, after everything handed over before it. Also how a message stored
/// by another node arrives ([`crate::cluster`]).
pub fn broadcast_message(app: &App, msg: &Message) {
    let frame = crate::peer::text_frame(&crate::protocol::event("message", msg));
    let to = Target::Room {
        name: msg.room.clone(),
        id: Some(msg.id),
    };
    app.fanout.deliver(vec![(to, frame)]);
    app.fanout.publish(|| Event::Message(Arc::new(msg.clone())));
}

/// Stores a direct message; once durable it goes to every socket of both users, then
/// `done` runs.
pub fn send_dm(
    app: &Arc<App>,
    actor: &Actor,
    to: &str,
    body: String,
    client_id: Option<String>,
    done: impl FnOnce(Result<Stored<DirectMessage>, ApiError>) + Send + 'static,
) -> Result<(), ApiError> {
    check_body(&body, app.cfg.max_message_chars)?;
    let from = sender(actor, client_id)?;
    let recipient = app
        .store
        .user_by_name(to)?
        .ok_or_else(|| ApiError::not_found(format!("no user named {to:?}")))?;
    let app2 = app.clone();
    let (from_id, to_id) = (actor.user_id, recipient.id);
    let recipient = (recipient.id, recipient.username);
    app.store.insert_dm(from, recipient, body, move |res| {
        let res = res.map_err(ApiError::from).inspect(|stored| {
            if let Stored::New(dm) = stored {
                inc(&METRICS.messages_stored);
                broadcast_dm(&app2, dm, [from_id, to_id]);
            }
        });
        done(res)
    });
    Ok(())
}

/// Hands a stored direct message to every socket here of both `users` (sender and
/// recipient ids) and to their subscriptions. Also how one stored by another node
/// arrives.
pub fn broadcast_dm(app: &App, dm: &DirectMessage, users: [i64; 2]) {
    let [from_id, to_id] = users;
    let frame = crate::peer::text_frame(&crate::protocol::event("dm", dm));
    let mut delivery = vec![(Target::User(to_id), frame.clone())];
    if from_id != to_id {
        delivery.push((Target::User(from_id), frame));
    }
    app.fanout.deliver(delivery);
    app.fanout
        .publish(|| Event::Dm(Arc::new(dm.clone()), users));
}

/// The room message the actor first sent with `client_id`, for a repeat that must be
/// answered with the message itself (GraphQL's `sendMessage`): 409 if the key went
/// with a direct message, 404 if the message was deleted since.
pub fn first_message(app: &App, actor: &Actor, client_id: &str) -> Result<Message, ApiError> {
    match app.store.sent_with(actor.user_id, client_id)? {
        Some(crate::store::messages::Sent::Room(Some(m))) => Ok(m),
        Some(crate::store::messages::Sent::Room(None)) => Err(ApiError::not_found(
            "the message first sent with this client_id was deleted",
        )),
        _ => Err(ApiError::conflict(
            "this client_id was already used for a direct message",
        )),
    }
}

/// The direct message the actor first sent with `client_id` (see [`first_message`]).
pub fn first_dm(app: &App, actor: &Actor, client_id: &str) -> Result<DirectMessage, ApiError> {
    match app.store.sent_with(actor.user_id, client_id)? {
        Some(crate::store::messages::Sent::Dm(Some(m))) => Ok(m),
        _ => Err(ApiError::conflict(
            "this client_id was already used for a room message",
        )),
    }
}
