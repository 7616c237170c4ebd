//! The agent's identity on disk: one file, `identity.json`, mode 0600.
//!
//! It holds the private key (generated here, never sent), the certificate, the CA, and
//! where the controller is. Key and certificate live in one file so that a renewal
//! replaces both in one atomic rename: a crash leaves the old pair or the new pair,
//! never a mix. Writes follow the crash-safe pattern: temporary file, fsync, rename,
//! fsync of the directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::messages::IssuedCertificate;
use uuid::Uuid;

/// File name of the identity inside the data directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// Everything the agent needs to open a session.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// The controller-chosen agent id.
    pub agent_id: Uuid,
    /// PEM of the private key.
    pub key_pem: String,
    /// The current certificate.
    pub certificate: IssuedCertificate,
    /// When this agent received the certificate, by its own clock. Renewal is timed
    /// from here, so a skewed agent clock neither renews early nor late.
    pub received_at_ms: UnixMillis,
    /// PEM of the controller CA.
    pub ca_pem: String,
    /// Controller session addresses, `host:port`.
    pub controller_addresses: Vec<String>,
    /// TLS server name of the controller.
    pub server_name: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("agent_id", &self.agent_id)
            .field("serial", &self.certificate.serial)
            .field("not_after_ms", &self.certificate.not_after_ms)
            .field("controller_addresses", &self.controller_addresses)
            .finish_non_exhaustive()
    }
}

/// Problems with the identity file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The agent has not enrolled into this data directory.
    #[error("no identity at {0}: run `surplus-agent enroll --token ...` first")]
    Missing(PathBuf),
    /// The file could not be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid identity.
    #[error("identity file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Identity {
    /// Path of the identity in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(IDENTITY_FILE)
    }

    /// Loads the identity from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = Self::path(data_dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing(path));
            }
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|e| IdentityError::Damaged {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes the identity atomically with mode 0600.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(data_dir);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(data_dir).map_err(io)?;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let text = serde_json::to_vec_pretty(self).expect("identity serializes");
        write_atomic(&path, &text, 0o600).map_err(io)
    }

    /// When (by the agent's clock) the certificate should be renewed: about two thirds
    /// into its life counted from its receipt, moved by `jitter` (a fraction in
    /// `[-1, 1]` of a twentieth of the life) so that agents enrolled together do not
    /// renew together.
    pub fn renew_at_ms(&self, jitter: f64) -> UnixMillis {
        let life = self.certificate.not_after_ms - self.certificate.issued_at_ms;
        renew_at_ms(self.received_at_ms, self.received_at_ms + life, jitter)
    }
}

/// Renewal time of a certificate issued at `issued_at` and valid until `not_after`.
pub fn renew_at_ms(issued_at: UnixMillis, not_after: UnixMillis, jitter: f64) -> UnixMillis {
    let life = (not_after - issued_at).max(0);
    let jitter = jitter.clamp(-1.0, 1.0) * life as f64 / 20.0;
    issued_at + life * 2 / 3 + jitter as i64
}

pub use surplus_runtime::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity() -> Identity {
        Identity {
            agent_id: Uuid::now_v7(),
            key_pem: "KEY".into(),
            certificate: IssuedCertificate {
                cert_pem: "CERT".into(),
                serial: "01".into(),
                issued_at_ms: 0,
                not_after_ms: 90_000,
            },
            received_at_ms: 0,
            ca_pem: "CA".into(),
            controller_addresses: vec!["127.0.0.1:7070".into()],
            server_name: "localhost".into(),
        }
    }

    #[test]
    fn identity_round_trips_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert!(matches!(
            Identity::load(&data),
            Err(IdentityError::Missing(_))
        ));
        let id = identity();
        id.save(&data).unwrap();
        assert_eq!(Identity::load(&data).unwrap(), id);
        let mode = fs::metadata(Identity::path(&data))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(Identity::path(&data), "{").unwrap();
        assert!(matches!(
            Identity::load(&data),
            Err(IdentityError::Damaged { .. })
        ));
    }

    #[test]
    fn renewal_is_timed_by_the_agent_clock_whatever_the_skew() {
        let mut id = identity();
        id.certificate.issued_at_ms = 1_000_000; // controller clock
        id.certificate.not_after_ms = 1_090_000;
        id.received_at_ms = 5_000_000; // agent clock, far ahead
        assert_eq!(id.renew_at_ms(0.0), 5_060_000);
    }

    #[test]
    fn renewal_is_two_thirds_into_the_life() {
        assert_eq!(renew_at_ms(0, 90_000, 0.0), 60_000);
        assert_eq!(renew_at_ms(0, 90_000, 1.0), 64_500);
        assert_eq!(renew_at_ms(0, 90_000, -1.0), 55_500);
    }

    proptest! {
        #[test]
        fn renewal_always_falls_inside_the_validity(issued in 0i64..1<<40, life in 1i64..1<<36, jitter in -5.0f64..5.0) {
            let at = renew_at_ms(issued, issued + life, jitter);
            prop_assert!(at > issued || life < 3);
            prop_assert!(at < issued + life);
        }
    }
}
