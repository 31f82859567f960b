"""Health check of the Ray node in this container: exit 0 when healthy, 1 (and one line
saying why) when not.

    python infra/docker/healthcheck.py            # the raylet (every node)
    python infra/docker/healthcheck.py --head     # and the cluster's GCS (the head)

It asks the endpoints that KubeRay's own probes ask: the dashboard agent's
`/api/local_raylet_healthz` on every node, and the dashboard's `/api/gcs_healthz` on the
head. Both answer without Ray's auth token. Only the standard library is used, so the
check costs no Ray import.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

AGENT_PORT = 52365  # Ray's default dashboard agent port (ray_constants)
DASHBOARD_PORT = 8265


def check(url: str, timeout: float) -> str | None:
    """None when `url` answers 200 with `success`, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(200).decode(errors="replace").strip()
    except urllib.error.HTTPError as err:
        return f"{url} answered {err.code}: {err.read(200).decode(errors='replace').strip()}"
    except OSError as err:
        return f"{url} unreachable: {err}"
    return None if body == "success" else f"{url} answered {body!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", action="store_true", help="also check the cluster's GCS")
    parser.add_argument("--host", default="127.0.0.1", help="where the node listens")
    parser.add_argument("--agent-port", type=int, default=AGENT_PORT, help="dashboard agent")
    parser.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per request")
    args = parser.parse_args(argv)
    urls = [f"http://{args.host}:{args.agent_port}/api/local_raylet_healthz"]
    if args.head:
        urls.append(f"http://{args.host}:{args.dashboard_port}/api/gcs_healthz")
    for url in urls:
        problem = check(url, args.timeout)
        if problem:
            print(f"unhealthy: {problem}")
            return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
