//! Checks of the controller's OpenAPI document by independent tools: the
//! `openapi-spec-validator` package (PyPI) for the document itself, and its
//! `jsonschema` dependency for real answers against the schemas the document gives.
//! `.ci/run` installs the package; a test without it fails naming what to install.

use std::process::Command;

use serde_json::Value;

const INSTALL: &str = "python3 -m pip install openapi-spec-validator (.ci/run installs it)";

/// Runs `python3 args`, failing the test with its output when it fails.
fn python(args: &[&str], what: &str) -> String {
    let out = Command::new("python3")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed to {what}: {e}; install it, then {INSTALL}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("No module named") {
        panic!("{what}: the validator is missing: {INSTALL}\n{text}");
    }
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Validates `doc` as an OpenAPI document with `openapi-spec-validator`.
pub fn validate_document(doc: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    python(
        &["-m", "openapi_spec_validator", file.to_str().unwrap()],
        "validate the OpenAPI document",
    );
}

/// One real answer of the API: `route` in the router's syntax (`/v1/agents/{id}`).
#[derive(Debug, serde::Serialize)]
pub struct Answer {
    /// The method.
    pub method: String,
    /// The route.
    pub route: String,
    /// The status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

/// Checks every answer against the schema `doc` documents for its route and status.
/// Returns the validator's summary line.
pub fn check_answers(doc: &Value, answers: &[Answer]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "answers.py",
            include_str!("openapi/answers.py").as_bytes().to_vec(),
        ),
        ("openapi.json", serde_json::to_vec(doc).unwrap()),
        ("answers.json", serde_json::to_vec(answers).unwrap()),
    ];
    for (name, bytes) in &files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    python(
        &[
            &path("answers.py"),
            &path("openapi.json"),
            &path("answers.json"),
        ],
        "check the API's answers against its OpenAPI document",
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc() -> Value {
        json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {"/x": {"get": {"responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                "4XX": {"description": "no", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }}}},
            "components": {"schemas": {
                "Thing": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
            }}
        })
    }

    fn answer(status: u16, body: Value) -> Answer {
        Answer {
            method: "GET".into(),
            route: "/x".into(),
            status,
            body,
        }
    }

    #[test]
    fn answers_that_match_their_schemas_pass() {
        let summary = check_answers(
            &doc(),
            &[
                answer(200, json!({"n": 1})),
                answer(404, json!({"error": "not_found"})),
            ],
        );
        assert!(summary.starts_with("2 answers checked"), "{summary}");
        validate_document(&doc());
    }

    #[test]
    #[should_panic(expected = "at /n")]
    fn an_answer_unlike_its_schema_fails() {
        check_answers(&doc(), &[answer(200, json!({"n": "one"}))]);
    }

    #[test]
    #[should_panic(expected = "status is not documented")]
    fn an_undocumented_status_fails() {
        check_answers(&doc(), &[answer(500, json!({"error": "internal"}))]);
    }
}
