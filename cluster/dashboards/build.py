"""Renders the dashboard dataclasses (`panels.py`) to Grafana dashboard JSON.

Owns: `to_json(dashboard)` (Grafana schemaVersion 39 model: rows, timeseries/stat panels with
gridPos laid out two to a row, a Prometheus `datasource` variable and `label_values` query
variables), `render_all()` (file name -> JSON text, deterministic), and `write_all()` which writes
the committed files in `helm/idlm/dashboards/` that the chart embeds with `.Files.Get`.
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.dashboards.panels import DASHBOARDS, Dashboard, Panel, Variable

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "helm" / "idlm" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": p.unit, "color": {"mode": "palette-classic"}}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
        }
    out = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DS, "expr": t.expr, "legendFormat": t.legend or "__auto", "refId": chr(ord("A") + i),
             "range": True, "instant": False, "editorMode": "code"}
            for i, t in enumerate(p.targets)
        ],
    }
    return out


def _variable_json(v: Variable) -> dict:
    metric = f"{v.metric}{{{v.selector}}}" if v.selector else v.metric
    query = f"label_values({metric}, {v.label_name})"
    return {
        "name": v.name,
        "label": v.label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
    }


def to_json(d: Dashboard) -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row in d.rows:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        x, row_h = 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    datasource_var = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
    }
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": d.tags,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": d.refresh,
        "time": {"from": d.time_from, "to": "now"},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource_var] + [_variable_json(v) for v in d.variables]},
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text for every dashboard (stable key order and indentation)."""
    return {d.filename: json.dumps(to_json(d), indent=2, sort_keys=False) + "\n" for d in DASHBOARDS}


def dashboard_files(directory: Path = DASHBOARD_DIR) -> dict[str, dict]:
    """The committed dashboards: file name -> parsed JSON."""
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def write_all(directory: Path = DASHBOARD_DIR) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale(directory: Path = DASHBOARD_DIR) -> list[str]:
    """Names of dashboards whose committed JSON differs from what the code generates."""
    out = []
    for name, text in render_all().items():
        path = Path(directory) / name
        if not path.exists() or path.read_text() != text:
            out.append(name)
    expected = set(render_all())
    out += sorted(p.name for p in Path(directory).glob("*.json") if p.name not in expected)
    return out
