"""The deployment files are checked, not just written: every Kubernetes manifest passes the
Kubernetes 1.30 schema in strict mode (kubernetes-validate's shipped schemas, no network),
the ConfigMap's TOML loads with the service's own loader, probes, ports, labels and
selectors agree across files, every file a compose bind mount or a Dockerfile COPY names is
in the repository, and no deployment file holds a key. The checks that run a tool or a
process (the Compose Specification schema, `docker-compose config`, the healthcheck
commands against a real worker and intake) are in tests/integration/test_deploy_files.py."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.settings import load_settings

from ..deploy_files import (
    KUBE,
    ROOT,
    compose_files,
    compose_healthcheck,
    compose_services,
    dockerfile,
    dockerfile_healthcheck,
    load_yaml,
    option,
    probed,
)

KUBERNETES_VERSION = "1.30"  # pinned: the schemas ship inside kubernetes-validate
# Custom resources have no schema in kubernetes-validate: their shape is checked below.
CUSTOM_RESOURCES = {"worker-keda-scaledobject.yaml"}
WORKER_METRICS_PORT = 9808


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def deployment_files() -> list[Path]:
    """Every file that deploys the service: what the key scan covers."""
    files = {*compose_files(), *ROOT.glob("Dockerfile*"), *ROOT.glob(".env.example")}
    files |= {p for p in (ROOT / "deploy").rglob("*") if p.is_file()}
    return sorted(files)


def resources(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for path in manifest_files():
        for doc in resources(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {KUBE.relative_to(ROOT)}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert 1 == len(containers)
    return dict(containers[0])


# -- the key scan ---------------------------------------------------------------------------

# CapMonster (and Anti-Captcha) keys are 32 hex digits; not part of a longer token (a
# sha256 digest is 64).
HEX_KEY = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32}(?![0-9A-Za-z])")
# An environment variable (upper case) whose name says it holds a secret.
SECRET_NAME = r"[A-Z][A-Z0-9_]*(?:KEY|TOKEN|PASSWORD|SECRET)"
VALUE = r"""(?P<value>\$\{[^}\n]*\}[^\s#"']*|"[^"\n]*"|'[^'\n]*'|[^\s#"']*)"""
ASSIGNMENTS = (
    # NAME: value (YAML), NAME=value (compose lists, shell, Dockerfile ENV, --from-literal)
    re.compile(rf"(?<![A-Za-z0-9_$]){SECRET_NAME}(?:\s*:\s+|\s*=\s*){VALUE}"),
    # Dockerfile's other ENV form: ENV NAME value
    re.compile(rf"^\s*ENV\s+{SECRET_NAME}\s+{VALUE}", re.M),
    # a secret as a command-line flag, in a shell line or an exec-form list
    re.compile(
        rf"--(?:token|client-key|api-key|password|requirepass|masterauth)(?:\s+|=|[\"']\s*,\s*){VALUE}"
    ),
    # a password inside a URL (redis://:PASSWORD@host)
    re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]*:(?P<value>\S+)@"),
)
# Kubernetes env entries: `- name: NAME` with `value: ...` next to it.
ENV_NAME = re.compile(rf"^\s*-?\s*name:\s*['\"]?{SECRET_NAME}['\"]?\s*$")
ENV_VALUE = re.compile(rf"^\s*-?\s*value:\s*{VALUE}")
# What may stand where a key would: a reference, nothing, or an obvious placeholder.
REFERENCE = re.compile(
    r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}"  # ${NAME}, ${NAME:?why}: no default value
    r"|\$[A-Za-z_][A-Za-z0-9_]*"  # $NAME (shell)
    r"|\$\(.*\)"  # $(command) (shell)
    r"|\.\.\.|<[^<>]*>"  # ..., <your key>: a placeholder
)


def _literal(value: str) -> bool:
    value = value.strip().strip("\"'")
    return bool(value) and not REFERENCE.fullmatch(value)


def literal_keys(text: str) -> list[str]:
    """Lines of ``text`` that give a secret a literal value: a 32-hex-digit key anywhere, a
    secret-named variable (``…KEY``, ``…TOKEN``, ``…PASSWORD``, ``…SECRET``) set to anything
    but a ``${…}``/``$NAME`` reference or a placeholder, a password in a URL, or a
    Kubernetes Secret manifest with data (the Secret is created by hand, never committed)."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines, 1):
        where = f"line {number}: {line.strip()[:80]}"
        if HEX_KEY.search(line):
            found.append(where)
            continue
        if any(_literal(m["value"]) for p in ASSIGNMENTS for m in p.finditer(line)):
            found.append(where)
            continue
        value = ENV_VALUE.match(line)
        if value and _literal(value["value"]):
            near = lines[max(0, number - 3) : number + 2]
            if any(ENV_NAME.match(other) for other in near):
                found.append(where)
    for doc in _yaml_documents(text):
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"a Secret manifest with data: {doc.get('metadata', {}).get('name')}")
    return found


def _yaml_documents(text: str) -> list[dict[str, Any]]:
    try:
        return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError:
        return []  # not YAML (a Dockerfile, Markdown): the line checks above cover it


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_deployment_file_holds_a_key(path: Path) -> None:
    """No compose file, Dockerfile or file under deploy/ gives a key a literal value: keys
    come from ${…} references (compose: the environment or .env) and secretKeyRefs."""
    assert [] == literal_keys(path.read_text())


def test_the_key_scan_covers_every_kind_of_deployment_file() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in deployment_files()}
    assert {"docker-compose.yml", "Dockerfile", "deploy/kubernetes/worker-deployment.yaml"} <= names
    assert len(names) >= 10


KEYS = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
# anything a person might paste: printable, no blanks, not a reference
LITERALS = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#'\""),
    min_size=1,
    max_size=40,
).filter(lambda v: not REFERENCE.fullmatch(v))
NAMES = st.sampled_from(
    ["CAPMONSTER_CLIENT_KEY", "ANTICAPTCHA_KEY", "REPORT_FORWARDER_INTAKE_TOKEN", "API_SECRET"]
) | st.from_regex(r"[A-Z][A-Z0-9]{0,8}_(?:KEY|TOKEN|PASSWORD|SECRET)", fullmatch=True)
PLANTS = {
    "compose map": "      {name}: {value}",
    "compose list": "      - {name}={value}",
    "quoted": '      {name}: "{value}"',
    "Dockerfile ENV": "ENV {name}={value}",
    "Dockerfile ENV, space": "ENV {name} {value}",
    "k8s env": "            - name: {name}\n              value: {value}",
    "k8s env, value first": "            - value: '{value}'\n              name: {name}",
    "kubectl": "  --from-literal={name}={value} \\",
    "flag": '          command: ["report-forwarder", "serve", "--token", "{value}"]',
    "redis flag": '    command: ["redis-server", "--requirepass", "{value}"]',
    "url": "      REDIS_URL: redis://:{value}@redis:6379/0",
}


@hsettings(max_examples=300, deadline=None)
@given(
    path=st.sampled_from(deployment_files()),
    form=st.sampled_from(sorted(PLANTS)),
    name=NAMES,
    value=KEYS | LITERALS,
    where=st.floats(0, 1),
)
@example(
    path=ROOT / "docker-compose.yml",
    form="compose map",
    name="CAPMONSTER_CLIENT_KEY",
    value="0123456789abcdef0123456789abcdef",
    where=0.5,
)
def test_a_key_planted_in_any_deployment_file_is_found(
    path: Path, form: str, name: str, value: str, where: float
) -> None:
    """The scan is not vacuous: a key (32 hex digits) or any literal given to a
    secret-named variable, a --token flag or a URL's password, planted anywhere in any
    deployment file, in any of the forms those files use, is reported."""
    lines = path.read_text().splitlines()
    at = int(where * len(lines))
    planted = PLANTS[form].format(name=name, value=value)
    text = "\n".join([*lines[:at], planted, *lines[at:]])
    assert literal_keys(text), planted


@pytest.mark.parametrize(
    "text",
    [
        "kind: Secret\napiVersion: v1\nmetadata: {name: report-forwarder}\n"
        "stringData: {REDIS_URL: 'redis://redis:6379/0'}\n",
        "      CAPMONSTER_CLIENT_KEY: ${CAPMONSTER_CLIENT_KEY:-0123abcd}\n",
        "# the key: 0123456789ABCDEF0123456789ABCDEF\n",
    ],
    ids=["a Secret manifest", "a default value in a reference", "in a comment, upper case"],
)
def test_a_secret_manifest_a_default_and_a_key_in_a_comment_are_found(text: str) -> None:
    assert literal_keys(text)


@pytest.mark.parametrize(
    "text",
    [
        "      CAPMONSTER_CLIENT_KEY: ${CAPMONSTER_CLIENT_KEY:?set it in .env}\n",
        "      - CAPMONSTER_CLIENT_KEY=${CAPMONSTER_CLIENT_KEY}\n",
        '  --from-literal=CAPMONSTER_CLIENT_KEY="$CAPMONSTER_CLIENT_KEY" \\\n',
        '  --from-literal=REPORT_FORWARDER_INTAKE_TOKEN="$(openssl rand -hex 32)"\n',
        "            - name: CAPMONSTER_CLIENT_KEY\n              valueFrom:\n"
        "                secretKeyRef: {name: report-forwarder, key: CAPMONSTER_CLIENT_KEY}\n",
        "image: redis@sha256:" + "ab" * 32 + "\n",
        "#   CAPMONSTER_CLIENT_KEY=...   the account's key\n",
    ],
)
def test_references_digests_and_placeholders_are_not_keys(text: str) -> None:
    assert [] == literal_keys(text)


# -- Kubernetes -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_passes_the_kubernetes_schema_in_strict_mode(path: Path) -> None:
    """Every resource validates against the Kubernetes 1.30 OpenAPI schema with unknown
    fields refused; a kind the schema does not know fails (only the listed custom
    resources are exempt, and checked by shape below)."""
    docs = resources(path)
    assert docs
    if path.name in CUSTOM_RESOURCES:
        return
    for doc in docs:
        assert KUBERNETES_VERSION == kubernetes_validate.validate(
            doc, KUBERNETES_VERSION, strict=True
        )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda c: c.update(livenesProbe=c.pop("livenessProbe")), "livenesProbe"),
        (lambda c: c.update(ports=[{"containerPort": "9808"}]), "'9808' is not"),
        (lambda c: c.pop("name"), "'name' is a required property"),
    ],
    ids=["misspelt field", "port as a string", "no container name"],
)
def test_the_schema_check_refuses_a_broken_deployment(change: Any, why: str) -> None:
    """The validation is strict and real: a misspelt field, a wrong type or a missing
    required field in the worker Deployment fails it."""
    deployment = by_kind("Deployment", "report-forwarder-worker")
    change(deployment["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(why)):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_of_its_folder_and_sets_no_namespace() -> None:
    kustomization = load_yaml(KUBE / "kustomization.yaml")
    listed = kustomization["resources"]
    assert sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml") == sorted(
        listed
    )
    assert "namespace" not in kustomization
    for path in manifest_files():
        for doc in resources(path):
            assert "namespace" not in doc["metadata"], path


def test_worker_deployment_probes_scrape_annotations_and_grace_period() -> None:
    """Workers: liveness /healthz and readiness /readyz on the metrics port the command
    opens and Prometheus is told to scrape, and a grace period as long as compose's."""
    deployment = by_kind("Deployment", "report-forwarder-worker")
    pod = deployment["spec"]["template"]
    worker = container(deployment)
    command = worker["command"]
    port = int(option(command, "--metrics-port"))
    assert WORKER_METRICS_PORT == port
    assert [{"name": "metrics", "containerPort": port}] == worker["ports"]
    assert {"path": "/healthz", "port": "metrics"} == worker["livenessProbe"]["httpGet"]
    assert {"path": "/readyz", "port": "metrics"} == worker["readinessProbe"]["httpGet"]
    annotations = pod["metadata"]["annotations"]
    assert ("true", str(port), "/metrics") == (
        annotations["prometheus.io/scrape"],
        annotations["prometheus.io/port"],
        annotations["prometheus.io/path"],
    )
    compose_worker = compose_services()["worker"]
    assert f"{pod['spec']['terminationGracePeriodSeconds']}s" == compose_worker["stop_grace_period"]
    assert worker["resources"]["requests"]
    assert worker["resources"]["limits"]["memory"]


def test_every_key_comes_from_the_secret_the_readme_tells_how_to_create() -> None:
    """Keys and the Redis URL reach the pods only through secretKeyRefs to one Secret, and
    deploy/kubernetes/README.md's `kubectl create secret` command creates every key they
    reference."""
    readme = (KUBE / "README.md").read_text()
    created = set(re.findall(r"--from-literal=([A-Z_]+)=", readme))
    for name in ("report-forwarder-worker", "report-forwarder-intake"):
        env = {e["name"]: e for e in container(by_kind("Deployment", name))["env"]}
        assert "CAPMONSTER_CLIENT_KEY" in env
        for entry in env.values():
            if "value" in entry:
                assert not re.fullmatch(SECRET_NAME + "|REDIS_URL", entry["name"]), entry
                continue
            ref = entry["valueFrom"]["secretKeyRef"]
            assert "report-forwarder" == ref["name"]
            assert ref["key"] in created, ref
    assert "kubectl create secret generic report-forwarder" in readme


def test_configmap_toml_loads_with_the_service_loader_and_names_the_secret_keys(
    tmp_path: Path,
) -> None:
    """The ConfigMap's report-forwarder.toml is a valid configuration (unknown keys are
    refused by the loader), and every account's key variable is set from the Secret in
    both Deployments."""
    configmap = by_kind("ConfigMap", "report-forwarder-config")
    (tmp_path / "report-forwarder.toml").write_text(configmap["data"]["report-forwarder.toml"])
    settings = load_settings(
        tmp_path / "report-forwarder.toml", environ={"REDIS_URL": "redis://redis:6379/0"}
    )
    assert "json" == settings.log_format
    for name in ("report-forwarder-worker", "report-forwarder-intake"):
        deployment = by_kind("Deployment", name)
        env = {e["name"]: e for e in container(deployment)["env"]}
        for account in settings.accounts.values():
            assert "secretKeyRef" in env[account.key_env]["valueFrom"]
        config_path = Path(env["REPORT_FORWARDER_CONFIG"]["value"])
        mount = container(deployment)["volumeMounts"][0]
        assert (str(config_path.parent), "config") == (mount["mountPath"], mount["name"])
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert "report-forwarder-config" == volumes["config"]["configMap"]["name"]
        assert config_path.name in configmap["data"]


def test_pdb_and_service_select_the_pods_they_are_for() -> None:
    worker = by_kind("Deployment", "report-forwarder-worker")
    intake = by_kind("Deployment", "report-forwarder-intake")
    pdb = by_kind("PodDisruptionBudget", "report-forwarder-worker")
    service = by_kind("Service", "report-forwarder-intake")
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    intake_labels = intake["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    assert service["spec"]["selector"].items() <= intake_labels.items()
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    assert worker["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]
    ports = {p["name"]: p["containerPort"] for p in container(intake)["ports"]}
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in ports
    command = container(intake)["command"]
    assert ports[target] == int(option(command, "--port"))
    assert {"path": "/healthz", "port": target} == container(intake)["readinessProbe"]["httpGet"]


def test_autoscaling_examples_target_the_workers_on_an_exported_metric_never_to_zero() -> None:
    """The HPA and KEDA examples scale the worker Deployment, never below 1 (the sweeper runs
    in the workers), on a gauge the workers do export."""
    exported = (ROOT / "worker" / "observability" / "metrics.py").read_text()
    hpa = by_kind("HorizontalPodAutoscaler", "report-forwarder-worker")
    assert "report-forwarder-worker" == hpa["spec"]["scaleTargetRef"]["name"]
    assert hpa["spec"]["minReplicas"] >= 1
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
    assert f'"{metric}"' in exported
    keda = resources(KUBE / "optional" / "worker-keda-scaledobject.yaml")[0]
    assert ("keda.sh/v1alpha1", "ScaledObject") == (keda["apiVersion"], keda["kind"])
    assert "report-forwarder-worker" == keda["spec"]["scaleTargetRef"]["name"]
    assert keda["spec"]["minReplicaCount"] >= 1
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    assert all(f'"{m}"' in exported for m in re.findall(r"report_forwarder_\w+", query))


# -- compose and the Dockerfile -------------------------------------------------------------


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_every_compose_bind_mount_and_build_context_is_in_the_repository(path: Path) -> None:
    missing = []
    for name, service in load_yaml(path)["services"].items():
        for source in _bind_sources(service):
            if not (path.parent / source).exists():
                missing.append(f"{name}: {source}")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (path.parent / context / "Dockerfile").is_file():
                missing.append(f"{name}: build {context}")
    assert [] == missing


def test_compose_stack_has_grafana_the_intake_and_prometheus_with_the_alert_rules() -> None:
    services = compose_services()
    assert {"redis", "worker", "intake", "prometheus", "grafana", "flower"} <= set(services)
    prometheus = services["prometheus"]["volumes"]
    assert "./config/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus
    grafana = services["grafana"]["volumes"]
    assert "./config/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./config/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    assert services["intake"]["command"][:2] == ["report-forwarder", "serve"]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = source
    return out


def test_prometheus_and_grafana_read_their_files_where_compose_mounts_them() -> None:
    """The paths the mounted configuration names inside the containers (the rule file,
    the dashboards folder, the datasource's Prometheus) are where compose puts them."""
    services = compose_services()
    prometheus = _mounts(services["prometheus"])
    config = load_yaml(ROOT / prometheus["/etc/prometheus/prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert (ROOT / prometheus[rule_file]).is_file(), rule_file
    grafana = _mounts(services["grafana"])
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    for provider_file in (provisioning / "dashboards").glob("*.yml"):
        for provider in load_yaml(provider_file)["providers"]:
            assert any((ROOT / grafana[provider["options"]["path"]]).glob("*.json"))
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, name = home.rpartition("/")
    assert (ROOT / grafana[folder] / name).is_file()
    for source_file in (provisioning / "datasources").glob("*.yml"):
        for source in load_yaml(source_file)["datasources"]:
            host, _, port = source["url"].removeprefix("http://").partition(":")
            assert host in services
            # the port the service listens on inside its container
            assert any(p.endswith(f":{port}") for p in services[host]["ports"])


def test_compose_healthchecks_probe_the_ports_the_services_open() -> None:
    """The worker's healthcheck asks /healthz on the port its command serves metrics on,
    which Prometheus scrapes; the intake's asks /healthz on the port it listens on."""
    services = compose_services()
    port = int(option(services["worker"]["command"], "--metrics-port"))
    assert ("/healthz", port) == probed(compose_healthcheck("worker"))
    intake_port = int(option(services["intake"]["command"], "--port"))
    assert ("/healthz", intake_port) == probed(compose_healthcheck("intake"))
    prometheus = load_yaml(ROOT / "config" / "prometheus.yml")
    scraped = [sd["port"] for job in prometheus["scrape_configs"] for sd in job["dns_sd_configs"]]
    assert port in scraped


def test_dockerfile_healthcheck_probes_healthz_on_the_metrics_port_the_image_sets() -> None:
    """The image's HEALTHCHECK asks the worker's /healthz on the port that the image's
    REPORT_FORWARDER_WORKER_METRICS_PORT makes the default command (the worker) open."""
    instructions = dockerfile()
    env = dict(
        item.split("=", 1)
        for args in (a for i, a in instructions if i == "ENV")
        for item in shlex.split(args)
    )
    port = int(env["REPORT_FORWARDER_WORKER_METRICS_PORT"])
    assert ("/healthz", port) == probed(dockerfile_healthcheck())
    assert ["report-forwarder", "worker"] == yaml.safe_load(
        next(a for i, a in instructions if i == "CMD")
    )


def test_every_dockerfile_copy_source_is_in_the_repository() -> None:
    for instruction, args in dockerfile():
        if instruction == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source


def test_pyproject_names_the_schema_tools_the_deploy_tests_use() -> None:
    """The tools these tests and their integration twins need are in the test extra, so a
    fresh clone's `pip install -e '.[test]'` has them."""
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    names = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in test_extra}
    assert {"check-jsonschema", "kubernetes-validate", "pyyaml"} <= names
