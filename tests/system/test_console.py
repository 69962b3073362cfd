"""The web console in a real browser (Debian's chromium, driven by Playwright) against a live
gateway and fake workers: what an operator does with it, from sign-in to sign-out. Each page's
screenshot is written to tests/screenshots/ (git-ignored; the README shows two of them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.fakes import fake_worker_config
from tests.system.conftest import Cluster, Gateway, wait_until

pytestmark = pytest.mark.timeout(240)
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent.parent / "screenshots"
ADMIN = "admin-token-for-the-console"
PAGES = ["overview", "models", "workers", "keys", "usage", "batches", "playground"]
NASTY = '<img src=x onerror="window.pwned=1">'  # a key's name, a playground text: shown as text, never run


@contextmanager
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail("chromium not found: .ci/run and make test install Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = chromium.new_page(viewport={"width": 1366, "height": 860})
        page.problems = []
        page.on("pageerror", lambda error: page.problems.append(str(error)))
        page.on(
            "console", lambda m: page.problems.append(m.text) if m.type == "error" and "load resource" not in m.text else None
        )
        try:
            yield page
        finally:
            chromium.close()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def visit(page, gateway: Gateway, name: str) -> None:
    page.goto(f"{gateway.url}/ui/#/{name}")
    page.wait_for_function("title => document.title.startsWith(title)", arg=page_title(name))  # functions: CSP forbids eval


def page_title(name: str) -> str:
    return {"keys": "API keys"}.get(name, name.capitalize())


def embed(gateway: Gateway, key: str, texts: list[str]) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/embeddings", json={"model": "fake-model", "input": texts},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip


def start_batch(gateway: Gateway, key: str, lines: int) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    body = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": "fake-model", "input": f"text {i}"}}) + "\n" for i in range(lines))  # fmt: skip
    upload = httpx.post(gateway.url + "/v1/files", files={"file": ("in.jsonl", body.encode())}, data={"purpose": "batch"},
                        headers=auth)  # fmt: skip
    assert upload.status_code == 200, upload.text
    batch = httpx.post(gateway.url + "/v1/batches", headers=auth, json={"input_file_id": upload.json()["id"],
                       "endpoint": "/v1/embeddings", "completion_window": "24h"})  # fmt: skip
    assert batch.status_code == 200, batch.text
    return batch.json()["id"]


def test_an_operator_runs_the_fleet_from_the_console(cluster: Cluster):
    gateway = cluster.gateway({"EMBEDQ_ADMIN_TOKENS": ADMIN, "EMBEDQ_KEYS_DB": str(cluster.tmp / "keys.db")})
    for _ in range(2):  # slow enough that a batch's progress can be watched
        cluster.worker(fake_worker_config(gateway.url, delay_s=0.25, max_num_seqs=8))
    with browser() as page:
        # Signed out, the console is the sign-in form; a wrong token is told so.
        page.goto(gateway.url + "/ui/")
        assert page.url == gateway.url + "/ui/login"
        page.get_by_label("Admin token").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        assert "not an admin token" in page.get_by_role("alert").inner_text()
        page.get_by_label("Admin token").fill(ADMIN)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(gateway.url + "/ui/")

        # The model and both workers appear within seconds.
        visit(page, gateway, "workers")
        page.wait_for_function("() => document.querySelectorAll('tbody tr .badge.serving').length === 2", timeout=10_000)
        shoot(page, "workers")
        visit(page, gateway, "models")
        page.get_by_role("heading", name="fake-model").wait_for(timeout=10_000)
        page.get_by_text("How a client calls it").click()
        copy = "Copy the curl example for fake-model"
        page.get_by_role("button", name=copy).focus()
        page.wait_for_timeout(3500)  # a refresh (every 3 s) redraws the page: the keyboard's place is kept
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == copy
        assert page.locator("details[open]").count() == 1
        shoot(page, "models")

        # A key made in the console works at once, and its secret is shown once.
        visit(page, gateway, "keys")
        page.get_by_label("Name", exact=True).fill("team-a")
        page.get_by_label("Requests per minute").fill("600")
        page.get_by_role("button", name="Create key").click()
        secret = page.locator("#secret-value").inner_text(timeout=10_000)
        assert embed(gateway, secret, ["hello"]).status_code == 200
        page.get_by_label("Name", exact=True).fill(NASTY)
        page.get_by_role("button", name="Create key").click()
        refused = page.locator("#status", has_text="key names are")  # refused; its message quotes the name, as text
        refused.wait_for(timeout=10_000)
        assert NASTY in refused.inner_text()
        page.get_by_role("button", name="Change the limits of team-a").click()
        page.get_by_role("dialog").get_by_label("Tokens per minute").fill("50000")
        page.get_by_role("dialog").get_by_role("button", name="Save").click()
        page.locator("tr:has-text('team-a')", has_text="50,000 tpm").wait_for(timeout=10_000)
        shoot(page, "keys")

        # The overview's charts move under a short load.
        visit(page, gateway, "overview")
        line = 'path[data-series="inputs/s"]'
        page.wait_for_selector(line)
        before = page.get_attribute(line, "d")
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda n: embed(gateway, secret, [f"text {n}", "two", "three"]).status_code, range(30)))
        assert set(statuses) == {200}
        page.wait_for_function("([line, before]) => document.querySelector(line).getAttribute('d') !== before",
                               arg=[line, before], timeout=15_000)  # fmt: skip
        page.wait_for_function("() => [...document.querySelectorAll('.tile')].some(t => t.innerText.includes('p50') && "
                               "!t.innerText.startsWith('–'))")  # fmt: skip
        shoot(page, "overview")
        page.emulate_media(color_scheme="dark")  # the system's setting, followed
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(18, 21, 27)"
        shoot(page, "overview-dark")
        page.emulate_media(color_scheme="light")

        # A batch's progress bar advances to completed.
        batch_id = start_batch(gateway, secret, 400)
        visit(page, gateway, "batches")
        bar = f'progress[aria-label^="{batch_id}:"]'
        seen: list[float] = []
        deadline_ms = 60_000
        while deadline_ms > 0:
            page.wait_for_selector(bar, timeout=10_000)
            seen.append(float(page.get_attribute(bar, "value") or 0))
            if page.locator(f'tr:has({bar}) [data-status="completed"]').count():
                break
            page.wait_for_timeout(1000)
            deadline_ms -= 1000
        assert seen[-1] == 400 and page.locator(f'tr:has({bar}) [data-status="completed"]').count() == 1, seen
        assert any(0 < value < 400 for value in seen), f"no progress seen between start and end: {seen}"
        assert seen == sorted(seen)
        output = page.locator(f'tr:has({bar}) a:has-text("Output")').get_attribute("href")
        assert len(page.request.get(gateway.url + output).text().splitlines()) == 400
        doomed = start_batch(gateway, secret, 4000)  # 60 s of work for these workers: cancelled long before
        page.get_by_role("button", name=f"Cancel {doomed}").click(timeout=10_000)
        page.get_by_role("dialog").get_by_role("button", name="Cancel batch").click()
        page.locator(f'tr:has-text("{doomed}") [data-status="cancelled"]').wait_for(timeout=30_000)
        shoot(page, "batches")

        # Revoked in the console: the next request gets 401.
        visit(page, gateway, "keys")
        page.get_by_role("button", name="Revoke team-a").click()
        page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
        page.locator("tr:has-text('team-a') .badge.revoked").wait_for(timeout=10_000)
        assert embed(gateway, secret, ["hello"]).status_code == 401

        # The playground: each text is most similar to itself; a text with markup is only text.
        visit(page, gateway, "playground")
        texts = ["The cat sat on the mat.", "Stock markets fell sharply.", NASTY, "<script>window.pwned=2</script>"]
        page.get_by_label("Texts, one per line").fill("\n".join(texts))
        page.get_by_role("button", name="Embed").click()
        page.wait_for_selector("rect.cell")
        cells = page.eval_on_selector_all("rect.cell", "cells => cells.map(c => [+c.dataset.row, +c.dataset.col, "
                                          "+c.dataset.value])")  # fmt: skip
        assert len(cells) == 16
        for row in range(4):
            own = [c for c in cells if c[0] == row]
            assert max(own, key=lambda c: c[2])[1] == row, own
        assert page.locator("svg.heatmap text", has_text="<script>window.pwne").count() == 1
        shoot(page, "playground")

        visit(page, gateway, "usage")
        page.get_by_role("cell", name="team-a").first.wait_for(timeout=10_000)
        shoot(page, "usage")
        csv = page.request.get(gateway.url + page.get_by_role("link", name="Export CSV").get_attribute("href"))
        assert csv.headers["content-type"].startswith("text/csv") and ",team-a," in csv.text()

        # Markup in data is text; and were it ever put in as HTML, the policy would not run it.
        assert page.evaluate("window.pwned") is None
        page.evaluate("""() => { window.blocked = 0;
            document.addEventListener('securitypolicyviolation', () => { window.blocked += 1; });
            document.body.insertAdjacentHTML('beforeend', '<img src=x onerror="window.pwned=3">');
            const s = document.createElement('script'); s.textContent = 'window.pwned = 4'; document.body.append(s); }""")
        page.wait_for_function("() => window.blocked >= 2")
        assert page.evaluate("window.pwned") is None

        # Signed out: every page and data endpoint answers 401 or the sign-in form.
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(gateway.url + "/ui/login")
        assert page.context.cookies() == []
        for name in PAGES:
            page.goto(f"{gateway.url}/ui/#/{name}")
            assert page.url.partition("#")[0] == gateway.url + "/ui/login", name
        for path in ["session", "fleet", "activity", "keys", "usage", "batches"]:
            assert page.request.get(f"{gateway.url}/ui/api/{path}").status == 401, path
        assert page.request.post(f"{gateway.url}/ui/api/embed", data={"model": "fake-model", "texts": ["x"]}).status == 401
        problems = [p for p in page.problems if "Content Security Policy" not in p]  # those the test provoked
        assert problems == [], problems


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_any_replica_shows_the_whole_fleet(cluster: Cluster, queue_backend: str):
    env = {"EMBEDQ_ADMIN_TOKENS": ADMIN, "EMBEDQ_KEYS_REDIS": "true"}
    first, second = cluster.gateway(env), cluster.gateway(env)
    cluster.worker(fake_worker_config(first.url))
    cluster.worker(fake_worker_config(second.url))
    console = httpx.Client(base_url=second.url)
    assert console.post("/ui/login", data={"token": ADMIN}).status_code == 303  # signed in through one replica...
    cookie = console.cookies["embedq_console"]
    with httpx.Client(base_url=first.url, cookies={"embedq_console": cookie}) as other:  # ...good on the other
        csrf = {"X-CSRF-Token": other.get("/ui/api/session").json()["csrf"]}
        secret = other.post("/ui/api/keys", json={"name": "team-r"}, headers=csrf).json()["key"]
        wait_until(lambda: len(other.get("/ui/api/fleet").json()["workers"]) == 2, 10, "both workers on the first replica")
    for _ in range(5):
        assert embed(first, secret, ["a", "b"]).status_code == 200
    both = lambda: sorted(w["state"] for w in console.get("/ui/api/fleet").json()["workers"]) == ["serving", "serving"]  # noqa: E731
    wait_until(both, 5, "both workers on the second replica (it reloads the registry every 0.5 s)")

    def counted() -> bool:
        activity = console.get("/ui/api/activity").json()
        series, queues = activity["series"], activity["queues"]
        sampled = "fake-model" in queues and queues["fake-model"]["depth"][-1] == 0  # both replicas' samples, summed
        return sum(series["requests"]) == 5 and sum(series["inputs"]) == 10 and sampled

    wait_until(counted, 10, "the first replica's calls in the second's console")
    assert sum(w["inputs_per_s"] for w in console.get("/ui/api/fleet").json()["workers"]) * 60 == pytest.approx(10)
    assert cluster.redis is not None
    cluster.redis.stop()
    try:  # Redis down: the console says so (503, its headers), never a 500
        down = console.get("/ui/api/fleet")
        assert down.status_code == 503 and down.headers["x-frame-options"] == "DENY", down.text
        assert down.json()["error"]["code"] == "queue_unavailable"
    finally:
        cluster.redis.start()
    wait_until(lambda: console.get("/ui/api/session").status_code == 200, 15, "the console back with Redis")
    console.post("/ui/logout", headers={"X-CSRF-Token": console.get("/ui/api/session").json()["csrf"]})
    with httpx.Client(base_url=first.url, cookies={"embedq_console": cookie}) as other:
        assert other.get("/ui/api/fleet").status_code == 401  # signed out on one replica: on every one
    console.close()
