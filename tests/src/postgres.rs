//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, a free
//! port on loopback, one server per test binary, stopped and removed when the binary
//! exits. Each test takes a database of its own ([`fresh_database`]). A benchmark
//! that measures durability starts a [`Server`] of its own with PostgreSQL's durable
//! defaults ([`Server::start`]).
//!
//! The server binaries come from Debian's `postgresql` package (or any installation
//! with `initdb` and `postgres` on `PATH` or under `/usr/lib/postgresql/*/bin`); where
//! they are missing the test fails saying so, it does not skip. PostgreSQL refuses to
//! run as root, so under root the server runs as the package's `postgres` user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const INSTALL: &str = "install Debian's `postgresql` package (apt-get install postgresql)";

/// A running PostgreSQL server on loopback.
pub struct Server {
    port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// Finds a PostgreSQL server binary.
fn binary(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name));
    // Debian's versioned directory first: its `postgres` is the server, while PATH may
    // hold only client wrappers.
    debian
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("PostgreSQL's `{name}` was not found: {INSTALL}"))
}

/// The uid and gid the server runs as: ours, or `postgres` under root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .unwrap_or_else(|| {
            panic!(
                "tests run as root and there is no `postgres` user to run PostgreSQL as: {INSTALL}"
            )
        });
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// A command that runs as the server user and dies with the thread that started it.
fn command(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("LC_ALL", "C.UTF-8");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the uid change, which clears it: the server dies with the test
            // binary even when the binary is killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The server the tests of this binary share: throwaway data, so without fsync.
fn shared() -> &'static Server {
    SERVER.get_or_init(|| {
        let server = Server::start(&["fsync=off", "max_connections=300"]);
        extern "C" fn stop() {
            if let Some(server) = SERVER.get() {
                server.stop();
            }
        }
        // SAFETY: registering a plain function; it runs at exit.
        unsafe { libc::atexit(stop) };
        server
    })
}

impl Server {
    /// Fails naming the package to install when PostgreSQL's server binaries, or the
    /// user to run them as under root, are missing.
    pub fn check_installed() {
        binary("initdb");
        binary("postgres");
        server_user();
    }

    /// Starts a server in a new temporary directory with `settings` (`name=value`,
    /// each passed as `-c`); fails naming the package when PostgreSQL is missing.
    pub fn start(settings: &[&str]) -> Server {
        let initdb = binary("initdb");
        let postgres = binary("postgres");
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix("surplus-pg-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("chown the server directory");
        }
        let data = dir.join("data");
        let out = command(&initdb, user)
            .args([
                "--auth=trust",
                "--username=surplus",
                "--encoding=UTF8",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("server.log")).expect("server log");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.join("server.log"), Some(uid), Some(gid)).unwrap();
        }
        // Started from a thread that never ends, so that PR_SET_PDEATHSIG (which follows the
        // thread, not the process) fires only when the test binary exits.
        let (tx, rx) = std::sync::mpsc::channel();
        let sock = dir.clone();
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            let child = command(&postgres, user)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", sock.display()))
                .args(settings.iter().flat_map(|s| ["-c", s]))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn();
            tx.send(child).unwrap();
            loop {
                std::thread::park();
            }
        });
        let child = rx.recv().unwrap().expect("starting postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within 30 s: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server {
            port,
            dir,
            child: Mutex::new(Some(child)),
        }
    }

    /// The server's root process (the postmaster), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok()?.as_ref().map(|c| c.id())
    }

    /// Stops the server and removes its files.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The URL of a new, empty database on this server.
    pub async fn fresh_database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = format!("postgres://surplus@127.0.0.1:{}/postgres", self.port);
        // The port accepts connections a moment before the server takes sessions ("the
        // database system is starting up"): retry until it does.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await {
                Ok(conn) => break conn,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the test PostgreSQL server is not ready yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connecting to the test server: {e}"),
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("creating a test database");
        format!("postgres://surplus@127.0.0.1:{}/{name}", self.port)
    }
}

/// The URL of a new, empty database on this binary's shared server (started on first
/// use).
pub async fn fresh_database() -> String {
    shared().fresh_database().await
}
