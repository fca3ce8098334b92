//! What a user can do, independent of transport: REST handlers, the socket and (later)
//! GraphQL call these, so validation, permission checks and audit happen in one place.

use crate::app::App;
use crate::auth::{random_token, token_hash, AuthError, Identity};
use crate::clock;
use crate::config::Registration;
use crate::error::ApiError;
use crate::fanout::Target;
use crate::limits::Noted;
use crate::metrics::{inc, METRICS};
use crate::model::{DirectMessage, Message, Page, Room, Stored, User};
use crate::store::audit::AuditEntry;
use crate::store::messages::Sender;
use crate::store::users::{RefreshOutcome, Rotation, GUARD_PERMISSION};
use crate::sync::lock;
use serde::Serialize;
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

/// Login and refresh answer (PROTOCOL.md `TokenPair`).
#[derive(Debug, Serialize)]
pub struct TokenPair {
    /// HS256 JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Opaque single-use refresh token.
    pub refresh_token: String,
    /// The user.
    pub user: User,
}

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

/// Records an event done by `actor` (who and from where come from the actor).
fn audit_by(
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
fn audit(
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
    Ok(())
}

/// `POST /api/register`.
pub fn register(
    app: &App,
    username: &str,
    password: &str,
    ip: Option<&str>,
) -> Result<User, ApiError> {
    if app.cfg.registration == Registration::Closed {
        return Err(ApiError::forbidden("registration is closed"));
    }
    if !valid_username(username) {
        return Err(ApiError::bad_request(
            "username must be 3 to 32 characters of A-Z a-z 0-9 _ . -",
        ));
    }
    check_password(password)?;
    let hash = app.auth.hash_password(password)?;
    let user = app
        .store
        .create_user(username, hash, None, clock::now_rfc3339())?;
    audit(
        app,
        Some(&user.username),
        "register",
        Some(&user.username),
        ip,
        json!({"roles": user.roles}),
    );
    Ok(user)
}

/// The key the login limits use for a name: lower-cased, and only for valid names.
fn limit_key(username: &str) -> Option<String> {
    valid_username(username).then(|| username.to_ascii_lowercase())
}

/// Counts a login attempt against `--login-rate` (see [`crate::limits::LoginLimits`]),
/// before any password work.
pub fn check_login_rate(app: &App, username: &str, ip: Option<&str>) -> Result<(), ApiError> {
    let name = limit_key(username);
    app.login_limits
        .admit(name.as_deref(), ip.unwrap_or("-"))
        .map_err(|secs| {
            inc(&METRICS.logins_failed);
            let ip = ip.unwrap_or("-");
            if app.folds.note("login_failed", ip) == Noted::First {
                login_failed_row(app, username, Some(ip), "rate_limited");
            }
            ApiError::rate_limited("too many login attempts", secs)
        })
}

/// Counts a write made through REST (or GraphQL) against the user's `--msg-rate`
/// budget: the same number per second a socket may send.
pub fn check_write_rate(app: &App, actor: &Actor) -> Result<(), ApiError> {
    app.write_limiter
        .check(&actor.user_id.to_string())
        .map_err(|secs| ApiError::rate_limited("too many requests; slow down", secs))
}

/// Counts a registration against `--register-rate` for the IP (its own budget: a
/// burst of sign-ups does not lock anyone out of logging in).
pub fn check_register_rate(app: &App, ip: Option<&str>) -> Result<(), ApiError> {
    app.register_limiter
        .check(ip.unwrap_or("-"))
        .map_err(|secs| ApiError::rate_limited("too many registrations from this address", secs))
}

/// Counts and audits a refused login (actor null). The attempted name is chosen by
/// whoever sent it: it becomes the target only if it is a valid username; otherwise
/// the row keeps only its length, never the text (which may be 60 KB, or forge lines
/// and carry terminal escapes into `parley audit`).
fn login_failed(app: &App, username: &str, ip: Option<&str>, reason: &str) {
    inc(&METRICS.logins_failed);
    login_failed_row(app, username, ip, reason);
}

/// The audit row of a refused login.
fn login_failed_row(app: &App, username: &str, ip: Option<&str>, reason: &str) {
    let (target, detail) = if valid_username(username) {
        (Some(username), json!({ "reason": reason }))
    } else {
        let size = username.len();
        let detail = json!({ "reason": reason, "invalid_name": true, "name_bytes": size });
        (None, detail)
    };
    audit(app, None, "login_failed", target, ip, detail);
}

/// `POST /api/login`: one 401 for unknown user and wrong password, taking the same time
/// (see `auth`'s module doc); a password stored at another bcrypt cost than the
/// configured one is re-hashed on success.
pub fn login(
    app: &App,
    username: &str,
    password: &str,
    ip: Option<&str>,
) -> Result<TokenPair, ApiError> {
    app.auth.watch_stored_costs(&app.store);
    let record = if valid_username(username) {
        app.store.user_by_name(username)?
    } else {
        None
    };
    if !app
        .auth
        .verify_password(record.as_ref().map(|r| r.password_hash.as_str()), password)
    {
        if let Some(name) = limit_key(username) {
            app.login_limits.failed(&name, ip.unwrap_or("-"));
        }
        login_failed(app, username, ip, "bad credentials");
        return Err(AuthError::BadCredentials.into());
    }
    let Some(record) = record else {
        return Err(AuthError::BadCredentials.into());
    };
    if record.banned {
        login_failed(app, &record.username, ip, "banned");
        return Err(AuthError::Banned.into());
    }
    if let Some(hash) = app.auth.rehash_if_needed(&record.password_hash, password)? {
        app.store
            .rehash_password(record.id, record.password_hash.clone(), hash)?;
    }
    let user = app.store.user(record.id)?;
    let sid = random_token();
    let refresh = random_token();
    let now = clock::now_unix();
    app.store.start_session(
        &record,
        sid.clone(),
        ip.map(str::to_owned),
        token_hash(&refresh),
        now + app.auth.refresh_ttl(),
        clock::now_rfc3339(),
    )?;
    inc(&METRICS.logins_ok);
    if let Some(name) = limit_key(username) {
        app.login_limits.succeeded(&name, ip.unwrap_or("-"));
    }
    audit(
        app,
        Some(&user.username),
        "login",
        Some(&user.username),
        ip,
        json!({}),
    );
    token_pair(app, user, &sid, refresh)
}

fn token_pair(
    app: &App,
    user: User,
    sid: &str,
    refresh_token: String,
) -> Result<TokenPair, ApiError> {
    let (access_token, _exp) = app.auth.issue_access(&user, sid)?;
    Ok(TokenPair {
        access_token,
        token_type: "Bearer",
        expires_in: app.auth.access_ttl(),
        refresh_token,
        user,
    })
}

/// `POST /api/refresh`: rotates the refresh token; a retired one revokes its login.
pub fn refresh(app: &App, refresh_token: &str, ip: Option<&str>) -> Result<TokenPair, ApiError> {
    if let Some((_, owner)) = app
        .store
        .refresh_token_session(&token_hash(refresh_token))?
    {
        if app.store.user_by_id(owner)?.is_some_and(|u| u.banned) {
            return Err(AuthError::Banned.into());
        }
    }
    let fresh = random_token();
    let now = clock::now_unix();
    let outcome = app.store.rotate_refresh(Rotation {
        old_hash: token_hash(refresh_token),
        new_hash: token_hash(&fresh),
        new_expires_at: now + app.auth.refresh_ttl(),
        now_unix: now,
        now: clock::now_rfc3339(),
        grace_secs: app.cfg.refresh_grace,
    })?;
    match outcome {
        RefreshOutcome::Invalid => Err(ApiError::unauthorized("invalid or expired refresh token")),
        RefreshOutcome::Reused { user_id, sid } => {
            let name = app.store.user_by_id(user_id)?.map(|u| u.username);
            app.hub
                .close_session(&sid, crate::peer::close::REVOKED, "login revoked");
            audit(
                app,
                name.as_deref(),
                "refresh_reuse",
                name.as_deref(),
                ip,
                json!({"revoked_login": true}),
            );
            Err(ApiError::unauthorized(
                "refresh token was already used; the login is revoked",
            ))
        }
        RefreshOutcome::Rotated { user_id, sid } => {
            renewed(app, user_id, &sid, fresh, ip, "refresh")
        }
        RefreshOutcome::Retried { user_id, sid } => {
            renewed(app, user_id, &sid, fresh, ip, "refresh_retry")
        }
    }
}

/// A new token pair for a login whose refresh token was just rotated (or retried
/// within the grace), audited as `action`.
fn renewed(
    app: &App,
    user_id: i64,
    sid: &str,
    refresh_token: String,
    ip: Option<&str>,
    action: &'static str,
) -> Result<TokenPair, ApiError> {
    let Some(record) = app.store.user_by_id(user_id)? else {
        return Err(ApiError::unauthorized("invalid refresh token"));
    };
    if record.banned {
        return Err(AuthError::Banned.into());
    }
    let user = app.store.user(user_id)?;
    let name = Some(user.username.as_str());
    audit(app, name, action, name, ip, json!({}));
    token_pair(app, user, sid, refresh_token)
}

/// `POST /api/logout`: revokes the caller's login, and that of each refresh token given
/// (the body's, the web client's cookie) that is the same user's.
pub fn logout(app: &App, actor: &Actor, refresh_tokens: &[&str]) -> Result<(), ApiError> {
    let mut sids = vec![actor.sid.clone()];
    for rt in refresh_tokens {
        if let Some((sid, owner)) = app.store.refresh_token_session(&token_hash(rt))? {
            if owner == actor.user_id && !sids.contains(&sid) {
                sids.push(sid);
            }
        }
    }
    for sid in &sids {
        app.store
            .revoke_session(sid, "logout", clock::now_rfc3339())?;
        app.hub
            .close_session(sid, crate::peer::close::REVOKED, "logged out");
    }
    audit_by(
        app,
        actor,
        "logout",
        Some(&actor.username),
        json!({"logins": sids.len()}),
    );
    Ok(())
}

/// `GET /api/me`.
pub fn me(app: &App, actor: &Actor) -> Result<User, ApiError> {
    Ok(app.store.user(actor.user_id)?)
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

/// The sender of a message from `actor`, with its once-only key.
fn sender(actor: &Actor, client_id: Option<String>) -> Result<Sender, ApiError> {
    check_client_id(client_id.as_deref())?;
    Ok(Sender {
        id: actor.user_id,
        name: actor.username.clone(),
        client_id,
    })
}

/// Stores a room message; once durable it is broadcast to the room (in commit order)
/// and then `done` runs — the socket's ack, or a REST/GraphQL reply. A repeat of the
/// actor's `client_id` is neither stored nor broadcast: `done` gets the first id.
pub fn send_message(
    app: &std::sync::Arc<App>,
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
                let frame = crate::peer::text_frame(&crate::protocol::event("message", msg));
                let to = Target::Room {
                    name: msg.room.clone(),
                    id: Some(msg.id),
                };
                app2.fanout.deliver(vec![(to, frame)]);
            }
        });
        done(res)
    });
    Ok(())
}

/// Stores a direct message; once durable it goes to every socket of both users, then
/// `done` runs.
pub fn send_dm(
    app: &std::sync::Arc<App>,
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
                let frame = crate::peer::text_frame(&crate::protocol::event("dm", dm));
                let mut delivery = vec![(Target::User(to_id), frame.clone())];
                if from_id != to_id {
                    delivery.push((Target::User(from_id), frame));
                }
                app2.fanout.deliver(delivery);
            }
        });
        done(res)
    });
    Ok(())
}

/// A user by name, or 404.
fn find_user(app: &App, name: &str) -> Result<crate::store::users::UserRecord, ApiError> {
    app.store
        .user_by_name(name)?
        .ok_or_else(|| ApiError::not_found(format!("no user named {name:?}")))
}

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
                let v = json!({"type": "deleted", "id": id, "room": room, "by": actor2.username});
                let to = Target::Room {
                    name: room.clone(),
                    id: None,
                };
                app2.fanout
                    .deliver(vec![(to, crate::peer::text_frame(&v.to_string()))]);
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
    let sockets = app.hub.user_peers(user.id).len();
    app.hub
        .close_user(user.id, crate::peer::close::REVOKED, "kicked");
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
    let frame = crate::peer::text_frame(&v.to_string());
    let peers = match &roles {
        None => app.hub.all_peers(),
        Some(roles) => app
            .store
            .users_with_roles(roles)?
            .into_iter()
            .flat_map(|id| app.hub.user_peers(id))
            .collect(),
    };
    for p in &peers {
        p.send(&frame);
    }
    audit_by(
        app,
        actor,
        "announce",
        None,
        json!({"roles": roles, "sockets": peers.len()}),
    );
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
