"""Property-based tests of the whole API from its OpenAPI document (schemathesis), against
a live server: no server errors and no response that the document does not allow."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from .helpers import Client
from .processes import Server, start_server

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "unsupported_method",
    ]
)
EXAMPLES = os.environ.get("LINGER_TEST_SCHEMATHESIS_EXAMPLES", "20")


async def test_openapi_document_is_served(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.resource is not None
    }
    assert documented == routed


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


async def test_schemathesis_finds_no_errors(servers: list[Server], server_args: list[str]) -> None:
    server = await start_server(servers, *server_args, "--poll-max", "0.05")
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{server.base}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        EXAMPLES,
        # One worker: with two threads, hypothesis' lambda descriptions (ast.parse) hit
        # CPython 3.11's "AST constructor recursion depth mismatch", an error of the
        # tool's own, reported as a runtime error of the run.
        "--workers",
        "1",
        "--no-color",
        "--suppress-health-check",
        "all",
        "--seed",
        "1",
        # The coverage phase of schemathesis 4.32 stops on an internal error of its own.
        "--phases",
        "examples,fuzzing,stateful",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    assert process.returncode == 0, output.decode()[-8000:]
    assert "Traceback" not in server.stderr()
