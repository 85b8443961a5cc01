//! Who a caller is and what they may do: password hashes (argon2id), signed expiring
//! bearer tokens (HMAC-SHA256), roles and per-stream rules.
//!
//! The pieces are pure: the node keeps users and rules in its replicated state and checks
//! every call with them in one interceptor. Answers map to gRPC codes there:
//! [`AuthError`] is UNAUTHENTICATED, [`Denied`] is PERMISSION_DENIED.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Version tag of the token format: a token of another format is malformed, not forged.
const TOKEN_PREFIX: &str = "strata1";
/// Bytes of a token signing key.
pub const TOKEN_KEY_BYTES: usize = 32;
/// Longest token accepted: bounds the work of checking a garbage header.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Longest user name and password accepted (argon2 cost grows with the input).
pub const USER_NAME_BYTES_MAX: usize = 128;
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// Why a caller is not authenticated (UNAUTHENTICATED). The text never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `authorization: Bearer <token>` (strata login)")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify (signed with another key, or altered)")]
    BadSignature,
    #[error("token expired at {expired_unix_secs} (log in again)")]
    Expired { expired_unix_secs: u64 },
    #[error("wrong user name or password")]
    BadCredentials,
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Why an authenticated caller may not do something (PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user {user:?} may not {action} {target}")]
pub struct Denied {
    pub user: String,
    pub action: &'static str,
    pub target: String,
}

/// The argon2id PHC string of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    check_len("password", password, PASSWORD_BYTES_MAX)?;
    if password.is_empty() {
        return Err(AuthError::Invalid { what: "password", reason: "must not be empty".into() });
    }
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| AuthError::Invalid { what: "salt", reason: e.to_string() })?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Invalid { what: "password", reason: e.to_string() })
}

/// Whether `password` matches the stored PHC string (constant time in the hash).
pub fn verify_password(password: &str, stored: &str) -> bool {
    if password.len() > PASSWORD_BYTES_MAX {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(stored) else { return false };
    Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
}

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), AuthError> {
    if value.len() > max {
        return Err(AuthError::Invalid { what, reason: format!("longer than {max} bytes") });
    }
    Ok(())
}

/// A valid user name: 1..=128 bytes of letters, digits, `-`, `_`, `.`, `@`.
pub fn check_user_name(name: &str) -> Result<(), AuthError> {
    check_len("user name", name, USER_NAME_BYTES_MAX)?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if !valid {
        return Err(AuthError::Invalid { what: "user name", reason: "use 1-128 letters, digits, '-', '_', '.', '@'".into() });
    }
    Ok(())
}

/// What a role may do by default (per-stream rules can grant more or less on streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: users, membership, `$`-streams.
    Admin,
    /// Operates the cluster (status, snapshots, tiering, leader hand-over) and reads.
    Ops,
    /// Reads and appends to ordinary streams.
    Writer,
    /// Reads ordinary streams.
    Reader,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Ops, Role::Writer, Role::Reader];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Ops => "ops",
            Role::Writer => "writer",
            Role::Reader => "reader",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| AuthError::Invalid { what: "role", reason: format!("{s:?} is not one of admin, ops, writer, reader") })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub user: String,
    pub roles: Vec<Role>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// What a token says, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "sub")]
    pub user: String,
    pub roles: Vec<Role>,
    #[serde(rename = "iat")]
    pub issued_unix_secs: u64,
    #[serde(rename = "exp")]
    pub expires_unix_secs: u64,
}

/// The key tokens are signed with. Never printed, also not by `Debug`.
#[derive(Clone)]
pub struct TokenKey([u8; TOKEN_KEY_BYTES]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    pub fn from_bytes(bytes: [u8; TOKEN_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn generate() -> Self {
        Self(rand::random())
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// A token for `principal`, valid from `now` for `ttl_secs`.
    pub fn issue(&self, principal: &Principal, now_unix_secs: u64, ttl_secs: u64) -> String {
        let claims = Claims {
            user: principal.user.clone(),
            roles: principal.roles.clone(),
            issued_unix_secs: now_unix_secs,
            expires_unix_secs: now_unix_secs.saturating_add(ttl_secs),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed = format!("{TOKEN_PREFIX}.{payload}");
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    /// The caller a token names, if this key signed it and it has not expired at `now`.
    pub fn verify(&self, token: &str, now_unix_secs: u64) -> Result<Principal, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::Malformed);
        }
        let (signed, signature) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
        let (prefix, payload) = signed.split_once('.').ok_or(AuthError::Malformed)?;
        if prefix != TOKEN_PREFIX {
            return Err(AuthError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| AuthError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        // Checked before the payload is even decoded, in constant time.
        mac.verify_slice(&signature).map_err(|_| AuthError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| AuthError::Malformed)?;
        if claims.expires_unix_secs <= now_unix_secs {
            return Err(AuthError::Expired { expired_unix_secs: claims.expires_unix_secs });
        }
        Ok(Principal { user: claims.user, roles: claims.roles })
    }
}

/// The token in an `authorization` header value (`Bearer <token>`).
pub fn bearer_token(header: &str) -> Result<&str, AuthError> {
    let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

/// A per-stream rule: who may read and who may write the streams it matches. `pattern`
/// is a stream name, or a prefix ending in `*`. Entries are user names or `role:<role>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRule {
    pub pattern: String,
    pub read: Vec<String>,
    pub write: Vec<String>,
}

impl StreamRule {
    /// How specifically this rule matches `stream` (None: not at all). An exact name beats
    /// every prefix; a longer prefix beats a shorter one.
    fn specificity(&self, stream: &str) -> Option<usize> {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => stream.starts_with(prefix).then_some(prefix.len()),
            None => (self.pattern == stream).then_some(usize::MAX),
        }
    }

    fn lists(entries: &[String], principal: &Principal) -> bool {
        entries.iter().any(|entry| match entry.strip_prefix("role:") {
            Some(role) => role.parse::<Role>().is_ok_and(|role| principal.has(role)),
            None => *entry == principal.user,
        })
    }
}

/// What a call does to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAccess {
    /// Reads, subscriptions, persistent-group consumption.
    Read,
    /// Appends, deletes, metadata and retention.
    Write,
}

/// What a call does to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterAccess {
    /// Status and members: any authenticated caller.
    View,
    /// Snapshots, tiering, leader hand-over: ops and admin.
    Operate,
    /// Membership changes, users, rules: admin only.
    Administer,
}

/// Whether `principal` may `access` `stream` under `rules`. Admins may do anything. The
/// most specific matching rule decides; without one, `$`-streams are admin-only, writers
/// read and write, readers and ops read.
pub fn authorize_stream(principal: &Principal, access: StreamAccess, stream: &str, rules: &[StreamRule]) -> Result<(), Denied> {
    if principal.has(Role::Admin) {
        return Ok(());
    }
    let rule = rules.iter().filter_map(|r| r.specificity(stream).map(|s| (s, r))).max_by_key(|(s, _)| *s).map(|(_, r)| r);
    let allowed = match rule {
        Some(rule) => StreamRule::lists(if access == StreamAccess::Read { &rule.read } else { &rule.write }, principal),
        None if stream.starts_with('$') => false,
        None => match access {
            StreamAccess::Read => principal.roles.iter().any(|r| matches!(r, Role::Writer | Role::Reader | Role::Ops)),
            StreamAccess::Write => principal.has(Role::Writer),
        },
    };
    if allowed {
        return Ok(());
    }
    Err(Denied {
        user: principal.user.clone(),
        action: if access == StreamAccess::Read { "read" } else { "write" },
        target: format!("stream {stream:?}"),
    })
}

/// Whether `principal` may make a cluster call of kind `access`.
pub fn authorize_cluster(principal: &Principal, access: ClusterAccess, what: &str) -> Result<(), Denied> {
    let allowed = match access {
        ClusterAccess::View => true,
        ClusterAccess::Operate => principal.has(Role::Admin) || principal.has(Role::Ops),
        ClusterAccess::Administer => principal.has(Role::Admin),
    };
    if allowed {
        return Ok(());
    }
    Err(Denied { user: principal.user.clone(), action: "call", target: what.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, roles: &[Role]) -> Principal {
        Principal { user: user.into(), roles: roles.to_vec() }
    }

    #[test]
    fn passwords_hash_with_a_fresh_salt_and_verify_only_themselves() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert_ne!(a, b, "each hash has its own salt");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &a) && verify_password("correct horse", &b));
        assert!(!verify_password("correct horsE", &a));
        assert!(!verify_password("correct horse", "not a hash"));
        assert!(hash_password("").is_err());
        assert!(hash_password(&"x".repeat(PASSWORD_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn tokens_verify_until_they_expire_and_only_under_their_key() {
        let key = TokenKey::generate();
        let alice = who("alice", &[Role::Writer]);
        let token = key.issue(&alice, 1_000, 60);
        assert_eq!(key.verify(&token, 1_000), Ok(alice.clone()));
        assert_eq!(key.verify(&token, 1_059), Ok(alice));
        assert_eq!(key.verify(&token, 1_060), Err(AuthError::Expired { expired_unix_secs: 1_060 }));
        assert_eq!(TokenKey::generate().verify(&token, 1_000), Err(AuthError::BadSignature), "another key's token");

        // An altered payload (roles raised to admin) keeps the old signature: refused.
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let (prefix, _) = signed.split_once('.').unwrap();
        let forged_claims = Claims { user: "alice".into(), roles: vec![Role::Admin], issued_unix_secs: 1_000, expires_unix_secs: 9_999 };
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        assert_eq!(key.verify(&format!("{prefix}.{forged_payload}.{signature}"), 1_000), Err(AuthError::BadSignature));

        for garbage in ["", "strata1", "strata1.x", "other.e30.AAAA", "strata1.!!.!!", &"a".repeat(TOKEN_BYTES_MAX + 1)] {
            assert_eq!(key.verify(garbage, 1_000), Err(AuthError::Malformed), "{garbage:?}");
        }
        assert_eq!(format!("{key:?}"), "TokenKey(<redacted>)", "the key never reaches a log");
    }

    #[test]
    fn bearer_headers_are_parsed_strictly() {
        assert_eq!(bearer_token("Bearer abc"), Ok("abc"));
        assert_eq!(bearer_token("bearer   abc "), Ok("abc"));
        assert_eq!(bearer_token("Basic abc"), Err(AuthError::Malformed));
        assert_eq!(bearer_token("Bearer "), Err(AuthError::Malformed));
        assert_eq!(bearer_token("abc"), Err(AuthError::Malformed));
    }

    #[test]
    fn roles_rules_and_dollar_streams_decide_stream_access() {
        let admin = who("root", &[Role::Admin]);
        let writer = who("app", &[Role::Writer]);
        let reader = who("bi", &[Role::Reader]);
        let ops = who("oncall", &[Role::Ops]);
        let nobody = who("guest", &[]);
        use StreamAccess::{Read, Write};
        // Defaults.
        assert!(authorize_stream(&writer, Write, "orders-1", &[]).is_ok());
        assert!(authorize_stream(&reader, Read, "orders-1", &[]).is_ok());
        assert!(authorize_stream(&reader, Write, "orders-1", &[]).is_err(), "a reader writing is refused");
        assert!(authorize_stream(&ops, Read, "orders-1", &[]).is_ok());
        assert!(authorize_stream(&ops, Write, "orders-1", &[]).is_err());
        assert!(authorize_stream(&nobody, Read, "orders-1", &[]).is_err());
        for p in [&writer, &reader, &ops] {
            assert!(authorize_stream(p, Read, "$all", &[]).is_err(), "$-streams are admin-only");
        }
        assert!(authorize_stream(&admin, Write, "$settings", &[]).is_ok());

        // Rules: the most specific one decides, for users and roles.
        let rules = vec![
            StreamRule { pattern: "payroll-*".into(), read: vec!["role:admin".into()], write: vec!["role:admin".into()] },
            StreamRule { pattern: "payroll-public-*".into(), read: vec!["role:reader".into(), "app".into()], write: vec![] },
            StreamRule { pattern: "payroll-public-7".into(), read: vec![], write: vec!["app".into()] },
            StreamRule { pattern: "$all".into(), read: vec!["bi".into()], write: vec![] },
        ];
        assert!(authorize_stream(&writer, Write, "payroll-1", &rules).is_err(), "a rule takes the writer's default away");
        assert!(authorize_stream(&reader, Read, "payroll-public-3", &rules).is_ok(), "the longer prefix wins");
        assert!(authorize_stream(&writer, Read, "payroll-public-3", &rules).is_ok(), "listed by name");
        assert!(authorize_stream(&writer, Write, "payroll-public-3", &rules).is_err());
        assert!(authorize_stream(&writer, Write, "payroll-public-7", &rules).is_ok(), "an exact name beats every prefix");
        assert!(authorize_stream(&writer, Read, "payroll-public-7", &rules).is_err());
        assert!(authorize_stream(&reader, Read, "$all", &rules).is_ok(), "a rule can open a $-stream to a user");
        let denied = authorize_stream(&reader, Write, "orders-1", &rules).unwrap_err();
        assert_eq!(denied.to_string(), "user \"bi\" may not write stream \"orders-1\"");
    }

    #[test]
    fn cluster_calls_go_by_role() {
        let admin = who("root", &[Role::Admin]);
        let ops = who("oncall", &[Role::Ops]);
        let writer = who("app", &[Role::Writer]);
        assert!(authorize_cluster(&writer, ClusterAccess::View, "status").is_ok());
        assert!(authorize_cluster(&writer, ClusterAccess::Operate, "trigger snapshot").is_err());
        assert!(authorize_cluster(&ops, ClusterAccess::Operate, "trigger snapshot").is_ok());
        assert!(authorize_cluster(&ops, ClusterAccess::Administer, "add learner").is_err(), "a non-admin cannot change membership");
        assert!(authorize_cluster(&admin, ClusterAccess::Administer, "add learner").is_ok());
        assert!(check_user_name("alice@example.com").is_ok());
        assert!(check_user_name("").is_err() && check_user_name("a b").is_err());
        assert_eq!("ops".parse::<Role>(), Ok(Role::Ops));
        assert!("root".parse::<Role>().is_err());
    }
}
