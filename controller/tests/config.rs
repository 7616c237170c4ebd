//! The example configuration (also the commented file `init` writes) is valid and
//! equal to the defaults; environment variables override it.

use std::path::Path;

use surplus_controller::ControllerConfig;

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/controller.example.toml"
    ))
}

#[test]
fn the_example_file_loads_and_states_the_defaults() {
    let loaded = ControllerConfig::load(example()).expect("deploy/controller.example.toml loads");
    assert_eq!(loaded, ControllerConfig::default());
}

#[test]
fn advertised_addresses_follow_the_listen_addresses_and_names() {
    let mut c = ControllerConfig::default();
    assert_eq!(c.session_addresses(), vec!["localhost:7070".to_string()]);
    c.enroll_listen = "10.0.0.5:9000".parse().unwrap();
    assert_eq!(c.enroll_addresses(), vec!["10.0.0.5:9000".to_string()]);
    c.advertise_enroll = vec!["ctl.example.com:9000".into()];
    assert_eq!(
        c.enroll_addresses(),
        vec!["ctl.example.com:9000".to_string()]
    );
}

#[test]
fn environment_overrides_the_file_and_bad_values_are_named() {
    let env = [
        (
            "SURPLUS_CONTROLLER_SERVER_NAMES",
            "ctl.example.com,10.0.0.5",
        ),
        ("SURPLUS_CONTROLLER_MISSED_HEARTBEATS", "5"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let loaded = ControllerConfig::load_with_env(example(), Some(env)).unwrap();
    assert_eq!(
        loaded.server_names,
        vec!["ctl.example.com".to_string(), "10.0.0.5".to_string()]
    );
    assert_eq!(loaded.missed_heartbeats, 5);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("controller.toml");
    std::fs::write(&file, "http_listen = \"not an address\"\n").unwrap();
    let err = ControllerConfig::load(&file).unwrap_err().to_string();
    assert!(
        err.contains("http_listen") || err.contains("not an address"),
        "{err}"
    );
}
