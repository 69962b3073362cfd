"""The worker's config.toml: the operators' format loads exactly; mistakes name their key path."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests import REPO
from worker.__main__ import main as worker_main
from worker.config import ConfigError, FakeGenerator, VllmGenerator, load_config, parse_config

# DESIGN.md's file, verbatim.
DESIGN_CONFIG = """\
edition = 1

[generator]
type = "vllm"
model_path = "/path/to/weights/Qwen/Qwen3-Embedding-8B"
max_model_len = 2048
max_num_seqs = 16
pipeline_parallel_size = 1
tensor_parallel_size = 1
task = "embed"

[queue]
url = "https://inference-api.pharia.example.com"
token = "worker-token"
checkpoint_name = "qwen3-embedding-8b"
version = 1
tags = []
http_request_retries = 7
service_name = "worker"
service_role = "Worker"

[queue.models."qwen3-embedding-8b"]
maximum_completion_tokens = 2048
description = "Description of the embedding model"

[queue.models."qwen3-embedding-8b".embedding_task]
supported = true

[monitoring]
metrics_port = 4000
tcp_probes = []
"""


def test_design_file_loads_with_every_value():
    config = parse_config(DESIGN_CONFIG)
    gen = config.generator
    assert isinstance(gen, VllmGenerator)
    assert (gen.model_path, gen.max_model_len, gen.max_num_seqs) == ("/path/to/weights/Qwen/Qwen3-Embedding-8B", 2048, 16)
    assert (gen.pipeline_parallel_size, gen.tensor_parallel_size, gen.task) == (1, 1, "embed")
    q = config.queue
    assert (q.url, q.token, q.checkpoint_name, q.version, q.tags) == (
        "https://inference-api.pharia.example.com",
        "worker-token",
        "qwen3-embedding-8b",
        1,
        [],
    )
    assert (q.http_request_retries, q.service_name, q.service_role) == (7, "worker", "Worker")
    model = q.models["qwen3-embedding-8b"]
    assert (model.maximum_completion_tokens, model.description) == (2048, "Description of the embedding model")
    assert model.embedding_task.supported is True
    assert (config.monitoring.metrics_port, config.monitoring.tcp_probes) == (4000, [])


@pytest.mark.parametrize("path", ["config.toml.example", "examples/all-minilm.toml"])
def test_shipped_examples_load(path):
    load_config(REPO / path)


def test_example_is_the_design_file_plus_comments():
    """config.toml.example documents the operators' file; it must not drift from it."""
    assert parse_config((REPO / "config.toml.example").read_text()) == parse_config(DESIGN_CONFIG)


def _error_for(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("max_model_len = 2048", "max_model_ln = 2048", "generator.max_model_ln: unknown key"),
        ("[monitoring]", "[monitoring]\nmetrics_prot = 1", "monitoring.metrics_prot: unknown key"),
        ("supported = true", "supportd = true", "queue.models.qwen3-embedding-8b.embedding_task.supportd: unknown key"),
        ("edition = 1", "edition = 1\nediton = 2", "editon: unknown key"),
        ("[monitoring]", "[monitorin]", "monitorin: unknown key"),
        ('checkpoint_name = "qwen3-embedding-8b"\n', "", "queue.checkpoint_name: missing required key"),
        ("max_num_seqs = 16", 'max_num_seqs = "16"', "generator.max_num_seqs: Input should be a valid integer"),
        ("max_num_seqs = 16", "max_num_seqs = 0", "generator.max_num_seqs: Input should be greater than 0"),
        ('task = "embed"', 'task = "generate"', "generator.task: Input should be 'embed'"),
        ('type = "vllm"', 'type = "tgi"', "generator.type: must be one of 'vllm', 'fake', got 'tgi'"),
        (
            'url = "https://inference-api.pharia.example.com"',
            'url = "inference-api"',
            "queue.url: must be an http:// or https:// URL",
        ),
        ("tcp_probes = []", 'tcp_probes = ["db"]', "monitoring.tcp_probes: each probe must be 'host:port'"),
        ("edition = 1", "edition = 2", "edition: Input should be 1"),
        ("supported = true", "supported = false", "no model has embedding_task.supported = true"),
    ],
)
def test_mistakes_name_the_key_path(old, new, expected):
    assert old in DESIGN_CONFIG
    assert expected in _error_for(DESIGN_CONFIG.replace(old, new, 1))


def test_model_names_that_need_quotes_are_quoted():
    text = (
        DESIGN_CONFIG.replace('"qwen3-embedding-8b"]', '"acme/embed v2"]')
        .replace('"qwen3-embedding-8b".embedding_task]', '"acme/embed v2".embedding_task]')
        .replace("supported = true", "suported = true")
    )
    assert 'queue.models."acme/embed v2".embedding_task.suported: unknown key' in _error_for(text)


def test_every_problem_is_reported_at_once():
    text = DESIGN_CONFIG.replace("max_model_len", "max_model_ln").replace("metrics_port", "metric_port")
    message = _error_for(text)
    assert "generator.max_model_ln" in message and "monitoring.metric_port" in message


def test_invalid_toml_is_an_error_with_a_position():
    assert "not valid TOML" in _error_for("edition = \n")


def test_fake_generator_has_defaults():
    text = DESIGN_CONFIG.split("[queue]")[1]
    config = parse_config('edition = 1\n[generator]\ntype = "fake"\n[queue]' + text)
    assert config.generator == FakeGenerator(type="fake")
    assert config.generator.delay_s == 0 and config.generator.dimensions == 384


def test_vllm_is_the_default_nowhere():
    """There is no default generator: a file without [generator] is rejected."""
    without_generator = DESIGN_CONFIG.split("[generator]")[0] + "[queue]" + DESIGN_CONFIG.split("[queue]")[1]
    assert "generator: missing required key" in _error_for(without_generator)


@dataclass
class Checked:
    returncode: int
    stdout: str
    stderr: str


def _check(path, capsys) -> Checked:
    """``python -m worker --config PATH --check``, in process."""
    code = worker_main(["--config", str(path), "--check"])
    out = capsys.readouterr()
    return Checked(code, out.out, out.err)


def test_check_prints_resolved_config_and_masks_token(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(DESIGN_CONFIG)
    result = _check(path, capsys)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["queue"]["token"] == "***"
    assert "worker-token" not in result.stdout + result.stderr
    assert resolved["generator"]["dtype"] == "auto"  # defaults are shown
    assert resolved["resolved"]["dtype"] in ("bfloat16", "float32") and resolved["resolved"]["why"]  # and what it means here
    assert "generator.model_path" in result.stderr and "does not exist" in result.stderr  # a warning only


def test_check_fails_with_the_key_path(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(DESIGN_CONFIG.replace("max_model_len", "max_model_ln"))
    result = _check(path, capsys)
    assert result.returncode == 2
    assert "generator.max_model_ln: unknown key" in result.stderr


def test_check_of_a_missing_file_fails(tmp_path, capsys):
    result = _check(tmp_path / "absent.toml", capsys)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_the_token_may_come_from_a_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-a-secret\n")
    config = parse_config(DESIGN_CONFIG.replace('token = "worker-token"', f'token_file = "{secret}"'))
    assert config.queue.resolved_token() == "from-a-secret"
    assert "not both" in _error_for(DESIGN_CONFIG.replace('token = "worker-token"', 'token = "a"\ntoken_file = "b"'))
    missing = parse_config(DESIGN_CONFIG.replace('token = "worker-token"', f'token_file = "{tmp_path / "absent"}"'))
    with pytest.raises(ConfigError, match="queue.token_file"):
        missing.queue.resolved_token()
