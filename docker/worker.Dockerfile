# embedq worker: vLLM's CUDA image plus embedq, run as a non-root user.
#   docker build -f docker/worker.Dockerfile -t embedq-worker .
# Build args: VLLM_IMAGE (the vLLM base image and tag; its vllm is the one the worker uses).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${VLLM_IMAGE}
# tcmalloc: the worker preloads it for vLLM's engine processes (their memory grows without it on CPU).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/embedq
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY gateway ./gateway
COPY worker ./worker
# --no-deps for vllm and torch: the base image's builds match its CUDA; the rest are small.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "httpx>=0.27" "tenacity>=8.2" "pydantic>=2.7" "prometheus-client>=0.20" \
      "starlette>=0.37" "uvicorn>=0.29" "numpy>=1.26" "orjson>=3.10" \
      "uvloop>=0.19" "httptools>=0.6" "aiohttp>=3.10" \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin embedq
USER 10001
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT=/tmp/vllm-cache
EXPOSE 4000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4000/metrics', timeout=2)"]
ENTRYPOINT ["python3", "-m", "worker"]
CMD ["--config", "/etc/embedq/config.toml"]
