"""Provisions the generated dashboards to a running Grafana over its HTTP API with `grafana-client`.

Owns: `push(url, token, folder_uid, folder_title, ...)`: makes sure the target folder exists
(`GET /api/folders/<uid>`, `POST /api/folders` on 404) and creates or overwrites each dashboard
(`POST /api/dashboards/db` with `overwrite: true`). Authentication: a service-account / API token
(`Authorization: Bearer`), or `user:password` basic auth. The chart's ConfigMaps (Grafana sidecar)
are the other way in; this is for a Grafana without the sidecar.
"""

from __future__ import annotations

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError

from cluster.dashboards.build import to_json
from cluster.dashboards.panels import DASHBOARDS, Dashboard


def client(url: str, token: str | None = None, basic: tuple[str, str] | None = None,
           timeout: float = 10.0) -> GrafanaApi:
    credential = token if token else basic
    return GrafanaApi.from_url(url=url, credential=credential, timeout=timeout)


def ensure_folder(api: GrafanaApi, uid: str, title: str) -> str:
    try:
        return api.folder.get_folder(uid)["uid"]
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
    return api.folder.create_folder(title, uid=uid)["uid"]


def push(url: str, token: str | None = None, *, basic: tuple[str, str] | None = None,
         folder_uid: str = "idlm-serve", folder_title: str = "idlm-serve",
         dashboards: list[Dashboard] | None = None, message: str = "provisioned by cluster.dashboards",
         timeout: float = 10.0) -> list[dict]:
    """Create/overwrite every dashboard in one folder; returns Grafana's responses (uid, url, version)."""
    api = client(url, token, basic, timeout)
    folder = ensure_folder(api, folder_uid, folder_title)
    results = []
    for d in dashboards or DASHBOARDS:
        body = to_json(d)
        body.pop("id", None)  # let Grafana match on uid
        results.append(api.dashboard.update_dashboard(
            {"dashboard": body, "folderUid": folder, "overwrite": True, "message": message}))
    return results
