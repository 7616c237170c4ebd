//! Security checks against host trees built with known weaknesses and known-good
//! settings: exact findings, nothing else, and malformed input is a finding.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use surplus_agent::security::{HostRoot, run};
use surplus_protocol::security::{CheckStatus, SecurityReport};

fn put(root: &Path, path: &str, text: &str, mode: u32) {
    let p = root.join(path.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn dir(root: &Path, path: &str, mode: u32) {
    let p = root.join(path.trim_start_matches('/'));
    fs::create_dir_all(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn sysctls(root: &Path, values: &[(&str, &str)]) {
    for (key, value) in values {
        put(
            root,
            &format!("/proc/sys/{}", key.replace('.', "/")),
            &format!("{value}\n"),
            0o644,
        );
    }
}

fn with_status(report: &SecurityReport, status: CheckStatus) -> BTreeSet<String> {
    report
        .findings
        .iter()
        .filter(|f| f.status == status)
        .map(|f| f.id.clone())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

const DATA_DIR: &str = "/var/lib/surplus-agent";

fn common(root: &Path) {
    for d in [
        "/usr/bin",
        "/usr/sbin",
        "/etc",
        "/var/lib/apt/lists",
        "/sys/kernel/security",
    ] {
        dir(root, d, 0o755);
    }
    put(
        root,
        "/var/lib/dpkg/status",
        "Package: a\nStatus: install ok installed\n",
        0o644,
    );
    put(root, "/usr/bin/passwd", "", 0o4755);
    dir(root, "/lib/modules/6.1.0-9-amd64", 0o755);
    dir(root, "/lib/modules/6.1.0-10-amd64", 0o755);
}

#[test]
fn a_weak_host_yields_exactly_its_weaknesses() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    common(root);
    put(
        root,
        "/etc/ssh/sshd_config",
        "# weak\nPermitRootLogin yes\nInclude /etc/ssh/sshd_config.d/*.conf\n",
        0o644,
    );
    put(
        root,
        "/etc/ssh/sshd_config.d/10-local.conf",
        "PasswordAuthentication yes\nPermitEmptyPasswords yes\nMaxAuthTries 10\nPermitRootLogin no\n",
        0o644,
    );
    sysctls(
        root,
        &[
            ("kernel.randomize_va_space", "0"),
            ("kernel.kptr_restrict", "0"),
            ("kernel.dmesg_restrict", "0"),
            ("kernel.unprivileged_bpf_disabled", "0"),
            ("kernel.yama.ptrace_scope", "0"),
            ("fs.protected_symlinks", "0"),
            ("fs.protected_hardlinks", "0"),
            ("fs.suid_dumpable", "2"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.all.accept_redirects", "1"),
            ("net.ipv4.tcp_syncookies", "0"),
            ("kernel.osrelease", "6.1.0-9-amd64"),
            ("kernel.core_pattern", "core"),
        ],
    );
    put(
        root,
        "/proc/net/tcp",
        "  sl  local_address rem_address   st\n   0: 00000000:0016 00000000:0000 0A 0\n",
        0o444,
    );
    put(
        root,
        "/proc/mounts",
        "/dev/vda1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n",
        0o444,
    );
    put(
        root,
        "/etc/passwd",
        "root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n",
        0o644,
    );
    put(
        root,
        "/etc/shadow",
        "root:$6$abc:19000::::::\ntoor::19000::::::\nalice:!:19000::::::\n",
        0o640,
    );
    put(root, "/usr/bin/evil", "", 0o777);
    put(root, "/usr/sbin/backdoor", "", 0o4755);
    dir(root, "/tmp", 0o777);
    put(root, "/run/docker.sock", "", 0o666);
    put(root, &format!("{DATA_DIR}/identity.json"), "{}", 0o644);

    let report = run(&HostRoot::new(root, Some(Path::new(DATA_DIR))));
    assert!(!report.live);
    let failed = with_status(&report, CheckStatus::Fail);
    let expected = set(&[
        "ssh.permit_root_login",
        "ssh.password_authentication",
        "ssh.permit_empty_passwords",
        "ssh.max_auth_tries",
        "kernel.aslr",
        "kernel.kptr_restrict",
        "kernel.dmesg_restrict",
        "kernel.unprivileged_bpf",
        "kernel.ptrace_scope",
        "fs.protected_symlinks",
        "fs.protected_hardlinks",
        "fs.suid_dumpable",
        "net.rp_filter",
        "net.accept_redirects",
        "net.syncookies",
        "kernel.core_dumps",
        "net.listening",
        "kernel.current",
        "time.sync",
        "accounts.extra_uid0",
        "accounts.duplicate_uids",
        "accounts.empty_passwords",
        "files.world_writable",
        "files.tmp_sticky",
        "files.unexpected_setuid",
        "mac.mode",
        "mounts.tmp",
        "mounts.dev_shm",
        "docker.socket",
        "agent.key_permissions",
        "packages.index_age",
    ]);
    assert_eq!(failed, expected, "\nreport: {report:#?}");
    // Checks of the live system say so instead of guessing.
    assert_eq!(
        with_status(&report, CheckStatus::NotApplicable),
        set(&["net.firewall", "packages.security_updates"])
    );
    let get = |id: &str| report.findings.iter().find(|f| f.id == id).unwrap();
    assert!(
        get("net.firewall")
            .evidence
            .contains("needs the live kernel")
    );
    assert!(
        get("ssh.permit_root_login")
            .evidence
            .contains("PermitRootLogin yes"),
        "the first occurrence wins, as in sshd"
    );
    assert!(get("accounts.extra_uid0").evidence.contains("toor"));
    assert!(
        get("accounts.duplicate_uids")
            .evidence
            .contains("alice, bob")
    );
    assert!(get("accounts.empty_passwords").evidence.contains("toor"));
    assert!(
        get("files.world_writable")
            .evidence
            .contains("/usr/bin/evil")
    );
    assert!(
        get("files.unexpected_setuid")
            .evidence
            .contains("/usr/sbin/backdoor")
    );
    assert!(!get("files.unexpected_setuid").evidence.contains("passwd"));
    assert!(get("net.listening").evidence.contains("tcp/0.0.0.0:22"));
    assert!(get("kernel.current").evidence.contains("6.1.0-10-amd64"));
    assert!(get("mounts.dev_shm").evidence.contains("noexec"));
    assert!(
        report
            .findings
            .iter()
            .all(|f| !f.remediation.is_empty() && !f.evidence.is_empty())
    );
    assert!(
        report.hardening_index < 10,
        "index {}",
        report.hardening_index
    );
    assert_eq!(report.band, "exposed");
}

#[test]
fn a_hardened_host_has_no_findings() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    common(root);
    put(
        root,
        "/etc/ssh/sshd_config",
        "PermitRootLogin no\nPasswordAuthentication no\nMaxAuthTries 3\nMatch User backup\n  PasswordAuthentication yes\n",
        0o644,
    );
    sysctls(
        root,
        &[
            ("kernel.randomize_va_space", "2"),
            ("kernel.kptr_restrict", "1"),
            ("kernel.dmesg_restrict", "1"),
            ("kernel.unprivileged_bpf_disabled", "2"),
            ("kernel.yama.ptrace_scope", "1"),
            ("fs.protected_symlinks", "1"),
            ("fs.protected_hardlinks", "1"),
            ("fs.suid_dumpable", "0"),
            ("net.ipv4.conf.all.rp_filter", "2"),
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.tcp_syncookies", "1"),
            ("kernel.osrelease", "6.1.0-10-amd64"),
        ],
    );
    put(
        root,
        "/proc/net/tcp",
        "  sl  local_address rem_address   st\n   0: 0100007F:0CEA 00000000:0000 0A 0\n",
        0o444,
    );
    put(
        root,
        "/proc/mounts",
        "/dev/vda1 / ext4 rw 0 0\ntmpfs /tmp tmpfs rw,nosuid,nodev 0 0\ntmpfs /dev/shm tmpfs rw,nosuid,nodev,noexec 0 0\n",
        0o444,
    );
    put(
        root,
        "/etc/security/limits.conf",
        "# no cores\n*   hard   core   0\n",
        0o644,
    );
    put(root, "/run/systemd/timesync/synchronized", "", 0o644);
    put(
        root,
        "/sys/kernel/security/apparmor/profiles",
        "/usr/sbin/ntpd (enforce)\n",
        0o444,
    );
    put(
        root,
        "/etc/passwd",
        "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        0o644,
    );
    put(
        root,
        "/etc/shadow",
        "root:$6$abc:19000::::::\nalice:!:19000::::::\n",
        0o640,
    );
    put(
        root,
        "/var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
        "x",
        0o644,
    );
    dir(root, "/tmp", 0o1777);
    put(root, &format!("{DATA_DIR}/identity.json"), "{}", 0o600);

    let report = run(&HostRoot::new(root, Some(Path::new(DATA_DIR))));
    assert_eq!(
        with_status(&report, CheckStatus::Fail),
        set(&[]),
        "\nreport: {report:#?}"
    );
    assert_eq!(
        with_status(&report, CheckStatus::NotApplicable),
        set(&["net.firewall", "packages.security_updates", "docker.socket"])
    );
    assert_eq!(
        (report.hardening_index, report.band.as_str()),
        (100, "hardened")
    );
}

#[test]
fn malformed_configuration_is_a_finding_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    put(
        root,
        "/etc/ssh/sshd_config",
        "PermitRootLogin no\nMaxAuthTries\n",
        0o644,
    );
    put(root, "/proc/sys/kernel/randomize_va_space", "two\n", 0o644);
    put(
        root,
        "/etc/passwd",
        "garbage line without fields\nroot:x:0:0::/root:/bin/sh\n:::\n",
        0o644,
    );
    put(
        root,
        "/proc/net/tcp",
        "header\nnot a socket line\n 0: ZZ:QQ 0 0A\n",
        0o444,
    );
    let report = run(&HostRoot::new(root, None));
    let get = |id: &str| report.findings.iter().find(|f| f.id == id).unwrap();
    assert_eq!(get("ssh.config").status, CheckStatus::Fail);
    assert!(
        get("ssh.config").evidence.contains("line 2"),
        "{}",
        get("ssh.config").evidence
    );
    assert_eq!(
        get("ssh.permit_root_login").status,
        CheckStatus::NotApplicable
    );
    assert_eq!(get("kernel.aslr").status, CheckStatus::Fail);
    assert!(get("kernel.aslr").evidence.contains("not a number"));
    assert_eq!(get("accounts.extra_uid0").status, CheckStatus::Pass);
    assert_eq!(get("net.listening").status, CheckStatus::Pass);
    assert_eq!(
        get("agent.key_permissions").status,
        CheckStatus::NotApplicable
    );
}

#[test]
fn the_live_host_can_be_checked() {
    let report = run(&HostRoot::new(Path::new("/"), None));
    assert!(report.findings.len() >= 30);
    // Ids are stable keys (the API, stored runs and comparisons between runs use
    // them): on a real host, too, each appears once.
    let ids: BTreeSet<&str> = report.findings.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids.len(), report.findings.len(), "a check id repeats");
}

/// The agent's own QUIC client endpoint is an unconnected UDP socket on all
/// interfaces; on the live host it is not an exposed service, while the same kind of
/// socket held by another process still is.
#[tokio::test]
async fn the_agents_own_sockets_are_not_exposed_listeners() {
    let own = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
    let own_port = own.local_addr().unwrap().port();
    // Another process holding an unconnected UDP socket on all interfaces: the
    // socket is handed to `sleep` as its standard input, then closed here.
    let theirs = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let their_port = theirs.local_addr().unwrap().port();
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )))
        .spawn()
        .unwrap();

    let report = tokio::task::spawn_blocking(|| run(&HostRoot::new(Path::new("/"), None)))
        .await
        .unwrap();
    let _ = other.kill();
    let _ = other.wait();
    let finding = report
        .findings
        .iter()
        .find(|f| f.id == "net.listening")
        .unwrap();
    assert!(
        !finding
            .evidence
            .contains(&format!("udp/0.0.0.0:{own_port}")),
        "the agent's own endpoint counted as exposed: {}",
        finding.evidence
    );
    assert!(
        finding.evidence.contains("of the agent itself not counted"),
        "{}",
        finding.evidence
    );
    assert!(
        finding
            .evidence
            .contains(&format!("udp/0.0.0.0:{their_port}")),
        "another process's socket must still count: {}",
        finding.evidence
    );
    assert_eq!(finding.status, CheckStatus::Fail);
    drop(own);
}
