//! Accounts, roles, permissions, sessions (logins) and refresh tokens.

use super::{sqlite::Sqlite, Result, StoreError};
use crate::model::User;
use rusqlite::{params, Connection, OptionalExtension, Row};

/// A user row, including what clients never see.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// Row id.
    pub id: i64,
    /// Name as registered.
    pub username: String,
    /// bcrypt hash.
    pub password_hash: String,
    /// RFC 3339.
    pub created_at: String,
    /// Whether the user is banned now.
    pub banned: bool,
    /// Random per account; a login records it and is valid only while it matches, so
    /// no other account can ever inherit the login, whatever its id.
    pub stamp: String,
}

/// What an access token's user and login look like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLogin {
    /// The account's name.
    pub username: String,
    /// Whether the account is banned.
    pub banned: bool,
    /// Whether the login is this account's (the stamps agree) and not revoked. False
    /// for a login of an account deleted outside parley, and for logins that predate
    /// the stamps but had no account when the database was upgraded.
    pub live: bool,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live; it is retired and the new one stored.
    Rotated {
        /// Owner.
        user_id: i64,
        /// The login it belongs to.
        sid: String,
    },
    /// The token was retired within `--refresh-grace` seconds (a retry whose answer
    /// was lost, two tabs at once): a new successor was stored for the same login.
    Retried {
        /// Owner.
        user_id: i64,
        /// The login it belongs to.
        sid: String,
    },
    /// The token had already been used: its whole login is now revoked.
    Reused {
        /// Owner.
        user_id: i64,
        /// The revoked login.
        sid: String,
    },
    /// Unknown, expired, or its login is revoked.
    Invalid,
}

const USER_COLUMNS: &str = "id, username, password_hash, created_at, banned_at IS NOT NULL, stamp";

/// SQL (over `sessions s`): whether the login was made for the account that holds its
/// `user_id` now. NULL stamps (a missing account, an orphan login) are never current.
const SESSION_CURRENT: &str =
    "coalesce(s.user_stamp = (SELECT stamp FROM users WHERE id = s.user_id), 0)";

/// A new account stamp: 16 random bytes, base64url.
pub(super) fn new_stamp() -> String {
    crate::random::random_token_bytes(16)
}

fn user_record(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: r.get(0)?,
        username: r.get(1)?,
        password_hash: r.get(2)?,
        created_at: r.get(3)?,
        banned: r.get(4)?,
        stamp: r.get(5)?,
    })
}

fn roles_of(c: &Connection, user_id: i64) -> rusqlite::Result<Vec<String>> {
    let mut st =
        c.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
    let rows = st.query_map([user_id], |r| r.get(0))?;
    rows.collect()
}

fn user_view(c: &Connection, user_id: i64) -> Result<User> {
    let rec = c
        .query_row(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"),
            [user_id],
            user_record,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound("user".into()))?;
    Ok(User {
        id: rec.id,
        username: rec.username,
        roles: roles_of(c, user_id)?,
        created_at: rec.created_at,
    })
}

impl Sqlite {
    /// Looks a user up by name, case-insensitively.
    pub fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE username = ?1"
            ))?
            .query_row([username], user_record)
            .optional()
        })
    }

    /// Looks a user up by id.
    pub fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>> {
        self.read(|c| {
            c.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))?
                .query_row([id], user_record)
                .optional()
        })
    }

    /// The public view of a user, with roles.
    pub fn user(&self, id: i64) -> Result<User> {
        self.read(|c| Ok(user_view(c, id)))?
    }

    /// Creates an account. Without `role`, the first account gets `admin` and later
    /// ones `member`. A name taken case-insensitively is a conflict.
    pub fn create_user(
        &self,
        username: &str,
        password_hash: String,
        role: Option<String>,
        created_at: String,
    ) -> Result<User> {
        let username = username.to_owned();
        self.write(move |c| {
            let taken: bool = c.query_row(
                "SELECT EXISTS(SELECT 1 FROM users WHERE username = ?1)",
                [&username],
                |r| r.get(0),
            )?;
            if taken {
                return Err(StoreError::Conflict("username is taken".into()));
            }
            let role = match role {
                Some(r) => r,
                None => {
                    let n: i64 = c.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
                    if n == 0 { "admin" } else { "member" }.to_owned()
                }
            };
            let known: bool = c.query_row(
                "SELECT EXISTS(SELECT 1 FROM roles WHERE name = ?1)",
                [&role],
                |r| r.get(0),
            )?;
            if !known {
                return Err(StoreError::NotFound(format!("role {role:?}")));
            }
            c.execute(
                "INSERT INTO users(username, password_hash, created_at, stamp)
                 VALUES (?1, ?2, ?3, ?4)",
                params![username, password_hash, created_at, new_stamp()],
            )?;
            let id = c.last_insert_rowid();
            c.execute(
                "INSERT INTO user_roles(user_id, role) VALUES (?1, ?2)",
                params![id, role],
            )?;
            user_view(c, id)
        })
    }

    /// Whether any of the user's current roles grants `permission`.
    pub fn has_permission(&self, user_id: i64, permission: &str) -> Result<bool> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM user_roles ur
                   JOIN role_permissions rp ON rp.role = ur.role
                  WHERE ur.user_id = ?1 AND rp.permission = ?2)",
            )?
            .query_row(params![user_id, permission], |r| r.get(0))
        })
    }

    /// Records a new login of `user` (bound to the stamp the account had when its
    /// password was checked) with its first refresh token.
    pub fn start_session(
        &self,
        user: &UserRecord,
        sid: String,
        ip: Option<String>,
        refresh_hash: String,
        refresh_expires_at: u64,
        now: String,
    ) -> Result<()> {
        let (user_id, stamp) = (user.id, user.stamp.clone());
        self.write(move |c| {
            c.execute(
                "INSERT INTO sessions(id, user_id, created_at, ip, user_stamp)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![sid, user_id, now, ip, stamp],
            )?;
            c.execute(
                "INSERT INTO refresh_tokens(token_hash, session_id, issued_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![refresh_hash, sid, now, refresh_expires_at as i64],
            )?;
            Ok(())
        })
    }

    /// The account `user_id` and whether login `sid` is live for it; `None` if the
    /// account does not exist.
    pub fn token_login(&self, user_id: i64, sid: &str) -> Result<Option<TokenLogin>> {
        // One statement: every authenticated request and upgrade runs it.
        self.read(|c| {
            c.prepare_cached(
                "SELECT u.username, u.banned_at IS NOT NULL,
                        EXISTS(SELECT 1 FROM sessions s
                                WHERE s.id = ?2 AND s.user_id = u.id
                                  AND s.revoked_at IS NULL AND s.user_stamp = u.stamp)
                   FROM users u WHERE u.id = ?1",
            )?
            .query_row(params![user_id, sid], |r| {
                Ok(TokenLogin {
                    username: r.get(0)?,
                    banned: r.get(1)?,
                    live: r.get(2)?,
                })
            })
            .optional()
        })
    }

    /// The session a refresh token belongs to, without using it.
    pub fn refresh_token_session(&self, token_hash: &str) -> Result<Option<(String, i64)>> {
        self.read(|c| {
            c.query_row(
                "SELECT s.id, s.user_id FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
                  WHERE t.token_hash = ?1",
                [token_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    /// Uses a refresh token: retires it and stores `new_hash` in its place, or, if it was
    /// already retired, revokes its whole login. One transaction, so two racing
    /// refreshes with the same token cannot both succeed. A token of a login that is
    /// not its account's (see [`TokenLogin::live`]) is invalid.
    pub fn rotate_refresh(&self, r: Rotation) -> Result<RefreshOutcome> {
        let Rotation {
            old_hash,
            new_hash,
            new_expires_at,
            now_unix,
            now,
            grace_secs,
        } = r;
        self.write(move |c| {
            let row: Option<(String, i64, i64, Option<String>, bool)> = c
                .query_row(
                    &format!(
                        "SELECT t.session_id, s.user_id, t.expires_at, t.used_at,
                                s.revoked_at IS NOT NULL OR NOT {SESSION_CURRENT}
                           FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
                          WHERE t.token_hash = ?1"
                    ),
                    [&old_hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            let Some((sid, user_id, expires_at, used, dead)) = row else {
                return Ok(RefreshOutcome::Invalid);
            };
            if dead {
                return Ok(RefreshOutcome::Invalid);
            }
            let insert_successor = || {
                c.execute(
                    "INSERT INTO refresh_tokens(token_hash, session_id, issued_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![new_hash, sid, now, new_expires_at as i64],
                )
            };
            if let Some(used_at) = used {
                if within_grace(&used_at, now_unix, grace_secs) {
                    insert_successor()?;
                    return Ok(RefreshOutcome::Retried { user_id, sid });
                }
                revoke_session_in(c, &sid, "refresh_reuse", &now)?;
                return Ok(RefreshOutcome::Reused { user_id, sid });
            }
            if expires_at <= now_unix as i64 {
                return Ok(RefreshOutcome::Invalid);
            }
            c.execute(
                "UPDATE refresh_tokens SET used_at = ?2 WHERE token_hash = ?1",
                params![old_hash, now],
            )?;
            insert_successor()?;
            Ok(RefreshOutcome::Rotated { user_id, sid })
        })
    }

    /// Revokes a login and its refresh tokens. Returns whether it was live.
    pub fn revoke_session(&self, sid: &str, reason: &'static str, now: String) -> Result<bool> {
        let sid = sid.to_owned();
        self.write(move |c| revoke_session_in(c, &sid, reason, &now))
    }
}

/// A refresh token's rotation: the hashes of the presented token and its successor.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Hash of the presented token.
    pub old_hash: String,
    /// Hash of the successor.
    pub new_hash: String,
    /// When the successor expires, unix seconds.
    pub new_expires_at: u64,
    /// Now, unix seconds.
    pub now_unix: u64,
    /// Now, RFC 3339.
    pub now: String,
    /// `--refresh-grace`: seconds after its rotation in which a retired token still
    /// gets a new pair (0 = never).
    pub grace_secs: u64,
}

/// Whether a token retired at `used_at` (RFC 3339) is still within the grace.
pub(super) fn within_grace(used_at: &str, now_unix: u64, grace_secs: u64) -> bool {
    let Ok(at) = humantime::parse_rfc3339(used_at) else {
        return false;
    };
    let at = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    grace_secs > 0 && now_unix.saturating_sub(at) < grace_secs
}

fn revoke_session_in(c: &Connection, sid: &str, reason: &str, now: &str) -> Result<bool> {
    let n = c.execute(
        "UPDATE sessions SET revoked_at = ?2, revoked_reason = ?3
          WHERE id = ?1 AND revoked_at IS NULL",
        params![sid, now, reason],
    )?;
    c.execute(
        "UPDATE refresh_tokens SET used_at = coalesce(used_at, ?2) WHERE session_id = ?1",
        params![sid, now],
    )?;
    Ok(n > 0)
}

/// The permission that must always keep an unbanned holder: whoever holds it can
/// assign roles and so repair everything else (the "last admin" rule of
/// docs/accounts.md).
pub const GUARD_PERMISSION: &str = "role.assign";

/// A role change as it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    /// Roles before.
    pub from: Vec<String>,
    /// Roles after.
    pub to: Vec<String>,
}

impl Sqlite {
    /// Bans or unbans a user. Banning also revokes every login of the user, so tokens
    /// issued before the ban stay dead after an unban. A ban that would leave no
    /// unbanned holder of `guard_permission` (the permission to assign roles) is
    /// refused (conflict): nobody could unban anyone then. The check and the change are
    /// one writer job, so two admins banning each other at once cannot both succeed.
    /// Returns whether anything changed.
    pub fn set_banned(
        &self,
        user_id: i64,
        banned: bool,
        guard_permission: &'static str,
        now: String,
    ) -> Result<bool> {
        self.write(move |c| {
            if !banned {
                let n = c.execute(
                    "UPDATE users SET banned_at = NULL WHERE id = ?1 AND banned_at IS NOT NULL",
                    [user_id],
                )?;
                return Ok(n > 0);
            }
            let before = guard_holders(c, guard_permission)?;
            let n = c.execute(
                "UPDATE users SET banned_at = ?2 WHERE id = ?1 AND banned_at IS NULL",
                params![user_id, now],
            )?;
            keep_a_guard_holder(c, guard_permission, before)?;
            revoke_user_sessions_in(c, user_id, "ban", &now)?;
            Ok(n > 0)
        })
    }

    /// Replaces a user's roles. Refuses (conflict) a change that would leave no
    /// unbanned user holding `guard_permission` (the permission to assign roles), and
    /// unknown roles (not found).
    pub fn set_roles(
        &self,
        user_id: i64,
        roles: Vec<String>,
        guard_permission: &'static str,
    ) -> Result<RoleChange> {
        self.write(move |c| {
            let from = roles_of(c, user_id)?;
            for r in &roles {
                let known: bool = c.query_row(
                    "SELECT EXISTS(SELECT 1 FROM roles WHERE name = ?1)",
                    [r],
                    |x| x.get(0),
                )?;
                if !known {
                    return Err(StoreError::NotFound(format!("role {r:?}")));
                }
            }
            let before = guard_holders(c, guard_permission)?;
            c.execute("DELETE FROM user_roles WHERE user_id = ?1", [user_id])?;
            for r in &roles {
                c.execute(
                    "INSERT OR IGNORE INTO user_roles(user_id, role) VALUES (?1, ?2)",
                    params![user_id, r],
                )?;
            }
            keep_a_guard_holder(c, guard_permission, before)?;
            Ok(RoleChange {
                from,
                to: roles_of(c, user_id)?,
            })
        })
    }

    /// Replaces a password hash with another of the same password (a new bcrypt cost)
    /// unless the hash changed meanwhile. Logins stay valid: the password is the same.
    pub fn rehash_password(&self, user_id: i64, old_hash: String, new_hash: String) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2",
                params![user_id, old_hash, new_hash],
            )?;
            Ok(())
        })
    }

    /// The distinct first seven characters of the stored password hashes: with bcrypt,
    /// `$2b$NN$`, which carries the cost.
    pub fn password_hash_prefixes(&self) -> Result<Vec<String>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT DISTINCT substr(password_hash, 1, 7) FROM users")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Sets a new password hash and revokes every login of the user.
    pub fn set_password(&self, user_id: i64, password_hash: String, now: String) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE users SET password_hash = ?2 WHERE id = ?1",
                params![user_id, password_hash],
            )?;
            revoke_user_sessions_in(c, user_id, "password_change", &now)?;
            Ok(())
        })
    }

    /// Ids of users holding any of `roles`.
    pub fn users_with_roles(&self, roles: &[String]) -> Result<Vec<i64>> {
        self.read(|c| {
            let mut st =
                c.prepare_cached("SELECT DISTINCT user_id FROM user_roles WHERE role = ?1")?;
            let mut out = Vec::new();
            for r in roles {
                for id in st.query_map([r], |x| x.get(0))? {
                    out.push(id?);
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })
    }

    /// Whether login `sid` of `user_id` may still act: not revoked, made for the
    /// account that holds the id now, user not banned.
    pub fn session_alive(&self, sid: &str, user_id: i64) -> Result<bool> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id
                  WHERE s.id = ?1 AND s.user_id = ?2 AND s.revoked_at IS NULL
                    AND s.user_stamp = u.stamp AND u.banned_at IS NULL)",
            )?
            .query_row(params![sid, user_id], |r| r.get(0))
        })
    }
}

/// How many unbanned users hold `permission` through one of their roles. Banned
/// holders do not count: they can neither log in nor act.
fn guard_holders(c: &Connection, permission: &str) -> Result<i64> {
    Ok(c.prepare_cached(
        "SELECT count(DISTINCT ur.user_id) FROM user_roles ur
               JOIN role_permissions rp ON rp.role = ur.role
               JOIN users u ON u.id = ur.user_id
              WHERE rp.permission = ?1 AND u.banned_at IS NULL",
    )?
    .query_row([permission], |r| r.get(0))?)
}

/// Fails (conflict, so the writer rolls the job back) when the job's change took the
/// last unbanned holder of `permission` away. A database that had none before (only
/// the CLI can repair it) is not made worse by an unrelated change, so that is allowed.
fn keep_a_guard_holder(c: &Connection, permission: &str, before: i64) -> Result<()> {
    if before > 0 && guard_holders(c, permission)? == 0 {
        return Err(StoreError::Conflict(
            "that would leave no unbanned admin (nobody could assign roles or lift bans)".into(),
        ));
    }
    Ok(())
}

fn revoke_user_sessions_in(c: &Connection, user_id: i64, reason: &str, now: &str) -> Result<()> {
    c.execute(
        "UPDATE refresh_tokens SET used_at = coalesce(used_at, ?2)
          WHERE session_id IN (SELECT id FROM sessions WHERE user_id = ?1)",
        params![user_id, now],
    )?;
    c.execute(
        "UPDATE sessions SET revoked_at = ?2, revoked_reason = ?3 WHERE user_id = ?1 AND revoked_at IS NULL",
        params![user_id, now, reason],
    )?;
    Ok(())
}

/// An account as an admin lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The public view, roles included.
    pub user: User,
    /// Whether the account is banned.
    pub banned: bool,
}

/// `prefix` as a LIKE pattern: its own `%`, `_` and `\` taken literally.
pub(super) fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for ch in prefix.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(ch);
    }
    p.push('%');
    p
}

impl Sqlite {
    /// Accounts whose name starts with `prefix` (case-insensitively), ordered by
    /// lower-cased name, after `after` (exclusive) if given: at most `limit`.
    pub fn list_users(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Listed>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT u.id, u.username, u.created_at, u.banned_at IS NOT NULL,
                        (SELECT group_concat(role, ',')
                           FROM (SELECT role FROM user_roles WHERE user_id = u.id ORDER BY role))
                   FROM users u
                  WHERE u.username LIKE ?1 ESCAPE '\\' AND lower(u.username) > lower(?2)
                  ORDER BY lower(u.username) LIMIT ?3",
            )?;
            let rows = st.query_map(
                params![like_prefix(prefix), after.unwrap_or(""), limit],
                |r| {
                    let roles: Option<String> = r.get(4)?;
                    Ok(Listed {
                        user: User {
                            id: r.get(0)?,
                            username: r.get(1)?,
                            created_at: r.get(2)?,
                            roles: roles
                                .map(|s| s.split(',').map(str::to_owned).collect())
                                .unwrap_or_default(),
                        },
                        banned: r.get(3)?,
                    })
                },
            )?;
            rows.collect()
        })
    }
}
