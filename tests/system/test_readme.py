"""Every curl and Python example in the README runs against a live gateway and succeeds.

The README's examples address 127.0.0.1:8080 and the model "all-minilm" (what `make run`
serves); here a fake-engine worker serves "all-minilm" on a gateway at an ephemeral port.
"""

from __future__ import annotations

import json
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
    assert {"openai", "ollama", "aleph_alpha_client"} <= imported


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
