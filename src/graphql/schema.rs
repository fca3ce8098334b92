//! The GraphQL schema (docs/graphql.md): its object types, and resolvers that each call
//! [`crate::actions`] (the same checks, audit rows, rate limits and broadcasts as REST
//! and the socket) and translate the answer.
//!
//! Resolvers run on the thread executing the operation: an HTTP worker, or a
//! subscription socket's pump thread. Writes wait for their commit on that thread.
//! Subscriptions listen through [`crate::events`]; `messageAdded` with `since`
//! registers its listener before it reads the stored messages, so a message committed
//! meanwhile is either in what it reads or in what it hears (or both: then the live
//! copy, with an id not above the last one replayed, is skipped).

use super::{graphql_error, Gql};
use crate::actions;
use crate::app::App;
use crate::error::ApiError;
use crate::events::{Event, Listening, Topic};
use crate::model::{self, Page, Stored};
use crate::peer::Peer;
use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Context, Object, Result, SimpleObject, Subscription as SubscriptionRoot};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How long a replay waits for a slow client to take a page before sending the next.
const REPLAY_WAIT: Duration = Duration::from_secs(2);

/// An account.
#[derive(SimpleObject)]
pub struct User {
    id: i64,
    username: String,
    roles: Vec<String>,
    created_at: String,
}

impl From<model::User> for User {
    fn from(u: model::User) -> Self {
        User {
            id: u.id,
            username: u.username,
            roles: u.roles,
            created_at: u.created_at,
        }
    }
}

/// A room with its live online count.
#[derive(SimpleObject)]
pub struct Room {
    name: String,
    created_at: String,
    online: i64,
}

impl From<actions::RoomView> for Room {
    fn from(r: actions::RoomView) -> Self {
        Room {
            name: r.name,
            created_at: r.created_at,
            online: i64::try_from(r.online).unwrap_or(i64::MAX),
        }
    }
}

/// A room message.
#[derive(SimpleObject)]
pub struct Message {
    id: i64,
    room: String,
    from: String,
    body: String,
    ts: String,
    client_id: Option<String>,
}

impl From<model::Message> for Message {
    fn from(m: model::Message) -> Self {
        Message {
            id: m.id,
            room: m.room,
            from: m.from,
            body: m.body,
            ts: m.ts,
            client_id: m.client_id,
        }
    }
}

/// A direct message.
#[derive(SimpleObject)]
#[graphql(name = "DM")]
pub struct Dm {
    id: i64,
    from: String,
    to: String,
    body: String,
    ts: String,
    client_id: Option<String>,
}

impl From<model::DirectMessage> for Dm {
    fn from(m: model::DirectMessage) -> Self {
        Dm {
            id: m.id,
            from: m.from,
            to: m.to,
            body: m.body,
            ts: m.ts,
            client_id: m.client_id,
        }
    }
}

/// An audit trail row; `detail` is its JSON object, encoded as a string.
#[derive(SimpleObject)]
pub struct AuditEvent {
    id: i64,
    ts: String,
    actor: Option<String>,
    action: String,
    target: Option<String>,
    ip: Option<String>,
    detail: String,
}

impl From<crate::store::audit::AuditEvent> for AuditEvent {
    fn from(e: crate::store::audit::AuditEvent) -> Self {
        AuditEvent {
            id: e.id,
            ts: e.ts,
            actor: e.actor,
            action: e.action,
            target: e.target,
            ip: e.ip,
            detail: e.detail.to_string(),
        }
    }
}

/// A directory entry.
#[derive(SimpleObject)]
pub struct UserSummary {
    username: String,
    online: bool,
}

impl From<actions::UserSummary> for UserSummary {
    fn from(u: actions::UserSummary) -> Self {
        UserSummary {
            username: u.username,
            online: u.online,
        }
    }
}

/// Someone came online in a room or went offline.
#[derive(SimpleObject)]
pub struct Presence {
    user: String,
    room: String,
    status: String,
}

/// A deleted room message.
#[derive(SimpleObject)]
pub struct Deleted {
    id: i64,
    room: String,
    by: String,
}

/// The caller's context, or `internal` (a request always carries it).
fn gql<'a>(ctx: &'a Context<'_>) -> Result<&'a Gql, ApiError> {
    ctx.data::<Gql>().map_err(|_| {
        log::error!("a GraphQL operation ran without its context");
        ApiError::internal()
    })
}

/// Runs a resolver body with the caller's context; its [`ApiError`] becomes a
/// GraphQL error carrying the code.
fn with<T>(ctx: &Context<'_>, f: impl FnOnce(&Gql) -> Result<T, ApiError>) -> Result<T> {
    gql(ctx).and_then(f).map_err(graphql_error)
}

/// The complexity of a list field: its page size (clamped as the action clamps it)
/// times the cost of one item.
fn list_cost(limit: Option<i64>, default: i64, max: i64, item: usize) -> usize {
    let n = usize::try_from(limit.unwrap_or(default).clamp(1, max)).unwrap_or(1);
    n.saturating_mul(item)
}

fn into_all<A, B: From<A>>(items: Vec<A>) -> Vec<B> {
    items.into_iter().map(Into::into).collect()
}

/// The root query type.
pub struct Query;

#[Object]
impl Query {
    /// The caller's account.
    async fn me(&self, ctx: &Context<'_>) -> Result<User> {
        with(ctx, |g| Ok(actions::me(&g.app, &g.actor)?.into()))
    }

    /// Rooms by name (`limit` 1–1000, default 200; `after` continues a listing).
    #[graphql(complexity = "list_cost(limit, 200, 1000, child_complexity)")]
    async fn rooms(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        limit: Option<i64>,
    ) -> Result<Vec<Room>> {
        with(ctx, |g| {
            Ok(into_all(actions::list_rooms(
                &g.app,
                after.as_deref(),
                limit,
            )?))
        })
    }

    /// A page of a room's history, oldest first.
    #[graphql(complexity = "list_cost(limit, 50, 200, child_complexity)")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        room: String,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<Message>> {
        with(ctx, |g| {
            let page = Page::new(before, after, limit);
            Ok(into_all(actions::room_history(&g.app, &room, page)?))
        })
    }

    /// A page of the users online in a room, by name (`limit` 1–1000, default 200;
    /// `after` continues a listing).
    #[graphql(complexity = "list_cost(limit, 200, 1000, 1)")]
    async fn room_online(
        &self,
        ctx: &Context<'_>,
        room: String,
        after: Option<String>,
        limit: Option<i64>,
    ) -> Result<Vec<String>> {
        with(ctx, |g| {
            actions::room_online(&g.app, &room, after.as_deref(), limit)
        })
    }

    /// A page of the caller's conversation with `user`, oldest first.
    #[graphql(complexity = "list_cost(limit, 50, 200, child_complexity)")]
    async fn dms(
        &self,
        ctx: &Context<'_>,
        user: String,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<i64>,
    ) -> Result<Vec<Dm>> {
        with(ctx, |g| {
            let page = Page::new(before, after, limit);
            Ok(into_all(actions::dm_history(
                &g.app, &g.actor, &user, page,
            )?))
        })
    }

    /// Users whose name starts with `q` (`limit` 1–100, default 20).
    #[graphql(complexity = "list_cost(limit, 20, 100, child_complexity)")]
    async fn users(
        &self,
        ctx: &Context<'_>,
        q: Option<String>,
        limit: Option<i64>,
    ) -> Result<Vec<UserSummary>> {
        with(ctx, |g| {
            Ok(into_all(actions::list_users(&g.app, q.as_deref(), limit)?))
        })
    }

    /// The audit trail, newest first (needs `audit.read`; `limit` 1–1000, default 100).
    #[graphql(complexity = "list_cost(limit, 100, 1000, child_complexity)")]
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        limit: Option<i64>,
        before: Option<i64>,
    ) -> Result<Vec<AuditEvent>> {
        with(ctx, |g| {
            Ok(into_all(actions::audit_events(
                &g.app, &g.actor, limit, before,
            )?))
        })
    }
}

/// The root mutation type. Each root field is one write against the caller's
/// `--msg-rate` budget, counted before the operation runs.
pub struct Mutation;

#[Object]
impl Mutation {
    /// Stores a message in a room (no join needed) and broadcasts it like a socket
    /// `send`. A repeated `clientId` stores nothing and returns the first message.
    async fn send_message(
        &self,
        ctx: &Context<'_>,
        room: String,
        body: String,
        client_id: Option<String>,
    ) -> Result<Message> {
        with(ctx, |g| {
            let room = actions::find_room(&g.app, &room)?;
            let cid = client_id.clone();
            let stored = actions::wait_for(|done| {
                actions::send_message(&g.app, &g.actor, room, body, cid, done)
            })?;
            match (stored, client_id) {
                (Stored::New(m), _) => Ok(m.into()),
                (Stored::Repeat(_), Some(cid)) => {
                    Ok(actions::first_message(&g.app, &g.actor, &cid)?.into())
                }
                (Stored::Repeat(_), None) => Err(ApiError::internal()),
            }
        })
    }

    /// Stores a direct message; it goes to every socket of both users.
    async fn send_dm(
        &self,
        ctx: &Context<'_>,
        to: String,
        body: String,
        client_id: Option<String>,
    ) -> Result<Dm> {
        with(ctx, |g| {
            let cid = client_id.clone();
            let stored =
                actions::wait_for(|done| actions::send_dm(&g.app, &g.actor, &to, body, cid, done))?;
            match (stored, client_id) {
                (Stored::New(m), _) => Ok(m.into()),
                (Stored::Repeat(_), Some(cid)) => {
                    Ok(actions::first_dm(&g.app, &g.actor, &cid)?.into())
                }
                (Stored::Repeat(_), None) => Err(ApiError::internal()),
            }
        })
    }

    /// Deletes a room message (needs `message.delete`).
    async fn delete_message(&self, ctx: &Context<'_>, id: i64) -> Result<bool> {
        with(ctx, |g| {
            actions::wait_for(|done| actions::delete_message(&g.app, &g.actor, id, done))?;
            Ok(true)
        })
    }

    /// Creates a room (needs `room.create`).
    async fn create_room(&self, ctx: &Context<'_>, name: String) -> Result<Room> {
        with(ctx, |g| {
            Ok(actions::create_room(&g.app, &g.actor, &name)?.into())
        })
    }

    /// Closes every socket of `user`: 4003 on `/ws`, 4403 on `/graphql` (needs
    /// `user.kick`).
    async fn kick(&self, ctx: &Context<'_>, user: String) -> Result<bool> {
        with(ctx, |g| {
            actions::kick(&g.app, &g.actor, &user).map(|_| true)
        })
    }

    /// Bans `user` (needs `user.ban`).
    async fn ban(&self, ctx: &Context<'_>, user: String) -> Result<bool> {
        with(ctx, |g| {
            actions::set_banned(&g.app, &g.actor, &user, true).map(|_| true)
        })
    }

    /// Lifts a ban (needs `user.ban`).
    async fn unban(&self, ctx: &Context<'_>, user: String) -> Result<bool> {
        with(ctx, |g| {
            actions::set_banned(&g.app, &g.actor, &user, false).map(|_| true)
        })
    }

    /// Replaces `user`'s roles (needs `role.assign`).
    async fn set_roles(&self, ctx: &Context<'_>, user: String, roles: Vec<String>) -> Result<User> {
        with(ctx, |g| {
            Ok(actions::set_roles(&g.app, &g.actor, &user, roles)?.into())
        })
    }

    /// Announces to every chat socket, or to users holding one of `roles` (needs
    /// `announce`).
    async fn announce(
        &self,
        ctx: &Context<'_>,
        body: String,
        roles: Option<Vec<String>>,
    ) -> Result<bool> {
        with(ctx, |g| {
            actions::announce(&g.app, &g.actor, &body, roles).map(|_| true)
        })
    }
}

/// The root subscription type (over `graphql-transport-ws` only).
pub struct Subscription;

/// The socket a subscription runs on.
fn socket(g: &Gql) -> Result<&Arc<Peer>, ApiError> {
    g.peer
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("subscriptions need the WebSocket transport"))
}

/// Starts listening for `topic` on behalf of the subscription's socket.
fn listen(g: &Gql, topic: Topic) -> Result<Listening, ApiError> {
    Ok(g.app.fanout.listen(topic, socket(g)?, g.app.cfg.send_queue))
}

#[SubscriptionRoot]
impl Subscription {
    /// The stored messages of `room` after `since` (all of them, in id order), then
    /// new ones as they are stored.
    async fn message_added(
        &self,
        ctx: &Context<'_>,
        room: String,
        since: Option<i64>,
    ) -> Result<impl Stream<Item = Result<Message>>> {
        with(ctx, |g| {
            let room = actions::find_room(&g.app, &room)?;
            let live = listen(g, Topic::Messages(room.name.clone()))?;
            let feed = Feed {
                app: g.app.clone(),
                peer: socket(g)?.clone(),
                room,
                last: since.unwrap_or(i64::MIN),
                replaying: since.is_some(),
                pages: 0,
                batch: VecDeque::new(),
                live,
                failed: false,
            };
            Ok(stream::unfold(feed, |mut f| async move {
                let next = f.next().await?;
                Some((next, f))
            }))
        })
    }

    /// Messages of `room` as they are deleted.
    async fn message_deleted(
        &self,
        ctx: &Context<'_>,
        room: String,
    ) -> Result<impl Stream<Item = Deleted>> {
        with(ctx, |g| {
            let room = actions::find_room(&g.app, &room)?;
            let live = listen(g, Topic::Deletions(room.name))?;
            Ok(live.filter_map(|e| async move {
                match e {
                    Event::Deleted(d) => Some(Deleted {
                        id: d.id,
                        room: d.room.clone(),
                        by: d.by.clone(),
                    }),
                    _ => None,
                }
            }))
        })
    }

    /// The caller's direct messages, sent and received, as they are stored.
    async fn dm_received(&self, ctx: &Context<'_>) -> Result<impl Stream<Item = Dm>> {
        with(ctx, |g| {
            let live = listen(g, Topic::Dms(g.actor.user_id))?;
            Ok(live.filter_map(|e| async move {
                match e {
                    Event::Dm(dm, _) => Some((*dm).clone().into()),
                    _ => None,
                }
            }))
        })
    }

    /// Users coming online in `room` (their first chat socket joins it) and going
    /// offline (their last one leaves).
    async fn presence(
        &self,
        ctx: &Context<'_>,
        room: String,
    ) -> Result<impl Stream<Item = Presence>> {
        with(ctx, |g| {
            let room = actions::find_room(&g.app, &room)?;
            let live = listen(g, Topic::Presence(room.name))?;
            Ok(live.filter_map(|e| async move {
                match e {
                    Event::Presence(p) => Some(Presence {
                        user: p.user.clone(),
                        room: p.room.clone(),
                        status: p.status.to_owned(),
                    }),
                    _ => None,
                }
            }))
        })
    }
}

/// `messageAdded`'s stream: the replay, page by page, then live messages.
struct Feed {
    app: Arc<App>,
    peer: Arc<Peer>,
    room: model::Room,
    /// The last id sent (replayed or live).
    last: i64,
    replaying: bool,
    pages: usize,
    batch: VecDeque<model::Message>,
    live: Listening,
    failed: bool,
}

impl Feed {
    async fn next(&mut self) -> Option<Result<Message>> {
        loop {
            if let Some(m) = self.batch.pop_front() {
                self.last = m.id;
                return Some(Ok(m.into()));
            }
            if self.failed {
                return None;
            }
            if self.replaying {
                // A page at a time, each once the client has taken most of the last:
                // a replay of any length fits the socket's queue.
                if self.pages > 0 {
                    self.peer.wait_for_room(REPLAY_WAIT);
                }
                self.pages += 1;
                let page = Page::new(None, Some(self.last), Some(Page::MAX_LIMIT));
                match self.app.store.room_history(&self.room, page) {
                    Ok(batch) => {
                        self.replaying = batch.len() == page.limit as usize;
                        self.batch = batch.into();
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(graphql_error(e.into())));
                    }
                }
                continue;
            }
            match self.live.next().await? {
                Event::Message(m) if m.id > self.last => {
                    self.last = m.id;
                    return Some(Ok((*m).clone().into()));
                }
                _ => continue,
            }
        }
    }
}
