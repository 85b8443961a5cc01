//! Users, per-stream rules and the token signing key, as replicated control state: every
//! node checks callers against the same records, a user removed on the leader is gone on
//! every node once applied, and a token signed by one node verifies on all of them.
//!
//! Keys (in the applied-state tree, beside the other control keys):
//! - `u` user name   → [`UserRecord`]
//! - `a` rule pattern → [`StreamRule`]
//! - `x` "token_key" → [`SecretBytes`] (set once, by the first leader)

use serde::{Deserialize, Serialize};
use strata_security::{Role, StreamRule};

use crate::control::{ControlFailure, ControlOutcome, ControlStore, ControlSuccess};
use crate::record;
use crate::StorageError;

pub const USER: u8 = b'u';
pub const RULE: u8 = b'a';
pub const AUTH_KEY: u8 = b'x';
/// Users in the cluster: bounds the replicated state and every scan of it.
pub const USERS_MAX: usize = 10_000;
/// Per-stream rules: each call's check scans them all.
pub const RULES_MAX: usize = 1_000;

/// A user as replicated: the password only as its argon2id hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub password_hash: String,
    pub roles: Vec<Role>,
    pub created_unix_ms: i64,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("roles", &self.roles)
            .field("created_unix_ms", &self.created_unix_ms)
            .finish()
    }
}

/// Key material: never printed, also not by `Debug` (commands are logged by label only,
/// but a `{:?}` of one must not leak it either).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBytes(#[serde(with = "crate::command::serde_bytes_compat")] pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

pub fn user_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(USER);
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn rule_key(pattern: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(pattern.len() + 1);
    key.push(RULE);
    key.extend_from_slice(pattern.as_bytes());
    key
}

pub fn token_key_key() -> Vec<u8> {
    let mut key = vec![AUTH_KEY];
    key.extend_from_slice(b"token_key");
    key
}

/// Sets the token key unless one is set: the first leader's key wins, later proposals
/// (a second leader racing the first) change nothing.
pub(crate) fn set_token_key(store: &mut dyn ControlStore, key: &SecretBytes) -> Result<ControlOutcome, StorageError> {
    let at = token_key_key();
    if store.get(&at)?.is_none() {
        store.put(at.clone(), record::seal_value("token key", &at, key)?);
    }
    Ok(Ok(ControlSuccess::Done))
}

/// Adds a user (`replace`: or replaces one of that name, keeping its creation time).
pub(crate) fn put_user(store: &mut dyn ControlStore, user: &UserRecord, replace: bool) -> Result<ControlOutcome, StorageError> {
    let key = user_key(&user.name);
    let mut user = user.clone();
    match store.get(&key)? {
        Some(existing) if !replace => {
            let _: UserRecord = record::open_value("user", &key, &existing)?;
            return Ok(Err(ControlFailure::UserExists { name: user.name }));
        }
        Some(existing) => {
            let existing: UserRecord = record::open_value("user", &key, &existing)?;
            user.created_unix_ms = existing.created_unix_ms;
        }
        None if store.scan(&[USER])?.len() >= USERS_MAX => return Ok(Err(ControlFailure::UsersFull)),
        None => {}
    }
    store.put(key.clone(), record::seal_value("user", &key, &user)?);
    Ok(Ok(ControlSuccess::Done))
}

/// The first admin, from a node's `--admin-password-file`: only into a cluster that has no
/// users yet, so restarting with the flag never resets a password changed since.
pub(crate) fn seed_admin(store: &mut dyn ControlStore, user: &UserRecord) -> Result<ControlOutcome, StorageError> {
    if store.scan(&[USER])?.is_empty() {
        return put_user(store, user, false);
    }
    Ok(Ok(ControlSuccess::Done))
}

pub(crate) fn remove_user(store: &mut dyn ControlStore, name: &str) -> Result<ControlOutcome, StorageError> {
    let key = user_key(name);
    if store.get(&key)?.is_none() {
        return Ok(Err(ControlFailure::UserNotFound { name: name.to_string() }));
    }
    store.remove(key);
    Ok(Ok(ControlSuccess::Done))
}

pub(crate) fn set_rule(store: &mut dyn ControlStore, rule: &StreamRule) -> Result<ControlOutcome, StorageError> {
    let key = rule_key(&rule.pattern);
    if store.get(&key)?.is_none() && store.scan(&[RULE])?.len() >= RULES_MAX {
        return Ok(Err(ControlFailure::RulesFull));
    }
    store.put(key.clone(), record::seal_value("stream rule", &key, rule)?);
    Ok(Ok(ControlSuccess::Done))
}

pub(crate) fn remove_rule(store: &mut dyn ControlStore, pattern: &str) -> Result<ControlOutcome, StorageError> {
    let key = rule_key(pattern);
    if store.get(&key)?.is_none() {
        return Ok(Err(ControlFailure::RuleNotFound { pattern: pattern.to_string() }));
    }
    store.remove(key);
    Ok(Ok(ControlSuccess::Done))
}

pub(crate) fn read_user(tree: &sled::Tree, name: &str) -> Result<Option<UserRecord>, StorageError> {
    record::read_value("user", tree, &user_key(name))
}

pub(crate) fn list_users(tree: &sled::Tree) -> Result<Vec<UserRecord>, StorageError> {
    record::scan_values("user", tree, &[USER])
}

pub(crate) fn list_rules(tree: &sled::Tree) -> Result<Vec<StreamRule>, StorageError> {
    record::scan_values("stream rule", tree, &[RULE])
}

pub(crate) fn read_token_key(tree: &sled::Tree) -> Result<Option<SecretBytes>, StorageError> {
    record::read_value("token key", tree, &token_key_key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlCommand;
    use crate::state::tests::state;

    fn user(name: &str, hash: &str, roles: &[Role]) -> UserRecord {
        UserRecord { name: name.into(), password_hash: hash.into(), roles: roles.to_vec(), created_unix_ms: 7 }
    }

    #[test]
    fn users_are_added_once_replaced_on_request_and_removed() {
        let (_dir, state) = state();
        let apply = |c| state.apply_control(c, b"m").unwrap();
        assert!(apply(ControlCommand::PutUser { user: user("ann", "h1", &[Role::Reader]), replace: false }).is_ok());
        assert_eq!(apply(ControlCommand::PutUser { user: user("ann", "h2", &[Role::Writer]), replace: false }), Err(ControlFailure::UserExists { name: "ann".into() }));
        assert_eq!(state.user("ann").unwrap().unwrap().password_hash, "h1");
        let mut changed = user("ann", "h3", &[Role::Writer]);
        changed.created_unix_ms = 99;
        assert!(apply(ControlCommand::PutUser { user: changed, replace: true }).is_ok());
        let ann = state.user("ann").unwrap().unwrap();
        assert_eq!((ann.password_hash.as_str(), ann.roles.as_slice(), ann.created_unix_ms), ("h3", &[Role::Writer][..], 7));
        assert!(apply(ControlCommand::RemoveUser { name: "ann".into() }).is_ok());
        assert_eq!(apply(ControlCommand::RemoveUser { name: "ann".into() }), Err(ControlFailure::UserNotFound { name: "ann".into() }));
        assert!(state.users().unwrap().is_empty());
    }

    #[test]
    fn the_seeded_admin_lands_only_in_an_empty_user_table() {
        let (_dir, state) = state();
        let apply = |c| state.apply_control(c, b"m").unwrap();
        apply(ControlCommand::SeedAdmin { user: user("admin", "first", &[Role::Admin]) }).unwrap();
        apply(ControlCommand::PutUser { user: user("admin", "changed", &[Role::Admin]), replace: true }).unwrap();
        apply(ControlCommand::SeedAdmin { user: user("admin", "first", &[Role::Admin]) }).unwrap();
        assert_eq!(state.user("admin").unwrap().unwrap().password_hash, "changed", "a restart with the flag resets nothing");
    }

    #[test]
    fn the_first_token_key_wins_and_rules_are_bounded_by_pattern() {
        let (_dir, state) = state();
        let apply = |c| state.apply_control(c, b"m").unwrap();
        assert!(state.token_key().unwrap().is_none());
        apply(ControlCommand::SetTokenKey { key: SecretBytes(vec![1; 32]) }).unwrap();
        apply(ControlCommand::SetTokenKey { key: SecretBytes(vec![2; 32]) }).unwrap();
        assert_eq!(state.token_key().unwrap().unwrap().0, vec![1; 32]);
        assert!(!format!("{:?}", ControlCommand::SetTokenKey { key: SecretBytes(vec![1; 32]) }).contains("1, 1"));
        let rule = |pattern: &str| StreamRule { pattern: pattern.into(), read: vec!["role:reader".into()], write: vec![] };
        apply(ControlCommand::SetStreamRule(rule("orders-*"))).unwrap();
        apply(ControlCommand::SetStreamRule(rule("orders-*"))).unwrap();
        assert_eq!(state.stream_rules().unwrap().len(), 1);
        assert_eq!(apply(ControlCommand::RemoveStreamRule { pattern: "x".into() }), Err(ControlFailure::RuleNotFound { pattern: "x".into() }));
        apply(ControlCommand::RemoveStreamRule { pattern: "orders-*".into() }).unwrap();
        assert!(state.stream_rules().unwrap().is_empty());
    }

    #[test]
    fn a_user_record_does_not_print_its_hash() {
        let printed = format!("{:?}", user("ann", "$argon2id$secret", &[Role::Reader]));
        assert!(!printed.contains("argon2id") && printed.contains("ann"));
    }
}
