"""The documentation under docs/ against the code, so it cannot drift: every YAML example is a
topology that passes `pgrouter check`, the topology reference names every key the loader
accepts, and the metrics page names every metric the collector exports."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from router import config as config_module
from router.config import load_config
from router.metrics import render
from tests.unit.test_admin import make_proxy

DOCS = Path(__file__).resolve().parents[2] / "docs"
README = DOCS.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_ENV = re.compile(r"password_env:\s*[\"']?(\w+)")
# A fragment without `databases:` is checked inside this smallest valid file.
_BASE = 'users:\n  app: {password: "pw"}\ndatabases:\n  appdb:\n    primary: "10.0.0.1:5432"\n'


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in doc_files():
        for i, match in enumerate(_FENCE.finditer(path.read_text(encoding="utf-8"))):
            if match.group(1) in ("yaml", "yml"):
                blocks.append((f"{path.name}#{i}", match.group(2)))
    return blocks


def test_docs_exist_and_readme_lists_them() -> None:
    names = {p.name for p in doc_files()}
    expected = {
        "topology.md",
        "migrating-from-pgbouncer.md",
        "replacing-haproxy-patroni.md",
        "operations.md",
        "metrics.md",
    }
    assert expected <= names
    readme = README.read_text(encoding="utf-8")
    for name in expected:
        assert f"(docs/{name})" in readme, f"README does not link docs/{name}"


@pytest.mark.parametrize(("where", "text"), yaml_blocks())
def test_yaml_examples_are_valid_topologies(where: str, text: str, tmp_path: Path) -> None:
    if not re.search(r"^databases:", text, re.M):
        text = _BASE + text
    path = tmp_path / "topology.yaml"
    path.write_text(text, encoding="utf-8")
    env = {name: "secret" for name in _ENV.findall(text)}
    config = load_config(path, env=env)  # the loader behind `pgrouter check`
    assert config.databases, where


def test_there_are_yaml_examples() -> None:
    assert len(yaml_blocks()) >= 10


def test_topology_reference_names_every_key() -> None:
    text = (DOCS / "topology.md").read_text(encoding="utf-8")
    keys = [
        *config_module._TOP_KEYS,
        *config_module._DATABASE_KEYS,
        *config_module._ROUTING_KEYS,
        *config_module._ENDPOINT_KEYS,
        *config_module._USER_KEYS,
        *config_module._ADMIN_KEYS,
        *config_module._LOG_KEYS,
        *config_module._CLIENT_TLS_KEYS,
        *config_module._SERVER_TLS_KEYS,
        *config_module.CLIENT_TLS_MODES,
        *config_module.SERVER_TLS_MODES,
        *config_module.POOL_MODES,
        *config_module.AUTH_TYPES,
        *config_module.ROUTING_READS,
        *config_module.READ_YOUR_WRITES_SCOPES,
        *config_module.LOG_LEVELS,
        *config_module.LOG_FORMATS,
    ]
    missing = [key for key in keys if f"`{key}`" not in text and f".{key}`" not in text]
    assert not missing, f"docs/topology.md does not mention {missing}"


def _exported_metric_names() -> set[str]:
    """Every metric family the collector yields, with backends and a router in place."""
    proxy = make_proxy()
    appdb = proxy.config.databases["appdb"]
    proxy.pool_for(appdb, "app")
    primary, replica = appdb.primary, appdb.replicas[0]
    proxy.monitors[(primary.host, primary.port)] = SimpleNamespace(  # type: ignore[assignment]
        up=True, in_recovery=False, lsn=2000, checks=1, failures=0, transitions=1, time_lag=0.0
    )
    proxy.monitors[(replica.host, replica.port)] = SimpleNamespace(  # type: ignore[assignment]
        up=True, in_recovery=True, lsn=1000, checks=1, failures=0, transitions=1, time_lag=0.5
    )
    proxy.routers["appdb"] = SimpleNamespace(  # type: ignore[assignment]
        to_replica=1,
        to_primary=1,
        no_replica=0,
        ryw_fallbacks=0,
        misroutes=0,
        lost_retries=0,
        catalog_waits=0,
        lag_fallbacks=0,
        classifier=SimpleNamespace(hits=1, misses=1, parse_seconds=0.01),
    )
    text = render(proxy).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def test_metrics_page_names_every_metric() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    names = _exported_metric_names()
    assert "pgrouter_backend_lag_bytes" in names and "pgrouter_misroutes_total" in names

    def documented(name: str) -> bool:
        if f"`{name}`" in text:
            return True
        # Shorthands used on the page: the pre-0.11 stats names and grouped database gauges.
        if name.startswith("pgbouncer_stats_") and not name.startswith("pgbouncer_stats_totals_"):
            return f"`pgbouncer_stats_totals_{name[len('pgbouncer_stats_') :]}`" in text
        if name.startswith("pgbouncer_databases_"):
            return f"`_{name[len('pgbouncer_databases_') :]}`" in text
        return False

    missing = sorted(name for name in names if not documented(name))
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_admin_commands_are_documented() -> None:
    from router.admin import AdminConsole

    console = AdminConsole(make_proxy())
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    shows = [f"SHOW {name.upper()}" for name in console._shows]
    commands = [name.upper() for name in console._commands if name not in ("show", "select")]
    missing = [c for c in [*shows, *commands] if c not in text]
    assert not missing, f"docs/operations.md does not mention {missing}"
