//! Who is there: the user directory (for starting a DM) and the admins' list of
//! accounts with their roles, bans and open sockets.

use super::{require_any, Actor};
use crate::app::App;
use crate::error::ApiError;
use crate::model::User;
use serde::Serialize;

/// A directory entry (`GET /api/users`).
#[derive(Debug, Serialize)]
pub struct UserSummary {
    /// Username.
    pub username: String,
    /// Whether the user has any open socket.
    pub online: bool,
}

/// An account as admins see it (`GET /api/admin/users`).
#[derive(Debug, Serialize)]
pub struct AdminUser {
    /// The public view.
    #[serde(flatten)]
    pub user: User,
    /// Whether the account is banned.
    pub banned: bool,
    /// Open sockets, all kinds.
    pub sockets: usize,
}

/// Users whose name starts with `q` (case-insensitively), by lower-cased name; `limit`
/// defaults to 20, clamped to 1–100. Any logged-in user may look.
pub fn list_users(
    app: &App,
    q: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<UserSummary>, ApiError> {
    let limit = limit.unwrap_or(20).clamp(1, 100) as u32;
    let found = app.store.list_users(q.unwrap_or(""), None, limit)?;
    Ok(found
        .into_iter()
        .map(|l| UserSummary {
            online: !app.hub.user_peers(l.user.id).is_empty(),
            username: l.user.username,
        })
        .collect())
}

/// Accounts with roles, ban state and open sockets, for those who may assign roles or
/// ban; `after` continues a listing, `limit` defaults to 100, clamped to 1–1000.
pub fn admin_users(
    app: &App,
    actor: &Actor,
    q: Option<&str>,
    after: Option<&str>,
    limit: Option<i64>,
) -> Result<Vec<AdminUser>, ApiError> {
    require_any(app, actor, &["role.assign", "user.ban"])?;
    let limit = limit.unwrap_or(100).clamp(1, 1000) as u32;
    let found = app.store.list_users(q.unwrap_or(""), after, limit)?;
    Ok(found
        .into_iter()
        .map(|l| AdminUser {
            sockets: app.hub.user_peers(l.user.id).len(),
            banned: l.banned,
            user: l.user,
        })
        .collect())
}
