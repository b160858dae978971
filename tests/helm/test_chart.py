"""Tests of the helm chart `helm/idlm`, rendered and linted with Helm's own Go engine
(helm-python-sdk, no helm binary).

Owns: rendering of the default values and variations (autoscaling off/on, ServiceMonitor + PodMonitor,
two GPU worker groups with tolerations, API key from a Secret); `helm lint --strict`; validation of
built-in kinds with kubernetes-validate (Kubernetes 1.33, strict), of the RayService against the
upstream KubeRay CRD schema (jsonschema, unknown fields refused as with `kubectl --validate=strict`),
of `serveConfigV2` with Ray Serve's own `ServeDeploySchema` and with `cluster.config.AppConfig`
(what `serve run` would do), and the negative cases (bad values -> errors).
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go engine) is not installed")

from cluster import chart_schema  # noqa: E402
from cluster.config import AppConfig  # noqa: E402
from cluster.dashboards import build as dash_build  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "idlm"
CRD_DIR = REPO.parent / "shared" / "kuberay"  # the workplace copy, when present
VENDORED_CRD = Path(__file__).with_name("crd") / "ray.io_rayservices.yaml.gz"  # see crd/README.md
K8S_VERSION = "1.33.0"
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}

SERVICE_MONITORS = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "30s"},
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    }
}
TWO_GPU_GROUPS = {
    "app": {"replica": {"autoscaling_config": None, "num_replicas": 3,
                        "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}},
    "workerGroups": [
        {"groupName": "h100", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 2,
         "resources": {"limits": {"cpu": "16", "memory": "128Gi"}},
         "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                         {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
         "rayStartParams": {"num-cpus": 16}},
        {"groupName": "l40s", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "gpus": 1,
         "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    ],
}
API_KEY_SECRET = {
    "apiKey": {"existingSecret": "idlm-api-key", "secretKey": "token"},
    "common": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
    "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
}
FIXED_REPLICAS = {
    "app": {"replica": {"autoscaling_config": None, "num_replicas": 1}},
    "dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "idlm-serve"}},
    "rayService": {"upgradeStrategy": "None"},
}
VARIANTS = {
    "default": {},
    "fixed-replicas": FIXED_REPLICAS,
    "monitors": SERVICE_MONITORS,
    "two-gpu-groups": TWO_GPU_GROUPS,
    "api-key-secret": API_KEY_SECRET,
}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def render(chart, values: dict | None = None) -> list[dict]:
    out = chart.render(values or {}, name="idlm", namespace="llm", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def serve_config(docs: list[dict]) -> dict:
    (rs,) = by_kind(docs, "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(docs: list[dict]) -> dict:
    (app,) = serve_config(docs)["applications"]
    return app["args"]


# ------------------------------------------------------------------ lint, schema file, render


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict_clean(variant):
    report = helm.lint(str(CHART), VARIANTS[variant], strict=True, namespace="llm", kube_version="v1.33.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_values_schema_is_generated_from_appconfig():
    assert (CHART / "values.schema.json").read_text() == chart_schema.render(), (
        "helm/idlm/values.schema.json is stale: run `python -m cluster.chart_schema`")


def test_dashboard_json_is_generated_from_code():
    assert dash_build.stale() == [], "run `python -m cluster.dashboards build`"


@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_kinds_validate(chart, variant):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    docs = render(chart, VARIANTS[variant])
    builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert {d["kind"] for d in builtin} >= {"Service", "ConfigMap"}
    for d in builtin:
        kv.validate(d, K8S_VERSION, strict=True)  # raises ValidationError


def _strict(schema):
    """CRD openAPIV3Schema -> JSON Schema refusing unknown fields (the API server prunes or, with
    fieldValidation=Strict, rejects them), except where the CRD preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return schema
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    crd = yaml.load(gzip.decompress(VENDORED_CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayservice_matches_upstream_crd(chart, rayservice_validator, variant):
    (rs,) = by_kind(render(chart, VARIANTS[variant]), "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_vendored_crd_is_the_upstream_file():
    shared = CRD_DIR / "ray.io_rayservices.yaml"
    if not shared.exists():
        pytest.skip(f"no workplace copy at {shared} to compare with")
    assert gzip.decompress(VENDORED_CRD.read_bytes()) == shared.read_bytes()


def test_crd_validation_catches_a_bad_manifest(chart, rayservice_validator):
    (rs,) = by_kind(render(chart), "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # not a string
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # misspelt field
    paths = {"/".join(map(str, e.path)) for e in rayservice_validator.iter_errors(bad)}
    assert "spec/rayClusterConfig/workerGroupSpecs/0/rayStartParams/num-gpus" in paths
    assert "spec/rayClusterConfig/headGroupSpec" in paths


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_is_what_serve_run_accepts(chart, variant):
    cfg = serve_config(render(chart, VARIANTS[variant]))
    # Ray Serve's own schema of a `serve deploy` / serveConfigV2 file.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    AppConfig.model_validate(app["args"])  # what cluster.app:build_app does first


def test_default_args_equal_deploy_idlm_gpu_yaml(chart):
    deploy = yaml.safe_load((REPO / "deploy" / "idlm-gpu.yaml").read_text())
    (dep_app,) = deploy["applications"]
    ours = AppConfig.model_validate(app_args(render(chart)))
    theirs = AppConfig.model_validate(dep_app["args"])
    assert ours.model_dump() == theirs.model_dump()
    assert serve_config(render(chart))["proxy_location"] == deploy["proxy_location"]


# ------------------------------------------------------------------ what the variants render


def test_default_render_shape(chart):
    docs = render(chart)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayService", "Service"]
    (rs,) = by_kind(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True  # app autoscaling on by default (as deploy/idlm-gpu.yaml)
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head["resources"])
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (wg,) = rc["workerGroupSpecs"]
    wc = wg["template"]["spec"]["containers"][0]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert wg["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "metrics", "containerPort": 8080} in wc["ports"]
    assert wg["rayStartParams"]["metrics-export-port"] == "8080"


def test_router_and_prefix_cache_values_reach_the_app(chart):
    args = app_args(render(chart))
    assert args["router"]["policy"] == "prefix" and args["enable_prefix_caching"] is True
    args = app_args(render(chart, {"app": {"enable_prefix_caching": False,
                                           "router": {"policy": "pow2", "imbalance_abs": 2}}}))
    cfg = AppConfig.model_validate(args)
    assert (cfg.router.policy, cfg.router.imbalance_abs, cfg.enable_prefix_caching) == ("pow2", 2, False)


def test_fixed_replicas_turn_off_ray_autoscaler(chart):
    docs = render(chart, FIXED_REPLICAS)
    (rs,) = by_kind(docs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert rs["spec"]["upgradeStrategy"] == {"type": "None"}
    assert app_args(docs)["replica"]["num_replicas"] == 1
    assert "autoscaling_config" not in app_args(docs)["replica"]
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "idlm-serve"}


def test_monitors_select_the_ray_pods(chart):
    docs = render(chart, SERVICE_MONITORS)
    (rs,) = by_kind(docs, "RayService")
    (sm,) = by_kind(docs, "ServiceMonitor")
    (pm,) = by_kind(docs, "PodMonitor")
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "idlm-metrics"]
    assert sm["apiVersion"] == pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == pm["metadata"]["labels"]["release"] == "prometheus"
    # ServiceMonitor -> metrics Service -> every Ray pod; PodMonitor -> every Ray pod.
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "30s"
    assert sm["spec"]["namespaceSelector"] == pm["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    rc = rs["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert any(p["name"] == "metrics" for p in pod["spec"]["containers"][0]["ports"])


def test_two_gpu_worker_groups(chart):
    docs = render(chart, TWO_GPU_GROUPS)
    (rs,) = by_kind(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is False
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"h100", "l40s"}
    h = groups["h100"]["template"]["spec"]
    assert h["containers"][0]["resources"]["limits"] == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "2"}
    assert h["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {t["key"] for t in h["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    assert groups["h100"]["rayStartParams"]["num-cpus"] == "16"  # ints become strings for the CRD
    assert groups["l40s"]["minReplicas"] == 0 and groups["l40s"]["maxReplicas"] == 2
    assert app_args(docs)["replica"]["num_replicas"] == 3


def test_api_key_from_secret_never_in_the_manifest(chart):
    docs = render(chart, API_KEY_SECRET)
    (rs,) = by_kind(docs, "RayService")
    assert "api_key" not in app_args(docs)
    rc = rs["spec"]["rayClusterConfig"]
    for pod in [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["IDLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "idlm-api-key", "key": "token"}}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    svc = rs["spec"]["serveService"]
    assert svc["spec"]["type"] == "LoadBalancer"
    # KubeRay replaces the ports by the head's container port named "serve"; keep them equal.
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]


def test_dashboard_configmaps_embed_the_generated_json(chart):
    cms = by_kind(render(chart), "ConfigMap")
    files = dash_build.dashboard_files()
    assert len(cms) == len(files) >= 1
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == files[name]
    assert render(chart, {"dashboards": {"enabled": False}}) and not by_kind(
        render(chart, {"dashboards": {"enabled": False}}), "ConfigMap")


def test_notes_render(chart):
    out = chart.render(API_KEY_SECRET | SERVICE_MONITORS, name="idlm", namespace="llm")
    notes = out["idlm/templates/NOTES.txt"]
    assert "kubectl -n llm get rayservice idlm" in notes
    assert "port-forward svc/idlm-serve 8000:8000" in notes
    assert "Authorization: Bearer" in notes and "ServiceMonitor idlm" in notes


# ------------------------------------------------------------------ negative cases


def test_bad_app_value_refused_by_values_schema(chart):
    with pytest.raises(helm.HelmError) as e:
        chart.render({"app": {"mode": "bogus"}}, name="idlm", namespace="llm")
    assert "mode" in str(e.value)
    with pytest.raises(helm.HelmError) as e:
        chart.render({"app": {"strid": 4}}, name="idlm", namespace="llm")  # misspelt field
    assert "strid" in str(e.value)
    with pytest.raises(helm.HelmError) as e:
        chart.render({"app": {"router": {"policy": "random"}}}, name="idlm", namespace="llm")
    assert "policy" in str(e.value)


def test_bad_app_value_that_only_appconfig_catches(chart):
    # Both fields are individually valid JSON-schema-wise; AppConfig's cross-field check (what
    # `serve run` runs first) refuses the combination, and so does this test's validation.
    docs = render(chart, {"app": {"replica": {"num_replicas": 2}}})  # + the default autoscaling_config
    with pytest.raises(Exception) as e:
        AppConfig.model_validate(app_args(docs))
    assert "num_replicas" in str(e.value) and "autoscaling_config" in str(e.value)
    docs = render(chart, {"app": {"stride": 8, "max_num_batched_tokens": 4}})
    with pytest.raises(Exception) as e:
        AppConfig.model_validate(app_args(docs))
    assert "max_num_batched_tokens" in str(e.value)


def test_not_enough_gpus_is_refused(chart):
    with pytest.raises(helm.HelmError) as e:
        chart.render({"app": {"replica": {"autoscaling_config": None, "num_replicas": 4}},
                      "workerGroups": [{"groupName": "gpu", "replicas": 2, "minReplicas": 2, "maxReplicas": 2,
                                        "gpus": 1}]}, name="idlm", namespace="llm")
    assert "need 4 GPUs" in str(e.value)


def test_api_key_twice_is_refused(chart):
    with pytest.raises(helm.HelmError) as e:
        chart.render({"app": {"api_key": "k"}, "apiKey": {"existingSecret": "s"}}, name="idlm", namespace="llm")
    assert "not both" in str(e.value)


def test_bad_chart_values_refused(chart):
    for bad in ({"workerGroups": []}, {"service": {"type": "Ingress"}},
                {"rayService": {"upgradeStrategy": "Rolling"}}, {"head": {"rayStartParams": {"x": [1]}}}):
        with pytest.raises(helm.HelmError):
            chart.render(bad, name="idlm", namespace="llm")
