"""Tests of the generated Grafana dashboards (`cluster.dashboards`).

Owns: dashboard structure; every panel / variable query parses as PromQL (promql-parser, the Rust
PromQL parser) and names only metrics the code exports (`cluster.metric_names`) or Ray Serve metrics
whose names are found in Ray's installed source; label names used per metric; `push` against a
local stdlib HTTP server speaking the Grafana endpoints it uses (requests recorded and checked);
and, marked slow, a real Prometheus scraping a running app under traffic, where every panel query
must return data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster import metric_names
from cluster.dashboards import DASHBOARDS, SERVE_METRICS
from cluster.dashboards.build import dashboard_files, render_all, to_json

ROOT = Path(__file__).resolve().parents[2]

# Labels each family carries. Engine: cluster.metric_names.LABELS + per-metric extras (see
# cluster/metrics.py); Ray Serve: the tag_keys in Ray's source (+ Ray's default tags).
ENGINE_EXTRA = {"idlm_accepted_tokens_per_pos": {"position"}, "idlm_rounds": {"kind"}, "idlm_requests": {"finish_reason"},
                "idlm_router_decisions": {"outcome"}, "idlm_stride_guard_steps": {"arm"}}
SERVE_LABELS = {
    "serve_num_http_requests": {"route", "method", "application", "status_code"},
    "serve_num_http_error_requests": {"route", "error_code", "method", "application"},
    "serve_http_request_latency_ms": {"route", "method", "application", "status_code"},
    "serve_num_ongoing_http_requests": {"node_id", "node_ip_address"},
    "serve_deployment_replica_healthy": {"deployment", "application", "replica"},
    "serve_deployment_request_counter": {"route", "deployment", "replica", "application"},
    "serve_deployment_processing_latency_ms": {"route", "deployment", "replica", "application"},
}
GRAFANA_VARS = {"$__rate_interval": "1m", "$model": ".*", "$mode": ".*", "$replica": ".*", "$application": ".*"}


def substitute(expr: str, rate_interval: str = "1m") -> str:
    out = expr.replace("$__rate_interval", rate_interval)
    for k, v in GRAFANA_VARS.items():
        out = out.replace(k, v)
    assert "$" not in out, out
    return out


def all_targets():
    return [(d.uid, p.title, t.expr) for d in DASHBOARDS for p in d.panels() for t in p.targets]


def variable_selectors() -> list[str]:
    out = []
    for f in dashboard_files().values():
        for v in f["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
                assert m, v["query"]
                out.append(m.group(1).replace("$model", ".*").replace("$mode", ".*"))
    return out


# ------------------------------------------------------------------ PromQL: parse + names + labels

pp = pytest.importorskip("promql_parser", reason="promql-parser (PyPI wheel of the Rust PromQL parser) is not installed")


def selectors(node) -> list:
    """All VectorSelectors in a parsed PromQL expression."""
    if isinstance(node, pp.VectorSelector):
        return [node]
    if isinstance(node, pp.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, pp.Call):
        return [s for a in node.args for s in selectors(a)]
    if isinstance(node, pp.BinaryExpr):
        return selectors(node.lhs) + selectors(node.rhs)
    if isinstance(node, pp.AggregateExpr):
        return selectors(node.expr) + (selectors(node.param) if node.param is not None else [])
    if isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return selectors(node.expr)
    assert isinstance(node, (pp.NumberLiteral, pp.StringLiteral)), type(node)
    return []


def grouping_labels(node) -> list[tuple[str, list]]:
    """(labels, selectors under it) of every `by (...)` aggregation."""
    out = []
    if isinstance(node, pp.AggregateExpr):
        if node.modifier is not None:
            out.append((list(node.modifier.labels), selectors(node.expr)))
        out += grouping_labels(node.expr)
    elif isinstance(node, pp.Call):
        for a in node.args:
            out += grouping_labels(a)
    elif isinstance(node, pp.BinaryExpr):
        out += grouping_labels(node.lhs) + grouping_labels(node.rhs)
    elif isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        out += grouping_labels(node.expr)
    return out


def ray_serve_source_names() -> set[str]:
    """Metric names declared in the installed Ray Serve source (read as text; ray is not imported)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    serve_dir = Path(list(spec.submodule_search_locations)[0]) / "serve"
    names = set()
    for py in serve_dir.rglob("*.py"):
        text = py.read_text(errors="replace").replace("{protocol_name}", "http")
        names |= set(re.findall(r'f?"(serve_[a-z0-9_]+)"', text))
    return names


def family(name: str) -> tuple[str, str]:
    """Exported series name -> (source, family) with Ray's prefix and suffixes removed."""
    assert name.startswith("ray_"), name
    base = name[4:]
    for suf in ("_bucket", "_sum", "_count", "_total", ""):
        if suf and not base.endswith(suf):
            continue
        fam = base[: len(base) - len(suf)] if suf else base
        if fam in metric_names.COUNTERS or fam in metric_names.GAUGES or fam in metric_names.HISTOGRAMS:
            return "engine", fam
        if fam in SERVE_METRICS:
            return "serve", fam
    raise AssertionError(f"{name}: neither an engine metric (cluster.metric_names) nor a known Ray Serve metric")


def allowed_labels(name: str) -> set[str]:
    src, fam = family(name)
    labels = set(metric_names.LABELS) | ENGINE_EXTRA.get(fam, set()) if src == "engine" else SERVE_LABELS[fam]
    if name.endswith("_bucket"):
        labels = labels | {"le"}
    return labels | {"instance", "job", "SessionName", "Component", "NodeAddress"}


def test_every_query_parses_and_names_only_exported_metrics():
    exported = set(metric_names.exported_names())
    serve_src = ray_serve_source_names()
    for fam in SERVE_METRICS:
        assert fam in serve_src, f"{fam} is not declared anywhere in Ray Serve's source"
    seen = set()
    for uid, title, expr in all_targets():
        try:
            ast = pp.parse(substitute(expr))
        except Exception as e:  # the parser raises ValueError with the position
            raise AssertionError(f"{uid} / {title}: {expr!r} does not parse: {e}") from e
        sels = selectors(ast)
        assert sels, (title, expr)
        for sel in sels:
            name = sel.name
            assert name, f"{title}: selector without a metric name in {expr!r}"
            src, fam = family(name)
            if src == "engine":
                assert name in exported, f"{title}: {name} is not in cluster.metric_names.exported_names()"
            seen.add(name)
            for m in sel.matchers.matchers:
                if m.name != "__name__":
                    assert m.name in allowed_labels(name), f"{title}: {name} has no label {m.name!r}"
        for labels, under in grouping_labels(ast):
            for sel in under:
                missing = set(labels) - allowed_labels(sel.name)
                assert not missing, f"{title}: by ({', '.join(labels)}) over {sel.name} lacks {missing}"
    for sel in variable_selectors():
        (vs,) = selectors(pp.parse(sel))
        assert vs.name in exported or family(vs.name)[0] == "serve"
    # The dashboards cover the whole engine vocabulary the brief lists.
    fams = {family(n)[1] for n in seen}
    wanted = set(metric_names.COUNTERS) | set(metric_names.GAUGES) | set(metric_names.HISTOGRAMS) | set(SERVE_METRICS)
    assert wanted - fams == set(), wanted - fams


def test_a_broken_query_is_caught():
    with pytest.raises(ValueError):
        pp.parse(substitute("sum(rate(ray_idlm_generation_tokens_total[$__rate_interval])"))  # missing ")"
    with pytest.raises(AssertionError):
        family("ray_idlm_generated_tokens_total")  # not exported by the engine


def test_promtool_agrees_if_installed(tmp_path):
    """Prometheus's own parser: every query as a recording rule, `promtool check rules`."""
    import shutil

    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"idlm:panel_{i}", "expr": substitute(expr, "1m")} for i, (_, _, expr) in enumerate(all_targets())]}]}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))  # YAML is a superset of JSON
    r = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ structure


def test_dashboard_structure():
    files = dashboard_files()
    assert set(files) == {d.filename for d in DASHBOARDS}
    assert {json.loads(t)["uid"] for t in render_all().values()} == {d.uid for d in DASHBOARDS}
    for name, d in files.items():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        names = [v["name"] for v in d["templating"]["list"]]
        assert names[0] == "datasource" and len(names) == len(set(names))
        titles = [p["title"] for p in d["panels"] if p["type"] != "row"]
        assert len(titles) == len(set(titles))
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
            if p["type"] == "row":
                continue
            assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["expr"] and t["refId"] for t in p["targets"])
        used = {v for p in d["panels"] for t in p.get("targets", []) for v in re.findall(r"\$(\w+)", t["expr"])}
        assert used <= set(names) | {"__rate_interval"}, used
    want = ["Token throughput", "Tokens per forward (TPF)", "Draft acceptance rate", "Acceptance by draft position",
            "ISD rounds by kind", "Time to first token", "Inter-token latency", "End-to-end request latency",
            "Running / waiting requests", "KV cache usage", "HTTP requests", "HTTP errors", "HTTP latency",
            "Healthy Serve replicas", "Engine replicas"]
    titles = {p.title for d in DASHBOARDS for p in d.panels()}
    assert set(want) <= titles, set(want) - titles


def test_dashboards_import_neither_ray_nor_torch():
    code = ("import sys, cluster.dashboards, cluster.dashboards.push, cluster.chart_schema; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}); print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ push against a local Grafana API


class FakeGrafanaAPI:
    """A stdlib HTTP server on 127.0.0.1 that implements the three Grafana endpoints `push` uses
    (GET /api/folders/<uid>, POST /api/folders, POST /api/dashboards/db), with Grafana's response
    shapes, bearer-token auth, and a log of every request."""

    def __init__(self, token: str = "s3cret") -> None:
        self.token, self.requests, self.folders, self.dashboards = token, [], {}, {}
        api = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                api.requests.append({"method": method, "path": self.path, "auth": self.headers.get("Authorization"),
                                     "content_type": self.headers.get("Content-Type"), "body": body})
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    return self._reply(401, {"message": "Unauthorized"})
                if method == "GET" and self.path.startswith("/api/folders/"):
                    uid = self.path.rsplit("/", 1)[1]
                    if uid in api.folders:
                        return self._reply(200, api.folders[uid])
                    return self._reply(404, {"message": "folder not found", "status": "not-found"})
                if method == "POST" and self.path == "/api/folders":
                    f = {"id": len(api.folders) + 1, "uid": body["uid"], "title": body["title"], "version": 1}
                    api.folders[body["uid"]] = f
                    return self._reply(200, f)
                if method == "POST" and self.path == "/api/dashboards/db":
                    d = body["dashboard"]
                    if body.get("folderUid") not in api.folders:
                        return self._reply(400, {"message": "folder not found"})
                    prev = api.dashboards.get(d["uid"])
                    if prev and not body.get("overwrite"):
                        return self._reply(412, {"message": "version-mismatch", "status": "version-mismatch"})
                    version = (prev["version"] + 1) if prev else 1
                    api.dashboards[d["uid"]] = {"dashboard": d, "version": version, "folderUid": body["folderUid"]}
                    return self._reply(200, {"id": 7, "uid": d["uid"], "url": f"/d/{d['uid']}/x", "status": "success",
                                             "version": version, "slug": "x"})
                return self._reply(404, {"message": "Not found"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _push_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.dashboards", "push", "--url", url, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_push_creates_folder_then_overwrites_dashboards():
    pytest.importorskip("grafana_client", reason="grafana-client is not installed")
    with FakeGrafanaAPI() as g:
        r = _push_cli(g.url, "--token", "s3cret", "--folder-uid", "llm", "--folder-title", "LLM serving")
        assert r.returncode == 0, r.stdout + r.stderr
        first = list(g.requests)
        assert [(q["method"], q["path"]) for q in first] == (
            [("GET", "/api/folders/llm"), ("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * len(DASHBOARDS))
        assert all(q["auth"] == "Bearer s3cret" for q in first)
        assert first[1]["body"] == {"title": "LLM serving", "uid": "llm"}
        for q, d in zip(first[2:], DASHBOARDS):
            assert q["content_type"].startswith("application/json")
            assert q["body"]["folderUid"] == "llm" and q["body"]["overwrite"] is True
            want = to_json(d)
            want.pop("id", None)
            assert q["body"]["dashboard"] == want
        assert "uid=idlm-serve" in r.stdout and "version=1" in r.stdout

        # Second run: the folder exists (no POST /api/folders); dashboards are overwritten (version 2).
        g.requests.clear()
        r = _push_cli(g.url, "--token", "s3cret", "--folder-uid", "llm")
        assert r.returncode == 0, r.stdout + r.stderr
        assert [(q["method"], q["path"]) for q in g.requests] == (
            [("GET", "/api/folders/llm")] + [("POST", "/api/dashboards/db")] * len(DASHBOARDS))
        assert all(v["version"] == 2 for v in g.dashboards.values())


def test_push_bad_token_fails_loudly():
    pytest.importorskip("grafana_client", reason="grafana-client is not installed")
    with FakeGrafanaAPI() as g:
        r = _push_cli(g.url, "--token", "wrong")
        assert r.returncode != 0
        assert "Unauthorized" in r.stderr
        assert [(q["method"], q["path"]) for q in g.requests] == [("GET", "/api/folders/idlm-serve")]
        assert g.dashboards == {}
    r = subprocess.run([sys.executable, "-m", "cluster.dashboards", "push", "--url", "http://127.0.0.1:9"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--token" in r.stderr


# ------------------------------------------------------------------ slow: real Prometheus, real app


@pytest.mark.slow
def test_every_panel_returns_data_from_a_real_prometheus():
    """Ray + the app (SmolLM2, ISD N=4, 1 replica) + a real Prometheus scraping Ray's metrics port
    every second; traffic (greedy chat, a stream, a long prompt that evicts, a 400 and a 404); then every panel query, with the
    Grafana variables set to match-all, must return at least one finite sample."""
    import requests

    from tests.cluster.support import PrometheusServer, RayServe, wait_for

    # a small KV cache (128 blocks): the distinct long prompt of each traffic round evicts cached blocks
    args = {"model": "smollm2", "mode": "isd", "stride": 4, "max_num_seqs": 16, "max_num_batched_tokens": 512,
            "kv_cache_tokens": 2048, "max_model_len": 2048,
            "replica": {"num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": 32,
                        "ray_actor_options": {"num_cpus": 1}}}
    rs = RayServe(num_cpus=4).start()
    prom = None
    try:
        base = rs.deploy(args, "idlm", "/")
        prom = PrometheusServer([rs.metrics_target], interval_s=1.0).start()
        prompts = ["Count from 1 to 30, separated by spaces.", "Repeat the word 'yes' twenty times.",
                   "What is the capital of France?", "List the days of the week.", "Name three colors."]

        rounds = iter(range(10**6))

        def traffic():
            n = next(rounds)
            long = " ".join(f"item{n}-{j}" for j in range(300))
            r = requests.post(f"{base}/v1/completions", json={"model": "smollm2", "prompt": long, "max_tokens": 2}, timeout=300)
            assert r.status_code == 200, r.text
            for i, q in enumerate(prompts * 2):
                body = {"model": "smollm2", "messages": [{"role": "user", "content": q}],
                        "max_tokens": 32 if i % 3 else 6, "temperature": 0, "stream": i == 3}
                r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=300)
                assert r.status_code == 200, r.text
            assert requests.post(f"{base}/v1/chat/completions", json={"model": "smollm2"}, timeout=60).status_code == 400
            assert requests.get(f"{base}/no/such/route", timeout=60).status_code == 404

        # Traffic until every series the panels read exists (Ray exports every ~10 s).
        failing: list[str] = []

        def all_panels_have_data():
            traffic()
            failing.clear()
            for _uid, title, expr in all_targets():
                q = substitute(expr, "2m")
                res = prom.query(q)
                if not any(math.isfinite(float(s["value"][1])) for s in res):
                    failing.append(f"{title}: {q}")
            return not failing

        ok = wait_for(all_panels_have_data, timeout=600, interval=1.0)
        assert ok, "panels without data:\n" + "\n".join(failing)
    finally:
        if prom is not None:
            prom.stop()
        rs.stop()
