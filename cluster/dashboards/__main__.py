"""Command line of `cluster.dashboards`: `build`, `check`, `push` (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.dashboards", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="regenerate helm/idlm/dashboards/*.json")
    b.add_argument("--out", default=None, help="output directory (default: the chart's dashboards/)")
    c = sub.add_parser("check", help="exit 1 if the committed JSON differs from the code")
    c.add_argument("--dir", default=None)
    p = sub.add_parser("push", help="create/overwrite the dashboards in a running Grafana")
    p.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
    p.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                   help="service-account token (default: $GRAFANA_TOKEN)")
    p.add_argument("--basic", default=None, help="user:password instead of a token")
    p.add_argument("--folder-uid", default="idlm-serve")
    p.add_argument("--folder-title", default="idlm-serve")
    p.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)

    from cluster.dashboards import build

    if a.cmd == "build":
        for path in build.write_all(a.out or build.DASHBOARD_DIR):
            print(path)
        return 0
    if a.cmd == "check":
        bad = build.stale(a.dir or build.DASHBOARD_DIR)
        if bad:
            print("stale dashboards (run `python -m cluster.dashboards build`): " + ", ".join(bad), file=sys.stderr)
            return 1
        print("dashboards up to date")
        return 0
    from cluster.dashboards.push import push

    if not a.token and not a.basic:
        ap.error("push needs --token (or $GRAFANA_TOKEN) or --basic user:password")
    basic = tuple(a.basic.split(":", 1)) if a.basic else None
    for r in push(a.url, a.token, basic=basic, folder_uid=a.folder_uid, folder_title=a.folder_title,
                  timeout=a.timeout):
        print(f"{r.get('status', 'ok')}: uid={r.get('uid')} url={r.get('url')} version={r.get('version')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
