"""A batch's input file, read and checked as OpenAI checks it before running anything: one JSON
object per line with a unique ``custom_id``, ``method`` POST, ``url`` the batch's endpoint and a
``body`` naming a model the key may use. The first problems found (at most ``MAX_ERRORS``) fail
the batch, each naming its line (counted from 1) in OpenAI's codes. What is wrong inside a body
(an empty input, say) is not the file's fault: that line's answer is the 400 that
``/v1/embeddings`` would give, in the error file, as OpenAI does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_ERRORS = 100
ENDPOINTS = ("/v1/embeddings",)


@dataclass(frozen=True)
class Line:
    custom_id: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def inputs(self) -> int:
        """How many inputs it sends (what it weighs in the batch's window)."""
        raw = self.body.get("input")
        return len(raw) if isinstance(raw, list) and raw and not isinstance(raw[0], int) else 1


def problem(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def read_lines(content: bytes, endpoint: str, model_known: Callable[[str], str | None]) -> tuple[list[Line], list[dict]]:
    """The file's lines, or what is wrong with it. ``model_known(name)``: None if the key may use
    the model, else why not."""
    lines: list[Line] = []
    errors: list[dict] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.splitlines(), start=1):
        if len(errors) >= MAX_ERRORS:
            break
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= MAX_LINES:
            errors.append(
                problem("too_many_tasks", f"the file has more than {MAX_LINES} requests; split it into several batches")
            )
            break
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(problem("invalid_json_line", "this line is not parseable as valid JSON", number))
            continue
        found = _check(item, endpoint, seen, number, model_known)
        if found is not None:
            errors.append(found)
            continue
        seen[item["custom_id"]] = number
        lines.append(Line(item["custom_id"], item["body"]))
    if not lines and not errors:
        errors.append(problem("empty_file", "the input file has no requests"))
    return lines, errors


def _check(item: Any, endpoint: str, seen: dict[str, int], number: int, model_known: Callable[[str], str | None]) -> dict | None:
    if not isinstance(item, dict):
        return problem("invalid_json_line", "this line is not a JSON object", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return problem("missing_required_parameter", "'custom_id' must be a non-empty string", number, "custom_id")
    if custom_id in seen:
        return problem("duplicate_custom_id", f"custom_id {custom_id!r} is also on line {seen[custom_id]}; "
                       "each request needs its own", number, "custom_id")  # fmt: skip
    if item.get("method") != "POST":
        return problem("invalid_method", f"'method' must be \"POST\" (got {item.get('method')!r})", number, "method")
    if item.get("url") != endpoint:
        return problem(
            "url_mismatch", f"'url' must be the batch's endpoint {endpoint!r} (got {item.get('url')!r})", number, "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return problem("missing_required_parameter", "'body' must be a JSON object: the request", number, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return problem("missing_required_parameter", "'body.model' must name a model", number, "body.model")
    why = model_known(model)
    if why is not None:
        return problem("model_not_found", why, number, "body.model")
    return None
