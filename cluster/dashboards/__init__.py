"""Grafana dashboards for idlm-serve, as code (pure data: no ray, no torch).

Owns: the dashboard definitions (`panels.py`), their JSON rendering and the committed files under
`helm/idlm/dashboards/` (`build.py`), provisioning to a live Grafana with `grafana-client`
(`push.py`), and the command line:

    python -m cluster.dashboards build            # regenerate helm/idlm/dashboards/*.json
    python -m cluster.dashboards check            # fail if the committed JSON is stale
    python -m cluster.dashboards push --url http://grafana:3000 --token <service-account token>

Every query names only metrics from `cluster.metric_names` (the engine exporter's vocabulary) or
Ray Serve's own metrics listed in `panels.SERVE_METRICS`; tests parse each query as PromQL and
check the names.
"""

from cluster.dashboards.build import DASHBOARD_DIR, dashboard_files, render_all
from cluster.dashboards.panels import DASHBOARDS, SERVE_METRICS, Dashboard, Panel, Target

__all__ = ["DASHBOARDS", "DASHBOARD_DIR", "SERVE_METRICS", "Dashboard", "Panel", "Target", "dashboard_files", "render_all"]
