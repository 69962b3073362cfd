# embedq gateway: small, non-root, no torch.
#   docker build -f docker/gateway.Dockerfile -t embedq-gateway .
# Build args: PYTHON_VERSION (the python:<version>-slim base).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY gateway ./gateway
COPY worker ./worker
# The distribution holds both packages; without extras it pulls no engine (no vllm, no torch).
RUN pip install --no-cache-dir --prefix=/install .

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /install /usr/local
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin embedq \
  && install -d -o 10001 -g 10001 /var/lib/embedq
USER 10001
# Uploaded files and batches (with EMBEDQ_QUEUE=redis they live in Redis): mount a volume here.
ENV PYTHONUNBUFFERED=1 EMBEDQ_DATA_DIR=/var/lib/embedq
VOLUME /var/lib/embedq
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
