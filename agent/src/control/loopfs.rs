//! Volumes of a fixed size for the process and Docker drivers: an ext4 file system in a
//! preallocated image file of the volume's size, mounted through a loop device on the
//! agent's host. Writes past the size fail with ENOSPC inside the instance, whatever
//! the host's own file system is; the space is reserved when the volume is created, so
//! a full host disk cannot take it away later.
//!
//! The image is `<root>/<id>.img`, the mount point `<root>/<id>`. Formatting uses the
//! host's `mkfs.ext4` and mounting its `mount -o loop` (util-linux), each started
//! without a shell, with every value a whole argument. A host without them, or without
//! loop devices, cannot enforce a size: [`check_host`] says why, and the drivers then
//! refuse to create volumes rather than create unbounded ones.
//!
//! The file system's own metadata (inode tables, a journal) takes a share of the image,
//! as on any disk: a client can store somewhat less than the size, never more.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::DriverError;

/// Smallest volume: below it ext4 has no room for its own structures.
pub const MIN_VOLUME_BYTES: u64 = 8 << 20;

/// Why this host cannot enforce volume sizes, or `Ok` when it can.
pub fn check_host() -> Result<(), String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err(
            "no loop devices (/dev/loop-control is missing): volume sizes cannot be enforced"
                .into(),
        );
    }
    for program in ["mkfs.ext4", "mount", "umount"] {
        if which(program).is_none() {
            return Err(format!(
                "{program} is not installed (Debian: e2fsprogs, mount): volume sizes cannot be enforced"
            ));
        }
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), DriverError> {
    let path =
        which(program).ok_or_else(|| DriverError::Failed(format!("{program} is not installed")))?;
    let out = Command::new(&path)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| DriverError::failed(&format!("cannot run {}", path.display()), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DriverError::Failed(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Is `dir` a mount point (a different device than its parent's)?
pub fn is_mounted(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(d), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    d.dev() != p.dev()
}

/// The volumes of one driver under one directory.
#[derive(Debug, Clone)]
pub struct ImageVolumes {
    root: PathBuf,
}

impl ImageVolumes {
    /// Volumes under `root` (created if missing; kept as an absolute path, since the
    /// engine and the sandbox resolve it from elsewhere).
    pub fn open(root: PathBuf) -> Result<Self, DriverError> {
        std::fs::create_dir_all(&root)
            .map_err(|e| DriverError::failed(&root.display().to_string(), e))?;
        let root = std::fs::canonicalize(&root)
            .map_err(|e| DriverError::failed(&root.display().to_string(), e))?;
        // The images and mounts are clients' data: no one else on the host passes.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| DriverError::failed(&root.display().to_string(), e))?;
        Ok(Self { root })
    }

    /// The directory holding the volumes (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the volume is mounted on the host.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn image(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.img"))
    }

    /// Creates the image (space reserved, ext4 made) and mounts it; idempotent by
    /// `id`. Blocking: call from a blocking thread.
    pub fn create(&self, id: &str, size_bytes: u64) -> Result<PathBuf, DriverError> {
        check_host().map_err(DriverError::Failed)?;
        if size_bytes < MIN_VOLUME_BYTES {
            return Err(super::Invalid::new(
                "size_bytes",
                format!("{size_bytes} is below the smallest volume of {MIN_VOLUME_BYTES} bytes"),
            )
            .into());
        }
        let image = self.image(id);
        if !image.exists() {
            let free = free_bytes(&self.root).map_err(|e| DriverError::failed("statvfs", e))?;
            if free < size_bytes {
                return Err(DriverError::Failed(format!(
                    "not enough space for {size_bytes} bytes under {} ({free} free)",
                    self.root.display()
                )));
            }
            // Made under a temporary name and renamed when complete, so a crash leaves
            // no half-made image that a retry would mount.
            let tmp = self.root.join(format!("{id}.img.tmp"));
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| DriverError::failed(&tmp.display().to_string(), e))?;
            let size = i64::try_from(size_bytes)
                .map_err(|_| DriverError::Failed(format!("{size_bytes} bytes is too large")))?;
            match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size) {
                Ok(()) => {}
                // A file system without preallocation: a sparse file of the size.
                Err(nix::errno::Errno::EOPNOTSUPP) => file
                    .set_len(size_bytes)
                    .map_err(|e| DriverError::failed("size the volume image", e))?,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(DriverError::failed("reserve the volume's space", e));
                }
            }
            file.sync_all()
                .map_err(|e| DriverError::failed("write the volume image", e))?;
            drop(file);
            // No reserved blocks (the client's, all of it), no discard (it would give
            // the reserved space back).
            run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-m".as_ref(),
                    "0".as_ref(),
                    "-E".as_ref(),
                    "nodiscard".as_ref(),
                    tmp.as_os_str(),
                ],
            )
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            std::fs::rename(&tmp, &image)
                .map_err(|e| DriverError::failed("keep the volume image", e))?;
        }
        self.ensure_mounted(id)?;
        // What the empty file system itself takes (its journal, inode tables): used
        // bytes are counted above it.
        let base = self.root.join(format!("{id}.base"));
        if !base.exists() {
            let used = fs_used(&self.dir(id))
                .map_err(|e| DriverError::failed("statvfs of the new volume", e))?;
            crate::identity::write_atomic(&base, used.to_string().as_bytes(), 0o600)
                .map_err(|e| DriverError::failed("record the volume's own size", e))?;
        }
        Ok(self.dir(id))
    }

    /// Mounts the volume if it is not (after a host restart). Blocking.
    pub fn ensure_mounted(&self, id: &str) -> Result<(), DriverError> {
        let dir = self.dir(id);
        if is_mounted(&dir) {
            return Ok(());
        }
        let image = self.image(id);
        if !image.exists() {
            return Err(DriverError::Failed(format!(
                "the image of volume {id} is missing ({})",
                image.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::failed(&dir.display().to_string(), e))?;
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                "loop,nosuid,nodev".as_ref(),
                image.as_os_str(),
                dir.as_os_str(),
            ],
        )
    }

    /// Unmounts and removes the volume (idempotent). Blocking.
    pub fn delete(&self, id: &str) -> Result<(), DriverError> {
        let dir = self.dir(id);
        if is_mounted(&dir) {
            run("umount", &[dir.as_os_str()])?;
        }
        for path in [
            self.image(id),
            self.root.join(format!("{id}.img.tmp")),
            self.root.join(format!("{id}.base")),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DriverError::failed("remove the volume image", e)),
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::failed("remove the volume's mount point", e)),
        }
    }
}

/// The same operations from async code, each on a blocking thread.
impl ImageVolumes {
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(ImageVolumes) -> Result<T, DriverError> + Send + 'static,
    ) -> Result<T, DriverError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| DriverError::failed(what, e))?
    }

    /// [`ImageVolumes::create`].
    pub async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<PathBuf, DriverError> {
        let id = id.to_owned();
        self.blocking("create volume", move |v| v.create(&id, size_bytes))
            .await
    }

    /// [`ImageVolumes::ensure_mounted`].
    pub async fn restore(&self, id: &str) -> Result<(), DriverError> {
        let id = id.to_owned();
        self.blocking("mount volume", move |v| v.ensure_mounted(&id))
            .await
    }

    /// [`ImageVolumes::delete`].
    pub async fn remove(&self, id: &str) -> Result<(), DriverError> {
        let id = id.to_owned();
        self.blocking("delete volume", move |v| v.delete(&id)).await
    }

    /// Bytes the volume's files take, when it is mounted: what its file system has in
    /// use above what it took empty. Read from the file system, never by walking the
    /// client's tree (which a running instance may change under the walk).
    pub async fn used(&self, id: &str) -> Result<Option<u64>, DriverError> {
        let dir = self.dir(id);
        let base = self.root.join(format!("{id}.base"));
        self.blocking("volume usage", move |_| {
            if !is_mounted(&dir) {
                return Ok(None);
            }
            let used = fs_used(&dir).map_err(|e| DriverError::failed("volume usage", e))?;
            let empty = std::fs::read_to_string(&base)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            Ok(Some(used.saturating_sub(empty)))
        })
        .await
    }

    /// Copies the volume's files into `to` (a new directory), never following a
    /// symbolic link, at most `limit` bytes of file contents. Blocking.
    pub fn copy_out(&self, id: &str, to: &Path, limit: u64) -> Result<u64, DriverError> {
        copy_tree(&self.dir(id), to, limit).map_err(|e| DriverError::failed("snapshot", e))
    }
}

/// Bytes free for unprivileged use on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Bytes in use on the file system holding `path`.
fn fs_used(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks().saturating_sub(s.blocks_free()) * s.fragment_size())
}

/// Copies the tree at `from` into a new directory `to`: directories, regular files and
/// symbolic links (as links), nothing else, the file system's own `lost+found` left
/// out, and at most `limit` bytes of contents. Every entry is opened relative to its
/// directory's descriptor with `O_NOFOLLOW` and checked after opening, so an instance
/// that swaps a directory for a link while it is copied (the copy runs as root) gets a
/// failed copy, never a copy of something outside its volume. Returns the bytes copied.
pub fn copy_tree(from: &Path, to: &Path, limit: u64) -> std::io::Result<u64> {
    use nix::fcntl::OFlag;
    let dir = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let src = nix::fcntl::open(from, dir, Mode::empty())?;
    std::fs::create_dir(to)?;
    let dst = nix::fcntl::open(to, dir, Mode::empty())?;
    let mut left = limit;
    copy_dir(&src, &dst, &mut left, true)?;
    Ok(limit - left)
}

use nix::sys::stat::{Mode, SFlag};

fn copy_dir(
    src: &std::os::fd::OwnedFd,
    dst: &std::os::fd::OwnedFd,
    left: &mut u64,
    top: bool,
) -> std::io::Result<()> {
    use nix::fcntl::{AtFlags, OFlag, openat};
    use std::os::fd::AsFd;
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let listing = nix::dir::Dir::openat(src.as_fd(), c".", dir_flags, Mode::empty())?;
    let names: Vec<std::ffi::CString> = listing
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .filter(|n| !(top && n.as_bytes() == b"lost+found"))
        .collect();
    for name in names {
        let st =
            nix::sys::stat::fstatat(src.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            let sub = openat(src, name.as_c_str(), dir_flags, Mode::empty())?;
            nix::sys::stat::mkdirat(dst, name.as_c_str(), Mode::from_bits_truncate(0o755))?;
            let dsub = openat(dst, name.as_c_str(), dir_flags, Mode::empty())?;
            copy_dir(&sub, &dsub, left, false)?;
        } else if kind == SFlag::S_IFREG {
            // O_NONBLOCK: if it became a FIFO meanwhile, the open does not hang.
            let fd = openat(
                src,
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let opened = nix::sys::stat::fstat(&fd)?;
            if SFlag::from_bits_truncate(opened.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                return Err(std::io::Error::other(
                    "the volume changed while it was copied",
                ));
            }
            let out = openat(
                dst,
                name.as_c_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )?;
            let mut input = std::io::Read::take(std::fs::File::from(fd), *left + 1);
            let copied = std::io::copy(&mut input, &mut std::fs::File::from(out))?;
            if copied > *left {
                return Err(std::io::Error::other("the volume holds more than its size"));
            }
            *left -= copied;
        } else if kind == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(src, name.as_c_str())?;
            nix::unistd::symlinkat(target.as_os_str(), dst, name.as_c_str())?;
        }
        // Devices, FIFOs and sockets are not copied.
    }
    Ok(())
}

/// Hands the volume at `dir` to `uid:gid`: the whole tree when its root belongs to
/// someone else (another instance used it before), as systemd does for a
/// `DynamicUser`'s state directory. Symbolic links are changed, never followed.
/// Blocking.
pub fn hand_over(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    fn walk(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        if std::fs::symlink_metadata(path)?.is_dir() {
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(dir, uid, gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_links_as_links_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("volume");
        std::fs::create_dir_all(from.join("d/e")).unwrap();
        std::fs::write(from.join("d/e/f"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc", from.join("link-to-etc")).unwrap();
        std::os::unix::fs::symlink("/etc", from.join("d/dir-link")).unwrap();
        nix::unistd::mkfifo(&from.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir(from.join("lost+found")).unwrap();
        let to = dir.path().join("copy");
        assert_eq!(copy_tree(&from, &to, 1000).unwrap(), 5);
        assert_eq!(std::fs::read(to.join("d/e/f")).unwrap(), b"hello");
        for link in ["link-to-etc", "d/dir-link"] {
            let meta = std::fs::symlink_metadata(to.join(link)).unwrap();
            assert!(meta.file_type().is_symlink(), "{link} stays a link");
        }
        assert!(!to.join("fifo").exists() && !to.join("lost+found").exists());
        // More than the limit (the volume's size) is refused.
        let err = copy_tree(&from, &dir.path().join("small"), 4).unwrap_err();
        assert!(err.to_string().contains("more than its size"), "{err}");
        // A volume directory that is itself a link is not followed.
        std::os::unix::fs::symlink(&from, dir.path().join("swapped")).unwrap();
        assert!(copy_tree(&dir.path().join("swapped"), &dir.path().join("x"), 1000).is_err());
    }
}
