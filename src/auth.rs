//! Passwords, access tokens (HS256 JWTs) and refresh tokens.
//!
//! The signing key is 32 random bytes from the OS, made on first start and kept in the
//! database's `settings` table (the file is created 0600); it is never logged. Access
//! tokens are checked for signature, algorithm and expiry here, and against the
//! database's current sessions and bans in [`Auth::authenticate`]: the `roles` claim is
//! informative only.
//!
//! # Login timing
//!
//! How long a refused login takes must not tell whether the name exists. bcrypt's work
//! is 2^cost, and stored hashes may have several costs (`--bcrypt-cost` was changed,
//! the CLI added an account with its own `--bcrypt-cost`), so every password check is
//! made to cost 2^T, with the *target cost* T = the configured cost or the highest cost
//! among stored hashes, whichever is higher. T is read from the users table at start,
//! read again at most every 5 s while logins come in (accounts the CLI adds are seen
//! within seconds), and raised at once when a login meets a costlier hash; it never
//! falls while the server runs.
//!
//! - Unknown user: one dummy bcrypt at cost T.
//! - Known user whose hash has cost c < T: the real verify, then dummy bcrypts at
//!   c, c+1, …, T−1: 2^c + (2^T − 2^c) = 2^T in all.
//!
//! A successful login re-hashes a password whose cost is not the configured one (the
//! password is at hand only then), so after a cost change the stored costs converge on
//! the configured one, and T follows them down at the next start.

use crate::config::Config;
use crate::model::User;
use crate::store::{Store, StoreError};
use jwt_simple::prelude::{
    Claims, Duration as JwtDuration, HS256Key, MACLike, VerificationOptions,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("missing access token")]
    Missing,
    /// The token is not a valid HS256 JWT signed with our key.
    #[error("invalid access token")]
    Invalid,
    /// The token's `exp` has passed.
    #[error("access token expired")]
    Expired,
    /// The token's login was revoked (logout, refresh reuse, ban, password change).
    #[error("access token revoked")]
    Revoked,
    /// The user is banned.
    #[error("user is banned")]
    Banned,
    /// Unknown user or wrong password (one answer for both).
    #[error("invalid username or password")]
    BadCredentials,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// bcrypt failed.
    #[error("password hashing: {0}")]
    Hash(String),
}

/// Claims parley adds to the registered ones (`sub`, `exp`, `iat`, `jti`).
#[derive(Debug, Serialize, Deserialize)]
struct ParleyClaims {
    name: String,
    roles: Vec<String>,
    sid: String,
}

/// Who a verified access token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id (the `sub` claim).
    pub user_id: i64,
    /// Username at issue time.
    pub username: String,
    /// The login the token belongs to.
    pub sid: String,
    /// Expiry, unix seconds.
    pub expires_at: u64,
}

/// Key and settings for issuing and checking credentials.
pub struct Auth {
    key: HS256Key,
    access_ttl: u64,
    refresh_ttl: u64,
    bcrypt_cost: u32,
    /// The cost every password check is made to take (see the module doc).
    target_cost: AtomicU32,
    /// When the stored hashes' costs were last read.
    costs_read_at: Mutex<Instant>,
}

/// How often logins read the stored hashes' costs again.
const COST_REREAD: Duration = Duration::from_secs(5);

/// The cost of a bcrypt hash (`$2b$12$…` has 12), if it is one with a cost bcrypt
/// accepts (4–31).
fn hash_cost(hash: &str) -> Option<u32> {
    let [b'$', b'2', b'a' | b'b' | b'x' | b'y', b'$', tens, ones, b'$', ..] = *hash.as_bytes()
    else {
        return None;
    };
    if !(tens.is_ascii_digit() && ones.is_ascii_digit()) {
        return None;
    }
    let cost = u32::from(tens - b'0') * 10 + u32::from(ones - b'0');
    (4..=31).contains(&cost).then_some(cost)
}

/// The highest cost among the stored password hashes (0 with no accounts).
fn stored_cost(store: &Store) -> Result<u32, AuthError> {
    let prefixes = store.password_hash_prefixes()?;
    Ok(prefixes
        .iter()
        .filter_map(|h| hash_cost(h))
        .max()
        .unwrap_or(0))
}

/// bcrypt work of `cost` with nothing to compare: the same computation `verify` does.
fn spend(cost: u32) {
    let _ = bcrypt::hash_with_salt("parley timing equaliser", cost, [0x5a; 16]);
}

pub use crate::random::{random_token, random_token_bytes};

/// Hex SHA-256 of a refresh token: the only form in which it is stored.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Auth {
    /// Loads the signing key from the store, creating it on first start.
    pub fn new(store: &Store, cfg: &Config) -> Result<Auth, AuthError> {
        let key = match store.setting("jwt_key")? {
            Some(k) if k.len() >= 32 => k,
            _ => {
                let mut fresh = vec![0u8; 32];
                getrandom::fill(&mut fresh).map_err(|e| AuthError::Hash(e.to_string()))?;
                store.setting_or_insert("jwt_key", fresh)?
            }
        };
        Ok(Auth {
            key: HS256Key::from_bytes(&key),
            access_ttl: cfg.access_ttl,
            refresh_ttl: cfg.refresh_ttl,
            bcrypt_cost: cfg.bcrypt_cost,
            target_cost: AtomicU32::new(cfg.bcrypt_cost.max(stored_cost(store)?)),
            costs_read_at: Mutex::new(Instant::now()),
        })
    }

    /// Access-token lifetime in seconds.
    pub fn access_ttl(&self) -> u64 {
        self.access_ttl
    }

    /// Refresh-token lifetime in seconds.
    pub fn refresh_ttl(&self) -> u64 {
        self.refresh_ttl
    }

    /// Hashes a new password with the configured cost.
    pub fn hash_password(&self, password: &str) -> Result<String, AuthError> {
        hash_password(password, self.bcrypt_cost)
    }

    /// Raises the target cost to the costliest stored hash, reading the hashes again
    /// if the last read is [`COST_REREAD`] old; call before checking a password. A
    /// failed read keeps the current target.
    pub fn watch_stored_costs(&self, store: &Store) {
        let due = match self.costs_read_at.try_lock() {
            Ok(mut at) if at.elapsed() >= COST_REREAD => {
                *at = Instant::now();
                true
            }
            // Read recently, or another login is reading right now.
            _ => false,
        };
        if due {
            match stored_cost(store) {
                Ok(c) => self.raise_target(c),
                Err(e) => log::warn!("reading stored password costs: {e}"),
            }
        }
    }

    fn raise_target(&self, cost: u32) {
        self.target_cost.fetch_max(cost, Ordering::Relaxed);
    }

    /// Checks a password against `hash` (`None`: the user is unknown), spending bcrypt
    /// work of the target cost whatever the stored hash's cost, so that no failure
    /// takes a telling time (see the module doc).
    pub fn verify_password(&self, hash: Option<&str>, password: &str) -> bool {
        let target = self.target_cost.load(Ordering::Relaxed);
        let Some(hash) = hash else {
            spend(target);
            return false;
        };
        // A hash bcrypt cannot parse cost nothing to check; spend as for no user.
        let (ok, spent) = match bcrypt::verify(password, hash) {
            Ok(ok) => (ok, hash_cost(hash)),
            Err(_) => (false, None),
        };
        match spent {
            Some(c) if c >= target => self.raise_target(c),
            Some(c) => (c..target).for_each(spend),
            None => spend(target),
        }
        ok
    }

    /// After a successful login: a new hash of `password` at the configured cost if
    /// the stored `hash` has another cost, else `None`.
    pub fn rehash_if_needed(
        &self,
        hash: &str,
        password: &str,
    ) -> Result<Option<String>, AuthError> {
        if hash_cost(hash) == Some(self.bcrypt_cost) {
            return Ok(None);
        }
        self.hash_password(password).map(Some)
    }

    /// Signs an access token for `user` in login `sid`; returns it with its expiry.
    pub fn issue_access(&self, user: &User, sid: &str) -> Result<(String, u64), AuthError> {
        let custom = ParleyClaims {
            name: user.username.clone(),
            roles: user.roles.clone(),
            sid: sid.to_owned(),
        };
        let claims = Claims::with_custom_claims(custom, JwtDuration::from_secs(self.access_ttl))
            .with_subject(user.id)
            .with_jwt_id(random_token_bytes(12));
        let exp = claims.expires_at.map(|t| t.as_secs()).unwrap_or(0);
        let token = self
            .key
            .authenticate(claims)
            .map_err(|e| AuthError::Hash(e.to_string()))?;
        Ok((token, exp))
    }

    /// Checks signature, algorithm (HS256 only) and expiry; no database access.
    pub fn decode_access(&self, token: &str) -> Result<Identity, AuthError> {
        let options = VerificationOptions {
            // Expiry is checked exactly below; this only absorbs clock skew on `nbf`/`iat`.
            time_tolerance: Some(JwtDuration::from_secs(60)),
            ..Default::default()
        };
        let claims = self
            .key
            .verify_token::<ParleyClaims>(token, Some(options))
            .map_err(|_| AuthError::Invalid)?;
        let exp = claims.expires_at.ok_or(AuthError::Invalid)?.as_secs();
        if exp <= crate::clock::now_unix() {
            return Err(AuthError::Expired);
        }
        let user_id = claims
            .subject
            .as_deref()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(AuthError::Invalid)?;
        Ok(Identity {
            user_id,
            username: claims.custom.name,
            sid: claims.custom.sid,
            expires_at: exp,
        })
    }

    /// Full check of an access token: valid signature and expiry (else 401), user not
    /// banned (else 403, so every token of a banned user answers 403), login not
    /// revoked (else 401: tokens from before a ban stay dead after the unban) and made
    /// for this very account (else 401: an account that somehow got a deleted user's
    /// id does not inherit the deleted user's logins; the stamps differ).
    pub fn authenticate(&self, store: &Store, token: &str) -> Result<Identity, AuthError> {
        let id = self.decode_access(token)?;
        let login = store
            .token_login(id.user_id, &id.sid)?
            .ok_or(AuthError::Revoked)?;
        if login.banned {
            return Err(AuthError::Banned);
        }
        if !login.live {
            return Err(AuthError::Revoked);
        }
        Ok(Identity {
            username: login.username,
            ..id
        })
    }
}

/// bcrypt with an explicit cost (the CLI uses this without a running server).
pub fn hash_password(password: &str, cost: u32) -> Result<String, AuthError> {
    bcrypt::hash(password, cost).map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (Auth, Store) {
        let dir = crate::store::tests::tempdir();
        let store = Store::open(&dir.join("a.db")).unwrap();
        let cfg = Config {
            bcrypt_cost: 4,
            ..Config::default()
        };
        (Auth::new(&store, &cfg).unwrap(), store)
    }

    fn user() -> User {
        User {
            id: 7,
            username: "ann".into(),
            roles: vec!["member".into()],
            created_at: crate::clock::now_rfc3339(),
        }
    }

    #[test]
    fn token_round_trip_and_tamper() {
        let (a, _s) = auth();
        let (t, exp) = a.issue_access(&user(), "sid1").unwrap();
        let id = a.decode_access(&t).unwrap();
        assert_eq!(
            (id.user_id, id.sid.as_str(), id.expires_at),
            (7, "sid1", exp)
        );
        let mut bad = t.clone();
        bad.pop();
        bad.push(if t.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(a.decode_access(&bad), Err(AuthError::Invalid)));
    }

    #[test]
    fn key_persists_across_opens() {
        let dir = crate::store::tests::tempdir();
        let cfg = Config {
            bcrypt_cost: 4,
            ..Config::default()
        };
        let store = Store::open(&dir.join("k.db")).unwrap();
        let (t, _) = Auth::new(&store, &cfg)
            .unwrap()
            .issue_access(&user(), "s")
            .unwrap();
        store.close();
        drop(store);
        let store = Store::open(&dir.join("k.db")).unwrap();
        assert!(Auth::new(&store, &cfg).unwrap().decode_access(&t).is_ok());
    }

    #[test]
    fn hash_costs_are_read_from_the_prefix() {
        let h = hash_password("hunter22", 5).unwrap();
        assert_eq!(hash_cost(&h), Some(5));
        assert_eq!(hash_cost("$2y$12$"), Some(12));
        assert_eq!(hash_cost("$2a$31$rest"), Some(31));
        for bad in [
            "", "$2b$", "$2b$3$x", "$2b$03$x", "$2b$32$x", "$2c$10$x", "$2b$+1$x",
        ] {
            assert_eq!(hash_cost(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn target_cost_covers_the_costliest_stored_hash() {
        let (a, s) = auth();
        assert_eq!(a.target_cost.load(Ordering::Relaxed), 4);
        let h = hash_password("hunter22", 6).unwrap();
        s.create_user("ann", h.clone(), None, crate::clock::now_rfc3339())
            .unwrap();
        let cfg = Config {
            bcrypt_cost: 4,
            ..Config::default()
        };
        let b = Auth::new(&s, &cfg).unwrap();
        assert_eq!(b.target_cost.load(Ordering::Relaxed), 6);
        // A costlier hash met at login raises the target at once.
        assert!(a.verify_password(Some(&h), "hunter22"));
        assert_eq!(a.target_cost.load(Ordering::Relaxed), 6);
        // Only a hash of another cost than the configured one is redone.
        assert!(a.rehash_if_needed(&h, "hunter22").unwrap().is_some());
        let h4 = a.hash_password("hunter22").unwrap();
        assert!(a.rehash_if_needed(&h4, "hunter22").unwrap().is_none());
    }

    #[test]
    fn unknown_user_never_verifies() {
        let (a, _s) = auth();
        assert!(!a.verify_password(None, "parley timing equaliser"));
        let h = a.hash_password("hunter22").unwrap();
        assert!(a.verify_password(Some(&h), "hunter22"));
        assert!(!a.verify_password(Some(&h), "hunter23"));
    }
}
