"""Session fixtures: one real PostgreSQL primary + 2 streaming replicas per test session.

PGROUTER_TEST_BACKEND=docker takes the servers from testcontainers instead of the local
PostgreSQL binaries (needs a Docker engine).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    APP_PASSWORD,
    APP_USER,
    DATABASES,
    MD5_PASSWORD,
    MD5_USER,
    ProxyProcess,
    ProxyStartError,
    base_topology,
    deep_merge,
    free_port,
    start_proxy,
)

ProxyFactory = Callable[..., ProxyProcess]


def _make_cluster() -> Any:
    backend = os.environ.get("PGROUTER_TEST_BACKEND", "local")
    if backend == "docker":
        from tests.docker_cluster import DockerCluster

        return DockerCluster(replicas=2).start()
    if backend != "local":
        raise pytest.UsageError(f"PGROUTER_TEST_BACKEND={backend!r}: expected local or docker")
    from router.cluster import LocalCluster

    return LocalCluster(replicas=2).start()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A started primary + 2 replicas with the test users and databases, shared by all tests."""
    c = _make_cluster()
    try:
        c.create_user(APP_USER, APP_PASSWORD)
        c.create_user(MD5_USER, MD5_PASSWORD, md5=True)
        for db in DATABASES:
            c.create_database(db, owner=APP_USER)
        c.wait_replicated()
        yield c
    finally:
        c.stop()


@pytest.fixture
def proxy_factory(cluster: Any, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start pgrouter processes in front of `cluster`; all are stopped at teardown.

    factory(config=None, *, args=(), env=None, timeout=15, **overrides): the base topology
    (see tests.support.base_topology), deep-merged with `config`, then with `overrides`
    (tests.support.DELETE removes a key). A proxy that exits or does not listen fails the test;
    to expect that, call tests.support.start_proxy and catch ProxyStartError.
    """
    started: list[ProxyProcess] = []

    def factory(
        config: dict[str, Any] | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        timeout: float = 15.0,
        **overrides: Any,
    ) -> ProxyProcess:
        topology = deep_merge(base_topology(cluster, free_port()), config or {})
        topology = deep_merge(topology, overrides)
        failure = ""
        try:
            proxy = start_proxy(
                topology,
                tmp_path,
                name=f"proxy{len(started) + 1}",
                args=args,
                env=env,
                timeout=timeout,
            )
        except ProxyStartError as exc:
            failure = str(exc)
        if failure:  # failed outside the except block: the log shows once, not chained twice
            pytest.fail(failure, pytrace=False)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:  # signal all first so they drain in parallel
        if proxy.returncode is None:
            proxy.proc.send_signal(signal.SIGTERM)
    for proxy in started:
        proxy.stop(signal.SIGTERM, timeout=10)
