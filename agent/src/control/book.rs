//! The agent's record of the instances and volumes it hosts: one JSON file per thing,
//! written atomically, read once at start. It is what lets a restarted agent re-adopt
//! running instances instead of orphaning or duplicating them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use surplus_protocol::control::{Instance, Volume};

use crate::identity::write_atomic;

/// Instances and volumes, in memory and on disk.
pub struct Book {
    dir: PathBuf,
    instances: Mutex<HashMap<String, Instance>>,
    volumes: Mutex<HashMap<String, Volume>>,
}

fn load<T: DeserializeOwned>(dir: &std::path::Path) -> std::io::Result<Vec<T>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => out.push(v),
            // One damaged record must not stop the agent; it is left for an operator.
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable control record skipped")
            }
        }
    }
    Ok(out)
}

fn save<T: Serialize>(dir: &std::path::Path, id: &str, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(format!("{id}.json")), &bytes, 0o600)
}

impl Book {
    /// Opens (creating) the book in `dir`.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        let instances = load::<Instance>(&dir.join("instances"))?
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        let volumes = load::<Volume>(&dir.join("volumes"))?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        Ok(Self {
            dir,
            instances: Mutex::new(instances),
            volumes: Mutex::new(volumes),
        })
    }

    /// Every instance.
    pub fn instances(&self) -> Vec<Instance> {
        let mut all: Vec<_> = self
            .instances
            .lock()
            .expect("book poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|i| (i.launched_at_ms, i.id.clone()));
        all
    }

    /// One instance.
    pub fn instance(&self, id: &str) -> Option<Instance> {
        self.instances
            .lock()
            .expect("book poisoned")
            .get(id)
            .cloned()
    }

    /// Records `instance` on disk, then in memory.
    pub fn put_instance(&self, instance: &Instance) -> std::io::Result<()> {
        save(&self.dir.join("instances"), &instance.id, instance)?;
        self.instances
            .lock()
            .expect("book poisoned")
            .insert(instance.id.clone(), instance.clone());
        Ok(())
    }

    /// Forgets an instance, on disk first.
    pub fn remove_instance(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join("instances").join(format!("{id}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.instances.lock().expect("book poisoned").remove(id);
        Ok(())
    }

    /// Every volume.
    pub fn volumes(&self) -> Vec<Volume> {
        let mut all: Vec<_> = self
            .volumes
            .lock()
            .expect("book poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|v| (v.created_at_ms, v.id.clone()));
        all
    }

    /// One volume.
    pub fn volume(&self, id: &str) -> Option<Volume> {
        self.volumes.lock().expect("book poisoned").get(id).cloned()
    }

    /// Records `volume` on disk, then in memory.
    pub fn put_volume(&self, volume: &Volume) -> std::io::Result<()> {
        save(&self.dir.join("volumes"), &volume.id, volume)?;
        self.volumes
            .lock()
            .expect("book poisoned")
            .insert(volume.id.clone(), volume.clone());
        Ok(())
    }
}
