"""Wire formats: the results frame, input parsing, rendering, and the gateway's settings."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from contract.frames import FrameError, decode_results, encode_results
from contract.messages import JobResult, ResultsHeader
from gateway.dialects.openai import parse_inputs, render_embeddings
from gateway.errors import InvalidRequest, WrongType
from gateway.settings import SettingsError, load_settings


def _header(*shapes: tuple[int, int]) -> ResultsHeader:
    return ResultsHeader(
        worker_id="w",
        results=[
            JobResult(job_id=f"j{i}", lease_id="l", rows=r, dims=d, prompt_tokens=[1] * r) for i, (r, d) in enumerate(shapes)
        ],
    )


def test_results_frame_round_trips_float32_exactly():
    rng = np.random.default_rng(0)
    matrices = [rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((1, 5)).astype(np.float32)]
    header, decoded = decode_results(encode_results(_header((2, 3), (1, 5)), matrices))
    assert header.results[1].dims == 5
    for sent, got in zip(matrices, decoded):
        assert got.dtype == np.float32 and np.array_equal(sent, got)


@pytest.mark.parametrize(
    "mangle",
    [lambda f: f[:2], lambda f: f[:-4], lambda f: f + b"\0\0\0\0", lambda f: b"\xff\xff\x00\x00" + f[4:]],
    ids=["no-prefix", "short-body", "long-body", "header-past-end"],
)
def test_results_frame_that_disagrees_with_its_header_is_refused(mangle):
    frame = encode_results(_header((2, 3)), [np.zeros((2, 3), np.float32)])
    with pytest.raises(FrameError):
        decode_results(mangle(frame))


def test_job_result_needs_a_token_count_per_row():
    with pytest.raises(ValueError, match="prompt_tokens"):
        JobResult(job_id="j", lease_id="l", rows=2, dims=3, prompt_tokens=[1])


@pytest.mark.parametrize(
    ("raw", "expected", "single"),
    [
        ("hello", ["hello"], True),
        (["a", "b"], ["a", "b"], False),
        ([1, 2, 3], [[1, 2, 3]], True),
        ([[1, 2], [3]], [[1, 2], [3]], False),
    ],
)
def test_the_four_input_shapes(raw, expected, single):
    assert parse_inputs(raw, max_inputs=2048) == (expected, single)


@pytest.mark.parametrize(
    ("raw", "error", "param"),
    [
        ("", InvalidRequest, "input"),
        ([], InvalidRequest, "input"),
        (["a", ""], InvalidRequest, "input[1]"),
        (["a", 3], WrongType, "input[1]"),
        ([1, "a"], WrongType, "input[1]"),
        ([[1], "a"], WrongType, "input[1]"),
        ([[1], []], InvalidRequest, "input[1]"),
        ([[1, -1]], InvalidRequest, "input[0]"),
        ([[1] * 131_073], InvalidRequest, "input[0]"),  # beyond any model's context: refused before its ids are read
        ([1] * 131_073, InvalidRequest, "input"),
        ([2**40], InvalidRequest, "input"),
        ([True, False], WrongType, "input[0]"),
        ([None], WrongType, "input[0]"),
        ({"text": "a"}, WrongType, "input"),
        (42, WrongType, "input"),
        (["x"] * 2049, InvalidRequest, "input"),
    ],
)
def test_bad_inputs_name_the_offending_item(raw, error, param):
    with pytest.raises(error) as info:
        parse_inputs(raw, max_inputs=2048)
    assert info.value.param == param
    assert param.split("[")[0] in info.value.message


def test_render_float_and_base64_carry_the_same_float32_values():
    vectors = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    as_float = orjson.loads(render_embeddings("m", vectors, 7, "float"))
    as_b64 = orjson.loads(render_embeddings("m", vectors, 7, "base64"))
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in as_float["data"]] == [0, 1]
    for i in range(2):
        from_float = np.array(as_float["data"][i]["embedding"], dtype=np.float32)
        from_b64 = np.frombuffer(base64.b64decode(as_b64["data"][i]["embedding"]), dtype="<f4")
        assert np.array_equal(from_float, vectors[i]) and np.array_equal(from_b64, vectors[i])


def test_settings_from_environment():
    settings = load_settings({"EMBEDQ_WORKER_TOKENS": "a, b,,", "EMBEDQ_REQUEST_TIMEOUT_S": "90"}, port=9000)
    assert settings.worker_tokens == ("a", "b") and settings.request_timeout_s == 90 and settings.port == 9000


def test_the_defaults_leave_time_to_recompute_a_dead_or_stuck_workers_jobs():
    settings = load_settings({})
    assert settings.worker_ttl_s + settings.lease_ttl_s <= settings.request_timeout_s


@pytest.mark.parametrize("variable", ["EMBEDQ_WORKER_TTL_S", "EMBEDQ_LEASE_TTL_S"])
def test_a_failure_detection_that_outlasts_half_the_request_is_refused_naming_both(variable):
    with pytest.raises(SettingsError) as refused:
        load_settings({variable: "31"})  # the request timeout is 60 s
    assert variable in str(refused.value) and "EMBEDQ_REQUEST_TIMEOUT_S" in str(refused.value)
    assert load_settings({variable: "31", "EMBEDQ_REQUEST_TIMEOUT_S": "62"})


def test_settings_errors_name_the_variable():
    with pytest.raises(SettingsError, match="EMBEDQ_MAX_ATTEMPTS"):
        load_settings({"EMBEDQ_MAX_ATTEMPTS": "zero"})


def test_open_workers_only_on_loopback():
    assert load_settings({}, host="127.0.0.1").workers_open
    assert load_settings({}, host="::1").workers_open
    with pytest.raises(SettingsError, match="EMBEDQ_WORKER_TOKENS"):
        load_settings({}, host="0.0.0.0")
    keys = {"EMBEDQ_KEYS_FILE": "/keys.json"}
    assert load_settings({"EMBEDQ_WORKER_TOKENS": "t", **keys}, host="0.0.0.0").worker_tokens == ("t",)
    assert load_settings({"EMBEDQ_ALLOW_OPEN_WORKERS": "true", **keys}, host="0.0.0.0").workers_open


def test_anonymous_clients_only_on_loopback():
    assert load_settings({}, host="127.0.0.1").clients_open
    with pytest.raises(SettingsError, match="EMBEDQ_KEYS_DB"):
        load_settings({"EMBEDQ_WORKER_TOKENS": "t"}, host="0.0.0.0")
    assert load_settings({"EMBEDQ_WORKER_TOKENS": "t", "EMBEDQ_ALLOW_ANONYMOUS_CLIENTS": "1"}, host="0.0.0.0").clients_open
    with pytest.raises(SettingsError, match="not more"):
        load_settings({"EMBEDQ_KEYS_DB": "a", "EMBEDQ_KEYS_FILE": "b"})
