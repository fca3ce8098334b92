//! Accounts, roles, permissions, sessions (logins) and refresh tokens on PostgreSQL:
//! the SQL of [`crate::store::users`], with the same meaning.
//!
//! Reads run on the caller's thread (a pooled client); writes are jobs on the
//! `pg-writer` thread (see [`super::writer`]). Checks that span accounts take the
//! `ACCOUNTS` advisory lock, so two nodes cannot both pass them; a refresh token is
//! rotated under its row lock. Usernames compare case-insensitively through
//! `lower()`, which the `COLLATE "C"` column limits to ASCII, as SQLite's NOCASE.

use super::writer::Locks;
use super::{big, col, is_unique_violation, Db, Postgres, Tx};
use crate::model::User;
use crate::store::users::{
    like_prefix, new_stamp, within_grace, Listed, RefreshOutcome, RoleChange, Rotation, TokenLogin,
    UserRecord,
};
use crate::store::{Result, StoreError};
use postgres::{GenericClient, Row};

const USER_COLUMNS: &str = "id, username, password_hash, created_at, banned_at IS NOT NULL, stamp";

/// SQL (over `sessions s`): whether the login was made for the account that holds its
/// `user_id` now. NULL stamps (a missing account, an orphan login) are never current.
const SESSION_CURRENT: &str =
    "coalesce(s.user_stamp = (SELECT stamp FROM users WHERE id = s.user_id), false)";

fn user_record(r: &Row) -> Result<UserRecord> {
    Ok(UserRecord {
        id: col(r, 0)?,
        username: col(r, 1)?,
        password_hash: col(r, 2)?,
        created_at: col(r, 3)?,
        banned: col(r, 4)?,
        stamp: col(r, 5)?,
    })
}

fn roles_of<C: GenericClient>(c: &mut Db<'_, C>, user_id: i64) -> Result<Vec<String>> {
    c.query(
        "SELECT role FROM user_roles WHERE user_id = $1 ORDER BY role",
        &[&user_id],
    )?
    .iter()
    .map(|r| col(r, 0))
    .collect()
}

fn user_view<C: GenericClient>(c: &mut Db<'_, C>, user_id: i64) -> Result<User> {
    let row = c
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
            &[&user_id],
        )?
        .ok_or_else(|| StoreError::NotFound("user".into()))?;
    let rec = user_record(&row)?;
    Ok(User {
        id: rec.id,
        username: rec.username,
        roles: roles_of(c, user_id)?,
        created_at: rec.created_at,
    })
}

fn role_exists(c: &mut Tx<'_, '_>, role: &str) -> Result<bool> {
    col(
        &c.query_one(
            "SELECT EXISTS(SELECT 1 FROM roles WHERE name = $1)",
            &[&role],
        )?,
        0,
    )
}

impl Postgres {
    /// Looks a user up by name, case-insensitively.
    pub fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        self.read(|c| {
            c.query_opt(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE lower(username) = lower($1)"),
                &[&username],
            )?
            .map(|r| user_record(&r))
            .transpose()
        })
    }

    /// Looks a user up by id.
    pub fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>> {
        self.read(|c| {
            c.query_opt(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
                &[&id],
            )?
            .map(|r| user_record(&r))
            .transpose()
        })
    }

    /// The public view of a user, with roles.
    pub fn user(&self, id: i64) -> Result<User> {
        self.read(|c| user_view(c, id))
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
        // ACCOUNTS: "the first account" must mean the same to every node.
        self.write(Locks::ACCOUNTS, move |c| {
            let taken: bool = col(
                &c.query_one(
                    "SELECT EXISTS(SELECT 1 FROM users WHERE lower(username) = lower($1))",
                    &[&username],
                )?,
                0,
            )?;
            if taken {
                return Err(StoreError::Conflict("username is taken".into()));
            }
            let role = match role {
                Some(r) => r,
                None => {
                    let n: i64 = col(&c.query_one("SELECT count(*) FROM users", &[])?, 0)?;
                    if n == 0 { "admin" } else { "member" }.to_owned()
                }
            };
            if !role_exists(c, &role)? {
                return Err(StoreError::NotFound(format!("role {role:?}")));
            }
            let inserted = c.try_query(
                "INSERT INTO users(username, password_hash, created_at, stamp)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&username, &password_hash, &created_at, &new_stamp()],
            );
            let rows = match inserted {
                Ok(rows) => rows,
                // Inserted by hand (psql) since the check.
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::Conflict("username is taken".into()))
                }
                Err(e) => return Err(e.into()),
            };
            let id: i64 = match rows.first() {
                Some(r) => col(r, 0)?,
                None => return Err(StoreError::Postgres("INSERT returned no id".into())),
            };
            c.execute(
                "INSERT INTO user_roles(user_id, role) VALUES ($1, $2)",
                &[&id, &role],
            )?;
            user_view(c, id)
        })
    }

    /// Whether any of the user's current roles grants `permission`.
    pub fn has_permission(&self, user_id: i64, permission: &str) -> Result<bool> {
        self.read(|c| {
            col(
                &c.query_one(
                    "SELECT EXISTS(SELECT 1 FROM user_roles ur
                       JOIN role_permissions rp ON rp.role = ur.role
                      WHERE ur.user_id = $1 AND rp.permission = $2)",
                    &[&user_id, &permission],
                )?,
                0,
            )
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
        self.write(Locks::NONE, move |c| {
            c.execute(
                "INSERT INTO sessions(id, user_id, created_at, ip, user_stamp)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&sid, &user_id, &now, &ip, &stamp],
            )?;
            c.execute(
                "INSERT INTO refresh_tokens(token_hash, session_id, issued_at, expires_at)
                 VALUES ($1, $2, $3, $4)",
                &[&refresh_hash, &sid, &now, &(refresh_expires_at as i64)],
            )?;
            Ok(())
        })
    }

    /// The account `user_id` and whether login `sid` is live for it; `None` if the
    /// account does not exist.
    pub fn token_login(&self, user_id: i64, sid: &str) -> Result<Option<TokenLogin>> {
        // One statement: every authenticated request and upgrade runs it.
        self.read(|c| {
            c.query_opt(
                "SELECT u.username, u.banned_at IS NOT NULL,
                        EXISTS(SELECT 1 FROM sessions s
                                WHERE s.id = $2 AND s.user_id = u.id
                                  AND s.revoked_at IS NULL AND s.user_stamp = u.stamp)
                   FROM users u WHERE u.id = $1",
                &[&user_id, &sid],
            )?
            .map(|r| {
                Ok(TokenLogin {
                    username: col(&r, 0)?,
                    banned: col(&r, 1)?,
                    live: col(&r, 2)?,
                })
            })
            .transpose()
        })
    }

    /// The session a refresh token belongs to, without using it.
    pub fn refresh_token_session(&self, token_hash: &str) -> Result<Option<(String, i64)>> {
        self.read(|c| {
            c.query_opt(
                "SELECT s.id, s.user_id FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
                  WHERE t.token_hash = $1",
                &[&token_hash],
            )?
            .map(|r| Ok((col(&r, 0)?, col(&r, 1)?)))
            .transpose()
        })
    }

    /// Uses a refresh token: retires it and stores `new_hash` in its place, or, if it was
    /// already retired, revokes its whole login. The token's row is locked first, so
    /// two racing refreshes with the same token (on any nodes) cannot both succeed. A
    /// token of a login that is not its account's (see [`TokenLogin::live`]) is invalid.
    pub fn rotate_refresh(&self, r: Rotation) -> Result<RefreshOutcome> {
        let Rotation {
            old_hash,
            new_hash,
            new_expires_at,
            now_unix,
            now,
            grace_secs,
        } = r;
        self.write(Locks::NONE, move |c| {
            let row = c.query_opt(
                &format!(
                    "SELECT t.session_id, s.user_id, t.expires_at, t.used_at,
                            s.revoked_at IS NOT NULL OR NOT {SESSION_CURRENT}
                       FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
                      WHERE t.token_hash = $1
                        FOR UPDATE OF t"
                ),
                &[&old_hash],
            )?;
            let Some(row) = row else {
                return Ok(RefreshOutcome::Invalid);
            };
            let sid: String = col(&row, 0)?;
            let user_id: i64 = col(&row, 1)?;
            let expires_at: i64 = col(&row, 2)?;
            let used: Option<String> = col(&row, 3)?;
            let dead: bool = col(&row, 4)?;
            if dead {
                return Ok(RefreshOutcome::Invalid);
            }
            let insert_successor = |c: &mut Tx<'_, '_>| {
                c.execute(
                    "INSERT INTO refresh_tokens(token_hash, session_id, issued_at, expires_at)
                     VALUES ($1, $2, $3, $4)",
                    &[&new_hash, &sid, &now, &(new_expires_at as i64)],
                )
            };
            if let Some(used_at) = used {
                if within_grace(&used_at, now_unix, grace_secs) {
                    insert_successor(c)?;
                    return Ok(RefreshOutcome::Retried { user_id, sid });
                }
                revoke_session_in(c, &sid, "refresh_reuse", &now)?;
                return Ok(RefreshOutcome::Reused { user_id, sid });
            }
            if expires_at <= now_unix as i64 {
                return Ok(RefreshOutcome::Invalid);
            }
            c.execute(
                "UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1",
                &[&old_hash, &now],
            )?;
            insert_successor(c)?;
            Ok(RefreshOutcome::Rotated { user_id, sid })
        })
    }

    /// Revokes a login and its refresh tokens. Returns whether it was live.
    pub fn revoke_session(&self, sid: &str, reason: &'static str, now: String) -> Result<bool> {
        let sid = sid.to_owned();
        self.write(Locks::NONE, move |c| {
            revoke_session_in(c, &sid, reason, &now)
        })
    }
}

fn revoke_session_in(c: &mut Tx<'_, '_>, sid: &str, reason: &str, now: &str) -> Result<bool> {
    let n = c.execute(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3
          WHERE id = $1 AND revoked_at IS NULL",
        &[&sid, &now, &reason],
    )?;
    c.execute(
        "UPDATE refresh_tokens SET used_at = coalesce(used_at, $2) WHERE session_id = $1",
        &[&sid, &now],
    )?;
    Ok(n > 0)
}

impl Postgres {
    /// Bans or unbans a user. Banning also revokes every login of the user, so tokens
    /// issued before the ban stay dead after an unban. A ban that would leave no
    /// unbanned holder of `guard_permission` (the permission to assign roles) is
    /// refused (conflict): nobody could unban anyone then. The check and the change
    /// hold the `ACCOUNTS` lock, so two admins banning each other at once, even on two
    /// nodes, cannot both succeed. Returns whether anything changed.
    pub fn set_banned(
        &self,
        user_id: i64,
        banned: bool,
        guard_permission: &'static str,
        now: String,
    ) -> Result<bool> {
        self.write(Locks::ACCOUNTS, move |c| {
            if !banned {
                let n = c.execute(
                    "UPDATE users SET banned_at = NULL WHERE id = $1 AND banned_at IS NOT NULL",
                    &[&user_id],
                )?;
                return Ok(n > 0);
            }
            let before = guard_holders(c, guard_permission)?;
            let n = c.execute(
                "UPDATE users SET banned_at = $2 WHERE id = $1 AND banned_at IS NULL",
                &[&user_id, &now],
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
        self.write(Locks::ACCOUNTS, move |c| {
            let from = roles_of(c, user_id)?;
            for r in &roles {
                if !role_exists(c, r)? {
                    return Err(StoreError::NotFound(format!("role {r:?}")));
                }
            }
            let before = guard_holders(c, guard_permission)?;
            c.execute("DELETE FROM user_roles WHERE user_id = $1", &[&user_id])?;
            for r in &roles {
                c.execute(
                    "INSERT INTO user_roles(user_id, role) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&user_id, r],
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
        self.write(Locks::NONE, move |c| {
            c.execute(
                "UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
                &[&user_id, &old_hash, &new_hash],
            )?;
            Ok(())
        })
    }

    /// The distinct first seven characters of the stored password hashes: with bcrypt,
    /// `$2b$NN$`, which carries the cost.
    pub fn password_hash_prefixes(&self) -> Result<Vec<String>> {
        self.read(|c| {
            c.query(
                "SELECT DISTINCT substr(password_hash, 1, 7) FROM users",
                &[],
            )?
            .iter()
            .map(|r| col(r, 0))
            .collect()
        })
    }

    /// Sets a new password hash and revokes every login of the user.
    pub fn set_password(&self, user_id: i64, password_hash: String, now: String) -> Result<()> {
        self.write(Locks::NONE, move |c| {
            c.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1",
                &[&user_id, &password_hash],
            )?;
            revoke_user_sessions_in(c, user_id, "password_change", &now)?;
            Ok(())
        })
    }

    /// Ids of users holding any of `roles`, ascending.
    pub fn users_with_roles(&self, roles: &[String]) -> Result<Vec<i64>> {
        self.read(|c| {
            c.query(
                "SELECT DISTINCT user_id FROM user_roles WHERE role = ANY($1) ORDER BY user_id",
                &[&roles],
            )?
            .iter()
            .map(|r| col(r, 0))
            .collect()
        })
    }

    /// Whether login `sid` of `user_id` may still act: not revoked, made for the
    /// account that holds the id now, user not banned.
    pub fn session_alive(&self, sid: &str, user_id: i64) -> Result<bool> {
        self.read(|c| {
            col(
                &c.query_one(
                    "SELECT EXISTS(SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id
                      WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL
                        AND s.user_stamp = u.stamp AND u.banned_at IS NULL)",
                    &[&sid, &user_id],
                )?,
                0,
            )
        })
    }
}

/// How many unbanned users hold `permission` through one of their roles. Banned
/// holders do not count: they can neither log in nor act.
fn guard_holders(c: &mut Tx<'_, '_>, permission: &str) -> Result<i64> {
    col(
        &c.query_one(
            "SELECT count(DISTINCT ur.user_id) FROM user_roles ur
               JOIN role_permissions rp ON rp.role = ur.role
               JOIN users u ON u.id = ur.user_id
              WHERE rp.permission = $1 AND u.banned_at IS NULL",
            &[&permission],
        )?,
        0,
    )
}

/// Fails (conflict, so the writer rolls the job back) when the job's change took the
/// last unbanned holder of `permission` away. A database that had none before (only
/// the CLI can repair it) is not made worse by an unrelated change, so that is allowed.
fn keep_a_guard_holder(c: &mut Tx<'_, '_>, permission: &str, before: i64) -> Result<()> {
    if before > 0 && guard_holders(c, permission)? == 0 {
        return Err(StoreError::Conflict(
            "that would leave no unbanned admin (nobody could assign roles or lift bans)".into(),
        ));
    }
    Ok(())
}

fn revoke_user_sessions_in(
    c: &mut Tx<'_, '_>,
    user_id: i64,
    reason: &str,
    now: &str,
) -> Result<()> {
    c.execute(
        "UPDATE refresh_tokens SET used_at = coalesce(used_at, $2)
          WHERE session_id IN (SELECT id FROM sessions WHERE user_id = $1)",
        &[&user_id, &now],
    )?;
    c.execute(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3
          WHERE user_id = $1 AND revoked_at IS NULL",
        &[&user_id, &now, &reason],
    )?;
    Ok(())
}

impl Postgres {
    /// Accounts whose name starts with `prefix` (case-insensitively), ordered by
    /// lower-cased name, after `after` (exclusive) if given: at most `limit`.
    pub fn list_users(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Listed>> {
        self.read(|c| {
            let rows = c.query(
                "SELECT u.id, u.username, u.created_at, u.banned_at IS NOT NULL,
                        (SELECT string_agg(role, ',' ORDER BY role)
                           FROM user_roles WHERE user_id = u.id)
                   FROM users u
                  WHERE lower(u.username) LIKE lower($1) ESCAPE '\\'
                    AND lower(u.username) > lower($2)
                  ORDER BY lower(u.username) LIMIT $3",
                &[&like_prefix(prefix), &after.unwrap_or(""), &big(limit)],
            )?;
            rows.iter()
                .map(|r| {
                    let roles: Option<String> = col(r, 4)?;
                    Ok(Listed {
                        user: User {
                            id: col(r, 0)?,
                            username: col(r, 1)?,
                            created_at: col(r, 2)?,
                            roles: roles
                                .map(|s| s.split(',').map(str::to_owned).collect())
                                .unwrap_or_default(),
                        },
                        banned: col(r, 3)?,
                    })
                })
                .collect()
        })
    }
}
