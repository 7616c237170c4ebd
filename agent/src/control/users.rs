//! Users of the process driver's instances: one unprivileged uid (and the same gid) per
//! instance from a configured range, like systemd's `DynamicUser`.
//!
//! An instance keeps its uid from RunInstances to TerminateInstances (a stop and start
//! keep it, so files it wrote stay its own); the allocation is kept in one small file
//! written crash-safely, so a restarted agent gives re-adopted instances the uids they
//! run as. A uid that the host's `/etc/passwd` or `/etc/group` knows, or that lies in a
//! range `/etc/subuid` or `/etc/subgid` gives to a user's namespaces, is never handed
//! out, and neither is 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The uids instances get: `first ..= first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    /// The first uid (never 0).
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl UidRange {
    /// Refuses ranges that include 0 or wrap around.
    pub fn validate(&self) -> Result<(), String> {
        if self.first == 0 {
            return Err("uid_first must not be 0: instances never run as root".into());
        }
        if self.count == 0
            || self
                .first
                .checked_add(self.count - 1)
                .is_none_or(|l| l == u32::MAX)
        {
            return Err(format!(
                "uid range {}+{} is empty or runs past the largest uid",
                self.first, self.count
            ));
        }
        Ok(())
    }

    fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }
}

/// The lowest uid of `range` that is neither `taken` by an instance nor known to the
/// host. Pure.
pub fn lowest_free(range: UidRange, taken: &BTreeSet<u32>, host: &BTreeSet<u32>) -> Option<u32> {
    (0..range.count)
        .map(|n| range.first + n)
        .find(|uid| *uid != 0 && !taken.contains(uid) && !host.contains(uid))
}

/// Ids named in the third field of `passwd`- or `group`-style text.
pub fn ids_in(text: &str) -> BTreeSet<u32> {
    text.lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// Ranges `(first, count)` of `subuid`- or `subgid`-style text (`name:first:count`).
pub fn ranges_in(text: &str) -> Vec<(u32, u32)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':').skip(1);
            Some((
                f.next()?.trim().parse().ok()?,
                f.next()?.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// The allocation table, on disk.
#[derive(Debug)]
pub struct Users {
    file: PathBuf,
    range: UidRange,
    host_db: PathBuf,
    taken: Mutex<BTreeMap<String, u32>>,
}

impl Users {
    /// Opens (or starts) the table in `file`; `etc` is where the host's `passwd` and
    /// `group` are (normally `/etc`).
    pub fn open(file: PathBuf, range: UidRange, etc: &Path) -> std::io::Result<Self> {
        range.validate().map_err(std::io::Error::other)?;
        let taken = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            file,
            range,
            host_db: etc.to_owned(),
            taken: Mutex::new(taken),
        })
    }

    /// The uid of `instance`, allocating one if it has none.
    pub fn allocate(&self, instance: &str) -> Result<u32, String> {
        let mut taken = self.taken.lock().expect("users poisoned");
        if let Some(uid) = taken.get(instance) {
            return Ok(*uid);
        }
        let mut host = BTreeSet::new();
        for f in ["passwd", "group"] {
            if let Ok(text) = std::fs::read_to_string(self.host_db.join(f)) {
                host.extend(ids_in(&text));
            }
        }
        for f in ["subuid", "subgid"] {
            if let Ok(text) = std::fs::read_to_string(self.host_db.join(f)) {
                for (first, count) in ranges_in(&text) {
                    // Only the part that overlaps the instances' range matters.
                    let lo = first.max(self.range.first);
                    let hi = first
                        .saturating_add(count)
                        .min(self.range.first.saturating_add(self.range.count));
                    host.extend(lo..hi);
                }
            }
        }
        let used: BTreeSet<u32> = taken.values().copied().collect();
        let uid = lowest_free(self.range, &used, &host).ok_or_else(|| {
            format!(
                "every uid of {}..{} is in use: raise uid_count",
                self.range.first,
                self.range.first as u64 + self.range.count as u64
            )
        })?;
        taken.insert(instance.to_owned(), uid);
        self.save(&taken).map_err(|e| {
            taken.remove(instance);
            format!("cannot record the instance's user: {e}")
        })?;
        Ok(uid)
    }

    /// Frees the uid of `instance` (terminated).
    pub fn release(&self, instance: &str) -> std::io::Result<()> {
        let mut taken = self.taken.lock().expect("users poisoned");
        if let Some(uid) = taken.remove(instance) {
            // Memory and disk agree, whatever happens: not saved, not released.
            self.save(&taken).inspect_err(|_| {
                taken.insert(instance.to_owned(), uid);
            })?;
        }
        Ok(())
    }

    /// Whether `uid` belongs to the configured range.
    pub fn in_range(&self, uid: u32) -> bool {
        self.range.contains(uid)
    }

    fn save(&self, taken: &BTreeMap<String, u32>) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(taken).map_err(std::io::Error::other)?;
        crate::identity::write_atomic(&self.file, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_taken_host_and_zero() {
        let range = UidRange {
            first: 100,
            count: 4,
        };
        let taken = BTreeSet::from([100]);
        let host = ids_in("root:x:0:0::/root:/bin/sh\nsvc:x:101:101::/:/bin/false\n");
        assert_eq!(lowest_free(range, &taken, &host), Some(102));
        let full = BTreeSet::from([100, 102, 103]);
        assert_eq!(lowest_free(range, &full, &host), None);
        assert!(
            UidRange {
                first: 0,
                count: 10
            }
            .validate()
            .is_err()
        );
        assert!(
            UidRange {
                first: u32::MAX - 1,
                count: 5
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn an_instance_keeps_its_uid_across_reopening_until_released() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), "a:x:600000:600000::/:/bin/sh\n").unwrap();
        std::fs::write(dir.path().join("subuid"), "b:600002:3\n").unwrap();
        let range = UidRange {
            first: 600000,
            count: 10,
        };
        let file = dir.path().join("users.json");
        let users = Users::open(file.clone(), range, dir.path()).unwrap();
        let a = users.allocate("i-a").unwrap();
        assert_eq!(a, 600001, "600000 belongs to a host account");
        assert_eq!(users.allocate("i-a").unwrap(), a);
        let b = users.allocate("i-b").unwrap();
        assert_eq!(b, 600005, "600002 to 600004 are a user's subordinate uids");
        drop(users);
        let users = Users::open(file, range, dir.path()).unwrap();
        assert_eq!(users.allocate("i-b").unwrap(), b, "kept across a restart");
        users.release("i-a").unwrap();
        assert_eq!(
            users.allocate("i-c").unwrap(),
            a,
            "a released uid is reused"
        );
    }
}
