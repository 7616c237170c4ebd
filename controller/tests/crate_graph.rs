//! The controller and the `surplus` CLI link the agent library only for `demo`: built
//! without default features, their dependency closure holds no agent crate (and so
//! none of bollard, sysinfo, hyper's client stack the agent brings).

use std::process::Command;

/// The package names in `cargo tree` of the controller with `features`.
fn normal_closure(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "surplus-controller",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(features)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn without_demo_the_controller_links_no_agent() {
    let lean = normal_closure(&["--no-default-features"]);
    assert!(
        lean.iter().any(|name| name == "surplus-runtime"),
        "{lean:?}"
    );
    for banned in ["surplus-agent", "bollard", "sysinfo"] {
        assert!(
            !lean.iter().any(|name| name == banned),
            "{banned} is in the controller's closure without `demo`"
        );
    }
    // The check can fail: with the default features the agent is there.
    let full = normal_closure(&[]);
    assert!(full.iter().any(|name| name == "surplus-agent"), "{full:?}");
}
