//! Join tokens: what an operator hands to a new host so its agent can enroll.
//!
//! A token carries everything the agent needs and nothing it must trust blindly: the
//! enrollment addresses, the TLS server name, the SHA-256 fingerprint of the controller
//! CA (pinned: no trust on first use), the expiry, and a 256-bit secret. The controller
//! stores only a hash of the secret.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::codec;

const PREFIX: &str = "surplus-join-1.";

/// A decoded join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinToken {
    /// The secret; only its hash is stored.
    pub secret: [u8; 32],
    /// SHA-256 of the controller CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// Enrollment endpoints, `host:port`.
    pub enroll_addresses: Vec<String>,
    /// TLS server name of the controller.
    pub server_name: String,
    /// Expiry.
    pub expires_at_ms: UnixMillis,
}

/// Why a token string could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenFormatError {
    /// The string does not start with the join token prefix.
    #[error("not a Surplus join token (it should start with `{PREFIX}`)")]
    Prefix,
    /// The body is not valid base64url.
    #[error("join token is damaged: not valid base64url")]
    Base64,
    /// The body does not decode.
    #[error("join token is damaged: {0}")]
    Body(String),
    /// The token names no address to enroll at.
    #[error("join token names no controller address")]
    NoAddress,
}

impl JoinToken {
    /// The printable form.
    pub fn encode(&self) -> String {
        let body = codec::encode_value(self).expect("a join token always encodes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
    }

    /// Reads a printable token; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenFormatError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenFormatError::Base64)?;
        let token: JoinToken =
            codec::decode_value(&bytes).map_err(|e| TokenFormatError::Body(e.to_string()))?;
        if token.enroll_addresses.is_empty() {
            return Err(TokenFormatError::NoAddress);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            secret: [7; 32],
            ca_fingerprint: [9; 32],
            enroll_addresses: vec!["10.0.0.1:7071".into(), "ctl.example:7071".into()],
            server_name: "ctl.example".into(),
            expires_at_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn round_trips_through_text() {
        let t = token();
        assert_eq!(JoinToken::parse(&format!("  {}\n", t.encode())), Ok(t));
    }

    #[test]
    fn damaged_tokens_are_named_not_guessed() {
        let text = token().encode();
        assert_eq!(JoinToken::parse("hello"), Err(TokenFormatError::Prefix));
        assert_eq!(
            JoinToken::parse(&format!("{text}!")),
            Err(TokenFormatError::Base64)
        );
        let truncated = &text[..text.len() - 10];
        assert!(matches!(
            JoinToken::parse(truncated),
            Err(TokenFormatError::Body(_))
        ));
        let mut empty = token();
        empty.enroll_addresses.clear();
        assert_eq!(
            JoinToken::parse(&empty.encode()),
            Err(TokenFormatError::NoAddress)
        );
    }
}
