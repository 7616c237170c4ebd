"""Checks real answers of the Surplus API against its own OpenAPI document.

argv: the document (JSON), the answers (a JSON list of {method, route, status, body}).
Each body must match the schema the document gives for that route and status (the
exact status, else 4XX/5XX). JSON Schema 2020-12, as OpenAPI 3.1 uses. Exit 1 with one
line per mismatch.
"""
import json
import sys

from jsonschema import Draft202012Validator

doc = json.load(open(sys.argv[1]))
answers = json.load(open(sys.argv[2]))
bad = []
checked = 0
for a in answers:
    where = f"{a['method']} {a['route']} -> {a['status']}"
    op = doc["paths"].get(a["route"], {}).get(a["method"].lower())
    if op is None:
        bad.append(f"{where}: the route is not in the document")
        continue
    status = str(a["status"])
    responses = op["responses"]
    response = responses.get(status) or responses.get(status[0] + "XX")
    if response is None:
        bad.append(f"{where}: the status is not documented ({sorted(responses)})")
        continue
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        continue
    # References are "#/components/schemas/...": resolve them against a root that
    # carries the document's components.
    root = dict(schema, components=doc["components"])
    errors = sorted(Draft202012Validator(root).iter_errors(a["body"]), key=lambda e: list(e.absolute_path))
    checked += 1
    for e in errors[:3]:
        path = "/".join(str(p) for p in e.absolute_path)
        bad.append(f"{where}: at /{path}: {e.message[:300]}")
print(f"{checked} answers checked against their documented schemas")
if bad:
    print("\n".join(bad))
    sys.exit(1)
