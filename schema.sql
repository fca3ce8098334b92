-- parley database layout, schema version 4.
--
-- This file is the one source of the layout: the binary embeds it and applies it to a
-- new database on first start, then sets PRAGMA user_version = 4 so later versions
-- know what to migrate from. (Older databases are upgraded in place on open; see
-- `migrate_v1`, `migrate_v2` and `migrate_v3` in src/store/mod.rs.) Times are RFC 3339
-- text in UTC unless a column says otherwise, so the file reads well in `sqlite3`.

-- Server-wide values, e.g. the JWT signing key (`jwt_key`, 32 random bytes).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- AUTOINCREMENT: an id is never given to a second account, even after rows were
-- deleted by hand (with the sqlite3 shell's foreign keys off, a deleted user's roles,
-- logins and messages stay behind under the old id). `stamp` is random per account;
-- each login records it, and a login whose stamp is not its account's is dead.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,               -- bcrypt
    created_at    TEXT NOT NULL,
    banned_at     TEXT,                        -- non-null while the user is banned
    stamp         TEXT NOT NULL                -- 16 random bytes, base64url
);

-- Roles and permissions are data, not code: the server asks "may this user do X?" by
-- joining these tables, so editing them changes what people may do.
CREATE TABLE roles (
    name TEXT PRIMARY KEY
);

CREATE TABLE permissions (
    name TEXT PRIMARY KEY
);

CREATE TABLE role_permissions (
    role       TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
    permission TEXT NOT NULL REFERENCES permissions(name) ON DELETE CASCADE,
    PRIMARY KEY (role, permission)
);

CREATE TABLE user_roles (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role    TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role)
);

-- One row per login: the `sid` claim of its access tokens. Revoking a session kills its
-- refresh tokens, its access tokens and its live sockets. `user_stamp` is the account's
-- stamp at login; the login counts only while it equals `users.stamp`.
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL,
    ip             TEXT,
    revoked_at     TEXT,
    revoked_reason TEXT,
    user_stamp     TEXT
);
CREATE INDEX sessions_user ON sessions(user_id);

-- Refresh tokens are stored only as a SHA-256 hash (hex). `used_at` marks a retired
-- token: presenting it again revokes its whole session.
CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    issued_at  TEXT NOT NULL,
    expires_at INTEGER NOT NULL,               -- unix seconds
    used_at    TEXT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens(session_id);

-- begin: login_epoch (schema 4; the upgrade from 3 runs this section as it is)
-- A count of every change that can end a login (a revoke, a ban, a new stamp, a
-- deleted account or login), whoever makes it: the server, `parley user`, the sqlite3
-- shell. The server re-checks its live sockets' logins when the count moves, instead
-- of after every commit. Without the row it re-checks after every commit again.
INSERT INTO settings(key, value) VALUES ('login_epoch', 0);
CREATE TRIGGER login_epoch_ban AFTER UPDATE OF banned_at, stamp ON users
BEGIN UPDATE settings SET value = value + 1 WHERE key = 'login_epoch'; END;
CREATE TRIGGER login_epoch_user_gone AFTER DELETE ON users
BEGIN UPDATE settings SET value = value + 1 WHERE key = 'login_epoch'; END;
CREATE TRIGGER login_epoch_revoke AFTER UPDATE OF user_id, revoked_at, user_stamp ON sessions
BEGIN UPDATE settings SET value = value + 1 WHERE key = 'login_epoch'; END;
CREATE TRIGGER login_epoch_login_gone AFTER DELETE ON sessions
BEGIN UPDATE settings SET value = value + 1 WHERE key = 'login_epoch'; END;
-- end: login_epoch

CREATE TABLE rooms (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    created_by INTEGER REFERENCES users(id) ON DELETE SET NULL
);

-- AUTOINCREMENT: an id is never reused, even after the newest row is deleted, so a
-- client resuming with `since` can trust that ids only grow.
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    body       TEXT NOT NULL,
    ts         TEXT NOT NULL,
    deleted_at TEXT,
    deleted_by INTEGER REFERENCES users(id) ON DELETE SET NULL,
    client_id  TEXT                            -- the sender's once-only key, if given
);
CREATE INDEX messages_room ON messages(room_id, id);

CREATE TABLE direct_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    from_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    to_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    body       TEXT NOT NULL,
    ts         TEXT NOT NULL,
    deleted_at TEXT,
    client_id  TEXT
);
CREATE INDEX direct_messages_pair ON direct_messages(from_id, to_id, id);
CREATE INDEX direct_messages_pair_rev ON direct_messages(to_id, from_id, id);

-- Once-only sends: a message or DM sent with a client_id is stored once per sender and
-- client_id, across rooms, DMs and restarts; a repeat is answered with this row's id.
CREATE TABLE client_ids (
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,                  -- 'room' or 'dm'
    message_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, client_id)
) WITHOUT ROWID;

-- Security events. `hash` = SHA-256 over this row's content and `prev_hash`, so a row
-- changed, deleted or inserted behind the server's back breaks the chain.
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        TEXT NOT NULL,
    actor     TEXT,                            -- username, NULL when anonymous
    action    TEXT NOT NULL,
    target    TEXT,
    ip        TEXT,
    detail    TEXT NOT NULL DEFAULT '{}',      -- JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

-- Seed data: applied once, when the database is created, and never again.
INSERT INTO roles(name) VALUES ('admin'), ('moderator'), ('member');

INSERT INTO permissions(name) VALUES
    ('message.delete'), ('user.kick'), ('user.ban'), ('role.assign'),
    ('audit.read'), ('announce'), ('room.create');

INSERT INTO role_permissions(role, permission) VALUES
    ('admin', 'message.delete'), ('admin', 'user.kick'), ('admin', 'user.ban'),
    ('admin', 'role.assign'), ('admin', 'audit.read'), ('admin', 'announce'),
    ('admin', 'room.create'),
    ('moderator', 'message.delete'), ('moderator', 'user.kick'),
    ('moderator', 'room.create'),
    ('member', 'room.create');

INSERT INTO rooms(name, created_at) VALUES ('general', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
