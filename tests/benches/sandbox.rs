//! `cargo bench -p surplus-tests --bench sandbox`: what the process driver's sandbox
//! costs. Starts and terminates instances through a `ControlPlane` (no controller) and
//! measures: RunInstances until the workload runs, TerminateInstances, the memory the
//! sandbox's supervisor and init keep per instance (they are forks of the agent), and
//! creating a volume (space reserved, ext4 made, loop-mounted). Needs root, cgroups
//! with the pids controller, loop devices and mkfs.ext4. Numbers go to
//! docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use surplus_agent::control::{self, ControlPlane, DriverKind};
use surplus_protocol::clock;
use surplus_protocol::control::*;
use surplus_tests::{CgroupGuard, control_config};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Proportional set size of a process, kB (`/proc/<pid>/smaps_rollup`).
fn pss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn handle(plane: &ControlPlane, command: Command) -> ControlReply {
    plane.handle(command).await.expect("command succeeds")
}

#[tokio::main]
async fn main() {
    let tag = "bench-sandbox";
    let config = control_config(DriverKind::Process, tag);
    let _cgroups = CgroupGuard(config.process.cgroup_parent.clone());
    let dir = tempfile::tempdir().unwrap();
    let driver = control::open_driver(&config, dir.path())
        .await
        .expect("the process driver starts (root, cgroups with pids)");
    let plane = ControlPlane::open(driver, dir.path().join("control"), clock::system(), &config)
        .await
        .unwrap();
    let spec = RunSpec {
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    };

    // Start and stop one at a time.
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let id = new_id(INSTANCE_PREFIX);
        let t = Instant::now();
        handle(
            &plane,
            Command::RunInstances {
                instance_id: id.clone(),
                spec: spec.clone(),
            },
        )
        .await;
        starts.push(t.elapsed());
        let t = Instant::now();
        handle(
            &plane,
            Command::Lifecycle {
                op: Lifecycle::Terminate,
                ids: vec![id],
            },
        )
        .await;
        stops.push(t.elapsed());
    }
    starts.sort();
    stops.sort();
    println!("| operation | p50 | p99 |");
    println!("| --- | --- | --- |");
    println!(
        "| RunInstances (sandbox set up, workload exec'd) | {:.2} ms | {:.2} ms |",
        ms(percentile(&starts, 0.5)),
        ms(percentile(&starts, 0.99))
    );
    println!(
        "| TerminateInstances (SIGTERM, cgroup removed) | {:.2} ms | {:.2} ms |",
        ms(percentile(&stops, 0.5)),
        ms(percentile(&stops, 0.99))
    );

    // Memory of the sandbox's own processes with 20 instances running, after the agent
    // side has done some work.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = new_id(INSTANCE_PREFIX);
        handle(
            &plane,
            Command::RunInstances {
                instance_id: id.clone(),
                spec: spec.clone(),
            },
        )
        .await;
        ids.push(id);
    }
    for _ in 0..200 {
        handle(&plane, Command::DescribeInstances(Filters::default())).await;
    }
    let mut supervisors = Vec::new();
    for id in &ids {
        let procs = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/pids/{}/{id}/cgroup.procs",
            config.process.cgroup_parent
        ))
        .unwrap_or_default();
        for pid in procs.lines() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("surplus-") {
                supervisors.push(pss_kb(pid));
            }
        }
    }
    let total: u64 = supervisors.iter().sum();
    println!(
        "| memory of the supervisor and init (PSS), 20 instances | {} kB per instance | {} kB in all |",
        total / ids.len() as u64,
        total
    );
    handle(
        &plane,
        Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids,
        },
    )
    .await;

    // Volumes: space reserved, ext4 made, loop-mounted; and deleted.
    for size in [64u64 << 20, 1 << 30] {
        let id = new_id(VOLUME_PREFIX);
        let t = Instant::now();
        handle(
            &plane,
            Command::CreateVolume {
                volume_id: id.clone(),
                name: None,
                size_bytes: size,
            },
        )
        .await;
        let created = t.elapsed();
        let t = Instant::now();
        handle(&plane, Command::DeleteVolume { volume_id: id }).await;
        println!(
            "| CreateVolume {} MiB / DeleteVolume | {:.1} ms | {:.1} ms |",
            size >> 20,
            ms(created),
            ms(t.elapsed())
        );
    }
}
