//! Who may allocate: static users (`name:password` or `name:0x<md5 key>`) and TURN REST API shared
//! secrets (username `<unix-expiry><sep><user>`, password `base64(HMAC-SHA1(secret, username))`).

use crate::StunMsg;
use crate::integrity::{HmacKey, LongTermKey, PreparedKey, long_term_key, rest_password_with};
use crate::stun::verify_message_integrity_with;
use std::collections::HashMap;

/// The credentials one realm accepts.
#[derive(Clone, Default)]
pub struct CredentialStore {
    realm: Box<str>,
    /// Static users: name -> precomputed long-term key.
    users: HashMap<Box<[u8]>, LongTermKey>,
    /// REST API secrets, all accepted (several at once make rotation painless), prepared for HMAC.
    secrets: Vec<HmacKey>,
    /// Separator between expiry and user in REST usernames.
    separator: u8,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Outcome of checking a request's credentials.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Authenticated: the key to sign the response with.
    Ok(PreparedKey),
    /// No such static user and not a REST username.
    UnknownUser,
    /// A REST username whose expiry has passed.
    Expired,
    /// The MESSAGE-INTEGRITY does not match any accepted password.
    BadIntegrity,
}

impl CredentialStore {
    /// A store for `realm` with no users or secrets.
    pub fn new(realm: &str, separator: u8) -> Self {
        Self { realm: realm.into(), separator, ..Self::default() }
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Adds a static user with a plain password.
    pub fn add_user(&mut self, name: &str, password: &str) {
        let key = long_term_key(name.as_bytes(), self.realm.as_bytes(), password.as_bytes());
        self.users.insert(name.as_bytes().into(), key);
    }

    /// Adds a static user with a precomputed key (coturn's `name:0x<hex>` form).
    pub fn add_user_key(&mut self, name: &str, key: LongTermKey) {
        self.users.insert(name.as_bytes().into(), key);
    }

    /// Adds a REST API shared secret.
    pub fn add_secret(&mut self, secret: &str) {
        self.secrets.push(HmacKey::new(secret.as_bytes()));
    }

    /// Whether any credential is configured at all.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.secrets.is_empty()
    }

    /// Splits a REST username into (expiry, user); `None` if it is not one.
    pub(crate) fn split_rest_username<'u>(&self, username: &'u [u8]) -> Option<(u64, &'u [u8])> {
        let (ts, user) = match username.iter().position(|&b| b == self.separator) {
            Some(i) => (&username[..i], &username[i + 1..]),
            None => (username, &username[username.len()..]),
        };
        if ts.is_empty() || ts.len() > 19 || !ts.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let expiry = ts.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        Some((expiry, user))
    }

    /// The name counted against the user quota: the user part of a REST username, else the whole name.
    pub(crate) fn quota_user<'u>(&self, username: &'u [u8]) -> &'u [u8] {
        if self.users.contains_key(username) || self.secrets.is_empty() {
            return username;
        }
        self.split_rest_username(username).map_or(username, |(_, user)| user)
    }

    /// Checks `msg`'s MESSAGE-INTEGRITY for `username` at `now_unix`.
    pub fn verify(&self, msg: &StunMsg<'_>, username: &[u8], now_unix: u64) -> Verdict {
        if let Some(key) = self.users.get(username) {
            return Self::check(msg, PreparedKey::new(*key));
        }
        if let Some(refused) = self.refuse_rest(username, now_unix) {
            return refused;
        }
        for secret in &self.secrets {
            let password = rest_password_with(secret, username);
            let key = PreparedKey::new(long_term_key(username, self.realm.as_bytes(), &password));
            if verify_message_integrity_with(msg, key.hmac()) {
                return Verdict::Ok(key);
            }
        }
        Verdict::BadIntegrity
    }

    /// [`CredentialStore::verify`] for a username whose key `known` this store derived before (the key
    /// its allocation was created with; the caller makes sure the store has not changed since): the
    /// REST expiry is checked again, the key is not derived again.
    pub(crate) fn verify_known(
        &self,
        msg: &StunMsg<'_>,
        username: &[u8],
        now_unix: u64,
        known: &LongTermKey,
    ) -> Verdict {
        if !self.users.contains_key(username)
            && let Some(refused) = self.refuse_rest(username, now_unix)
        {
            return refused;
        }
        Self::check(msg, PreparedKey::new(*known))
    }

    /// Why a username that is not a static user's is refused before any key is tried, if it is.
    fn refuse_rest(&self, username: &[u8], now_unix: u64) -> Option<Verdict> {
        if self.secrets.is_empty() {
            return Some(Verdict::UnknownUser);
        }
        let Some((expiry, _)) = self.split_rest_username(username) else {
            return Some(Verdict::UnknownUser);
        };
        (expiry < now_unix).then_some(Verdict::Expired)
    }

    fn check(msg: &StunMsg<'_>, key: PreparedKey) -> Verdict {
        if verify_message_integrity_with(msg, key.hmac()) { Verdict::Ok(key) } else { Verdict::BadIntegrity }
    }
}
