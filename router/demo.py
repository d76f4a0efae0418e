"""`pgrouter demo`: a throwaway primary + 2 streaming replicas with the proxy in front.

Everything lives in a temporary directory and is removed on Ctrl-C, so a new user can try
the proxy with nothing but the PostgreSQL binaries installed.
"""

from __future__ import annotations

import sys

from router.cluster import ClusterError, LocalCluster
from router.config import parse_config

DEMO_USER = "app"
DEMO_PASSWORD = "app-demo"
DEMO_DATABASES = ("appdb", "reports")


def demo_topology(cluster: LocalCluster, port: int) -> dict[str, object]:
    primary = cluster.primary
    return {
        "listen": f"127.0.0.1:{port}",
        "pool_mode": "transaction",
        "pool_size": 10,
        "auth_type": "scram-sha-256",
        "users": {
            DEMO_USER: {"password": DEMO_PASSWORD},
            cluster.superuser: {"password": cluster.password},
        },
        "admin": {"users": [cluster.superuser]},
        "databases": {
            name: {
                "primary": f"{primary.host}:{primary.port}",
                "replicas": [f"{r.host}:{r.port}" for r in cluster.replicas],
            }
            for name in DEMO_DATABASES
        },
    }


def run_demo(port: int = 6432) -> int:
    from router.cli import serve

    print("pgrouter demo: starting a local primary and 2 streaming replicas...", flush=True)
    try:
        cluster = LocalCluster(replicas=2).start()
    except ClusterError as exc:
        print(f"pgrouter demo: {exc}", file=sys.stderr)
        return 1
    try:
        cluster.create_user(DEMO_USER, DEMO_PASSWORD)
        for name in DEMO_DATABASES:
            cluster.create_database(name, owner=DEMO_USER)
        config = parse_config(demo_topology(cluster, port))
        nodes = ", ".join(f"{n.name} on port {n.port}" for n in cluster.nodes)
        print(
            f"\n  PostgreSQL: {nodes} (data in {cluster.base_dir})\n"
            f"  pgrouter:   127.0.0.1:{port}, databases {', '.join(DEMO_DATABASES)}\n\n"
            f"  Connect:    PGPASSWORD={DEMO_PASSWORD} psql -h 127.0.0.1 -p {port} "
            f"-U {DEMO_USER} appdb\n"
            f"  Benchmark:  PGPASSWORD={DEMO_PASSWORD} pgbench -h 127.0.0.1 -p {port} "
            f"-U {DEMO_USER} -i appdb\n\n"
            "  Ctrl-C stops the proxy and the cluster and removes every file.\n",
            flush=True,
        )
        return serve(config)
    finally:
        print("pgrouter demo: stopping the cluster", flush=True)
        cluster.stop()
