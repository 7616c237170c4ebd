//! The controller's data directory: CA, server certificate, database, configuration.
//!
//! ```text
//! DIR/ca.crt  ca.key (0600)  server.crt  server.key (0600)  controller.toml
//! DIR/controller.db (the embedded database, unless `database_url` names another)
//! DIR/controller.lock (the pid of the controller serving the directory)
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use surplus_certs::CertAuthority;
use surplus_protocol::clock::UnixMillis;
use surplus_runtime::write_atomic;

use crate::config::ControllerConfig;
use crate::store::{Backend, Principal, Role, Store};

/// The commented default configuration written by `init`.
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/controller.example.toml");

const SERVER_CERT_LIFETIME_MS: i64 = 365 * 86_400_000;
const SERVER_CERT_RENEW_BEFORE_MS: i64 = 30 * 86_400_000;

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir(PathBuf);

impl DataDir {
    /// The directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.crt")
    }
    /// CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// Server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.0.join("server.crt")
    }
    /// Server key.
    pub fn server_key(&self) -> PathBuf {
        self.0.join("server.key")
    }
    /// Configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.0.join("controller.toml")
    }
    /// Lock file of the controller serving the directory.
    pub fn lock_file(&self) -> PathBuf {
        self.0.join("controller.lock")
    }

    /// Takes the directory's advisory lock (`flock`) for as long as the returned value
    /// lives, and writes this process's pid into the lock file. A second controller on
    /// the same directory would fight the first over its agents (marking them
    /// unreachable); it fails here instead, naming the holder. The local administration
    /// commands (`token create`, `agent revoke`) do not take it: they are meant to run
    /// beside a serving controller.
    pub fn lock(&self) -> anyhow::Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.lock_file();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim() {
                    "" => "a process that has not written its pid yet".to_owned(),
                    pid => format!("pid {pid}"),
                };
                bail!(
                    "{} is in use by another surplus-controller ({holder}, lock {}); stop it first or give this one another --data-dir",
                    self.0.display(),
                    path.display()
                );
            }
            Err(e) => bail!("locking {}: {e}", path.display()),
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing pid {pid} into {}", path.display()))?;
        Ok(DataDirLock { _file: file })
    }

    /// Loads the configuration of this directory.
    pub fn load_config(&self) -> anyhow::Result<ControllerConfig> {
        ControllerConfig::load(&self.config_file())
            .with_context(|| format!("reading {}", self.config_file().display()))
    }

    /// Loads the CA, failing clearly when the directory was never initialised.
    pub fn load_ca(&self) -> anyhow::Result<CertAuthority> {
        if !self.ca_cert().exists() {
            bail!(
                "{} is not an initialised controller data directory (run `surplus-controller init --data-dir {}`)",
                self.0.display(),
                self.0.display()
            );
        }
        let cert = fs::read_to_string(self.ca_cert())
            .with_context(|| format!("reading {}", self.ca_cert().display()))?;
        let key = fs::read_to_string(self.ca_key())
            .with_context(|| format!("reading {}", self.ca_key().display()))?;
        Ok(CertAuthority::from_pem(&cert, &key)?)
    }

    /// Opens the database `database_url` names (see
    /// [`ControllerConfig::database_url`]), applying migrations.
    pub async fn open_store(&self, database_url: &str) -> anyhow::Result<Arc<dyn Store>> {
        let backend = Backend::of(database_url, &self.0)?;
        crate::store::open(database_url, &self.0)
            .await
            .with_context(|| format!("opening the database {}", backend.display()))
    }

    /// Re-issues the server certificate when it is missing, expires within 30 days, or
    /// does not carry the configured names. Returns `(cert PEM, key PEM)`.
    pub fn server_identity(
        &self,
        ca: &CertAuthority,
        names: &[String],
        now_ms: UnixMillis,
    ) -> anyhow::Result<(String, String)> {
        let current = fs::read_to_string(self.server_cert())
            .ok()
            .zip(fs::read_to_string(self.server_key()).ok());
        let names_file = self.0.join("server.names");
        let wanted = names.join("\n");
        if let Some((cert, key)) = current {
            let fresh = surplus_certs::cert_info_pem(&cert)
                .is_ok_and(|i| i.not_after_ms - now_ms > SERVER_CERT_RENEW_BEFORE_MS);
            let same_names = fs::read_to_string(&names_file).is_ok_and(|n| n == wanted);
            if fresh && same_names {
                return Ok((cert, key));
            }
        }
        let (cert, key) = ca.issue_server(names, now_ms, SERVER_CERT_LIFETIME_MS)?;
        write_atomic(&self.server_key(), key.as_bytes(), 0o600)?;
        write_atomic(&self.server_cert(), cert.as_bytes(), 0o644)?;
        write_atomic(&names_file, wanted.as_bytes(), 0o644)?;
        Ok((cert, key))
    }
}

/// The lock of a data directory ([`DataDir::lock`]); released when dropped (or when
/// the process ends, however it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// What `init` made.
#[derive(Debug)]
pub struct InitReport {
    /// The admin API token, shown once.
    pub admin_token: String,
    /// SHA-256 of the CA certificate.
    pub ca_fingerprint: [u8; 32],
}

/// A new random API token and its stored hash.
pub fn new_api_token() -> (String, String) {
    let secret: [u8; 32] = rand::random();
    let token = format!("spl_{}", surplus_certs::hex(&secret));
    let hash = api_token_hash(&token);
    (token, hash)
}

/// The stored form of an API token.
pub fn api_token_hash(token: &str) -> String {
    surplus_certs::hex(&surplus_certs::sha256(token.as_bytes()))
}

/// Creates a data directory: CA, server certificate, database, admin token, config.
///
/// With a `database_url` (such as `postgres://...`), that database is migrated and
/// used, and the URL is written into `controller.toml`; it is checked before anything
/// is written, so a wrong URL or an unreachable server leaves no half-made directory.
pub async fn init(
    dir: &DataDir,
    server_names: &[String],
    database_url: Option<&str>,
    now_ms: UnixMillis,
) -> anyhow::Result<InitReport> {
    if dir.ca_cert().exists() {
        bail!(
            "{} is already initialised (its CA exists); refusing to replace it",
            dir.path().display()
        );
    }
    let external = match database_url {
        Some(url) => {
            let backend = Backend::of(url, dir.path())?;
            if let Backend::Postgres(url) = &backend {
                crate::store::postgres::migrate(url).await?;
            }
            Some(url)
        }
        None => None,
    };
    fs::create_dir_all(dir.path()).with_context(|| format!("creating {}", dir.path().display()))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
    if !dir.config_file().exists() {
        let mut text = DEFAULT_CONFIG.to_owned();
        if !server_names.is_empty() {
            let list = server_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            text.push_str(&format!(
                "\n# Set by `init --server-name`.\nserver_names = [{list}]\n"
            ));
        }
        if let Some(url) = external {
            // The directory is 0700: a password in the URL is for this controller only.
            text.push_str(&format!(
                "\n# Set by `init --database-url`.\ndatabase_url = {url:?}\n"
            ));
        }
        write_atomic(&dir.config_file(), text.as_bytes(), 0o644)?;
    }
    let config = dir.load_config()?;
    let (ca, ca_key) = CertAuthority::generate("Surplus controller CA", now_ms)?;
    write_atomic(&dir.ca_key(), ca_key.as_bytes(), 0o600)?;
    write_atomic(&dir.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
    dir.server_identity(&ca, &config.server_names, now_ms)?;
    let store = dir.open_store(&config.database_url).await?;
    let (admin_token, hash) = new_api_token();
    store
        .create_api_token(
            &hash,
            &Principal {
                account: "admin".into(),
                role: Role::Admin,
            },
            "created by init",
            now_ms,
        )
        .await?;
    Ok(InitReport {
        admin_token,
        ca_fingerprint: ca.fingerprint(),
    })
}
