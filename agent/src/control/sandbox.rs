//! The process driver's sandbox: what a client's instance sees of the host and what it
//! may do there.
//!
//! A provider lets strangers run programs on its machine, so an instance must not be
//! able to read the agent's key, rewrite its spool, touch other instances, leave its
//! cgroup or become root. Every instance therefore starts as a chain of three
//! processes, all in the instance's cgroup:
//!
//! 1. the **supervisor**, the agent's direct child: it joins the cgroup (before anything
//!    else runs, so no fork escapes), starts a session of its own, unshares the mount,
//!    PID, IPC and UTS namespaces and forks; then it only waits and passes the exit
//!    status on, so the agent learns how the instance ended;
//! 2. the **init**, PID 1 of the new PID namespace: it builds the instance's file
//!    system view (a fresh root: the host's system directories read-only, a private
//!    `/tmp`, a minimal `/dev`, its own `/proc`, the attached volumes at their mount
//!    paths, nothing of the agent's data), pivots into it and forks the workload; then
//!    it reaps orphans and ends when the workload ends, which ends every process left in
//!    the namespace;
//! 3. the **workload**: it drops every capability (bounding, ambient and inheritable
//!    sets), switches to the instance's own unprivileged user (a uid and gid from the
//!    configured range, like systemd's `DynamicUser`, never 0), sets `no_new_privs` so
//!    no set-uid binary raises it again, and is then replaced by the client's program.
//!
//! All of this happens between `fork` and `exec` of the agent's child (`pre_exec`),
//! where only async-signal-safe system calls on memory prepared before the fork are
//! allowed: [`Prepared`] holds every path, string and number as plain bytes, and the
//! code in [`enter`] allocates nothing on its way to `exec`. A step that fails writes
//! its number and `errno` into a report pipe and fails the start; the agent names the
//! step in the error ([`Report::explain`]). There is no fallback to a weaker sandbox.
//!
//! The plan of the file system view is pure data ([`plan`]) and tested on its own.
//!
//! With `allow_host_user = true` (off by default, and reported as `host_user` in the
//! host's isolation report) the workload keeps the agent's user and capabilities; the
//! namespaces and the file system view stay the same.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Gid, Pid, Uid};

/// Processes of the sandbox itself in an instance's cgroup: the supervisor and the init.
/// They are not the client's: process limits and counts leave them out.
pub const SUPERVISORS: u32 = 2;

/// Host directories an instance sees by default, read-only (those that exist; a
/// symbolic link such as `/bin -> usr/bin` is recreated as the same link).
pub const DEFAULT_SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// Paths an instance's volume may not be mounted on: the kernel's own views.
const RESERVED_MOUNT_PATHS: &[&str] = &["/proc", "/sys", "/dev"];

/// Device nodes an instance gets in its `/dev` (bound from the host's).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Who the workload runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// An unprivileged user and group of its own.
    Own {
        /// uid.
        uid: u32,
        /// gid.
        gid: u32,
    },
    /// The agent's own user, with its capabilities (`allow_host_user`).
    Host,
}

/// Everything the view of one instance is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// An empty directory on the host where the new root is assembled (a tmpfs is
    /// mounted on it inside the instance's mount namespace only).
    pub root: PathBuf,
    /// Host system directories, as found on the host (see [`SystemPath`]).
    pub system_paths: Vec<SystemPath>,
    /// Host paths that must stay invisible even if they lie under a system path (the
    /// agent's data directory, the volume root).
    pub hidden: Vec<PathBuf>,
    /// Volumes: the host directory and the absolute path inside the instance.
    pub volumes: Vec<(PathBuf, String)>,
    /// Size of the private `/tmp` (and of `/var/tmp`, `/dev/shm`), bytes.
    pub tmp_size_bytes: u64,
}

/// A system directory as the host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemPath {
    /// A directory, bound read-only.
    Dir(PathBuf),
    /// A symbolic link (`/bin -> usr/bin`), recreated with the same target.
    Link(PathBuf, PathBuf),
}

impl SystemPath {
    /// Looks at `path` on the host: `None` when it does not exist.
    pub fn probe(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        if meta.file_type().is_symlink() {
            Some(SystemPath::Link(
                path.to_owned(),
                std::fs::read_link(path).ok()?,
            ))
        } else if meta.is_dir() {
            Some(SystemPath::Dir(path.to_owned()))
        } else {
            None
        }
    }

    fn path(&self) -> &Path {
        match self {
            SystemPath::Dir(p) | SystemPath::Link(p, _) => p,
        }
    }
}

/// One step of building the view, in the instance's mount namespace. Paths are
/// absolute on the host (under [`Layout::root`] for targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Mounts of this namespace propagate nowhere (nothing reaches the host), which
    /// `pivot_root` also requires.
    PrivatePropagation,
    /// A tmpfs at `target` with `options` (mode, size).
    Tmpfs {
        /// Where.
        target: PathBuf,
        /// `mode=...,size=...`.
        options: String,
        /// Mount it read-only from the start (masks).
        read_only: bool,
    },
    /// A directory (no error when it exists).
    Mkdir(PathBuf),
    /// A symbolic link.
    Symlink {
        /// What it points to.
        target: PathBuf,
        /// The link.
        link: PathBuf,
    },
    /// An empty file, to bind a device node onto.
    Touch(PathBuf),
    /// A bind mount (not recursive: mounts below `source` stay out of sight), then a
    /// remount with the flags: read-only or not, never set-uid, devices only where
    /// `devices`.
    Bind {
        /// Host path.
        source: PathBuf,
        /// Path under the new root.
        target: PathBuf,
        /// Read-only.
        read_only: bool,
        /// Device nodes usable.
        devices: bool,
    },
    /// The namespace's own `/proc`.
    Proc(PathBuf),
    /// A `devpts` of its own (`newinstance`), for pseudo-terminals.
    Devpts(PathBuf),
    /// Makes an existing mount read-only (the tmpfs of `/dev`).
    RemountReadOnly(PathBuf),
    /// A volume at its mount path: each directory of the path made (if missing) and
    /// opened one by one below the new root without following a symbolic link, so that
    /// nothing in a volume (or anywhere in the view) can point the mount elsewhere; then
    /// the volume is bound on the directory opened, never set-uid, no devices.
    Volume {
        /// The volume's directory on the host.
        source: PathBuf,
        /// The new root.
        root: PathBuf,
        /// The path inside the instance (absolute).
        inside: String,
    },
    /// Switches to the new root and lets go of the host's (`pivot_root`, then a lazy
    /// unmount of the old root), then makes the new root's tmpfs read-only.
    PivotRoot(PathBuf),
}

fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// `path`'s ancestors below `/` and itself, outermost first (`/a/b` → `/a`, `/a/b`).
fn prefixes(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut acc = PathBuf::from("/");
    for c in path.components().skip(1) {
        acc.push(c);
        out.push(acc.clone());
    }
    out
}

/// Checks a volume's mount path against the kernel's own views: refused when it is
/// `/proc`, `/sys`, `/dev` or below them.
pub fn check_mount_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    match RESERVED_MOUNT_PATHS.iter().find(|r| p.starts_with(r)) {
        Some(r) => Err(format!(
            "{path} is inside {r}, which the sandbox provides itself"
        )),
        None => Ok(()),
    }
}

/// The steps that build the view of `layout`, in order. Pure: the same layout gives the
/// same steps.
pub fn plan(layout: &Layout) -> Vec<Op> {
    let root = &layout.root;
    let r = |p: &str| under(root, Path::new(p));
    let tmp = |mode: &str| format!("mode={mode},size={}", layout.tmp_size_bytes.max(4096));
    let mut ops = vec![
        Op::PrivatePropagation,
        Op::Tmpfs {
            target: root.clone(),
            options: "mode=0755,size=1m,nr_inodes=4096".into(),
            read_only: false,
        },
    ];
    // Scratch space of its own (first, so that a system path may lie below it).
    for (dir, mode) in [
        ("/tmp", "1777"),
        ("/var", ""),
        ("/var/tmp", "1777"),
        ("/run", "0755"),
    ] {
        ops.push(Op::Mkdir(r(dir)));
        if !mode.is_empty() {
            ops.push(Op::Tmpfs {
                target: r(dir),
                options: tmp(mode),
                read_only: false,
            });
        }
    }
    // System directories, read-only, without set-uid or devices.
    let mut made = std::collections::BTreeSet::new();
    let mut mkdirs = |ops: &mut Vec<Op>, path: &Path, including_self: bool| {
        let mut all = prefixes(path);
        if !including_self {
            all.pop();
        }
        for p in all {
            if made.insert(p.clone()) {
                ops.push(Op::Mkdir(under(root, &p)));
            }
        }
    };
    for sp in &layout.system_paths {
        match sp {
            SystemPath::Dir(p) => {
                mkdirs(&mut ops, p, true);
                ops.push(Op::Bind {
                    source: p.clone(),
                    target: under(root, p),
                    read_only: true,
                    devices: false,
                });
            }
            SystemPath::Link(p, target) => {
                mkdirs(&mut ops, p, false);
                ops.push(Op::Symlink {
                    target: target.clone(),
                    link: under(root, p),
                });
            }
        }
    }
    // The kernel's views: a process table of the namespace's own, the host's sysfs
    // read-only without the mounts below it (so no cgroup file system at all).
    ops.push(Op::Mkdir(r("/proc")));
    ops.push(Op::Proc(r("/proc")));
    ops.push(Op::Bind {
        source: r("/proc/sys"),
        target: r("/proc/sys"),
        read_only: true,
        devices: false,
    });
    ops.push(Op::Mkdir(r("/sys")));
    ops.push(Op::Bind {
        source: "/sys".into(),
        target: r("/sys"),
        read_only: true,
        devices: false,
    });
    // A minimal /dev: a few device nodes bound from the host, pseudo-terminals of its
    // own, shared memory of its own.
    ops.push(Op::Mkdir(r("/dev")));
    ops.push(Op::Tmpfs {
        target: r("/dev"),
        options: "mode=0755,size=64k,nr_inodes=64".into(),
        read_only: false,
    });
    for d in DEVICES {
        let target = under(root, &Path::new("/dev").join(d));
        ops.push(Op::Touch(target.clone()));
        ops.push(Op::Bind {
            source: Path::new("/dev").join(d),
            target,
            read_only: false,
            devices: true,
        });
    }
    ops.push(Op::Mkdir(r("/dev/pts")));
    ops.push(Op::Devpts(r("/dev/pts")));
    ops.push(Op::Symlink {
        target: "pts/ptmx".into(),
        link: r("/dev/ptmx"),
    });
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(Op::Symlink {
            target: target.into(),
            link: under(root, &Path::new("/dev").join(name)),
        });
    }
    ops.push(Op::Mkdir(r("/dev/shm")));
    ops.push(Op::Tmpfs {
        target: r("/dev/shm"),
        options: tmp("1777"),
        read_only: false,
    });
    // The agent's own files stay out of sight even under a system directory.
    for h in &layout.hidden {
        // A path inside another hidden one is gone with it.
        let covered = layout
            .hidden
            .iter()
            .any(|other| other != h && h.starts_with(other));
        if !covered
            && layout
                .system_paths
                .iter()
                .any(|sp| matches!(sp, SystemPath::Dir(_)) && h.starts_with(sp.path()))
        {
            ops.push(Op::Tmpfs {
                target: under(root, h),
                options: "mode=0000,size=4k,nr_inodes=1".into(),
                read_only: true,
            });
        }
    }
    // Volumes last, outer paths before the paths inside them. Mount points are made
    // in the view only, never through a symbolic link (see `Op::Volume`); under a
    // read-only system directory the directory must exist already, or the step fails.
    let mut volumes: Vec<&(PathBuf, String)> = layout.volumes.iter().collect();
    volumes.sort_by_key(|(_, inside)| Path::new(inside).components().count());
    for (host, inside) in volumes {
        ops.push(Op::Volume {
            source: host.clone(),
            root: root.clone(),
            inside: inside.clone(),
        });
    }
    ops.push(Op::RemountReadOnly(r("/dev")));
    ops.push(Op::PivotRoot(root.clone()));
    ops
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::PrivatePropagation => write!(f, "make the instance's mounts private"),
            Op::Tmpfs { target, .. } => write!(f, "mount a tmpfs on {}", target.display()),
            Op::Mkdir(p) => write!(f, "create the directory {}", p.display()),
            Op::Symlink { target, link } => {
                write!(f, "link {} to {}", link.display(), target.display())
            }
            Op::Touch(p) => write!(f, "create {}", p.display()),
            Op::Bind {
                source,
                target,
                read_only,
                ..
            } => write!(
                f,
                "bind {} on {}{}",
                source.display(),
                target.display(),
                if *read_only { " read-only" } else { "" }
            ),
            Op::Proc(p) => write!(f, "mount the instance's /proc on {}", p.display()),
            Op::Devpts(p) => write!(f, "mount a devpts on {}", p.display()),
            Op::RemountReadOnly(p) => write!(f, "make {} read-only", p.display()),
            Op::Volume { source, inside, .. } => write!(
                f,
                "mount {} at {inside} (without following symbolic links)",
                source.display()
            ),
            Op::PivotRoot(p) => write!(f, "switch the root to {}", p.display()),
        }
    }
}

/// Steps outside the mount plan, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
enum Fixed {
    Setsid = 0x8000,
    JoinCgroup,
    Unshare,
    ForkInit,
    Hostname,
    ForkWorkload,
    Capabilities,
    Groups,
    Gid,
    Uid,
    VerifyCapabilities,
    NoNewPrivs,
    WorkloadSession,
    CloseDescriptors,
    SyscallFilter,
}

impl Fixed {
    const ALL: [Fixed; 15] = [
        Fixed::Setsid,
        Fixed::JoinCgroup,
        Fixed::Unshare,
        Fixed::ForkInit,
        Fixed::Hostname,
        Fixed::ForkWorkload,
        Fixed::Capabilities,
        Fixed::Groups,
        Fixed::Gid,
        Fixed::Uid,
        Fixed::VerifyCapabilities,
        Fixed::NoNewPrivs,
        Fixed::WorkloadSession,
        Fixed::CloseDescriptors,
        Fixed::SyscallFilter,
    ];

    fn describe(self) -> &'static str {
        match self {
            Fixed::Setsid => "start a session of its own",
            Fixed::JoinCgroup => "join the instance's cgroup",
            Fixed::Unshare => "unshare the mount, PID, IPC and UTS namespaces",
            Fixed::ForkInit => "start the namespace's init",
            Fixed::Hostname => "set the instance's host name",
            Fixed::ForkWorkload => "start the workload",
            Fixed::Capabilities => "drop the bounding, ambient and inheritable capabilities",
            Fixed::Groups => "drop supplementary groups",
            Fixed::Gid => "switch to the instance's group",
            Fixed::Uid => "switch to the instance's user",
            Fixed::VerifyCapabilities => "check that no capability is left",
            Fixed::NoNewPrivs => "set no_new_privs",
            Fixed::WorkloadSession => "start the workload's session",
            Fixed::CloseDescriptors => "close the agent's descriptors on exec",
            Fixed::SyscallFilter => "install the system call filter",
        }
    }
}

/// What the sandbox reported about a failed start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    step: u16,
    errno: i32,
}

impl Report {
    /// The failed step in words, with the system's reason.
    pub fn explain(&self, ops: &[Op]) -> String {
        let errno = nix::errno::Errno::from_raw(self.errno);
        let step = match Fixed::ALL.iter().find(|f| **f as u16 == self.step) {
            Some(f) => f.describe().to_owned(),
            None => ops
                .get(usize::from(self.step))
                .map_or_else(|| format!("step {}", self.step), Op::to_string),
        };
        format!("sandbox set-up failed: {step}: {}", errno.desc())
    }
}

struct PreparedOp {
    kind: u8,
    a: CString,
    b: CString,
    flags: MsFlags,
    /// Path components, for `K_VOLUME`.
    parts: Vec<CString>,
}

const K_PRIVATE: u8 = 0;
const K_TMPFS: u8 = 1;
const K_MKDIR: u8 = 2;
const K_SYMLINK: u8 = 3;
const K_TOUCH: u8 = 4;
const K_BIND: u8 = 5;
const K_PROC: u8 = 6;
const K_DEVPTS: u8 = 7;
const K_RO: u8 = 8;
const K_PIVOT: u8 = 9;
const K_VOLUME: u8 = 10;

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", p.display()),
        )
    })
}

/// Everything [`enter`] needs, prepared before the fork: no allocation happens after.
pub struct Prepared {
    ops: Vec<PreparedOp>,
    procs: Vec<CString>,
    hostname: OsString,
    user: User,
    /// The highest capability number the kernel knows (`cap_last_cap`).
    last_cap: u32,
    /// Syscall filters the workload installs last (own-user instances only).
    filters: Vec<seccompiler::BpfProgram>,
    report: RawFd,
    max_fd: i32,
}

impl Prepared {
    /// Prepares `ops` for an instance named `hostname` running as `user`, joining the
    /// cgroup through `procs` files, reporting failures into `report` (the write end
    /// of a pipe opened with `O_CLOEXEC`).
    pub fn new(
        ops: &[Op],
        procs: &[PathBuf],
        hostname: &str,
        user: User,
        report: RawFd,
    ) -> std::io::Result<Self> {
        let empty = CString::default();
        let mut prepared = Vec::with_capacity(ops.len());
        for op in ops {
            let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            let p = match op {
                Op::PrivatePropagation => PreparedOp {
                    kind: K_PRIVATE,
                    a: CString::new("/").expect("no NUL"),
                    b: empty.clone(),
                    flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    parts: Vec::new(),
                },
                Op::Tmpfs {
                    target,
                    options,
                    read_only,
                } => PreparedOp {
                    kind: K_TMPFS,
                    a: cstring(target)?,
                    b: CString::new(options.as_bytes()).map_err(std::io::Error::other)?,
                    flags: if *read_only {
                        base | MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC
                    } else {
                        base
                    },
                    parts: Vec::new(),
                },
                Op::Mkdir(p) => PreparedOp {
                    kind: K_MKDIR,
                    a: cstring(p)?,
                    b: empty.clone(),
                    flags: MsFlags::empty(),
                    parts: Vec::new(),
                },
                Op::Symlink { target, link } => PreparedOp {
                    kind: K_SYMLINK,
                    a: cstring(target)?,
                    b: cstring(link)?,
                    flags: MsFlags::empty(),
                    parts: Vec::new(),
                },
                Op::Touch(p) => PreparedOp {
                    kind: K_TOUCH,
                    a: cstring(p)?,
                    b: empty.clone(),
                    flags: MsFlags::empty(),
                    parts: Vec::new(),
                },
                Op::Bind {
                    source,
                    target,
                    read_only,
                    devices,
                } => {
                    let mut flags = MsFlags::MS_NOSUID;
                    if *read_only {
                        flags |= MsFlags::MS_RDONLY;
                    }
                    if !*devices {
                        flags |= MsFlags::MS_NODEV;
                    }
                    PreparedOp {
                        kind: K_BIND,
                        a: cstring(source)?,
                        b: cstring(target)?,
                        flags,
                        parts: Vec::new(),
                    }
                }
                Op::Proc(p) => PreparedOp {
                    kind: K_PROC,
                    a: cstring(p)?,
                    b: empty.clone(),
                    flags: base | MsFlags::MS_NOEXEC,
                    parts: Vec::new(),
                },
                Op::Devpts(p) => PreparedOp {
                    kind: K_DEVPTS,
                    a: cstring(p)?,
                    b: CString::new("newinstance,ptmxmode=0666,mode=0620").expect("no NUL"),
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                    parts: Vec::new(),
                },
                Op::RemountReadOnly(p) => PreparedOp {
                    kind: K_RO,
                    a: cstring(p)?,
                    b: empty.clone(),
                    flags: base | MsFlags::MS_NOEXEC,
                    parts: Vec::new(),
                },
                Op::PivotRoot(p) => PreparedOp {
                    kind: K_PIVOT,
                    a: cstring(p)?,
                    b: empty.clone(),
                    flags: MsFlags::empty(),
                    parts: Vec::new(),
                },
                Op::Volume {
                    source,
                    root,
                    inside,
                } => PreparedOp {
                    kind: K_VOLUME,
                    a: cstring(source)?,
                    b: cstring(root)?,
                    flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    parts: Path::new(inside)
                        .components()
                        .skip(1)
                        .map(|c| cstring(Path::new(c.as_os_str())))
                        .collect::<Result<_, _>>()?,
                },
            };
            prepared.push(p);
        }
        let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| i32::try_from(soft).unwrap_or(i32::MAX).min(1 << 16))
            .unwrap_or(1024);
        Ok(Self {
            ops: prepared,
            procs: procs.iter().map(|p| cstring(p)).collect::<Result<_, _>>()?,
            hostname: OsString::from_vec(hostname.as_bytes().to_vec()),
            user,
            filters: match user {
                User::Own { .. } => syscall_filters()?,
                User::Host => Vec::new(),
            },
            last_cap: std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(63),
            report,
            max_fd,
        })
    }
}

/// System calls refused to an instance's workload with EPERM: new namespaces (user
/// namespaces above all, which would hand it capabilities over a new network or mount
/// namespace and the kernel surface behind them), mounting, kernel keyrings, BPF,
/// perf events, io_uring, userfaultfd, modules, swap, reboot and the clock. Most of them
/// need a capability it does not have anyway; the filter closes what unprivileged
/// processes may still reach. `clone3` answers ENOSYS (its flags are out of a filter's
/// sight), so the C library falls back to `clone`, whose namespace flags are checked.
fn syscall_filters() -> std::io::Result<Vec<seccompiler::BpfProgram>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(|e| {
        std::io::Error::other(format!(
            "no system call filter for this architecture: {e:?}"
        ))
    })?;
    let namespaces = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
        0x80, // CLONE_NEWTIME
    ];
    let any_namespace = || -> std::io::Result<Vec<SeccompRule>> {
        namespaces
            .iter()
            .map(|flag| {
                let flag = *flag as u64;
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .collect()
    };
    let mut refused: std::collections::BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_setns,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_acct,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_open_by_handle_at,
        libc::SYS_fanotify_init,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    refused.insert(libc::SYS_unshare, any_namespace()?);
    refused.insert(libc::SYS_clone, any_namespace()?);
    let build = |rules, action| -> std::io::Result<seccompiler::BpfProgram> {
        SeccompFilter::new(rules, SeccompAction::Allow, action, arch)
            .and_then(|f| f.try_into())
            .map_err(|e: seccompiler::BackendError| std::io::Error::other(e.to_string()))
    };
    Ok(vec![
        build(refused, SeccompAction::Errno(libc::EPERM as u32))?,
        build(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?,
    ])
}

/// The pipe the sandbox reports a failed step into: the read end for the agent, the
/// write end for the child (closed on `exec`).
pub fn report_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Reads the report after the start: `None` when every step succeeded (the pipe closed
/// empty on `exec`). Call once the child's `spawn` returned and the agent's copy of the
/// write end is closed.
pub fn read_report(read: OwnedFd) -> Option<Report> {
    use std::io::Read;
    let mut file = std::fs::File::from(read);
    let mut buf = [0u8; 6];
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| Report {
        step: u16::from_le_bytes([buf[0], buf[1]]),
        errno: i32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]),
    })
}

/// Writes a failed step into the report pipe; returns the error to fail with.
fn fail(p: &Prepared, step: u16, errno: nix::errno::Errno) -> std::io::Error {
    let e = errno as i32;
    let s = step.to_le_bytes();
    let n = e.to_le_bytes();
    let buf = [s[0], s[1], n[0], n[1], n[2], n[3]];
    // SAFETY: `report` is the write end of the pipe, open in this process.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(p.report) };
    let _ = nix::unistd::write(fd, &buf);
    std::io::Error::from_raw_os_error(e)
}

/// Closes every descriptor above stderr: the supervisor and the init keep nothing of
/// the agent's open (its sockets, the pipe through which the start is reported), so
/// the start is reported as soon as the workload `exec`s.
fn close_from_3(max_fd: i32) {
    // SAFETY: close_range(2) only closes descriptors; ENOSYS on kernels before 5.9.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        for fd in 3..max_fd {
            // SAFETY: closing a descriptor this process may hold; EBADF otherwise.
            unsafe { libc::close(fd) };
        }
    }
}

/// Waits for `child` (and, as PID 1, reaps everything else) and ends this process with
/// the child's status: the exit code, or 128 + the signal that killed it.
fn wait_and_exit(child: Pid) -> ! {
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                // SAFETY: _exit ends the process without running anything of the
                // parent's (no destructors, no atexit handlers, no buffered output).
                unsafe { libc::_exit(code) }
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                // SAFETY: as above.
                unsafe { libc::_exit(128 + signal as i32) }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(127) },
        }
    }
}

fn run_op(op: &PreparedOp) -> nix::Result<()> {
    use nix::mount::mount;
    const NONE: Option<&std::ffi::CStr> = None;
    match op.kind {
        K_PRIVATE => mount(NONE, op.a.as_c_str(), NONE, op.flags, NONE),
        K_TMPFS => mount(
            Some(c"tmpfs"),
            op.a.as_c_str(),
            Some(c"tmpfs"),
            op.flags,
            Some(op.b.as_c_str()),
        ),
        K_MKDIR => match nix::unistd::mkdir(op.a.as_c_str(), Mode::from_bits_truncate(0o755)) {
            Err(nix::errno::Errno::EEXIST) => Ok(()),
            other => other,
        },
        K_SYMLINK => nix::unistd::symlinkat(op.a.as_c_str(), nix::fcntl::AT_FDCWD, op.b.as_c_str()),
        K_TOUCH => nix::fcntl::open(
            op.a.as_c_str(),
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map(drop),
        K_BIND => {
            // A bind mount takes its flags only from a remount of it.
            mount(
                Some(op.a.as_c_str()),
                op.b.as_c_str(),
                NONE,
                MsFlags::MS_BIND,
                NONE,
            )?;
            mount(
                NONE,
                op.b.as_c_str(),
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | op.flags,
                NONE,
            )
        }
        K_PROC => mount(
            Some(c"proc"),
            op.a.as_c_str(),
            Some(c"proc"),
            op.flags,
            NONE,
        ),
        K_DEVPTS => mount(
            Some(c"devpts"),
            op.a.as_c_str(),
            Some(c"devpts"),
            op.flags,
            Some(op.b.as_c_str()),
        ),
        K_RO => mount(
            NONE,
            op.a.as_c_str(),
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | op.flags,
            NONE,
        ),
        K_PIVOT => {
            // The new root must be a mount (the tmpfs) and no mount may be shared
            // (PrivatePropagation); "." on "." stacks the old root on the new one, and
            // the lazy unmount then lets go of the host's whole tree.
            nix::unistd::chdir(op.a.as_c_str())?;
            nix::unistd::pivot_root(c".", c".")?;
            nix::mount::umount2(c".", MntFlags::MNT_DETACH)?;
            nix::unistd::chdir(c"/")?;
            mount(
                NONE,
                c"/",
                NONE,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                NONE,
            )
        }
        K_VOLUME => {
            use nix::fcntl::{OFlag, openat};
            let dir = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut at = nix::fcntl::open(op.b.as_c_str(), dir, Mode::empty())?;
            let mut parent = None;
            for part in &op.parts {
                match nix::sys::stat::mkdirat(&at, part.as_c_str(), Mode::from_bits_truncate(0o755))
                {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                // O_NOFOLLOW: a symbolic link here (planted in a volume, say) fails the
                // step with ELOOP instead of leading the mount outside the view.
                let next = openat(&at, part.as_c_str(), dir, Mode::empty())?;
                parent = Some(std::mem::replace(&mut at, next));
            }
            let (Some(parent), Some(last)) = (parent, op.parts.last()) else {
                return Err(nix::errno::Errno::EINVAL);
            };
            let mut buf = [0u8; 32];
            mount(
                Some(op.a.as_c_str()),
                fd_path(at.as_raw_fd(), &mut buf),
                NONE,
                MsFlags::MS_BIND,
                NONE,
            )?;
            // Reopened through its parent, the path now leads to the new mount, whose
            // flags a remount sets.
            let mounted = openat(&parent, last.as_c_str(), dir, Mode::empty())?;
            mount(
                NONE,
                fd_path(mounted.as_raw_fd(), &mut buf),
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | op.flags,
                NONE,
            )
        }
        _ => Err(nix::errno::Errno::EINVAL),
    }
}

/// `/proc/self/fd/<fd>` in `buf`, without allocating.
fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> &std::ffi::CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    std::ffi::CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/")
}

/// The body of `pre_exec`: makes the calling child the supervisor, forks the init and
/// the workload, and returns (in the workload only) ready for `exec`.
///
/// # Safety
///
/// Call only in the child between `fork` and `exec`. Only async-signal-safe system
/// calls follow, on memory `p` prepared before the fork.
pub unsafe fn enter(p: &Prepared) -> std::io::Result<()> {
    // A session of its own: the instance outlives an agent restart and no terminal
    // signal of the agent's reaches it.
    nix::unistd::setsid().map_err(|e| fail(p, Fixed::Setsid as u16, e))?;
    // Join the cgroup first: every process forked from here on is counted, limited and
    // signalled with the instance.
    for procs in &p.procs {
        let owned = nix::fcntl::open(
            procs.as_c_str(),
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(p, Fixed::JoinCgroup as u16, e))?;
        match nix::unistd::write(&owned, b"0") {
            Ok(1) => {}
            Ok(_) => return Err(fail(p, Fixed::JoinCgroup as u16, nix::errno::Errno::EIO)),
            Err(e) => return Err(fail(p, Fixed::JoinCgroup as u16, e)),
        }
    }
    // Namespaces: its own mounts (the view), processes (it sees and signals only its
    // own; the next child is PID 1), System V IPC and host name.
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(|e| fail(p, Fixed::Unshare as u16, e))?;
    // SAFETY: this process has one thread (the child of a fork); the child below only
    // makes system calls on prepared memory.
    match unsafe { nix::unistd::fork() }.map_err(|e| fail(p, Fixed::ForkInit as u16, e))? {
        ForkResult::Parent { child } => {
            // The supervisor: it stays to report the instance's exit status. Stop
            // signals go to every process of the cgroup; it ignores them and ends when
            // the init ends. (It is a fork of the agent: its name says what it is.)
            close_from_3(p.max_fd);
            let _ = nix::sys::prctl::set_name(c"surplus-superv");
            for s in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGQUIT,
            ] {
                // SAFETY: installing SIG_IGN runs no code of ours.
                let _ = unsafe { nix::sys::signal::signal(s, SigHandler::SigIgn) };
            }
            wait_and_exit(child)
        }
        ForkResult::Child => {}
    }
    // The init (PID 1 of the new namespace): build the view, then start the workload.
    let _ = nix::sys::prctl::set_name(c"surplus-init");
    for (n, op) in p.ops.iter().enumerate() {
        run_op(op).map_err(|e| fail(p, n as u16, e))?;
    }
    nix::unistd::sethostname(&p.hostname).map_err(|e| fail(p, Fixed::Hostname as u16, e))?;
    // SAFETY: as above.
    match unsafe { nix::unistd::fork() }.map_err(|e| fail(p, Fixed::ForkWorkload as u16, e))? {
        ForkResult::Parent { child } => {
            close_from_3(p.max_fd);
            wait_and_exit(child)
        }
        ForkResult::Child => {}
    }
    // The workload.
    if let User::Own { uid, gid } = p.user {
        // Capabilities first, while it still has CAP_SETPCAP: nothing can be raised
        // again by a file's capabilities or an inherited set. (Raw system calls: nix has
        // none for these, and the caps crate allocates its errors, which is not
        // allowed here.)
        capabilities::drop_all(p.last_cap).map_err(|e| fail(p, Fixed::Capabilities as u16, e))?;
        nix::unistd::setgroups(&[]).map_err(|e| fail(p, Fixed::Groups as u16, e))?;
        let gid = Gid::from_raw(gid);
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| fail(p, Fixed::Gid as u16, e))?;
        // From uid 0 to another, the kernel clears the permitted and effective sets.
        let uid = Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail(p, Fixed::Uid as u16, e))?;
        if capabilities::any_left() {
            return Err(fail(
                p,
                Fixed::VerifyCapabilities as u16,
                nix::errno::Errno::EPERM,
            ));
        }
    }
    // No set-uid binary or file capability raises the workload's privileges again.
    nix::sys::prctl::set_no_new_privs().map_err(|e| fail(p, Fixed::NoNewPrivs as u16, e))?;
    // The system calls a workload has no use for, refused from here on (see
    // `syscall_filters`).
    for filter in &p.filters {
        seccompiler::apply_filter(filter).map_err(|e| {
            let errno = match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
                    io.raw_os_error().unwrap_or(libc::EINVAL)
                }
                _ => libc::EINVAL,
            };
            fail(
                p,
                Fixed::SyscallFilter as u16,
                nix::errno::Errno::from_raw(errno),
            )
        })?;
    }
    nix::unistd::setsid().map_err(|e| fail(p, Fixed::WorkloadSession as u16, e))?;
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    // Nothing the agent holds open reaches the client's program: every descriptor above
    // stderr closes on exec (a directory the agent inherited would otherwise lead out of
    // the view). The start's own pipes are close-on-exec already.
    cloexec_from_3(p.max_fd).map_err(|e| fail(p, Fixed::CloseDescriptors as u16, e))?;
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec.
fn cloexec_from_3(max_fd: i32) -> nix::Result<()> {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range(2) only changes descriptor flags (kernel 5.11 or later).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r == 0 {
        return Ok(());
    }
    for fd in 3..max_fd {
        // SAFETY: fcntl(2) on a descriptor this process may hold; EBADF otherwise.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if r != 0 && nix::errno::Errno::last() != nix::errno::Errno::EBADF {
            return Err(nix::errno::Errno::last());
        }
    }
    Ok(())
}

/// The capability sets of the calling thread, through `capget`/`capset` and `prctl`.
mod capabilities {
    const VERSION_3: u32 = 0x2008_0522;

    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    fn get() -> nix::Result<[Data; 2]> {
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capget(2) with a version-3 header and room for two data words.
        let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        nix::errno::Errno::result(r).map(|_| data)
    }

    /// Clears the ambient and inheritable sets and drops every capability up to
    /// `last_cap` from the bounding set.
    pub fn drop_all(last_cap: u32) -> nix::Result<()> {
        // SAFETY: prctl(2) with integer arguments only.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        nix::errno::Errno::result(r)?;
        let mut data = get()?;
        for d in &mut data {
            d.inheritable = 0;
        }
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        // SAFETY: capset(2) with a version-3 header and two data words.
        let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        nix::errno::Errno::result(r)?;
        for cap in 0..=last_cap {
            // SAFETY: prctl(2) with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            match nix::errno::Errno::result(r) {
                Ok(_) | Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether any capability is left in the effective, permitted or inheritable sets
    /// (or they cannot be read).
    pub fn any_left() -> bool {
        match get() {
            Ok(data) => data
                .iter()
                .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            root: "/var/lib/a/control/roots/i-1".into(),
            system_paths: vec![
                SystemPath::Dir("/usr".into()),
                SystemPath::Link("/bin".into(), "usr/bin".into()),
                SystemPath::Dir("/etc".into()),
                SystemPath::Dir("/opt/tools".into()),
            ],
            hidden: vec![
                "/var/lib/a".into(),
                "/etc/surplus".into(),
                "/etc/surplus/volumes".into(),
            ],
            volumes: vec![("/var/lib/a/control/volumes/vol-1".into(), "/data/db".into())],
            tmp_size_bytes: 1 << 20,
        }
    }

    fn check(ops: &[Op], expect: &[&str]) {
        let text: Vec<String> = ops.iter().map(Op::to_string).collect();
        let mut at = 0;
        for e in expect {
            match text[at..].iter().position(|t| t == e) {
                Some(p) => at += p + 1,
                None => panic!("{e:?} missing or out of order in:\n{}", text.join("\n")),
            }
        }
    }

    #[test]
    fn the_view_is_built_in_order_and_ends_read_only() {
        let ops = plan(&layout());
        let root = "/var/lib/a/control/roots/i-1";
        check(
            &ops,
            &[
                "make the instance's mounts private",
                &format!("mount a tmpfs on {root}"),
                &format!("mount a tmpfs on {root}/tmp"),
                &format!("bind /usr on {root}/usr read-only"),
                &format!("link {root}/bin to usr/bin"),
                &format!("create the directory {root}/opt"),
                &format!("bind /opt/tools on {root}/opt/tools read-only"),
                &format!("mount the instance's /proc on {root}/proc"),
                &format!("bind {root}/proc/sys on {root}/proc/sys read-only"),
                &format!("bind /sys on {root}/sys read-only"),
                &format!("bind /dev/null on {root}/dev/null"),
                &format!("mount a tmpfs on {root}/etc/surplus"),
                "mount /var/lib/a/control/volumes/vol-1 at /data/db (without following symbolic links)",
                &format!("make {root}/dev read-only"),
                &format!("switch the root to {root}"),
            ],
        );
        assert!(matches!(ops.last(), Some(Op::PivotRoot(_))));
    }

    /// Nothing of the host is writable in the view but the instance's own volumes and
    /// scratch space; the agent's directory is masked only where it would show.
    #[test]
    fn only_volumes_and_scratch_space_are_writable() {
        let ops = plan(&layout());
        for op in &ops {
            if let Op::Bind {
                source,
                read_only: false,
                devices,
                ..
            } = op
            {
                let ok = source.starts_with("/var/lib/a/control/volumes")
                    || (*devices && source.starts_with("/dev"));
                assert!(ok, "writable bind of {}", source.display());
            }
        }
        for op in &ops {
            if let Op::Volume { source, .. } = op {
                assert!(source.starts_with("/var/lib/a/control/volumes"));
            }
        }
        let masks: Vec<&PathBuf> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Tmpfs {
                    target,
                    read_only: true,
                    ..
                } => Some(target),
                _ => None,
            })
            .collect();
        // /var/lib/a is not under a bound directory: it is simply not there.
        assert_eq!(
            masks,
            [&PathBuf::from("/var/lib/a/control/roots/i-1/etc/surplus")]
        );
    }

    #[test]
    fn volumes_are_mounted_outer_paths_first() {
        let mut l = layout();
        l.volumes = vec![
            ("/v/inner".into(), "/data/db/logs".into()),
            ("/v/outer".into(), "/data".into()),
        ];
        let ops = plan(&l);
        let order: Vec<&str> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Volume { inside, .. } => Some(inside.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["/data", "/data/db/logs"]);
    }

    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buf = [0u8; 32];
        assert_eq!(fd_path(7, &mut buf).to_str().unwrap(), "/proc/self/fd/7");
        assert_eq!(
            fd_path(1_048_575, &mut buf).to_str().unwrap(),
            "/proc/self/fd/1048575"
        );
    }

    #[test]
    fn mount_paths_inside_the_kernels_views_are_refused() {
        for bad in ["/proc", "/proc/x", "/sys/fs/cgroup", "/dev/shm"] {
            assert!(check_mount_path(bad).is_err(), "{bad}");
        }
        for good in ["/data", "/srv/db", "/processes", "/device"] {
            check_mount_path(good).unwrap();
        }
    }

    #[test]
    fn every_step_has_words_and_reports_decode() {
        let ops = plan(&layout());
        let bind = ops
            .iter()
            .position(|o| matches!(o, Op::Bind { .. }))
            .unwrap();
        let r = Report {
            step: bind as u16,
            errno: nix::errno::Errno::EROFS as i32,
        };
        assert!(
            r.explain(&ops).contains("bind /usr on"),
            "{}",
            r.explain(&ops)
        );
        let r = Report {
            step: Fixed::Uid as u16,
            errno: nix::errno::Errno::EPERM as i32,
        };
        assert_eq!(
            r.explain(&ops),
            "sandbox set-up failed: switch to the instance's user: Operation not permitted"
        );
    }
}
