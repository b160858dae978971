"""Generates the helm chart's `helm/idlm/values.schema.json` (pure: no ray, no torch).

Owns: the JSON Schema of the chart's values. The chart-level keys (image, head, workerGroups,
service, metrics, dashboards...) are written here by hand; the `app` block (the Serve application's
`args`) is `cluster.config.AppConfig.model_json_schema()`, so `helm install/template/lint` refuses a
misspelt or out-of-range app field with the same rules as `serve run`, and the schema cannot drift
from the config model (a test regenerates it and compares).

    python -m cluster.chart_schema            # rewrite helm/idlm/values.schema.json
    python -m cluster.chart_schema --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "helm" / "idlm" / "values.schema.json"

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_LIST = {"type": "array"}
_STRMAP = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _pod(extra: dict | None = None) -> dict:
    props = {
        "rayStartParams": _STRMAP,
        "resources": _obj({"requests": _OBJ, "limits": _OBJ}),
        "labels": _LABELS,
        "annotations": _LABELS,
        "nodeSelector": _LABELS,
        "tolerations": _LIST,
        "affinity": _OBJ,
        "env": _LIST,
        "volumes": _LIST,
        "volumeMounts": _LIST,
    }
    props.update(extra or {})
    return _obj(props)


def _monitor() -> dict:
    return _obj({
        "enabled": _BOOL, "namespace": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION,
        "labels": _LABELS, "honorLabels": _BOOL,
    })


def chart_schema() -> dict:
    from cluster.config import AppConfig

    app = AppConfig.model_json_schema()
    defs = app.pop("$defs", {})
    app.pop("title", None)
    worker = _pod({
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 40},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "gpus": {"type": "integer", "minimum": 0},
        "shmSize": _STR,
    })
    worker["required"] = ["groupName", "replicas", "minReplicas", "maxReplicas"]
    schema = _obj({
        "global": _OBJ,
        "nameOverride": _STR,
        "fullnameOverride": _STR,
        "image": _obj({"repository": _STR, "tag": _STR,
                       "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, ["repository"]),
        "imagePullSecrets": _LIST,
        "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+"},
        "serve": _obj({
            "applicationName": {"type": "string", "minLength": 1},
            "routePrefix": {"type": "string", "pattern": "^/"},
            "importPath": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"},
            "proxyLocation": {"enum": ["HeadOnly", "EveryNode", "Disabled"]},
            "port": _PORT,
            "runtimeEnv": _OBJ,
        }, ["applicationName", "routePrefix", "importPath"]),
        "app": app,
        "apiKey": _obj({"existingSecret": _STR, "secretKey": {"type": "string", "minLength": 1},
                        "envName": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}}),
        "rayService": _obj({
            "upgradeStrategy": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
            "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
            "excludeHeadPodFromServeSvc": _BOOL,
            "enableInTreeAutoscaling": {"type": ["boolean", "null"]},
        }),
        "common": _obj({"env": _LIST, "envFrom": _LIST}),
        "head": _pod({"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}),
        "workerGroups": {"type": "array", "minItems": 1, "items": worker},
        "service": _obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                         "annotations": _LABELS, "labels": _LABELS}),
        "metrics": _obj({
            "port": _PORT,
            "service": _obj({"enabled": _BOOL, "annotations": _LABELS}),
            "serviceMonitor": _monitor(),
            "podMonitor": _monitor(),
        }),
        "dashboards": _obj({"enabled": _BOOL, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS}),
    }, ["image", "serve", "app", "workerGroups"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "idlm chart values (generated by `python -m cluster.chart_schema`; app = cluster.config.AppConfig)",
        **schema,
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.chart_schema", description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run `python -m cluster.chart_schema`", file=sys.stderr)
            return 1
        print("values.schema.json up to date")
        return 0
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
