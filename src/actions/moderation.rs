//! Moderation: deleting messages, kicking, banning, roles, announcements, and reading
//! the audit trail. Each needs a permission from the database's current roles.

use super::{audit_by, check_body, find_user, require, Actor};
use crate::app::App;
use crate::clock;
use crate::error::ApiError;
use crate::events::Event;
use crate::fanout::Target;
use crate::model::{Deleted, User};
use crate::store::notice::Notice;
use crate::store::users::GUARD_PERMISSION;
use serde_json::json;

/// Ban (`true`) or unban a user: needs `user.ban`. A ban revokes every login of the
/// user and closes their live sockets with 4003; one that would leave no unbanned
/// admin is refused with 409.
pub fn set_banned(app: &App, actor: &Actor, username: &str, banned: bool) -> Result<(), ApiError> {
    require(app, actor, "user.ban", Some(username))?;
    let user = find_user(app, username)?;
    if banned && user.id == actor.user_id {
        return Err(ApiError::conflict("you cannot ban yourself"));
    }
    app.store
        .set_banned(user.id, banned, GUARD_PERMISSION, clock::now_rfc3339())?;
    if banned {
        app.hub
            .close_user(user.id, crate::peer::close::REVOKED, "banned");
    }
    let action = if banned { "ban" } else { "unban" };
    audit_by(app, actor, action, Some(&user.username), json!({}));
    Ok(())
}

/// Replaces a user's roles: needs `role.assign`; 409 if no unbanned user could assign
/// roles after.
pub fn set_roles(
    app: &App,
    actor: &Actor,
    username: &str,
    roles: Vec<String>,
) -> Result<User, ApiError> {
    require(app, actor, "role.assign", Some(username))?;
    let user = find_user(app, username)?;
    let change = app
        .store
        .set_roles(user.id, roles, GUARD_PERMISSION)
        .map_err(|e| match e {
            crate::store::StoreError::NotFound(what) => {
                ApiError::bad_request(format!("unknown {what}"))
            }
            other => other.into(),
        })?;
    audit_by(
        app,
        actor,
        "role_change",
        Some(&user.username),
        json!({"from": change.from, "to": change.to}),
    );
    Ok(app.store.user(user.id)?)
}

/// Deletes a room message: needs `message.delete`. Once durable, `deleted` goes to the
/// room and then `done` runs.
pub fn delete_message(
    app: &std::sync::Arc<App>,
    actor: &Actor,
    id: i64,
    done: impl FnOnce(Result<(), ApiError>) + Send + 'static,
) -> Result<(), ApiError> {
    require(app, actor, "message.delete", Some(&id.to_string()))?;
    let app2 = app.clone();
    let actor2 = actor.clone();
    app.store
        .delete_message(id, actor.user_id, clock::now_rfc3339(), move |res| {
            let res = res.map_err(ApiError::from).map(|room| {
                broadcast_deleted(
                    &app2,
                    Deleted {
                        id,
                        room: room.clone(),
                        by: actor2.username.clone(),
                    },
                );
                audit_by(
                    &app2,
                    &actor2,
                    "message_delete",
                    Some(&id.to_string()),
                    json!({"room": room}),
                );
            });
            done(res)
        });
    Ok(())
}

/// Closes every socket of `username` with 4003: needs `user.kick`.
pub fn kick(app: &App, actor: &Actor, username: &str) -> Result<usize, ApiError> {
    require(app, actor, "user.kick", Some(username))?;
    let user = find_user(app, username)?;
    let sockets = close_kicked(app, user.id);
    app.store.notify(Notice::Kick { user_id: user.id });
    audit_by(
        app,
        actor,
        "kick",
        Some(&user.username),
        json!({"sockets": sockets}),
    );
    Ok(sockets)
}

/// Sends an announcement to every socket, or to users holding one of `roles`: needs
/// `announce`. Returns how many sockets it reached.
pub fn announce(
    app: &App,
    actor: &Actor,
    body: &str,
    roles: Option<Vec<String>>,
) -> Result<usize, ApiError> {
    require(app, actor, "announce", None)?;
    check_body(body, app.cfg.max_message_chars)?;
    let v = json!({"type": "announcement", "from": actor.username, "body": body, "ts": clock::now_rfc3339()});
    let frame = v.to_string();
    let sockets = deliver_announcement(app, &frame, roles.as_deref())?;
    app.store.notify(Notice::Announce {
        frame,
        roles: roles.clone(),
    });
    audit_by(
        app,
        actor,
        "announce",
        None,
        json!({"roles": roles, "sockets": sockets}),
    );
    Ok(sockets)
}

/// Sends `deleted` to the room's sockets on this node and to its subscriptions. Also
/// how a deletion made on another node arrives ([`crate::cluster`]).
pub fn broadcast_deleted(app: &App, deleted: Deleted) {
    let frame = crate::peer::text_frame(&crate::protocol::event("deleted", &deleted));
    let to = Target::Room {
        name: deleted.room.clone(),
        id: None,
    };
    app.fanout.deliver(vec![(to, frame)]);
    app.fanout
        .publish(|| Event::Deleted(std::sync::Arc::new(deleted)));
}

/// Closes every socket of the user on this node with 4003; returns how many.
pub fn close_kicked(app: &App, user_id: i64) -> usize {
    let sockets = app.hub.user_peers(user_id).len();
    app.hub
        .close_user(user_id, crate::peer::close::REVOKED, "kicked");
    sockets
}

/// Sends an announcement frame to the chat sockets on this node (of the holders of
/// `roles`, if given); returns how many.
pub fn deliver_announcement(
    app: &App,
    frame: &str,
    roles: Option<&[String]>,
) -> Result<usize, ApiError> {
    let frame = crate::peer::text_frame(frame);
    let mut peers = match roles {
        None => app.hub.all_peers(),
        Some(roles) => app
            .store
            .users_with_roles(roles)?
            .into_iter()
            .flat_map(|id| app.hub.user_peers(id))
            .collect(),
    };
    peers.retain(|p| p.speaks_chat());
    for p in &peers {
        p.send(&frame);
    }
    Ok(peers.len())
}

/// A page of the audit trail, newest first: needs `audit.read`.
pub fn audit_events(
    app: &App,
    actor: &Actor,
    limit: Option<i64>,
    before: Option<i64>,
) -> Result<Vec<crate::store::audit::AuditEvent>, ApiError> {
    require(app, actor, "audit.read", None)?;
    let limit = limit.unwrap_or(100).clamp(1, 1000) as u32;
    Ok(app.store.audit_events(limit, before)?)
}
