"""The README's curl examples, run as written against a real `recsys-serve` process."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.helpers import Server, running_server

README = Path(__file__).resolve().parents[1] / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:8000"


def curl_commands() -> list[str]:
    """Every `curl` command in the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    joined = [b.replace("\\\n", " ") for b in blocks]
    return [line.strip() for block in joined for line in block.splitlines()
            if line.strip().startswith("curl ")]


def test_readme_has_examples_for_every_endpoint() -> None:
    text = " ".join(curl_commands())
    for path in ("/v1/score", "/v1/recommend", "/v1/model", "/v1/admin/reload", "/healthz",
                 "/readyz", "/metrics"):
        assert DOCUMENTED_URL + path in text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path,
           redis_url: str) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("readme"), model_store, redis_url,
                        "readme") as server:
        yield server


@pytest.mark.parametrize("command", curl_commands())
def test_readme_example_runs(server: Server, command: str) -> None:
    # The same command, pointed at this test's server instead of the documented port.
    local = command.replace(DOCUMENTED_URL, f"http://127.0.0.1:{server.port}")
    done = subprocess.run(["bash", "-c", local + " -w '\\n%{http_code}'"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", (command, done.stdout, server.log())
    if "/metrics" not in command:
        assert "error" not in json.loads(body)
