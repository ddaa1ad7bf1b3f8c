//! Authentication of requests (RFC 8489 §9.2): challenges, long-term credentials checked against
//! the allocation's kept key, the per-source budget of unauthenticated answers, unknown attributes and
//! Binding.

use super::{Action, Engine, write_response};
use crate::allocation::FiveTuple;
use crate::attr::AttrType;
use crate::auth::{NonceCheck, Verdict};
use crate::error::{DropReason, ErrorCode};
use crate::integrity::PreparedKey;
use crate::policy::rate::LogKind;
use crate::stats::{STALE_NONCE, bump};
use crate::stun::{Class, Method, StunMsg};
use crate::table::AllocId;
use std::time::Instant;

/// Most unknown attributes listed in one 420 response.
pub(super) const MAX_UNKNOWN_LISTED: usize = 8;
/// Longest USERNAME accepted (RFC 8489 §14.3: less than 513 bytes).
pub(super) const MAX_USERNAME: usize = 512;
/// Longest REALM or NONCE accepted (RFC 8489 §14.9, §14.10: less than 763 bytes).
pub(super) const MAX_REALM_OR_NONCE: usize = 762;

/// Attributes the engine understands; other comprehension-required ones get 420. DONT-FRAGMENT is
/// deliberately absent: relays do not set DF, and RFC 8656 §7.2 says to treat it as unknown then.
pub(super) const KNOWN: &[AttrType] = &[
    AttrType::MAPPED_ADDRESS,
    AttrType::USERNAME,
    AttrType::MESSAGE_INTEGRITY,
    AttrType::ERROR_CODE,
    AttrType::UNKNOWN_ATTRIBUTES,
    AttrType::CHANNEL_NUMBER,
    AttrType::LIFETIME,
    AttrType::BANDWIDTH,
    AttrType::XOR_PEER_ADDRESS,
    AttrType::DATA,
    AttrType::REALM,
    AttrType::NONCE,
    AttrType::XOR_RELAYED_ADDRESS,
    AttrType::REQUESTED_ADDRESS_FAMILY,
    AttrType::EVEN_PORT,
    AttrType::REQUESTED_TRANSPORT,
    AttrType::XOR_MAPPED_ADDRESS,
    AttrType::RESERVATION_TOKEN,
    AttrType::PRIORITY,
    AttrType::USE_CANDIDATE,
];

/// The result of authenticating a request: the key and the username it carried, and the allocation of
/// its 5-tuple, if any (looked up once, for the key and for the request).
pub(super) struct Authenticated<'a> {
    pub(super) key: PreparedKey,
    pub(super) username: &'a [u8],
    pub(super) existing: Option<AllocId>,
}

impl Engine {
    /// Charges an answer to an unauthenticated request to its source and the source's prefix,
    /// node-wide; true when over the limit (drop). Unauthenticated answers are bigger than the
    /// requests, so an unlimited server is a reflector.
    pub(super) fn over_source_limit(&mut self, now: Instant, tuple: FiveTuple) -> bool {
        let (rate, burst) = (self.settings.unauth_rate, self.settings.unauth_burst);
        if self.cluster.answer_unauthenticated(tuple.client.ip(), now, rate, burst) {
            return false;
        }
        let ip = tuple.client.ip();
        self.logs.log(
            LogKind::RateLimited,
            log::Level::Info,
            now,
            format_args!("unauthenticated requests from {ip} over the rate limit: dropped"),
        );
        true
    }

    /// 401 or 438 with a fresh NONCE and the REALM, and no MESSAGE-INTEGRITY.
    pub(super) fn challenge(&mut self, now: Instant, tuple: FiveTuple, msg: &StunMsg<'_>, code: ErrorCode) -> Action {
        let expiry = self.unix(now) + self.settings.nonce_lifetime.as_secs();
        let nonce = self.settings.nonce_key.mint(expiry, tuple.client.ip());
        let with_reason = self.settings.reason_phrases;
        let settings = &self.settings;
        write_response(&mut self.out, settings, msg, Class::Error, None, |w| {
            w.add_error(code, with_reason);
            w.add_bytes(AttrType::REALM, settings.credentials.realm().as_bytes());
            w.add_bytes(AttrType::NONCE, &nonce);
        })
    }

    //= RFC 8489 §9.2.4: "If the message does not contain a MESSAGE-INTEGRITY or a
    //= MESSAGE-INTEGRITY-SHA256 attribute, the server MUST generate an error response with an error
    //= code of 401 (Unauthenticated). ... If the message contains a MESSAGE-INTEGRITY ... but is missing
    //= USERNAME or USERHASH, REALM, or NONCE, the server MUST generate an error response with an error
    //= code of 400 (Bad Request). ... If the NONCE is no longer valid, ... 438 (Stale Nonce)."
    pub(super) fn authenticate<'m>(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'m>,
    ) -> Result<Authenticated<'m>, Action> {
        let limited = |engine: &mut Self| {
            engine.over_source_limit(now, tuple).then_some(Action::Drop(DropReason::SourceRateLimited))
        };
        if msg.integrity_offset().is_none() {
            if let Some(drop) = limited(self) {
                return Err(drop);
            }
            let challenge = self.challenge(now, tuple, msg, ErrorCode::Unauthorized);
            // Clients refresh with the credentials they allocated with (libwebrtc, Firefox, pion), so an
            // unauthenticated Refresh smaller than its answer is a reflection probe: under a flood it
            // goes unanswered. First Allocates are answered whatever their size: real clients' are
            // smaller than any 401 (28 bytes from libwebrtc, 44 from Firefox).
            if msg.method() == Method::REFRESH
                && matches!(challenge, Action::Reply { len } if msg.bytes().len() < len)
                && self.cluster.unauthenticated_flood(now)
            {
                return Err(Action::Drop(DropReason::UnauthenticatedUnderFlood));
            }
            return Err(challenge);
        }
        let (Some(username), Some(realm), Some(nonce)) =
            (msg.attr(AttrType::USERNAME), msg.attr(AttrType::REALM), msg.attr(AttrType::NONCE))
        else {
            return Err(limited(self).unwrap_or_else(|| self.error(msg, ErrorCode::BadRequest, None)));
        };
        if username.len() > MAX_USERNAME || realm.len() > MAX_REALM_OR_NONCE || nonce.len() > MAX_REALM_OR_NONCE {
            return Err(limited(self).unwrap_or_else(|| self.error(msg, ErrorCode::BadRequest, None)));
        }
        let unix = self.unix(now);
        if self.settings.nonce_key.check(nonce, tuple.client.ip(), unix) == NonceCheck::Stale {
            bump(&self.stats.auth_failures[STALE_NONCE], 1);
            return Err(limited(self).unwrap_or_else(|| self.challenge(now, tuple, msg, ErrorCode::StaleNonce)));
        }
        // Requests on an allocation (Refresh, CreatePermission, ChannelBind) by the username that made it
        // are checked with the key it authenticated with, unless a reload changed the credentials since:
        // the REST expiry is checked again, the key (HMAC-SHA1 and MD5) is not derived again.
        let existing = self.table.find(&tuple);
        let known = existing
            .and_then(|id| self.table.get(id))
            .filter(|a| a.key_generation == self.key_generation && a.username.as_bytes() == username)
            .map(|a| a.key.0);
        let credentials = &self.settings.credentials;
        let verdict = match known {
            Some(key) => credentials.verify_known(msg, username, unix, &key),
            None => credentials.verify(msg, username, unix),
        };
        let (reason, which) = match verdict {
            Verdict::Ok(key) => return Ok(Authenticated { key, username, existing }),
            Verdict::UnknownUser => ("unknown user", 0),
            Verdict::Expired => ("expired REST credential", 1),
            Verdict::BadIntegrity => ("wrong password or secret", 2),
        };
        bump(&self.stats.auth_failures[which], 1);
        let user = String::from_utf8_lossy(username);
        self.logs.log(
            LogKind::AuthFailure,
            log::Level::Info,
            now,
            format_args!("authentication failed ({reason}): user={user} client={tuple}"),
        );
        Err(limited(self).unwrap_or_else(|| self.challenge(now, tuple, msg, ErrorCode::Unauthorized)))
    }

    //= RFC 8489 §6.3.1: "If the request contains one or more unknown comprehension-required attributes,
    //= the server replies with an error response with an error code of 420 (Unknown Attribute) and
    //= includes an UNKNOWN-ATTRIBUTES attribute in the response that lists the unknown
    //= comprehension-required attributes."
    pub(super) fn reject_unknown(&mut self, msg: &StunMsg<'_>, key: Option<&PreparedKey>) -> Option<Action> {
        let mut unknown = [0u16; MAX_UNKNOWN_LISTED];
        let mut n = 0;
        for a in msg.attrs() {
            let listed = unknown[..n].contains(&a.typ.0);
            if a.typ.comprehension_required() && !KNOWN.contains(&a.typ) && n < MAX_UNKNOWN_LISTED && !listed {
                unknown[n] = a.typ.0;
                n += 1;
            }
        }
        if n == 0 {
            return None;
        }
        let with_reason = self.settings.reason_phrases;
        Some(write_response(&mut self.out, &self.settings, msg, Class::Error, key, |w| {
            w.add_error(ErrorCode::UnknownAttribute, with_reason);
            w.add_unknown_attributes(&unknown[..n]);
        }))
    }

    pub(super) fn binding(&mut self, tuple: FiveTuple, msg: &StunMsg<'_>) -> Action {
        if let Some(action) = self.reject_unknown(msg, None) {
            return action;
        }
        write_response(&mut self.out, &self.settings, msg, Class::Success, None, |w| {
            w.add_xor_addr(AttrType::XOR_MAPPED_ADDRESS, tuple.client);
        })
    }

    /// Authenticates, rejects unknown attributes, finds the 5-tuple's allocation and checks the username.
    pub(super) fn authorize_on_allocation<'m>(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &StunMsg<'m>,
    ) -> Result<(Authenticated<'m>, AllocId), Action> {
        let auth = self.authenticate(now, tuple, msg)?;
        if let Some(action) = self.reject_unknown(msg, Some(&auth.key)) {
            return Err(action);
        }
        let Some(id) = auth.existing else {
            return Err(self.error(msg, ErrorCode::AllocationMismatch, Some(&auth.key)));
        };
        //= RFC 8656 §5: "if the USERNAME ... does not match the username used to create the allocation,
        //= the request MUST be rejected with a 441 (Wrong Credentials) error."
        if self.table.get(id).is_some_and(|a| a.username.as_bytes() != auth.username) {
            return Err(self.error(msg, ErrorCode::WrongCredentials, Some(&auth.key)));
        }
        Ok((auth, id))
    }
}
