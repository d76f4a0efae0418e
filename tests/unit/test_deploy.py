"""Static checks of the packaging: docker-compose.yml, deploy/Dockerfile, deploy/k8s/, systemd.

No Docker engine or Kubernetes cluster runs here, so these files are held to what can be
checked without one: they parse, everything they mount exists, the ports they publish and probe
agree with the topology they run, and that topology passes `pgrouter check`.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from router.config import Config, load_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
UNIT = ROOT / "deploy" / "systemd" / "pgrouter.service"

COMPOSE_SERVICES = {"primary", "replica1", "replica2", "pgrouter", "prometheus", "grafana"}
DATABASE_SERVICES = ("primary", "replica1", "replica2")
K8S_KINDS = {
    "configmap.yaml": ("v1", "ConfigMap"),
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
}
POSTGRES_PORT = 5432


# --------------------------------------------------------------------------------------------
# docker-compose.yml helpers
# --------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount; named volumes are skipped."""
    mounts = []
    for entry in svc.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type") != "bind":
                continue
            source, target = entry["source"], entry["target"]
        else:
            source, target, *_ = entry.split(":")
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        mounts.append((ROOT / source, target))
    return mounts


def mounted_at(svc: dict[str, Any], target: str) -> Path:
    """The host path bind-mounted at `target`."""
    for source, mount_target in bind_mounts(svc):
        if mount_target == target:
            return source
    raise AssertionError(f"nothing is bind-mounted at {target}")


def host_path_of(svc: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind `container_path`, through a bind mount of it or a parent dir."""
    for source, target in bind_mounts(svc):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / posixpath.relpath(container_path, target)
    return None


def published_ports(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from short ("[ip:]host:container[/tcp]") or long syntax."""
    result: dict[int, int] = {}
    entry: Any
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            target = int(entry["target"])
            published = int(entry.get("published", target))
        else:
            spec = str(entry).split("/")[0]
            parts = spec.rsplit(":", 2)
            target = int(parts[-1])
            published = int(parts[-2]) if len(parts) >= 2 else target
        result[target] = published
    return result


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    """dependency -> condition (service_started for the list form)."""
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def command_words(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command", [])
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def compose_topology_path() -> Path:
    return mounted_at(service("pgrouter"), container_config_path())


@cache
def compose_topology() -> Config:
    return load_config(compose_topology_path(), env=environment(service("pgrouter")))


# --------------------------------------------------------------------------------------------
# Dockerfile helpers
# --------------------------------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return instructions


def docker_args(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that ships)."""
    instructions = dockerfile()
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def entrypoint() -> list[str]:
    values = docker_args("ENTRYPOINT")
    assert values, "the Dockerfile has no ENTRYPOINT"
    words = json.loads(values[-1])  # exec form, so pgrouter is PID 1 and gets the signals
    assert isinstance(words, list)
    return words


def container_config_path() -> str:
    """The --config path of the image's ENTRYPOINT."""
    words = entrypoint()
    assert "--config" in words, f"ENTRYPOINT {words} passes no --config"
    return words[words.index("--config") + 1]


# --------------------------------------------------------------------------------------------
# Kubernetes helpers
# --------------------------------------------------------------------------------------------


@cache
def k8s_documents(name: str) -> list[dict[str, Any]]:
    text = (K8S / name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def k8s(kind: str) -> dict[str, Any]:
    for name, (_, expected_kind) in K8S_KINDS.items():
        if expected_kind == kind:
            (doc,) = k8s_documents(name)
            return doc
    raise KeyError(kind)


def pod_spec() -> dict[str, Any]:
    return k8s("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    named = [c for c in containers if c["name"] == "pgrouter"]
    assert len(named) == 1, "the Deployment needs exactly one container named pgrouter"
    return named[0]


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number or a containerPort name) as a number."""
    if isinstance(port, int):
        return port
    for item in container().get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    raise AssertionError(f"the pgrouter container has no port named {port!r}")


def container_env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container().get("env", [])}


def k8s_topology_text() -> str:
    data = k8s("ConfigMap")["data"]
    assert "topology.yaml" in data, "the ConfigMap has no topology.yaml key"
    return str(data["topology.yaml"])


@pytest.fixture
def k8s_topology(tmp_path: Path) -> Config:
    """The ConfigMap's topology, validated with dummy values for the Deployment's env vars
    (so a password_env the Deployment does not provide fails here)."""
    path = tmp_path / "topology.yaml"
    path.write_text(k8s_topology_text(), encoding="utf-8")
    env = {name: item.get("value", "dummy-secret") for name, item in container_env().items()}
    return load_config(path, env=env)


# --------------------------------------------------------------------------------------------
# systemd helpers
# --------------------------------------------------------------------------------------------


@cache
def unit() -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)], keeping repeated keys (ExecReload=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{UNIT.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT.name}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: str, key: str) -> list[str]:
    return [value for k, value in unit().get(section, []) if k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert values, f"[{section}] has no {key}="
    return values[-1]


def admin_port(config: Config) -> int:
    assert config.admin.http is not None, "admin.http must be on (probes, Prometheus)"
    return config.admin.http[1]


def ports_of(config: Config) -> Iterator[int]:
    for _, port in config.listen:
        yield port
    yield admin_port(config)


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------


def test_compose_parses_with_the_stack_services() -> None:
    services = compose()["services"]
    assert set(services) >= COMPOSE_SERVICES
    for name in DATABASE_SERVICES:
        assert str(service(name)["image"]).startswith("postgres:16")
    assert str(service("prometheus")["image"]).startswith("prom/prometheus")
    assert str(service("grafana")["image"]).startswith("grafana/grafana")
    build = service("pgrouter")["build"]
    assert (ROOT / build["context"]).resolve() == ROOT
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_bind_mounts_exist() -> None:
    missing = [
        f"{name}: {source.relative_to(ROOT)} -> {target}"
        for name, svc in compose()["services"].items()
        for source, target in bind_mounts(svc)
        if not source.exists()
    ]
    assert not missing, f"mounted but not in the repository: {missing}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_compose_shell_scripts_parse() -> None:
    scripts = {
        source
        for svc in compose()["services"].values()
        for source, _ in bind_mounts(svc)
        if source.suffix == ".sh"
    }
    assert scripts
    for script in sorted(scripts):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_compose_pgrouter_mounts_a_valid_topology() -> None:
    config = compose_topology()
    assert config.admin.http is not None, "admin.http must be on for Prometheus and healthchecks"
    for host, _ in (*config.listen, config.admin.http):
        # A loopback address inside the container cannot be reached through published ports.
        assert host in ("0.0.0.0", "::"), f"{host} is not reachable from outside the container"


def test_compose_topology_passes_pgrouter_check() -> None:
    path = compose_topology_path()
    result = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, **environment(service("pgrouter"))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK:")


def test_compose_publishes_the_topology_ports() -> None:
    published = published_ports(service("pgrouter"))
    for port in ports_of(compose_topology()):
        assert port in published, f"pgrouter listens on {port}, but compose does not publish it"
    exposed = {int(p.split("/")[0]) for args in docker_args("EXPOSE") for p in args.split()}
    assert set(ports_of(compose_topology())) <= exposed


def test_compose_topology_points_at_the_compose_databases() -> None:
    config = compose_topology()
    primary = environment(service("primary"))
    for db in config.databases.values():
        assert db.primary.host == "primary"
        assert {r.host for r in db.replicas} == set(DATABASE_SERVICES) - {"primary"}
        assert all(e.port == POSTGRES_PORT for e in db.backends)
    assert primary["APP_DB"] in {db.dbname for db in config.databases.values()}
    # The proxy logs in to the servers with its users' passwords: they must be the ones the
    # primary's init script (APP_*) and image (POSTGRES_*) create.
    server_passwords = {
        primary.get("POSTGRES_USER", "postgres"): primary["POSTGRES_PASSWORD"],
        primary["APP_USER"]: primary["APP_PASSWORD"],
    }
    for name, user in config.users.items():
        assert name in server_passwords, f"user {name} does not exist on the compose servers"
        assert user.password == server_passwords[name], f"user {name}: password differs"


def test_compose_streaming_replicas() -> None:
    primary = service("primary")
    words = command_words(primary)
    assert "wal_level=replica" in words
    assert "hot_standby=on" in words
    assert host_path_of(primary, "/docker-entrypoint-initdb.d/10-pgrouter.sh") is not None
    primary_env = environment(primary)
    for name in DATABASE_SERVICES:
        assert "pg_isready" in " ".join(service(name)["healthcheck"]["test"])
    for name in ("replica1", "replica2"):
        replica = service(name)
        env = environment(replica)
        assert env["PRIMARY_HOST"] == "primary"
        for key in ("REPLICATION_USER", "REPLICATION_PASSWORD"):
            assert env[key] == primary_env[key], f"{name}: {key} differs from the primary's"
        assert depends_on(replica) == {"primary": "service_healthy"}
        script = host_path_of(replica, replica["entrypoint"][-1])
        assert script is not None and "pg_basebackup" in script.read_text(encoding="utf-8")
        # Same server settings as the primary: a standby refuses smaller max_connections etc.
        assert command_words(replica) == words


def test_compose_pgrouter_waits_for_the_databases_and_drains() -> None:
    pgrouter = service("pgrouter")
    deps = depends_on(pgrouter)
    assert {name: deps.get(name) for name in DATABASE_SERVICES} == dict.fromkeys(
        DATABASE_SERVICES, "service_healthy"
    )
    grace = parse_duration(pgrouter.get("stop_grace_period", "10s"))
    assert grace > compose_topology().shutdown_timeout


def test_compose_prometheus_scrapes_pgrouter() -> None:
    prometheus_yml = mounted_at(service("prometheus"), "/etc/prometheus/prometheus.yml")
    data = yaml.safe_load(prometheus_yml.read_text(encoding="utf-8"))
    wanted = f"pgrouter:{admin_port(compose_topology())}"
    scraped = [
        job
        for job in data["scrape_configs"]
        for static in job.get("static_configs", [])
        if wanted in static.get("targets", [])
    ]
    assert scraped, f"no scrape job targets {wanted}"
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in scraped)


def test_compose_grafana_is_provisioned() -> None:
    grafana = service("grafana")
    provisioning = mounted_at(grafana, "/etc/grafana/provisioning")
    dashboards_target = "/var/lib/grafana/dashboards"
    dashboards = mounted_at(grafana, dashboards_target)
    assert provisioning.is_dir() and dashboards.is_dir()
    dashboard_files = sorted(dashboards.glob("*.json"))
    assert dashboard_files, "no dashboard JSON to provision"
    for path in dashboard_files:
        json.loads(path.read_text(encoding="utf-8"))

    prometheus_port = next(iter(published_ports(service("prometheus"))))
    urls = [
        source.get("url", "")
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", [])
        if source.get("type") == "prometheus"
    ]
    assert urls, "no Prometheus data source is provisioned"
    assert all(urlsplit(url).netloc == f"prometheus:{prometheus_port}" for url in urls), urls

    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text(encoding="utf-8")).get("providers", [])
    ]
    assert providers, "no dashboard provider is provisioned"
    for provider in providers:
        path = provider["options"]["path"]
        assert host_path_of(grafana, path) is not None, f"dashboard path {path} is not mounted"

    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        home_file = host_path_of(grafana, home)
        assert home_file is not None and home_file.is_file(), home


# --------------------------------------------------------------------------------------------
# deploy/Dockerfile
# --------------------------------------------------------------------------------------------


def test_dockerfile_slim_python_non_root() -> None:
    base = final_stage()[0][1].split()[0]
    assert re.fullmatch(r"python:(\$\{PYTHON_VERSION\}|3\.1[1-9])-slim", base), base
    arg_defaults = dict(a.split("=", 1) for a in docker_args("ARG") if "=" in a)
    if "PYTHON_VERSION" in arg_defaults:
        assert re.fullmatch(r"3\.1[1-9]", arg_defaults["PYTHON_VERSION"])
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    assert re.fullmatch(r"[1-9]\d*", user), "a numeric USER lets Kubernetes check runAsNonRoot"
    assert int(user) == pod_spec()["securityContext"]["runAsUser"]


def test_dockerfile_installs_the_package_from_the_build_context() -> None:
    copied = {
        word.rstrip("/")
        for args in docker_args("COPY")
        if not args.startswith("--from")
        for word in args.split()[:-1]
    }
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {pattern.rstrip("*") for pattern in packages} | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    runs = [args for keyword, args in final_stage() if keyword == "RUN"]
    assert any(re.search(r"\bpip install\b.*\bpgrouter\b", args) for args in runs), runs


def test_dockerfile_entrypoint_and_healthcheck() -> None:
    assert entrypoint()[:1] == ["pgrouter"]
    assert container_config_path() == "/etc/pgrouter/topology.yaml"
    exposed = {p for args in docker_args("EXPOSE") for p in args.split()}
    assert {"6432", "9930"} <= exposed
    (healthcheck,) = docker_args("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")  # it is valid Python
    env = " ".join(docker_args("ENV"))
    url = re.search(r"PGROUTER_HEALTHCHECK_URL=(\S+)", env)
    target = url.group(1) if url else command[2]
    assert f":{admin_port(compose_topology())}/healthz" in target


# --------------------------------------------------------------------------------------------
# deploy/k8s/
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(K8S_KINDS))
def test_k8s_manifest_parses_with_its_kind(name: str) -> None:
    docs = k8s_documents(name)
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    (doc,) = docs
    assert (doc["apiVersion"], doc["kind"]) == K8S_KINDS[name]
    assert doc["metadata"]["name"]


def test_k8s_has_no_unexpected_manifests() -> None:
    assert {path.name for path in K8S.glob("*.y*ml")} == set(K8S_KINDS)


def test_k8s_configmap_topology_is_valid(k8s_topology: Config) -> None:
    assert k8s_topology.admin.http is not None
    assert all(host in ("0.0.0.0", "::") for host, _ in k8s_topology.listen)


def test_k8s_probes_hit_the_admin_http_port(k8s_topology: Config) -> None:
    port = admin_port(k8s_topology)
    c = container()
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(get["port"]) == port, probe
    declared = {int(p["containerPort"]) for p in c["ports"]}
    assert set(ports_of(k8s_topology)) <= declared


def test_k8s_deployment_mounts_the_topology_where_the_image_reads_it() -> None:
    config_path = container_config_path()
    c = container()
    assert "command" not in c, "keep the image's ENTRYPOINT (and its --config)"
    assert "--config" not in c.get("args", [])
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    configmap_name = k8s("ConfigMap")["metadata"]["name"]
    found = False
    for mount in c["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None or source["name"] != configmap_name:
            continue
        items = {item["path"]: item["key"] for item in source.get("items", [])}
        if "subPath" in mount:
            files = {mount["mountPath"]: items.get(mount["subPath"], mount["subPath"])}
        else:
            names = items or {key: key for key in k8s("ConfigMap")["data"]}
            files = {posixpath.join(mount["mountPath"], p): k for p, k in names.items()}
        found = found or files.get(config_path) == "topology.yaml"
    assert found, f"the ConfigMap's topology.yaml is not mounted at {config_path}"


def test_k8s_deployment_shape() -> None:
    deployment = k8s("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    c = container()
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


def test_k8s_termination_covers_the_drain(k8s_topology: Config) -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    pre_stop = container().get("lifecycle", {}).get("preStop", {}).get("exec", {})
    command = pre_stop.get("command", [])
    sleep = float(command[1]) if command[:1] == ["sleep"] else 0.0
    assert grace > sleep + k8s_topology.shutdown_timeout


def test_k8s_server_connection_budget(k8s_topology: Config) -> None:
    """replicas x the per-pod budget stays under max_connections, also during rollouts."""
    spec = k8s("Deployment")["spec"]
    env = container_env()
    budget = int(env["PGROUTER_SERVER_CONN_BUDGET"]["value"])
    max_connections = int(env["PGROUTER_POSTGRES_MAX_CONNECTIONS"]["value"])
    # What one pod may open to each server: pool_size per (database, user, backend).
    per_server: dict[tuple[str, int], int] = {}
    for db in k8s_topology.databases.values():
        for backend in db.backends:
            key = (backend.host, backend.port)
            per_server[key] = per_server.get(key, 0) + db.pool_size * len(k8s_topology.users)
    assert max(per_server.values()) <= budget, f"one pod needs {per_server}, budget {budget}"
    surge = spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 0)
    assert surge in (0, "0", "0%"), "a surge pod would open connections beyond the budget"
    assert spec["replicas"] * budget < max_connections


def test_k8s_service_and_pdb_select_the_pods(k8s_topology: Config) -> None:
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = k8s("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    targets = {
        int(p["port"]): container_port(p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]
    }
    listen_port = k8s_topology.listen[0][1]
    assert targets == {6432: listen_port, 9930: admin_port(k8s_topology)}
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------------------------
# deploy/systemd/pgrouter.service
# --------------------------------------------------------------------------------------------


def test_systemd_unit() -> None:
    assert unit_value("Service", "Type") == "exec"
    user = unit_value("Service", "User")
    assert user and user not in ("root", "0")
    exec_start = unit_value("Service", "ExecStart").split()
    assert Path(exec_start[0]).name == "pgrouter"
    assert exec_start[1:] == ["--config", "/etc/pgrouter/topology.yaml"]
    assert unit_values("Service", "ExecReload")[-1] == "/bin/kill -HUP $MAINPID"
    assert unit_value("Service", "KillSignal") == "SIGTERM"
    assert unit_value("Service", "Restart") == "on-failure"
    stop_timeout = parse_duration(unit_value("Service", "TimeoutStopSec"))
    assert stop_timeout > Config().shutdown_timeout
    assert int(unit_value("Service", "LimitNOFILE")) >= 2 * Config().max_client_conn
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert unit_value("Service", key) == value, key
    assert unit_value("Install", "WantedBy") == "multi-user.target"
