//! Reading a process's CPU time, memory and descriptors from `/proc`, and the
//! controller process the load generator drives.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcReading {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size so far (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Reads `pid` now.
pub fn read(pid: u32) -> std::io::Result<ProcReading> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("unreadable /proc/<pid>/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Ok(ProcReading {
        cpu_ticks: tick(11) + tick(12),
        rss_bytes: kb("VmRSS:") * 1024,
        peak_rss_bytes: kb("VmHWM:") * 1024,
        fds,
        threads: kb("Threads:"),
    })
}

/// Reads a server of several processes, `root` and its children (PostgreSQL's
/// postmaster and its backends): CPU of the root, of its children now running and of
/// those it has reaped (`cutime`, `cstime`); memory as the sum of proportional set
/// sizes (`Pss`), so that shared buffers count once, not once per backend.
pub fn read_tree(root: u32) -> std::io::Result<ProcReading> {
    let fields = |pid: u32| -> std::io::Result<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| std::io::Error::other("unreadable /proc/<pid>/stat"))?;
        // From field 3 (state, read as 0) on: ppid at 1, utime..cstime at 11..=14.
        Ok(rest
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect())
    };
    let pss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Pss:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024
    };
    let f = fields(root)?;
    let mut r = ProcReading {
        cpu_ticks: f[11] + f[12] + f[13] + f[14],
        rss_bytes: pss(root),
        ..ProcReading::default()
    };
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(f) = fields(pid)
            && f.get(1) == Some(&u64::from(root))
        {
            r.cpu_ticks += f[11] + f[12];
            r.rss_bytes += pss(pid);
            r.threads += 1;
        }
    }
    r.peak_rss_bytes = r.rss_bytes;
    Ok(r)
}

/// One point of a process's resource curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcSample {
    /// Seconds since sampling started.
    pub at_s: f64,
    /// CPU used since the previous sample, in percent of one core.
    pub cpu_percent: f64,
    /// Resident set size, MiB.
    pub rss_mib: f64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// Samples one process at a fixed interval.
pub struct Sampler {
    pid: u32,
    read: fn(u32) -> std::io::Result<ProcReading>,
    ticks_per_s: f64,
    started: Instant,
    first: ProcReading,
    last: (Instant, ProcReading),
    /// Every sample so far.
    pub samples: Vec<ProcSample>,
}

impl Sampler {
    /// Starts sampling `pid`.
    pub fn new(pid: u32) -> std::io::Result<Self> {
        Self::with(pid, read)
    }

    /// Starts sampling the server whose root process is `pid` ([`read_tree`]).
    pub fn tree(pid: u32) -> std::io::Result<Self> {
        Self::with(pid, read_tree)
    }

    fn with(pid: u32, read: fn(u32) -> std::io::Result<ProcReading>) -> std::io::Result<Self> {
        let now = Instant::now();
        let first = read(pid)?;
        Ok(Self {
            pid,
            read,
            ticks_per_s: clock_ticks() as f64,
            started: now,
            first,
            last: (now, first),
            samples: Vec::new(),
        })
    }

    /// Takes one sample.
    pub fn sample(&mut self) -> std::io::Result<ProcSample> {
        let now = Instant::now();
        let r = (self.read)(self.pid)?;
        let secs = now.duration_since(self.last.0).as_secs_f64().max(1e-3);
        let used = r.cpu_ticks.saturating_sub(self.last.1.cpu_ticks) as f64 / self.ticks_per_s;
        let s = ProcSample {
            at_s: now.duration_since(self.started).as_secs_f64(),
            cpu_percent: used / secs * 100.0,
            rss_mib: r.rss_bytes as f64 / 1048576.0,
            fds: r.fds,
            threads: r.threads,
        };
        self.last = (now, r);
        self.samples.push(s);
        Ok(s)
    }

    /// CPU used since sampling started, in percent of one core.
    pub fn mean_cpu_percent(&self) -> f64 {
        let secs = self.last.0.duration_since(self.started).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        let used = self.last.1.cpu_ticks.saturating_sub(self.first.cpu_ticks) as f64;
        used / self.ticks_per_s / secs * 100.0
    }

    /// The last reading.
    pub fn last(&self) -> ProcReading {
        self.last.1
    }
}

/// A `surplus-controller` process on loopback, initialised in its own directory.
pub struct ControllerProcess {
    child: tokio::process::Child,
    /// Process id (for sampling).
    pub pid: u32,
    /// HTTP API base URL.
    pub url: String,
    /// The admin API token `init` printed.
    pub admin_token: String,
    /// The data directory (`controller.db` is in it).
    pub data_dir: PathBuf,
    /// Where the controller's log goes.
    pub log: PathBuf,
}

impl ControllerProcess {
    /// Runs `init` in `dir` then `serve` with `env` (`SURPLUS_CONTROLLER_*`), on fresh
    /// loopback ports, and waits until the API answers.
    /// With `database_url`, the controller's database is that PostgreSQL database
    /// (`init --database-url`), else the embedded SQLite file.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        env: &[(String, String)],
        database_url: Option<&str>,
    ) -> anyhow::Result<Self> {
        let data_dir = dir.join("controller");
        let out = tokio::process::Command::new(bin)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["init", "--server-name", "localhost"])
            .args(
                database_url
                    .map(|u| ["--database-url", u])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .await
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "surplus-controller init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let admin_token = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("admin API token (shown once, stored hashed): "))
            .context("surplus-controller init printed no admin token")?
            .to_owned();
        let port = |udp: bool| -> anyhow::Result<u16> {
            Ok(if udp {
                std::net::UdpSocket::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port()
            } else {
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port()
            })
        };
        let http = port(false)?;
        let mut all_env = vec![
            (
                "SURPLUS_CONTROLLER_SESSION_LISTEN".to_owned(),
                format!("127.0.0.1:{}", port(true)?),
            ),
            (
                "SURPLUS_CONTROLLER_ENROLL_LISTEN".to_owned(),
                format!("127.0.0.1:{}", port(true)?),
            ),
            (
                "SURPLUS_CONTROLLER_PEER_LISTEN".to_owned(),
                format!("127.0.0.1:{}", port(true)?),
            ),
            (
                "SURPLUS_CONTROLLER_HTTP_LISTEN".to_owned(),
                format!("127.0.0.1:{http}"),
            ),
        ];
        all_env.extend(env.iter().cloned());
        let log = dir.join("controller.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = tokio::process::Command::new(bin)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("serve")
            .envs(all_env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("controller exited at once")?;
        let url = format!("http://127.0.0.1:{http}");
        let mut ctl = Self {
            child,
            pid,
            url,
            admin_token,
            data_dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http_client = reqwest::Client::new();
        loop {
            if let Some(status) = ctl.child.try_wait()? {
                bail!(
                    "surplus-controller serve exited with {status}; see {}",
                    ctl.log.display()
                );
            }
            let ok = http_client
                .get(format!("{}/v1/health", ctl.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(ctl);
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller's API did not answer within 30 s; see {}",
                    ctl.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the controller with SIGTERM (it closes its sessions and exits), or kills
    /// it after 30 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) with a pid we spawned and still own.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the controller exited with {status} on SIGTERM");
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the controller did not stop within 30 s of SIGTERM")
            }
        }
    }
}
