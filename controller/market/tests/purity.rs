//! `surplus-market` never does I/O: its normal dependency closure holds no async
//! runtime, database driver, network stack or random number generator; nor does
//! `surplus-api`, the bodies built on its records. Read from
//! `cargo tree`, so a dependency added anywhere below it fails here by name.

use std::collections::BTreeSet;
use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "sqlx",
    "quinn",
    "axum",
    "reqwest",
    "rand",
    "mio",
    "hyper",
    "libsqlite3-sys",
];

/// The names of the crates `package` links on this platform, transitively, without
/// dev-dependencies (`cargo tree -e normal`, which resolves features as a build does),
/// with every feature of `package` on (the `openapi` schemas included).
fn closure(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--all-features",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(names.contains(package), "cargo tree printed no {package}");
    names
}

fn forbidden_in(package: &str) -> Vec<String> {
    closure(package)
        .into_iter()
        .filter(|n| FORBIDDEN.contains(&n.as_str()))
        .collect()
}

#[test]
fn the_market_crate_never_links_io_or_randomness() {
    assert_eq!(
        forbidden_in("surplus-market"),
        Vec::<String>::new(),
        "surplus-market must stay pure: these crates entered its dependency closure"
    );
    // The API's bodies are plain data too: the CLI and the console link them.
    assert_eq!(
        forbidden_in("surplus-api"),
        Vec::<String>::new(),
        "surplus-api must stay plain data: these crates entered its dependency closure"
    );
    // The check sees what it looks for: the controller links all of these.
    let controller = forbidden_in("surplus-controller");
    for name in ["tokio", "sqlx", "quinn", "axum", "reqwest"] {
        assert!(
            controller.contains(&name.to_owned()),
            "{name} not found in the controller's closure: {controller:?}"
        );
    }
}
