//! The benchmark suite on this host (quick sizes): figures are positive and in their
//! units, runs are cancellable and bounded by their budget, and the scratch file is
//! always removed. Speed itself is measured in `docs/PERFORMANCE.md`, not asserted.

use std::sync::atomic::{AtomicBool, Ordering};

use surplus_agent::bench::run;
use surplus_protocol::bench::BenchPlan;

fn plan(dir: &std::path::Path) -> BenchPlan {
    BenchPlan {
        budget_ms: 120_000,
        scratch_dir: dir.display().to_string(),
        storage_bytes: 16 << 20,
        repetitions: 3,
        quick: true,
    }
}

fn leftovers(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn every_figure_is_positive_and_in_its_unit_and_runs_agree() {
    let dir = tempfile::tempdir().unwrap();
    let never = AtomicBool::new(false);
    let mut steps = Vec::new();
    let first = run(&plan(dir.path()), None, &never, |p| steps.push(p));
    assert!(
        !first.cancelled && first.skipped.is_empty(),
        "{:?}",
        first.skipped
    );
    let units = [
        ("cpu.int", "Mops/s"),
        ("cpu.float", "MFLOP/s"),
        ("cpu.sha256", "MB/s"),
        ("memory.latency", "ns"),
        ("memory.usable", "bytes"),
        ("memory.", "MB/s"),
        ("storage.free", "bytes"),
        ("storage.seq", "MB/s"),
        ("storage.rand", "IOPS"),
    ];
    for r in &first.results {
        let unit = units
            .iter()
            .find(|(p, _)| r.id.starts_with(p))
            .map(|(_, u)| *u)
            .unwrap_or("?");
        assert_eq!(r.unit, unit, "{}", r.id);
        assert!(
            r.value > 0.0 && r.value.is_finite(),
            "{} = {}",
            r.id,
            r.value
        );
        assert!(
            r.repetitions.iter().all(|x| *x > 0.0 && x.is_finite()),
            "{}: {:?}",
            r.id,
            r.repetitions
        );
        assert!(r.cv >= 0.0 && r.cv.is_finite());
        assert!(r.reference == 0.0 || r.score > 0.0, "{} is scored", r.id);
    }
    for id in [
        "cpu.int.single",
        "cpu.sha256.multi",
        "memory.triad",
        "memory.latency",
        "memory.usable",
        "storage.seqwrite",
        "storage.randread",
    ] {
        assert!(first.results.iter().any(|r| r.id == id), "missing {id}");
    }
    let usable = first
        .results
        .iter()
        .find(|r| r.id == "memory.usable")
        .unwrap();
    assert_eq!(
        usable.value,
        (32 << 20) as f64,
        "every page written was read back"
    );
    assert_eq!(
        steps.last().map(|p| (p.done, p.total)),
        Some((10, 10)),
        "progress reaches the end"
    );
    assert_eq!(leftovers(dir.path()), 0, "the scratch file is deleted");

    // A second run agrees with the first in ratio (loosely: tests share the machine).
    let second = run(&plan(dir.path()), None, &never, |_| {});
    let ratio = first.composite_score / second.composite_score;
    assert!(
        first.composite_score > 0.0 && (0.5..2.0).contains(&ratio),
        "composite {} vs {}",
        first.composite_score,
        second.composite_score
    );
}

#[test]
fn cancellation_stops_the_run_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = AtomicBool::new(false);
    let report = run(&plan(dir.path()), None, &cancel, |p| {
        if p.step == "memory.stream" {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    assert!(report.cancelled);
    assert!(
        report.results.iter().all(|r| r.id.starts_with("cpu.")),
        "nothing after the cancellation ran: {:?}",
        report.results.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    assert_eq!(report.results.len(), 6);
    assert_eq!(leftovers(dir.path()), 0);
}

#[test]
fn an_exhausted_budget_skips_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &BenchPlan {
            budget_ms: 0,
            ..plan(dir.path())
        },
        None,
        &AtomicBool::new(false),
        |_| {},
    );
    assert!(report.results.is_empty());
    assert_eq!(report.skipped.len(), 10);
    assert!(report.skipped[0].contains("budget"));
    assert_eq!(report.composite_score, 0.0);
}

#[test]
fn an_unusable_scratch_directory_is_reported_not_fatal() {
    let report = run(
        &plan(std::path::Path::new("/nonexistent/surplus")),
        None,
        &AtomicBool::new(false),
        |_| {},
    );
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.starts_with("storage: cannot use /nonexistent/surplus")),
        "{:?}",
        report.skipped
    );
    assert!(!report.cancelled);
}
