"""A web page the developer visits, opened in a real browser (Debian's Chromium, headless), tries
to drive the dev-mode gateway on loopback: register a worker (to steal the developer's texts),
embed, and read the model list through a rebinding-style host name. The gateway refuses all of it."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import metric
from tests.system.conftest import Cluster, Gateway, free_port

pytestmark = pytest.mark.timeout(120)
CHROMIUM = Path("/usr/bin/chromium")
PAGE = """<!doctype html><title>cute cats</title><body><script>
const gateway = "http://127.0.0.1:%(gw)d";
const hello = {worker_id: "rogue", checkpoint_name: "fake-model", max_batch_items: 64,
               models: {"fake-model": {max_input_tokens: 64, dimensions: 16}}};
const results = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); results[name] = r.type + " " + r.status; }
  catch (e) { results[name] = "failed: " + e.message; }
}
(async () => {
  await attempt("register-worker", gateway + "/internal/v1/workers/heartbeat", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain", "X-Embedq-Session": "0123456789abcdef0123"}, body: JSON.stringify(hello)});
  await attempt("embed-readable", gateway + "/v1/embeddings", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({model: "fake-model", input: "secret"})});
  await attempt("embed-blind", gateway + "/v1/embeddings", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body: JSON.stringify({model: "fake-model", input: "secret"})});
  await attempt("rebound-read", "http://evil.example:%(gw)d/v1/models", {mode: "no-cors"});
  document.body.dataset.results = JSON.stringify(results);
  document.title = "done";
})();
</script></body>"""


@pytest.fixture
def attacker_page(served: Gateway) -> Iterator[str]:
    """The page, served from another origin (another port of loopback)."""
    page = (PAGE % {"gw": served.port}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://evil.example:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def served(cluster: Cluster) -> Gateway:
    return cluster.gateway()  # dev mode: loopback, no keys, no worker tokens


def test_a_foreign_page_cannot_drive_the_dev_mode_gateway(served: Gateway, attacker_page: str):
    if not CHROMIUM.exists():
        pytest.fail("chromium not found: .ci/run and make test install Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP evil.example 127.0.0.1"],  # the page's own name, rebound to loopback
        )  # fmt: skip
        page = browser.new_page()
        page.goto(attacker_page)
        page.wait_for_function("document.title === 'done'", timeout=30_000)
        results = json.loads(page.evaluate("document.body.dataset.results"))
        browser.close()
    health = httpx.get(served.url + "/health").json()
    metrics = httpx.get(served.url + "/metrics").text

    def counted(endpoint: str, status: int) -> float:
        return metric(metrics, f'embedq_gateway_requests_total{{endpoint="{endpoint}",status="{status}"}}')

    summary = f"page saw {results}; gateway: {health}"
    assert health["workers"] == 0, "a page registered a worker: " + summary
    assert counted("/internal/v1/workers/heartbeat", 403) == 1, summary
    assert results["embed-readable"].startswith("failed"), summary  # no CORS for it: nothing to read
    assert counted("/v1/embeddings", 403) == 2, summary  # the preflighted one never got a POST through; both refused
    # The rebound name is not a host this gateway answers for (Chromium tries a 421 twice).
    assert counted("/v1/models", 421) >= 1 and counted("/v1/models", 200) == 0, summary
