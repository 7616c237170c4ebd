//! The example configuration in `deploy/` is valid, complete and equal to the defaults,
//! and environment variables override it.

use std::path::Path;
use std::time::Duration;

use surplus_agent::AgentConfig;

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/agent.example.toml"
    ))
}

#[test]
fn the_example_file_loads_and_states_the_defaults() {
    let loaded = AgentConfig::load(Some(example())).expect("deploy/agent.example.toml loads");
    assert_eq!(
        loaded,
        AgentConfig::default(),
        "the example documents the defaults"
    );
}

#[test]
fn unknown_fields_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "heartbeat_intervall = \"5s\"\n").unwrap();
    let err = AgentConfig::load(Some(&file)).unwrap_err().to_string();
    assert!(err.contains("heartbeat_intervall"), "{err}");
    std::fs::write(&file, "heartbeat_interval = \"often\"\n").unwrap();
    let err = AgentConfig::load(Some(&file)).unwrap_err().to_string();
    assert!(
        err.contains("heartbeat_interval") || err.contains("often"),
        "{err}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let env = [
        ("SURPLUS_AGENT_INVENTORY_INTERVAL", "5m"),
        ("SURPLUS_AGENT_CONTROLLER_ADDRESSES", "a:1,b:2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let loaded = AgentConfig::load_with_env(Some(example()), Some(env)).unwrap();
    assert_eq!(loaded.inventory_interval, Duration::from_secs(300));
    assert_eq!(
        loaded.controller_addresses,
        vec!["a:1".to_string(), "b:2".to_string()]
    );
}
