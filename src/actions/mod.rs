//! What a user can do, independent of transport: REST handlers, the socket and GraphQL
//! call these, so validation, permission checks, rate limits and audit happen in one
//! place. One file per area: [`accounts`] (register, login, tokens), [`chat`] (rooms,
//! messages, DMs), [`moderation`] (delete, kick, ban, roles, announcements, the audit
//! trail) and [`directory`] (who is there); this file holds what they share — the
//! [`Actor`], input rules, the permission check and the audit helpers.

mod accounts;
mod chat;
mod directory;
mod moderation;

pub use accounts::*;
pub use chat::*;
pub use directory::*;
pub use moderation::*;

use crate::app::App;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::model::Room;
use crate::store::audit::AuditEntry;
use crate::sync::lock;
use serde_json::json;

/// Who is acting, and from where.
#[derive(Debug, Clone)]
pub struct Actor {
    /// User id.
    pub user_id: i64,
    /// Username.
    pub username: String,
    /// The login acted through.
    pub sid: String,
    /// Peer IP (no port).
    pub ip: Option<String>,
}

impl Actor {
    /// The actor behind a verified token.
    pub fn new(id: &Identity, ip: Option<String>) -> Actor {
        Actor {
            user_id: id.user_id,
            username: id.username.clone(),
            sid: id.sid.clone(),
            ip,
        }
    }
}

/// Records an event done by `actor` (who and from where come from the actor).
pub(super) fn audit_by(
    app: &App,
    actor: &Actor,
    action: &'static str,
    target: Option<&str>,
    detail: serde_json::Value,
) {
    audit(
        app,
        Some(&actor.username),
        action,
        target,
        actor.ip.as_deref(),
        detail,
    );
}

/// Records a security event.
pub(super) fn audit(
    app: &App,
    actor: Option<&str>,
    action: &'static str,
    target: Option<&str>,
    ip: Option<&str>,
    detail: serde_json::Value,
) {
    app.store.audit(AuditEntry {
        actor: actor.map(str::to_owned),
        action,
        target: target.map(str::to_owned),
        ip: ip.map(str::to_owned),
        detail,
    });
}

/// Usernames: 3–32 chars of `[A-Za-z0-9_.-]`.
pub fn valid_username(name: &str) -> bool {
    (3..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Room names: 1–64 chars of `[a-z0-9_-]`.
pub fn valid_room_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// Passwords: 8–72 bytes (bcrypt's limit).
pub fn check_password(password: &str) -> Result<(), ApiError> {
    if (8..=72).contains(&password.len()) {
        Ok(())
    } else {
        Err(ApiError::bad_request("password must be 8 to 72 bytes"))
    }
}

/// Message bodies: 1 to `max` Unicode characters.
pub fn check_body(body: &str, max: usize) -> Result<(), ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("body must not be empty"));
    }
    if body.chars().nth(max).is_some() {
        return Err(ApiError::too_large(format!(
            "body is over {max} characters"
        )));
    }
    // SQLite would store it, PostgreSQL refuses it in text: refused here, a body
    // means the same on either engine (and `parley migrate` never meets one).
    if body.contains('\0') {
        return Err(ApiError::bad_request(
            "body must not contain the NUL character (U+0000)",
        ));
    }
    Ok(())
}

/// `client_id`: 1–64 chars of `[A-Za-z0-9_-]`.
pub fn check_client_id(client_id: Option<&str>) -> Result<(), ApiError> {
    let ok = client_id.is_none_or(|c| {
        (1..=64).contains(&c.len())
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "client_id must be 1 to 64 characters of A-Z a-z 0-9 _ -",
        ))
    }
}

/// Runs an action whose result arrives on the writer thread (a send, a deletion) and
/// waits for it.
pub fn wait_for<T: Send + 'static>(
    start: impl FnOnce(Box<dyn FnOnce(Result<T, ApiError>) + Send>) -> Result<(), ApiError>,
) -> Result<T, ApiError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    start(Box::new(move |r| {
        let _ = tx.send(r);
    }))?;
    rx.recv().unwrap_or_else(|_| Err(ApiError::internal()))
}

/// Counts a write made through REST (or GraphQL) against the user's `--msg-rate`
/// budget: the same number per second a socket may send.
pub fn check_write_rate(app: &App, actor: &Actor) -> Result<(), ApiError> {
    check_write_rate_n(app, actor, 1)
}

/// Counts `n` writes at once against `--msg-rate`: all of them, or none if they do not
/// all fit (so a refused request has spent nothing).
pub fn check_write_rate_n(app: &App, actor: &Actor, n: u32) -> Result<(), ApiError> {
    app.write_limiter
        .check_n(&actor.user_id.to_string(), n)
        .map_err(|secs| ApiError::rate_limited("too many requests; slow down", secs))
}

/// Counts a registration against `--register-rate` for the IP (its own budget: a
/// burst of sign-ups does not lock anyone out of logging in).
pub fn check_register_rate(app: &App, ip: Option<&str>) -> Result<(), ApiError> {
    app.register_limiter
        .check(ip.unwrap_or("-"))
        .map_err(|secs| ApiError::rate_limited("too many registrations from this address", secs))
}

/// Checks that the actor holds at least one of `permissions`; a refusal is audited.
pub fn require_any(app: &App, actor: &Actor, permissions: &[&str]) -> Result<(), ApiError> {
    for p in permissions {
        if app.store.has_permission(actor.user_id, p)? {
            return Ok(());
        }
    }
    let wanted = permissions.join(" or ");
    audit_by(app, actor, "forbidden", None, json!({"permission": wanted}));
    Err(ApiError::forbidden(format!("missing permission {wanted}")))
}

/// Checks a permission against the database's current roles; a refusal is audited.
pub fn require(
    app: &App,
    actor: &Actor,
    permission: &str,
    target: Option<&str>,
) -> Result<(), ApiError> {
    if app.store.has_permission(actor.user_id, permission)? {
        return Ok(());
    }
    audit_by(
        app,
        actor,
        "forbidden",
        target,
        json!({"permission": permission}),
    );
    Err(ApiError::forbidden(format!(
        "missing permission {permission}"
    )))
}

/// A room by name, or 404.
///
/// Rooms are only ever added, so found ones are remembered: joining and sending then
/// cost no database read, and idle sockets' threads keep small stacks.
pub fn find_room(app: &App, name: &str) -> Result<Room, ApiError> {
    if let Some(room) = lock(&app.rooms).get(name).cloned() {
        return Ok(room);
    }
    let room = app
        .store
        .room(name)?
        .ok_or_else(|| ApiError::not_found(format!("no room named {name:?}")))?;
    lock(&app.rooms).insert(room.name.clone(), room.clone());
    Ok(room)
}

/// A user by name, or 404.
pub(super) fn find_user(
    app: &App,
    name: &str,
) -> Result<crate::store::users::UserRecord, ApiError> {
    app.store
        .user_by_name(name)?
        .ok_or_else(|| ApiError::not_found(format!("no user named {name:?}")))
}
