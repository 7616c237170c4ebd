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
        Ok(Self { root })
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
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
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
        for path in [self.image(id), self.root.join(format!("{id}.img.tmp"))] {
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

    /// Bytes of the files in the volume, when it is mounted.
    pub async fn used(&self, id: &str) -> Result<Option<u64>, DriverError> {
        let dir = self.dir(id);
        self.blocking("volume usage", move |_| {
            if !is_mounted(&dir) {
                return Ok(None);
            }
            used_bytes(&dir)
                .map(Some)
                .map_err(|e| DriverError::failed("volume usage", e))
        })
        .await
    }
}

/// Bytes free for unprivileged use on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Bytes of the files in a volume, its file system's own `lost+found` left out.
pub fn used_bytes(dir: &Path) -> std::io::Result<u64> {
    fn walk(path: &Path, top: bool) -> std::io::Result<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if top && entry.file_name() == "lost+found" {
                continue;
            }
            let meta = entry.metadata()?;
            total += if meta.is_dir() {
                walk(&entry.path(), false)?
            } else {
                meta.len()
            };
        }
        Ok(total)
    }
    walk(dir, true)
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
