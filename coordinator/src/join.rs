//! Join tokens and host revocation: the rules, as pure functions of the
//! persisted records and the clock (`now_ms` is always passed in).
//!
//! **Tokens.** `rollout token create` makes a token of [`TOKEN_BYTES`] random
//! bytes (base64url). The coordinator keeps only its sha256 ([`hash_token`])
//! in a [`TokenRecord`] with its expiry, labels, optional host binding and
//! whether it was used. A join succeeds once: [`TokenRecord::check`] refuses
//! an unknown, used or expired token (or the wrong host for a bound token), and
//! the store marks the token used with a compare-and-swap before the CSR is
//! signed, so two joins racing with one token cannot both win.
//!
//! **Revocation.** `rollout hosts remove NAME` revokes the host *by name*: a
//! [`HostRevocation`] records when, and from then on every agent certificate
//! for NAME is refused ([`HostRevocation::admits`]) — whatever CA-signed
//! certificate exists for it, including ones never seen by the coordinator —
//! except the certificates a later `rollout-agent join` for NAME issued, whose
//! serial numbers the record lists. (Comparing the certificate's `not_before`
//! with the revocation time would not do: certificates are back-dated for clock
//! skew and carry whole seconds.) Removing the host again empties that list.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tonic::Status;

use crate::pki::Role;
use crate::tls::Identity;

/// Random bytes in a token: 256 bits.
pub const TOKEN_BYTES: usize = 32;
/// Shortest token lifetime.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest token lifetime: tokens are meant to be short-lived.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a spent or expired token is kept (to say "used" or "expired"
/// rather than "unknown") before `token create` prunes it.
pub const KEEP_SPENT: Duration = Duration::from_secs(24 * 3600);

/// What every token starts with: recognizable (and findable by secret
/// scanners), and a token never starts with `-`, which command lines would
/// take for an option.
pub const TOKEN_PREFIX: &str = "rjt_";

/// A fresh token: [`TOKEN_PREFIX`] and [`TOKEN_BYTES`] from the OS-seeded
/// CSPRNG in base64url without padding (47 characters, safe in shells and
/// URLs).
pub fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill(&mut bytes[..]);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The sha256 (hex) of a token as stored; surrounding whitespace (a pasted
/// newline) is ignored.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.trim().as_bytes()))
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Who used a token, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The host that joined with it.
    pub host: String,
    /// When (unix ms).
    pub at_ms: i64,
}

/// A join token as persisted (`token/<sha256>`): never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// sha256 (hex) of the token: the key it is found by.
    pub hash: String,
    /// Creation time (unix ms).
    pub created_at_ms: i64,
    /// The token is refused from this time on (unix ms).
    pub expires_at_ms: i64,
    /// Labels handed to the joining host.
    pub labels: BTreeMap<String, String>,
    /// When set, only this host name may join with it.
    pub host: Option<String>,
    /// Set by the one join that spent it.
    pub used: Option<TokenUse>,
}

/// Why a token does not admit a host. Messages name the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No token with this hash (mistyped, truncated, or from another coordinator).
    #[error(
        "unknown token: the coordinator has no such token (check that it was copied whole, \
         or create one with `rollout token create`)"
    )]
    Unknown,
    /// Past its expiry.
    #[error("token expired at {}; create a new one with `rollout token create`", time(*.at_ms))]
    Expired {
        /// Expiry (unix ms).
        at_ms: i64,
    },
    /// Already spent by a join.
    #[error(
        "token already used (host {host:?} joined with it at {}); a token admits one join: \
         create a new one with `rollout token create`",
        time(*.at_ms)
    )]
    Used {
        /// The host that used it.
        host: String,
        /// When (unix ms).
        at_ms: i64,
    },
    /// A token bound to another host name.
    #[error(
        "this token only admits host {allowed:?}, not {host:?}; join with --host {allowed} or \
         create a token for {host:?} with `rollout token create --host {host}`"
    )]
    WrongHost {
        /// The host the token was created for.
        allowed: String,
        /// The host that asked.
        host: String,
    },
}

impl TokenRefusal {
    /// The gRPC status: `Unauthenticated` for an unknown token,
    /// `PermissionDenied` for a known one that does not admit the host.
    pub fn to_status(&self) -> Status {
        match self {
            TokenRefusal::Unknown => Status::unauthenticated(self.to_string()),
            _ => Status::permission_denied(self.to_string()),
        }
    }
}

impl TokenRecord {
    /// A new, unused token record valid for `ttl` from `now_ms`.
    pub fn new(
        hash: String,
        now_ms: i64,
        ttl: Duration,
        labels: BTreeMap<String, String>,
        host: Option<String>,
    ) -> TokenRecord {
        TokenRecord {
            hash,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl.as_millis() as i64),
            labels,
            host,
            used: None,
        }
    }

    /// Whether `host` may join with this token at `now_ms`.
    pub fn check(&self, host: &str, now_ms: i64) -> Result<(), TokenRefusal> {
        if let Some(u) = &self.used {
            return Err(TokenRefusal::Used {
                host: u.host.clone(),
                at_ms: u.at_ms,
            });
        }
        if now_ms >= self.expires_at_ms {
            return Err(TokenRefusal::Expired {
                at_ms: self.expires_at_ms,
            });
        }
        if let Some(allowed) = &self.host
            && allowed != host
        {
            return Err(TokenRefusal::WrongHost {
                allowed: allowed.clone(),
                host: host.to_string(),
            });
        }
        Ok(())
    }

    /// The record after `host` joined with it at `now_ms`.
    pub fn spent_by(&self, host: &str, now_ms: i64) -> TokenRecord {
        TokenRecord {
            used: Some(TokenUse {
                host: host.to_string(),
                at_ms: now_ms,
            }),
            ..self.clone()
        }
    }

    /// Whether `token create` may forget it: spent or expired for longer
    /// than [`KEEP_SPENT`].
    pub fn prunable(&self, now_ms: i64) -> bool {
        let keep = KEEP_SPENT.as_millis() as i64;
        let ended = match &self.used {
            Some(u) => u.at_ms.min(self.expires_at_ms),
            None => self.expires_at_ms,
        };
        now_ms.saturating_sub(ended) > keep
    }
}

/// A removed host (`revoked/<host>`): its certificates are refused except
/// those issued by a join after the removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRevocation {
    /// The host name (certificate CN).
    pub host: String,
    /// When it was removed (unix ms).
    pub removed_at_ms: i64,
    /// Serials (hex) of certificates issued to it by joins since.
    pub admitted_serials: Vec<String>,
}

impl HostRevocation {
    /// A fresh revocation: nothing admitted.
    pub fn new(host: &str, now_ms: i64) -> HostRevocation {
        HostRevocation {
            host: host.to_string(),
            removed_at_ms: now_ms,
            admitted_serials: Vec::new(),
        }
    }

    /// Whether the certificate with `serial` is still accepted.
    pub fn admits(&self, serial: &str) -> bool {
        self.admitted_serials.iter().any(|s| s == serial)
    }

    /// The refusal every RPC answers with.
    pub fn refusal(&self) -> Status {
        Status::permission_denied(format!(
            "host {} was removed (at {}); join it again with a new token: `rollout token create` \
             on the operator's side, then `rollout-agent join` on the host",
            self.host,
            time(self.removed_at_ms)
        ))
    }
}

/// Whether `id` may call the agent API given the revocation of its host, if
/// any. Only agent certificates are subject to host revocation.
pub fn check_admitted(id: &Identity, revocation: Option<&HostRevocation>) -> Result<(), Status> {
    match revocation {
        Some(r) if id.role == Role::Agent && !r.admits(&id.serial) => Err(r.refusal()),
        _ => Ok(()),
    }
}

/// Parses `k=v` (a `--label` argument).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not key=value, e.g. role=web")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn record(ttl: Duration, host: Option<&str>) -> TokenRecord {
        TokenRecord::new(
            hash_token("tok"),
            T0,
            ttl,
            BTreeMap::from([("role".to_string(), "web".to_string())]),
            host.map(str::to_string),
        )
    }

    #[test]
    fn tokens_carry_256_random_bits_and_only_their_hash_is_kept() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(a.strip_prefix(TOKEN_PREFIX).expect("prefix"))
            .expect("base64url");
        assert_eq!(raw.len(), TOKEN_BYTES);
        const { assert!(TOKEN_BYTES * 8 >= 128) };
        let h = hash_token(&a);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a));
        assert_eq!(
            h,
            hash_token(&format!("{a}\n")),
            "a pasted newline is ignored"
        );
        assert_ne!(h, hash_token(&b));
    }

    #[test]
    fn token_admits_until_its_expiry_and_not_at_it() {
        let r = record(Duration::from_secs(600), None);
        assert_eq!(r.expires_at_ms, T0 + 600_000);
        assert_eq!(r.check("web-1", T0), Ok(()));
        assert_eq!(r.check("web-1", T0 + 599_999), Ok(()));
        let err = r.check("web-1", T0 + 600_000).expect_err("expired");
        assert_eq!(
            err,
            TokenRefusal::Expired {
                at_ms: T0 + 600_000
            }
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("token expired at 2023-11-14T22:23:20Z"),
            "{msg}"
        );
        assert!(msg.contains("rollout token create"), "{msg}");
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn token_is_single_use() {
        let r = record(Duration::from_secs(600), None);
        let spent = r.spent_by("web-1", T0 + 5);
        let err = spent.check("web-2", T0 + 10).expect_err("reused");
        assert!(matches!(&err, TokenRefusal::Used { host, .. } if host == "web-1"));
        assert!(err.to_string().contains("token already used"), "{err}");
        // Used wins over expired: the more useful explanation.
        let err = spent
            .check("web-1", T0 + 10_000_000)
            .expect_err("reused late");
        assert!(matches!(err, TokenRefusal::Used { .. }));
    }

    #[test]
    fn bound_token_admits_only_its_host() {
        let r = record(Duration::from_secs(60), Some("db-1"));
        assert_eq!(r.check("db-1", T0), Ok(()));
        let err = r.check("db-2", T0).expect_err("other host");
        assert!(
            err.to_string().contains("only admits host \"db-1\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_token_is_unauthenticated() {
        let s = TokenRefusal::Unknown.to_status();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().starts_with("unknown token"), "{}", s.message());
    }

    #[test]
    fn spent_and_expired_tokens_are_pruned_after_a_day() {
        let day = KEEP_SPENT.as_millis() as i64;
        let r = record(Duration::from_secs(60), None);
        assert!(!r.prunable(T0 + 60_000 + day));
        assert!(r.prunable(T0 + 60_001 + day));
        let spent = r.spent_by("h", T0 + 1);
        assert!(spent.prunable(T0 + 2 + day));
    }

    #[test]
    fn removed_host_is_refused_except_certificates_from_a_later_join() {
        let id = |role, name: &str, serial: &str| Identity {
            role,
            name: name.into(),
            serial: serial.into(),
        };
        let mut rev = HostRevocation::new("web-1", T0);
        let old = id(Role::Agent, "web-1", "aa");
        let err = check_admitted(&old, Some(&rev)).expect_err("revoked");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().starts_with(
                "host web-1 was removed (at 2023-11-14T22:13:20Z); join it again with a new token"
            ),
            "{}",
            err.message()
        );
        rev.admitted_serials.push("bb".into());
        assert!(check_admitted(&id(Role::Agent, "web-1", "bb"), Some(&rev)).is_ok());
        assert!(check_admitted(&old, Some(&rev)).is_err());
        assert!(check_admitted(&old, None).is_ok());
        // Operators are never subject to host revocation.
        assert!(check_admitted(&id(Role::Operator, "web-1", "aa"), Some(&rev)).is_ok());
    }

    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(parse_label("role=web"), Ok(("role".into(), "web".into())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
    }
}
