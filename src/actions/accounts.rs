//! Accounts and tokens: register, login (and its limits and audit), refresh, logout.

use super::{audit, audit_by, check_password, valid_username, Actor};
use crate::app::App;
use crate::auth::{random_token, token_hash, AuthError};
use crate::clock;
use crate::config::Registration;
use crate::error::ApiError;
use crate::limits::Noted;
use crate::metrics::{inc, METRICS};
use crate::model::User;
use crate::store::users::{RefreshOutcome, Rotation};
use serde::Serialize;
use serde_json::json;

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
