"""Every curl and Python example in the README runs against a live gateway and succeeds.

The README's examples address 127.0.0.1:8080 and the model "all-minilm" (what `make run`
serves); here a fake-engine worker serves "all-minilm" on a gateway at an ephemeral port.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.system.conftest import REPO, Cluster, fake_worker_config

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", README, flags=re.S)
CURLS = [code.strip() for lang, code in BLOCKS if lang == "sh" and code.lstrip().startswith("curl ")]
PYTHONS = [code for lang, code in BLOCKS if lang == "python"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("readme"))
    gw = cluster.gateway()
    cluster.worker(fake_worker_config(gw.url, "all-minilm", dimensions=384, max_model_len=256))
    gw.wait_for_model("all-minilm")
    yield gw
    cluster.stop_all()


def _here(code: str, gateway) -> str:
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{gateway.port}")


def test_the_readme_has_examples_for_every_dialect():
    assert any("/v1/embeddings" in c for c in CURLS) and any("/api/embed" in c for c in CURLS)
    imported = {module for code in PYTHONS for module in re.findall(r"(?:from|import) (\w+)", code)}
    assert {"openai", "ollama", "aleph_alpha_client", "cohere"} <= imported


@pytest.mark.parametrize("command", CURLS, ids=[c.split()[1] for c in CURLS])
def test_curl_example(gateway, command):
    result = subprocess.run(
        ["bash", "-c", _here(command, gateway) + " --silent --show-error --fail-with-body"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert "error" not in answer
    vectors = [d["embedding"] for d in answer["data"]] if "data" in answer else answer["embeddings"]
    assert [len(v) for v in vectors] == [384, 384]


@pytest.mark.parametrize("code", PYTHONS, ids=[re.search(r"import (\w+)", c).group(1) for c in PYTHONS])
def test_python_example(gateway, code):
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _here(code, gateway)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "384" in result.stdout or "all-minilm" in result.stdout, result.stdout


TENANCY = (REPO / "docs" / "tenancy.md").read_text()
TENANCY_BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", TENANCY, flags=re.S)
ADMIN_TOKEN = "admin-token-of-the-docs-test"


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenancy-docs")
    cluster = Cluster(tmp)
    gw = cluster.gateway(env={"EMBEDQ_KEYS_DB": str(tmp / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN_TOKEN})
    cluster.worker(fake_worker_config(gw.url, "all-minilm", dimensions=384, max_model_len=256))
    gw.wait_for_model("all-minilm")
    yield gw
    cluster.stop_all()


def test_the_tenancy_pages_examples_run(keyed_gateway):
    """docs/tenancy.md: the admin API by curl, then a key's use and its usage from Python."""
    assert {lang for lang, _ in TENANCY_BLOCKS} == {"sh", "python"}
    env = {**os.environ, "ADMIN_TOKEN": ADMIN_TOKEN}
    for lang, code in TENANCY_BLOCKS:
        command = ["bash", "-c", _here(code, keyed_gateway).strip() + " --fail-with-body"] if lang == "sh" else [
            sys.executable, "-W", "error", "-c", _here(code, keyed_gateway)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        if lang == "sh":
            assert json.loads(result.stdout)["key"].startswith("eq-")
        else:
            lines = result.stdout.splitlines()
            assert lines[0] == "59 of 60 left this minute" and lines[1].endswith(" tokens"), result.stdout
            assert "'docs-team'" in lines[2] and "'prompt_tokens': " + lines[1].split()[0] in lines[2], result.stdout


BATCHES = (REPO / "docs" / "batches.md").read_text()


def test_the_batches_pages_example_runs(gateway):
    """docs/batches.md: a file uploaded, a batch run, its output read, with the openai client."""
    (code,) = re.findall(r"```python\n(.*?)```", BATCHES, flags=re.S)
    result = subprocess.run([sys.executable, "-W", "error", "-c", _here(code, gateway)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["completed 3 of 3", "doc-0 384", "doc-1 384", "doc-2 384"], result.stdout
