"""deploy/ is valid and true to the code, checked offline: no Docker engine, no cluster.

Kubernetes manifests are validated against the JSON schemas shipped inside the
kubernetes-validate package (strict: unknown fields fail), compose.yaml against the
compose-spec schema vendored in check-jsonschema. Tools that may be absent (the docker compose
plugin, kubectl, systemd-analyze) are used when present and skipped with a reason otherwise.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from flowd.config import ENV, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
README = (ROOT / "README.md").read_text()

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
# In deploy/kubernetes but not Kubernetes objects: kustomize's own file, the Helm chart values.
NOT_MANIFESTS = ("kustomization.yaml", "nats-values.yaml")
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS)
# Created by hand once (it holds credentials), so `kubectl apply -k` never overwrites it.
NOT_IN_KUSTOMIZATION = "secret.yaml"
# An older Kubernetes release and the newest one whose schemas the package ships.
K8S_VERSIONS = ("1.29", latest_version())
HTTP_PORT = 8321
NATS_NODES = ("nats-1", "nats-2", "nats-3")
FLOWD_SERVICES = ("flowd-1", "flowd-2")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _load(path: Path) -> Any:
    (doc,) = _load_all(path)
    return doc


def _objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in _load_all(path) if isinstance(d, dict)]


def _k8s(kind: str) -> dict[str, Any]:
    (obj,) = [o for p in MANIFESTS for o in _objects(p) if o["kind"] == kind]
    return obj


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def _compose() -> dict[str, Any]:
    services: dict[str, Any] = _load(COMPOSE)["services"]
    return services


def _flowd_image_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the flowd image (flowd replicas, migrate, flowctl)."""
    image = _compose()["flowd-1"]["image"]
    return {name: s for name, s in _compose().items() if s.get("image") == image}


def _env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(the VAR=value lines, the names of every VAR= line including commented ones)."""
    values: dict[str, str] = {}
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        name, sep, value = line.lstrip("#").strip().partition("=")
        if sep and name.isidentifier() and name.isupper():
            names.add(name)
            if not commented:
                values[name] = value
    return values, names


def _unit() -> dict[str, list[str]]:
    """flowd.service as key -> values (systemd allows repeated keys)."""
    entries: dict[str, list[str]] = {}
    for raw in (SYSTEMD / "flowd.service").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def _deploy_settings(env: dict[str, str]) -> Settings:
    """The settings flowd would run with (parsed as `flowd run` does; nothing connects)."""
    return Settings.from_env({"DATABASE_URL": "postgresql://x@db/x", **env})


# -- every file parses ------------------------------------------------------------------------


def test_deploy_has_the_expected_files() -> None:
    names = {_rel(p) for p in DEPLOY.rglob("*") if p.is_file()}
    assert {
        "deploy/Dockerfile",
        "deploy/compose/compose.yaml",
        "deploy/compose/README.md",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/migration-job.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/secret.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/nats-values.yaml",
        "deploy/kubernetes/README.md",
        "deploy/systemd/flowd.service",
        "deploy/systemd/flowd.env.example",
        "deploy/systemd/README.md",
        "deploy/nats/accounts.conf",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses_to_mappings(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs)


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    for obj in _objects(path):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{_rel(path)} {obj['kind']} at {where or '<root>'}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    kustomization = _load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert (K8S / NOT_IN_KUSTOMIZATION).is_file()
    assert set(resources) == {p.name for p in MANIFESTS} - {NOT_IN_KUSTOMIZATION}
    # The image name the manifests use is the one `images:` rewrites.
    (image,) = kustomization["images"]
    for kind in ("Deployment", "Job"):
        assert {c["image"] for c in _pod_spec(_k8s(kind))["containers"]} == {image["name"]}


def test_kustomize_build_renders_valid_objects() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the manifests are still validated one by one")
    out = _run(kubectl, "kustomize", str(K8S))
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
    ]
    (image,) = _load(K8S / "kustomization.yaml")["images"]
    for obj in objects:
        kubernetes_validate.validate(obj, latest_version(), strict=True)
        if obj["kind"] in ("Deployment", "Job"):
            (container,) = _pod_spec(obj)["containers"]
            assert container["image"] == f"{image['newName']}:{image['newTag']}"


def test_deployment_probes_resources_and_security() -> None:
    deployment = _k8s("Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = _pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["args"] == ["run"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT}

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/readyz", HTTP_PORT)
    assert probe("livenessProbe") == ("/healthz", HTTP_PORT)
    assert probe("startupProbe") == ("/healthz", HTTP_PORT)
    assert container["resources"] == {
        "requests": {"memory": "96Mi", "cpu": "250m"},
        "limits": {"memory": "192Mi"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # NATS_CREDS names the file that the Secret's nats.creds key is mounted as.
    env = {e["name"]: e for e in container["env"]}
    creds = Path(env["NATS_CREDS"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == creds.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == _k8s("Secret")["metadata"]["name"]
    assert {i["key"]: i["path"] for i in volume["secret"]["items"]} == {creds.name: creds.name}
    assert creds.name in _k8s("Secret")["stringData"]
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] in _k8s("Secret")["stringData"]


def test_service_pdb_and_job_select_what_they_should() -> None:
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    service, pdb, job = _k8s("Service"), _k8s("PodDisruptionBudget"), _k8s("Job")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", HTTP_PORT)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The migration Job's pods are neither behind the Service nor counted by the PDB.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= job_labels.items()
    (container,) = _pod_spec(job)["containers"]
    assert container["args"] == ["migrate"]


def test_kubernetes_settings_are_valid_and_agree_with_the_nats_values() -> None:
    data = _k8s("ConfigMap")["data"]
    settings = _deploy_settings(data)
    assert settings.migrate is False
    assert settings.http_host == "0.0.0.0"
    assert settings.nats_url == "nats://nats:4222"
    # Several replicas keep per-flow order only with partitions (subjects.md).
    assert settings.partitions >= _k8s("Deployment")["spec"]["replicas"] > 1
    values = _load(K8S / "nats-values.yaml")["config"]
    assert values["cluster"] == {"enabled": True, "replicas": settings.stream_replicas}
    assert values["jetstream"]["enabled"] is True
    assert values["jetstream"]["fileStore"]["pvc"]["size"]


# -- compose -----------------------------------------------------------------------------------


def test_compose_matches_the_compose_spec() -> None:
    schema = "vendor.compose-spec"  # vendored in the package: no download
    out = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_nats_cluster_and_postgres() -> None:
    services = _compose()
    routes = {f"nats://{n}:6222" for n in NATS_NODES}
    volumes = set()
    for name in NATS_NODES:
        command = services[name]["command"]
        assert "-js" in command
        assert command[command.index("-n") + 1] == name  # JetStream needs unique names
        assert "--cluster_name" in command
        assert "--cluster" in command
        assert set(command[command.index("--routes") + 1].split(",")) == routes
        (volume,) = services[name]["volumes"]
        volumes.add(volume.split(":")[0])
        assert services[name]["healthcheck"]["test"]
    assert len(volumes) == len(NATS_NODES)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_compose_migrate_then_flowd_replicas() -> None:
    services = _compose()
    assert set(services) == {*NATS_NODES, "postgres", "migrate", *FLOWD_SERVICES, "flowctl"}
    partitions = set()
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    for name in FLOWD_SERVICES:
        svc = services[name]
        assert svc["command"] == ["run"]
        assert svc["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert f"http://127.0.0.1:{HTTP_PORT}/readyz" in " ".join(svc["healthcheck"]["test"])
        env = svc["environment"]
        assert env["NATS_URL"].split(",") == [f"nats://{n}:4222" for n in NATS_NODES]
        settings = _deploy_settings(env)
        assert settings.stream_replicas == len(NATS_NODES) == 3
        assert settings.migrate is False
        assert settings.http_host == "0.0.0.0"
        partitions.add(settings.partitions)
    # Per-flow order across replicas needs partitions, the same N on every replica.
    (n,) = partitions
    assert n >= len(FLOWD_SERVICES)
    # Every flowd-image service builds deploy/Dockerfile from the repository root.
    for svc in _flowd_image_services().values():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]) == DEPLOY / "Dockerfile"


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or _run(docker, "compose", "version").returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose version` fails)")
    out = _run(docker, "compose", "-f", str(COMPOSE), "config", "--quiet")
    assert out.returncode == 0, out.stderr


def test_dockerfile_builds_the_project_into_a_non_root_flowd_image() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any("pip install ." in line for line in lines)
    assert 'ENTRYPOINT ["flowd"]' in lines
    assert 'CMD ["run"]' in lines
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


# -- systemd -----------------------------------------------------------------------------------


def test_systemd_unit_runs_flowd_run_hardened() -> None:
    unit = _unit()
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "flowd"
    assert argv[1:] == ["run"]
    expected = {
        "Type": "simple",
        "User": "flowd",
        "EnvironmentFile": "/etc/flowd/flowd.env",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "30",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "flowd",
    }
    assert {k: unit[k] for k in expected} == {k: [v] for k, v in expected.items()}
    environment = dict(v.partition("=")[::2] for v in unit["Environment"])
    assert environment == {"FLOWD_DATA_DIR": "/var/lib/flowd"}  # = the StateDirectory


def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: point it at this venv's flowd.
    flowd = Path(sys.executable).with_name("flowd")
    unit = tmp_path / "flowd.service"
    unit.write_text(
        (SYSTEMD / "flowd.service").read_text().replace("/usr/local/bin/flowd", str(flowd))
    )
    out = _run(analyze, "verify", str(unit), env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert out.returncode == 0, out.stderr
    assert str(unit) not in out.stderr, out.stderr  # e.g. "Unknown key" warnings


def test_systemd_env_example_is_valid() -> None:
    values, _ = _env_file(SYSTEMD / "flowd.env.example")
    settings = _deploy_settings(values)
    assert settings.nats_url is not None
    assert len(settings.nats_url.split(",")) == settings.stream_replicas


# -- consistency with the code and the README ----------------------------------------------------


def test_every_variable_deploy_sets_for_flowd_is_a_setting() -> None:
    names: set[str] = set()
    for svc in _flowd_image_services().values():
        names |= set(svc.get("environment", {}))
    names |= set(_k8s("ConfigMap")["data"])
    for kind in ("Deployment", "Job"):
        for container in _pod_spec(_k8s(kind))["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    names |= {v.partition("=")[0] for v in _unit().get("Environment", [])}
    names |= _env_file(SYSTEMD / "flowd.env.example")[1]
    assert {"NATS_URL", "DATABASE_URL", "FLOWD_STREAM_REPLICAS", "NATS_CREDS"} <= names
    assert names <= set(ENV.values()), names - set(ENV.values())


def test_endpoints_and_port_match_the_readme_and_the_code() -> None:
    assert "`GET /healthz`" in README
    assert "`GET /readyz`" in README
    assert f"| `FLOWD_HTTP_PORT` | `{HTTP_PORT}` |" in README
    assert Settings.model_fields["http_port"].default == HTTP_PORT


@pytest.mark.parametrize("command", ["run", "migrate"])
def test_flowd_subcommands_used_by_deploy_exist(command: str) -> None:
    out = _run(sys.executable, "-m", "flowd", command, "--help")
    assert out.returncode == 0, out.stderr
