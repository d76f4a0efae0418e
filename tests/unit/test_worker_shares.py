"""With `workers: N`, each worker's proxy takes its share of every pool and issues cancel keys
that name it (router.proxy with worker=(index, count))."""

from __future__ import annotations

import pytest

from router.config import parse_config
from router.proxy import Proxy

TOPOLOGY = {
    "users": {"app": {"password": "pw"}},
    "databases": {"appdb": {"primary": "10.0.0.1:5432", "pool_size": 5, "min_pool_size": 3}},
}


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_the_shares_add_up_to_the_configured_sizes(count: int) -> None:
    config = parse_config(TOPOLOGY, env={})
    database = config.databases["appdb"]
    settings = [
        Proxy(config, worker=(i, count)).pool_for(database, "app").settings for i in range(count)
    ]
    assert sum(s.pool_size for s in settings) == 5
    assert sum(s.min_pool_size for s in settings) == 3
    assert all(s.pool_size >= 1 and s.min_pool_size <= s.pool_size for s in settings)
    sizes = [s.pool_size for s in settings]
    assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first workers


def test_cancel_keys_name_the_worker_that_issued_them() -> None:
    config = parse_config(TOPOLOGY, env={})
    for index in range(3):
        proxy = Proxy(config, worker=(index, 3))
        for _ in range(200):
            pid, _secret = proxy.register_cancel_key(object())  # type: ignore[arg-type]
            assert pid % 3 == index
            assert 0 < pid < 2**31


def test_one_worker_keeps_the_whole_pool() -> None:
    config = parse_config(TOPOLOGY, env={})
    settings = Proxy(config).pool_for(config.databases["appdb"], "app").settings
    assert (settings.pool_size, settings.min_pool_size) == (5, 3)
