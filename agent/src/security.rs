//! Security validation checks (A4): cheap, local, read-only.
//!
//! Every check reads through a root directory ([`HostRoot`]), `/` on a live host, so
//! tests build host trees with known weaknesses and assert exact findings. Checks of
//! the running kernel and processes read `<root>/proc` and `<root>/sys`; when the root
//! is not `/` and those are absent, the check says it needs the live kernel instead of
//! guessing. Parsers are pure functions over text. The only programs started are a
//! fixed few (`nft`, `iptables-save`, `apt-get -s`), on the live host only, never
//! through a shell.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use surplus_protocol::security::{CheckStatus, Finding, SecurityReport, Severity, hardening_index};

/// The host as seen through a root directory.
#[derive(Debug, Clone)]
pub struct HostRoot {
    root: PathBuf,
    live: bool,
    agent_data_dir: Option<PathBuf>,
}

impl HostRoot {
    /// The host under `root`; `agent_data_dir` (a path on that host) is where the
    /// agent's identity lives, for the key-permission check.
    pub fn new(root: &Path, agent_data_dir: Option<&Path>) -> Self {
        let live = root == Path::new("/");
        Self {
            root: root.to_path_buf(),
            live,
            agent_data_dir: agent_data_dir.map(Path::to_path_buf),
        }
    }

    /// `abs` (an absolute path on the host) under the root.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn read(&self, abs: &str) -> Option<String> {
        fs::read_to_string(self.path(abs)).ok()
    }

    fn needs_live(&self, what: &str) -> String {
        if self.live {
            format!("{what} not present on this host")
        } else {
            format!(
                "{what} not present under {}: this check needs the live kernel",
                self.root.display()
            )
        }
    }
}

struct Check {
    id: &'static str,
    title: &'static str,
    severity: Severity,
    remediation: &'static str,
}

impl Check {
    fn pass(&self, evidence: impl Into<String>) -> Finding {
        self.finding(CheckStatus::Pass, evidence)
    }
    fn fail(&self, evidence: impl Into<String>) -> Finding {
        self.finding(CheckStatus::Fail, evidence)
    }
    fn na(&self, evidence: impl Into<String>) -> Finding {
        self.finding(CheckStatus::NotApplicable, evidence)
    }
    fn verdict(&self, ok: bool, evidence: impl Into<String>) -> Finding {
        if ok {
            self.pass(evidence)
        } else {
            self.fail(evidence)
        }
    }
    fn finding(&self, status: CheckStatus, evidence: impl Into<String>) -> Finding {
        Finding {
            id: self.id.into(),
            title: self.title.into(),
            severity: self.severity,
            status,
            evidence: evidence.into(),
            remediation: self.remediation.into(),
        }
    }
}

/// Runs every check against `host`.
pub fn run(host: &HostRoot) -> SecurityReport {
    let mut findings = Vec::new();
    findings.extend(ssh_checks(host));
    findings.extend(sysctl_checks(host));
    findings.push(core_dumps(host));
    findings.push(listening_sockets(host));
    findings.push(firewall(host));
    findings.extend(package_checks(host));
    findings.push(kernel_current(host));
    findings.push(time_sync(host));
    findings.extend(account_checks(host));
    findings.push(world_writable(host));
    findings.push(tmp_sticky(host));
    findings.push(setuid_binaries(host));
    findings.push(mandatory_access_control(host));
    findings.extend(mount_options(host));
    findings.push(docker_socket(host));
    findings.push(agent_key(host));
    let (index, band) = hardening_index(&findings);
    SecurityReport {
        root: host.root.display().to_string(),
        live: host.live,
        findings,
        hardening_index: index,
        band: band.into(),
    }
}

// ---------------------------------------------------------------- sshd

/// Effective global sshd settings: keyword (lower case) → first value, as sshd reads
/// them (first occurrence wins; `Include` expanded in place; `Match` blocks end the
/// global section). Errors name the file and line.
pub fn sshd_settings(host: &HostRoot) -> Result<Option<BTreeMap<String, String>>, String> {
    let main = "/etc/ssh/sshd_config";
    let Some(text) = host.read(main) else {
        return if host.path(main).exists() {
            Err(format!("{main} is unreadable"))
        } else {
            Ok(None)
        };
    };
    let mut settings = BTreeMap::new();
    read_sshd(host, main, &text, &mut settings, 0)?;
    Ok(Some(settings))
}

fn read_sshd(
    host: &HostRoot,
    file: &str,
    text: &str,
    out: &mut BTreeMap<String, String>,
    depth: u32,
) -> Result<bool, String> {
    if depth > 8 {
        return Err(format!("{file}: Include nested too deeply"));
    }
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, v)) => (
                k.trim().to_lowercase(),
                v.trim().trim_start_matches('=').trim().to_owned(),
            ),
            None => {
                return Err(format!(
                    "{file} line {}: keyword {line:?} has no value",
                    n + 1
                ));
            }
        };
        if value.is_empty() {
            return Err(format!(
                "{file} line {}: keyword {key:?} has no value",
                n + 1
            ));
        }
        match key.as_str() {
            "match" => return Ok(false),
            "include" => {
                for pattern in value.split_whitespace() {
                    let abs = if pattern.starts_with('/') {
                        pattern.to_owned()
                    } else {
                        format!("/etc/ssh/{pattern}")
                    };
                    for inc in expand_glob(host, &abs) {
                        let text = host
                            .read(&inc)
                            .ok_or_else(|| format!("{inc} (included from {file}) is unreadable"))?;
                        if !read_sshd(host, &inc, &text, out, depth + 1)? {
                            return Ok(false);
                        }
                    }
                }
            }
            _ => {
                out.entry(key).or_insert(value);
            }
        }
    }
    Ok(true)
}

/// Expands a trailing `*` pattern in the last path component (`/etc/ssh/sshd_config.d/*.conf`).
fn expand_glob(host: &HostRoot, abs: &str) -> Vec<String> {
    let Some((dir, name)) = abs.rsplit_once('/') else {
        return vec![];
    };
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![abs.to_owned()];
    };
    let mut found: Vec<String> = fs::read_dir(host.path(dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix) && n.ends_with(suffix))
                .map(|n| format!("{dir}/{n}"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn ssh_checks(host: &HostRoot) -> Vec<Finding> {
    let parse = Check {
        id: "ssh.config",
        title: "sshd configuration is readable and well-formed",
        severity: Severity::Medium,
        remediation: "fix the reported line; `sshd -t` validates the configuration",
    };
    let root_login = Check {
        id: "ssh.permit_root_login",
        title: "sshd refuses password logins as root",
        severity: Severity::High,
        remediation: "set `PermitRootLogin no` (or `prohibit-password`) in /etc/ssh/sshd_config",
    };
    let password = Check {
        id: "ssh.password_authentication",
        title: "sshd does not accept passwords",
        severity: Severity::Medium,
        remediation: "set `PasswordAuthentication no` and use keys",
    };
    let empty = Check {
        id: "ssh.permit_empty_passwords",
        title: "sshd refuses empty passwords",
        severity: Severity::Critical,
        remediation: "set `PermitEmptyPasswords no`",
    };
    let tries = Check {
        id: "ssh.max_auth_tries",
        title: "sshd allows at most 4 authentication attempts",
        severity: Severity::Low,
        remediation: "set `MaxAuthTries 4` or lower",
    };
    let settings = match sshd_settings(host) {
        Ok(Some(s)) => s,
        Ok(None) => {
            let why = "no /etc/ssh/sshd_config: sshd is not installed";
            return [parse, root_login, password, empty, tries]
                .iter()
                .map(|c| c.na(why))
                .collect();
        }
        Err(e) => {
            let why = format!("effective settings unknown: {e}");
            let mut out = vec![parse.fail(e)];
            out.extend(
                [root_login, password, empty, tries]
                    .iter()
                    .map(|c| c.na(why.clone())),
            );
            return out;
        }
    };
    let get = |k: &str, default: &str| {
        settings
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("{default} (default)"))
    };
    let value = |k: &str, default: &str| {
        settings
            .get(k)
            .map(|v| v.to_lowercase())
            .unwrap_or_else(|| default.to_owned())
    };
    let rl = value("permitrootlogin", "prohibit-password");
    let pa = value("passwordauthentication", "yes");
    let pe = value("permitemptypasswords", "no");
    let mt = value("maxauthtries", "6");
    let mut out = vec![parse.pass("parsed /etc/ssh/sshd_config and its includes")];
    out.push(root_login.verdict(
        rl != "yes",
        format!(
            "PermitRootLogin {}",
            get("permitrootlogin", "prohibit-password")
        ),
    ));
    out.push(password.verdict(
        pa == "no",
        format!(
            "PasswordAuthentication {}",
            get("passwordauthentication", "yes")
        ),
    ));
    out.push(empty.verdict(
        pe != "yes",
        format!("PermitEmptyPasswords {}", get("permitemptypasswords", "no")),
    ));
    out.push(match mt.parse::<u32>() {
        Ok(n) => tries.verdict(n <= 4, format!("MaxAuthTries {}", get("maxauthtries", "6"))),
        Err(_) => tries.fail(format!("MaxAuthTries {mt:?} is not a number")),
    });
    out
}

// ---------------------------------------------------------------- kernel settings

fn sysctl(host: &HostRoot, key: &str) -> Option<String> {
    host.read(&format!("/proc/sys/{}", key.replace('.', "/")))
        .map(|s| s.trim().to_owned())
}

fn sysctl_checks(host: &HostRoot) -> Vec<Finding> {
    type Rule = (
        &'static str,
        &'static str,
        &'static str,
        Severity,
        fn(i64) -> bool,
        &'static str,
    );
    const RULES: &[Rule] = &[
        (
            "kernel.aslr",
            "kernel.randomize_va_space",
            "address-space layout randomisation is full",
            Severity::High,
            |v| v == 2,
            "sysctl -w kernel.randomize_va_space=2 (and persist it in /etc/sysctl.d)",
        ),
        (
            "kernel.kptr_restrict",
            "kernel.kptr_restrict",
            "kernel pointers are hidden",
            Severity::Medium,
            |v| v >= 1,
            "sysctl -w kernel.kptr_restrict=1",
        ),
        (
            "kernel.dmesg_restrict",
            "kernel.dmesg_restrict",
            "kernel log is restricted to privileged users",
            Severity::Low,
            |v| v == 1,
            "sysctl -w kernel.dmesg_restrict=1",
        ),
        (
            "kernel.unprivileged_bpf",
            "kernel.unprivileged_bpf_disabled",
            "unprivileged BPF is disabled",
            Severity::Medium,
            |v| v >= 1,
            "sysctl -w kernel.unprivileged_bpf_disabled=1",
        ),
        (
            "kernel.ptrace_scope",
            "kernel.yama.ptrace_scope",
            "ptrace is restricted to descendants",
            Severity::Medium,
            |v| v >= 1,
            "sysctl -w kernel.yama.ptrace_scope=1",
        ),
        (
            "fs.protected_symlinks",
            "fs.protected_symlinks",
            "symlinks in sticky directories are protected",
            Severity::Medium,
            |v| v == 1,
            "sysctl -w fs.protected_symlinks=1",
        ),
        (
            "fs.protected_hardlinks",
            "fs.protected_hardlinks",
            "hard links to others' files are protected",
            Severity::Medium,
            |v| v == 1,
            "sysctl -w fs.protected_hardlinks=1",
        ),
        (
            "fs.suid_dumpable",
            "fs.suid_dumpable",
            "set-uid programs do not dump core",
            Severity::Medium,
            |v| v == 0,
            "sysctl -w fs.suid_dumpable=0",
        ),
        (
            "net.rp_filter",
            "net.ipv4.conf.all.rp_filter",
            "reverse-path filtering is on",
            Severity::Low,
            |v| v == 1 || v == 2,
            "sysctl -w net.ipv4.conf.all.rp_filter=1",
        ),
        (
            "net.accept_redirects",
            "net.ipv4.conf.all.accept_redirects",
            "ICMP redirects are ignored",
            Severity::Medium,
            |v| v == 0,
            "sysctl -w net.ipv4.conf.all.accept_redirects=0",
        ),
        (
            "net.syncookies",
            "net.ipv4.tcp_syncookies",
            "TCP SYN cookies are on",
            Severity::Low,
            |v| v == 1,
            "sysctl -w net.ipv4.tcp_syncookies=1",
        ),
    ];
    RULES
        .iter()
        .map(|(id, key, title, severity, ok, remediation)| {
            let c = Check {
                id,
                title,
                severity: *severity,
                remediation,
            };
            match sysctl(host, key) {
                None => c.na(host.needs_live(key)),
                Some(v) => match v.parse::<i64>() {
                    Ok(n) => c.verdict(ok(n), format!("{key} = {n}")),
                    Err(_) => c.fail(format!("{key} = {v:?} is not a number")),
                },
            }
        })
        .collect()
}

fn core_dumps(host: &HostRoot) -> Finding {
    let c = Check {
        id: "kernel.core_dumps",
        title: "core dumps are disabled or captured by a handler",
        severity: Severity::Low,
        remediation: "add `* hard core 0` to /etc/security/limits.conf, or set Storage=none in /etc/systemd/coredump.conf",
    };
    let mut limits = host.read("/etc/security/limits.conf").unwrap_or_default();
    for f in expand_glob(host, "/etc/security/limits.d/*.conf") {
        limits.push_str(&host.read(&f).unwrap_or_default());
    }
    let hard_zero = limits.lines().any(|l| {
        let w: Vec<&str> = l
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        matches!(w[..], ["*", "hard", "core", "0"])
    });
    let storage_none = host.read("/etc/systemd/coredump.conf").is_some_and(|t| {
        t.lines()
            .any(|l| l.trim().eq_ignore_ascii_case("storage=none"))
    });
    let pattern = sysctl(host, "kernel.core_pattern");
    let evidence = format!(
        "limits hard core 0: {hard_zero}; coredump Storage=none: {storage_none}; core_pattern: {}",
        pattern.as_deref().unwrap_or("unknown")
    );
    c.verdict(hard_zero || storage_none, evidence)
}

// ---------------------------------------------------------------- network

/// A listening socket from `/proc/net/{tcp,udp}{,6}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    /// `tcp`, `udp`, `tcp6`, `udp6`.
    pub proto: &'static str,
    /// Local address.
    pub addr: std::net::IpAddr,
    /// Local port.
    pub port: u16,
    /// The socket's inode (which process holds it: `/proc/<pid>/fd` links to
    /// `socket:[inode]`), when the line has it.
    pub inode: Option<u64>,
}

/// The inode of a `/proc/<pid>/fd/<n>` link target such as `socket:[12345]`.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the sockets this process holds (the agent's own QUIC endpoint is an
/// unconnected UDP socket on all interfaces: a client, not an exposed service).
fn own_socket_inodes() -> BTreeSet<u64> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| socket_inode(&target.to_string_lossy()))
        .collect()
}

/// Parses one `/proc/net/*` table; keeps TCP sockets in LISTEN and bound UDP sockets.
pub fn parse_proc_net(proto: &'static str, text: &str) -> Vec<Listener> {
    let listen_state = if proto.starts_with("tcp") { "0A" } else { "07" };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != listen_state {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let bytes: Vec<u8> = (0..addr.len() / 2)
                .map(|i| u8::from_str_radix(&addr[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()
                .ok()?;
            // The kernel prints each 32-bit word in host (little-endian) order.
            let words: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied().collect::<Vec<_>>())
                .collect();
            let addr = match words.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(&words[..]).ok()?),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(&words[..]).ok()?),
                _ => return None,
            };
            let inode = f.get(9).and_then(|i| i.parse().ok());
            Some(Listener {
                proto,
                addr,
                port,
                inode,
            })
        })
        .collect()
}

fn is_loopback(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn listening_sockets(host: &HostRoot) -> Finding {
    let c = Check {
        id: "net.listening",
        title: "no service listens on a non-loopback address",
        severity: Severity::Low,
        remediation: "stop services that need not be reachable, or bind them to 127.0.0.1",
    };
    let mut seen = false;
    let mut exposed = BTreeSet::new();
    // On the live host, the sockets of this very process (the agent's) are not
    // services; under `--root` the tree's tables belong to no process here.
    let own = if host.live {
        own_socket_inodes()
    } else {
        BTreeSet::new()
    };
    let mut skipped = 0;
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        if let Some(text) = host.read(&format!("/proc/net/{proto}")) {
            seen = true;
            for l in parse_proc_net(proto, &text) {
                if is_loopback(&l.addr) {
                    continue;
                }
                if l.inode.is_some_and(|i| own.contains(&i)) {
                    skipped += 1;
                } else {
                    exposed.insert(format!("{}/{}:{}", l.proto, l.addr, l.port));
                }
            }
        }
    }
    if !seen {
        return c.na(host.needs_live("/proc/net"));
    }
    let list: Vec<String> = exposed.into_iter().collect();
    let mut evidence = if list.is_empty() {
        "only loopback listeners".to_owned()
    } else {
        format!("{} exposed: {}", list.len(), list.join(", "))
    };
    if skipped > 0 {
        evidence.push_str(&format!(
            " ({skipped} socket(s) of the agent itself not counted)"
        ));
    }
    c.verdict(list.is_empty(), evidence)
}

/// Counts packet-filter rules in `nft list ruleset` output.
pub fn nft_rule_count(ruleset: &str) -> usize {
    ruleset
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && *l != "}")
        .filter(|l| {
            ![
                "table ",
                "chain ",
                "type ",
                "policy ",
                "set ",
                "map ",
                "elements ",
                "flags ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .count()
}

fn firewall(host: &HostRoot) -> Finding {
    let c = Check {
        id: "net.firewall",
        title: "a packet filter is active",
        severity: Severity::Medium,
        remediation: "load a default-deny ruleset with nftables (or iptables) and persist it",
    };
    if !host.live {
        return c.na(host.needs_live("the packet filter"));
    }
    let run = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    if let Some(out) = run("nft", &["list", "ruleset"]) {
        let n = nft_rule_count(&String::from_utf8_lossy(&out.stdout));
        return c.verdict(n > 0, format!("nftables: {n} rules"));
    }
    if let Some(out) = run("iptables-save", &[]) {
        let n = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        return c.verdict(n > 0, format!("iptables: {n} rules"));
    }
    c.fail("neither nft nor iptables-save answered: no packet filter could be seen")
}

// ---------------------------------------------------------------- packages and kernel

fn package_checks(host: &HostRoot) -> Vec<Finding> {
    let age = Check {
        id: "packages.index_age",
        title: "the package index was refreshed within 7 days",
        severity: Severity::Low,
        remediation: "run `apt-get update` regularly (unattended-upgrades does)",
    };
    let pending = Check {
        id: "packages.security_updates",
        title: "no security updates are pending",
        severity: Severity::High,
        remediation: "apply them: `apt-get upgrade` (and reboot if the kernel changed)",
    };
    if !host.path("/var/lib/dpkg/status").exists() {
        let why = "no dpkg database: package checks cover Debian-family hosts";
        return vec![age.na(why), pending.na(why)];
    }
    let newest = fs::read_dir(host.path("/var/lib/apt/lists"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
                .max()
        })
        .ok()
        .flatten();
    let age_finding = match newest.and_then(|t| t.elapsed().ok()) {
        Some(d) => {
            let days = d.as_secs() / 86_400;
            age.verdict(days <= 7, format!("newest index file is {days} days old"))
        }
        None => age.fail("no package index under /var/lib/apt/lists: `apt-get update` never ran"),
    };
    let pending_finding = if !host.live {
        pending.na(host.needs_live("the package manager"))
    } else {
        match Command::new("apt-get")
            .args(["-s", "-o", "Debug::NoLocking=true", "upgrade"])
            .env("LC_ALL", "C")
            .output()
        {
            Ok(o) if o.status.success() => {
                let (all, security) =
                    crate::inventory::apt_pending(&String::from_utf8_lossy(&o.stdout));
                pending.verdict(
                    security == 0,
                    format!("{security} security updates pending ({all} updates in all)"),
                )
            }
            _ => pending.na("apt-get -s upgrade did not run"),
        }
    };
    vec![age_finding, pending_finding]
}

/// Orders kernel release strings numerically (`6.1.0-10` < `6.1.0-9` is wrong; this
/// gets it right).
pub fn kernel_version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kernel_current(host: &HostRoot) -> Finding {
    let c = Check {
        id: "kernel.current",
        title: "the newest installed kernel is running",
        severity: Severity::Medium,
        remediation: "reboot into the newest installed kernel",
    };
    let Some(running) = sysctl(host, "kernel.osrelease") else {
        return c.na(host.needs_live("the running kernel release"));
    };
    let installed: Vec<String> = fs::read_dir(host.path("/lib/modules"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let Some(newest) = installed.iter().max_by_key(|r| kernel_version_key(r)) else {
        return c.na(format!(
            "running {running}; no kernels found under /lib/modules (container or custom kernel)"
        ));
    };
    c.verdict(
        kernel_version_key(newest) <= kernel_version_key(&running),
        format!("running {running}, newest installed {newest}"),
    )
}

fn time_sync(host: &HostRoot) -> Finding {
    let c = Check {
        id: "time.sync",
        title: "the clock is synchronised",
        severity: Severity::Medium,
        remediation: "run chrony or systemd-timesyncd",
    };
    if host.path("/run/systemd/timesync/synchronized").exists() {
        return c.pass("systemd-timesyncd reports synchronised");
    }
    let daemons = ["chronyd", "ntpd", "systemd-timesyn", "ntpsec", "openntpd"];
    let proc_dir = host.path("/proc");
    let Ok(entries) = fs::read_dir(&proc_dir) else {
        return c.na(host.needs_live("/proc"));
    };
    let running: BTreeSet<String> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim().to_owned();
            daemons.contains(&comm.as_str()).then_some(comm)
        })
        .collect();
    if running.is_empty() {
        c.fail("no time synchronisation daemon is running")
    } else {
        c.pass(format!(
            "running: {}",
            running.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

// ---------------------------------------------------------------- accounts

/// `(name, uid)` of every entry of a passwd file.
pub fn passwd_entries(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
        })
        .collect()
}

fn account_checks(host: &HostRoot) -> Vec<Finding> {
    let root_only = Check {
        id: "accounts.extra_uid0",
        title: "root is the only account with uid 0",
        severity: Severity::Critical,
        remediation: "remove or renumber the other uid-0 accounts",
    };
    let duplicate = Check {
        id: "accounts.duplicate_uids",
        title: "no two accounts share a uid",
        severity: Severity::Medium,
        remediation: "give every account its own uid",
    };
    let empty = Check {
        id: "accounts.empty_passwords",
        title: "no account has an empty password",
        severity: Severity::Critical,
        remediation: "lock them: `passwd -l NAME`",
    };
    let mut out = Vec::new();
    match host.read("/etc/passwd") {
        None => {
            out.push(root_only.na("no /etc/passwd"));
            out.push(duplicate.na("no /etc/passwd"));
        }
        Some(text) => {
            let entries = passwd_entries(&text);
            let extra: Vec<&str> = entries
                .iter()
                .filter(|(n, u)| *u == 0 && n != "root")
                .map(|(n, _)| n.as_str())
                .collect();
            out.push(root_only.verdict(
                extra.is_empty(),
                if extra.is_empty() {
                    "only root has uid 0".into()
                } else {
                    format!("uid 0: {}", extra.join(", "))
                },
            ));
            let mut by_uid: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
            for (n, u) in &entries {
                by_uid.entry(*u).or_default().push(n);
            }
            let shared: Vec<String> = by_uid
                .iter()
                .filter(|(_, n)| n.len() > 1)
                .map(|(u, n)| format!("{u}: {}", n.join(", ")))
                .collect();
            out.push(duplicate.verdict(
                shared.is_empty(),
                if shared.is_empty() {
                    format!("{} accounts, all uids distinct", entries.len())
                } else {
                    shared.join("; ")
                },
            ));
        }
    }
    out.push(match host.read("/etc/shadow") {
        None => empty.na(if host.path("/etc/shadow").exists() {
            "/etc/shadow is unreadable (run the agent as root)"
        } else {
            "no /etc/shadow"
        }),
        Some(text) => {
            let names: Vec<&str> = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    (f.next()?.is_empty() && !name.is_empty()).then_some(name)
                })
                .collect();
            empty.verdict(
                names.is_empty(),
                if names.is_empty() {
                    "every account has a password or is locked".into()
                } else {
                    format!("empty password: {}", names.join(", "))
                },
            )
        }
    });
    out
}

// ---------------------------------------------------------------- files

const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/lib",
    "/etc",
];
const BIN_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/lib",
    "/usr/libexec",
];
const WALK_LIMIT: usize = 200_000;

/// Walks the files below `dirs` (not following symlinks, not leaving the file
/// system of each start), calling `visit` with the host path and metadata.
fn walk(host: &HostRoot, dirs: &[&str], mut visit: impl FnMut(&str, &fs::Metadata)) -> bool {
    let mut seen_dirs = BTreeSet::new();
    let mut budget = WALK_LIMIT;
    for start in dirs {
        let base = host.path(start);
        let Ok(meta) = fs::symlink_metadata(&base) else {
            continue;
        };
        if meta.file_type().is_symlink() || !seen_dirs.insert((meta.dev(), meta.ino())) {
            continue; // /bin -> usr/bin on merged-/usr systems
        }
        let dev = meta.dev();
        let mut stack = vec![(base, start.to_string())];
        while let Some((dir, shown)) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if budget == 0 {
                    return false;
                }
                budget -= 1;
                let Ok(m) = e.path().symlink_metadata() else {
                    continue;
                };
                let name = format!("{shown}/{}", e.file_name().to_string_lossy());
                visit(&name, &m);
                if m.is_dir() && m.dev() == dev {
                    stack.push((e.path(), name));
                }
            }
        }
    }
    true
}

fn world_writable(host: &HostRoot) -> Finding {
    let c = Check {
        id: "files.world_writable",
        title: "nothing in system paths is world-writable",
        severity: Severity::High,
        remediation: "chmod o-w the listed paths",
    };
    let mut found = Vec::new();
    let complete = walk(host, SYSTEM_DIRS, |name, m| {
        let mode = m.permissions().mode();
        let sticky_dir = m.is_dir() && mode & 0o1000 != 0;
        if !m.file_type().is_symlink() && mode & 0o002 != 0 && !sticky_dir {
            found.push(name.to_owned());
        }
    });
    let mut evidence = if found.is_empty() {
        "none found".to_owned()
    } else {
        format!(
            "{}: {}",
            found.len(),
            found
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if !complete {
        evidence.push_str(&format!(" (stopped after {WALK_LIMIT} entries)"));
    }
    c.verdict(found.is_empty(), evidence)
}

fn tmp_sticky(host: &HostRoot) -> Finding {
    let c = Check {
        id: "files.tmp_sticky",
        title: "/tmp has the sticky bit",
        severity: Severity::High,
        remediation: "chmod 1777 /tmp",
    };
    match fs::metadata(host.path("/tmp")) {
        Err(_) => c.na("no /tmp"),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            c.verdict(
                mode & 0o002 == 0 || mode & 0o1000 != 0,
                format!("/tmp mode {mode:04o}"),
            )
        }
    }
}

/// Set-uid programs that a stock distribution ships.
const EXPECTED_SETUID: &[&str] = &[
    "chfn",
    "chsh",
    "gpasswd",
    "mount",
    "newgrp",
    "passwd",
    "su",
    "sudo",
    "umount",
    "ping",
    "pkexec",
    "fusermount",
    "fusermount3",
    "ssh-keysign",
    "dbus-daemon-launch-helper",
    "polkit-agent-helper-1",
    "unix_chkpwd",
    "chage",
    "expiry",
    "crontab",
    "at",
    "newuidmap",
    "newgidmap",
    "Xorg.wrap",
    "sg",
    "pppd",
    "mount.nfs",
    "mount.cifs",
    "staprun",
    "traceroute6.iputils",
];

fn setuid_binaries(host: &HostRoot) -> Finding {
    let c = Check {
        id: "files.unexpected_setuid",
        title: "no unexpected set-uid programs",
        severity: Severity::High,
        remediation: "remove the set-uid bit (chmod u-s) from programs that do not need it",
    };
    let mut unexpected = Vec::new();
    let mut expected = 0;
    walk(host, BIN_DIRS, |name, m| {
        if m.is_file() && m.permissions().mode() & 0o4000 != 0 {
            let base = name.rsplit('/').next().unwrap_or(name);
            if EXPECTED_SETUID.contains(&base) {
                expected += 1;
            } else {
                unexpected.push(name.to_owned());
            }
        }
    });
    c.verdict(
        unexpected.is_empty(),
        if unexpected.is_empty() {
            format!("{expected} set-uid programs, all expected")
        } else {
            format!("unexpected: {}", unexpected.join(", "))
        },
    )
}

fn mandatory_access_control(host: &HostRoot) -> Finding {
    let c = Check {
        id: "mac.mode",
        title: "mandatory access control is enforcing",
        severity: Severity::Low,
        remediation: "enable AppArmor or SELinux in enforcing mode",
    };
    if let Some(v) = host.read("/sys/fs/selinux/enforce") {
        return c.verdict(
            v.trim() == "1",
            format!(
                "SELinux {}",
                if v.trim() == "1" {
                    "enforcing"
                } else {
                    "permissive"
                }
            ),
        );
    }
    if let Some(p) = host.read("/sys/kernel/security/apparmor/profiles") {
        let enforce = p.lines().filter(|l| l.ends_with("(enforce)")).count();
        return c.verdict(
            enforce > 0,
            format!("AppArmor: {enforce} profiles enforcing"),
        );
    }
    if !host.path("/sys/kernel/security").exists() && !host.live {
        return c.na(host.needs_live("/sys/kernel/security"));
    }
    c.fail("neither SELinux nor AppArmor is active")
}

/// `mount point → options` from a `/proc/mounts` text (the last mount wins).
pub fn mount_table(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.get(1)?.to_string(),
                f.get(3)?.split(',').map(str::to_owned).collect(),
            ))
        })
        .collect()
}

fn mount_options(host: &HostRoot) -> Vec<Finding> {
    let tmp = Check {
        id: "mounts.tmp",
        title: "/tmp is a separate mount with nodev,nosuid",
        severity: Severity::Low,
        remediation: "mount /tmp as tmpfs with nodev,nosuid (noexec where possible)",
    };
    let shm = Check {
        id: "mounts.dev_shm",
        title: "/dev/shm is mounted nodev,nosuid,noexec",
        severity: Severity::Medium,
        remediation: "add nodev,nosuid,noexec to /dev/shm in /etc/fstab and remount",
    };
    let Some(text) = host.read("/proc/mounts") else {
        let why = host.needs_live("/proc/mounts");
        return vec![tmp.na(why.clone()), shm.na(why)];
    };
    let table = mount_table(&text);
    let judge = |c: &Check, point: &str, need: &[&str]| match table.get(point) {
        None => c.fail(format!("{point} is not a separate mount")),
        Some(opts) => {
            let missing: Vec<&str> = need
                .iter()
                .copied()
                .filter(|o| !opts.iter().any(|x| x == o))
                .collect();
            c.verdict(
                missing.is_empty(),
                if missing.is_empty() {
                    format!("{point}: {}", opts.join(","))
                } else {
                    format!("{point} lacks {}", missing.join(","))
                },
            )
        }
    };
    vec![
        judge(&tmp, "/tmp", &["nodev", "nosuid"]),
        judge(&shm, "/dev/shm", &["nodev", "nosuid", "noexec"]),
    ]
}

fn docker_socket(host: &HostRoot) -> Finding {
    let c = Check {
        id: "docker.socket",
        title: "the Docker socket is not writable by everyone",
        severity: Severity::Critical,
        remediation: "chmod 660 the socket and keep the docker group to administrators",
    };
    for path in ["/run/docker.sock", "/var/run/docker.sock"] {
        if let Ok(m) = fs::metadata(host.path(path)) {
            let mode = m.permissions().mode() & 0o777;
            return c.verdict(mode & 0o006 == 0, format!("{path} mode {mode:03o}"));
        }
    }
    c.na("no Docker socket")
}

fn agent_key(host: &HostRoot) -> Finding {
    let c = Check {
        id: "agent.key_permissions",
        title: "the agent's private key is readable by its owner only",
        severity: Severity::High,
        remediation: "chmod 600 the identity file and 700 its directory",
    };
    let Some(dir) = &host.agent_data_dir else {
        return c.na("no agent data directory given");
    };
    let file = dir.join(crate::identity::IDENTITY_FILE);
    match fs::metadata(host.path(&file.to_string_lossy())) {
        Err(_) => c.na(format!("{} does not exist (not enrolled)", file.display())),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            c.verdict(
                mode & 0o077 == 0,
                format!("{} mode {mode:03o}", file.display()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines_decode_addresses_and_states() {
        let tcp = "  sl  local_address rem_address   st\n   0: 0100007F:0CEA 00000000:0000 0A 0\n   1: 00000000:0016 00000000:0000 0A 0\n   2: 0100007F:8000 0100007F:0CEA 01 0\n";
        let l = parse_proc_net("tcp", tcp);
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].addr.to_string(), l[0].port),
            ("127.0.0.1".to_string(), 3306)
        );
        assert_eq!(
            (l[1].addr.to_string(), l[1].port),
            ("0.0.0.0".to_string(), 22)
        );
        let tcp6 = "sl\n 0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A\n";
        let l = parse_proc_net("tcp6", tcp6);
        assert_eq!(l[0].addr.to_string(), "::1");
        assert!(is_loopback(&l[0].addr));
    }

    #[test]
    fn proc_net_lines_carry_their_inode_and_fd_links_name_it() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  711: 00000000:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 48213 2 0000000000000000 0\n";
        let l = parse_proc_net("udp", udp);
        assert_eq!((l[0].port, l[0].inode), (0xA1B2, Some(48213)));
        assert_eq!(socket_inode("socket:[48213]"), Some(48213));
        assert_eq!(socket_inode("pipe:[48213]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn kernel_releases_sort_numerically() {
        assert!(kernel_version_key("6.1.0-10-amd64") > kernel_version_key("6.1.0-9-amd64"));
        assert!(kernel_version_key("6.10.1") > kernel_version_key("6.9.12"));
    }

    #[test]
    fn nft_rules_are_counted_without_structure_lines() {
        let ruleset = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established,related accept\n\t\ttcp dport 22 accept\n\t}\n}\n";
        assert_eq!(nft_rule_count(ruleset), 2);
        assert_eq!(nft_rule_count(""), 0);
    }
}
