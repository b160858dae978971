"""Two Ray nodes on one machine (`pytest -m slow`): a head and a worker node, separate raylets
started with the real CLI on 127.0.0.1 (tests/cluster/multinode.py), each offering one
`idlm_slot` custom resource that every engine replica asks for, so the 2 replicas land one per
node. The app serves through both; stopping the worker node under load ends its requests with
clean 503s while the head's replica keeps serving; when the node comes back Serve places the
pending replica on it and the replicas spread over both nodes again. Prints the recovery figures
(README "Reliability"); docs/reliability.md has the same layout on KubeRay."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import tempfile
import time

import pytest
import requests

from tests.cluster.multinode import ENV, RayNode
from tests.cluster.support import free_port, wait_for

pytestmark = pytest.mark.slow
MODEL = os.environ.get("IDLM_TWO_NODE_MODEL", "smollm2")
APP = "twonode"


def _args(model: str) -> dict:
    # Serve's power-of-two router: the prompts here share their template prefix, which the prefix
    # router would (rightly) keep on one replica; this test is about nodes, not routing.
    return {"model": model, "served_model_name": "m", "mode": "ar", "max_num_seqs": 16, "kv_cache_tokens": 4096,
            "max_model_len": 1024, "router": {"policy": "pow2"},
            "replica": {"num_replicas": 2, "health_check_period_s": 2, "max_ongoing_requests": 32,
                        "ray_actor_options": {"num_cpus": 1, "resources": {"idlm_slot": 1}}}}


def _post(base: str, i: int, max_tokens: int = 8, timeout: float = 300) -> requests.Response:
    return requests.post(f"{base}/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, timeout=timeout)


def _served_by(base: str) -> set[str]:
    with cf.ThreadPoolExecutor(8) as ex:
        return {r.headers["x-idlm-replica"] for r in ex.map(lambda i: _post(base, i), range(24))}


def _placement() -> dict[str, str]:
    """replica id -> node id of the app's live engine replicas, from the GCS actor table.

    Not through a deployment handle: in a driver process that already drove another Ray cluster
    (the other cluster tests of the same pytest run), a handle's calls to this cluster's replicas
    never returned (seen 2026-12-02, `test_fuzz.py test_two_nodes.py` in one run; py-spy: the
    main thread in `DeploymentResponse.result`, the router's loop idle); alone, they did. The
    private `ray._private.state` reads the GCS directly; the public state API needs the dashboard,
    which this head runs without."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{APP}#EngineReplica#"
    return {a["Name"][len(prefix):]: a["Address"]["NodeID"] for a in state.actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith(prefix)}


def _running() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["EngineReplica"].replica_states.get("RUNNING", 0)


@pytest.fixture
def nodes(monkeypatch):
    for k, v in ENV.items():
        if k.startswith("RAY_"):
            monkeypatch.setenv(k, v)
    tmp = tempfile.mkdtemp(prefix="idlm2n-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = RayNode(tmp, num_cpus=4, resources={"idlm_slot": 1}).start()
    state = {"head": head, "worker": None}
    try:
        state["worker"] = RayNode(tmp, address=head.address, num_cpus=4, resources={"idlm_slot": 1}).start()
        yield state
    finally:
        import ray

        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if state["worker"] is not None:
                state["worker"].stop()
            head.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def test_two_nodes_serve_survive_node_loss_and_spread_again(nodes, smollm2_dir):
    import ray
    from ray import serve

    from cluster.app import build_app

    head, worker = nodes["head"], nodes["worker"]
    ray.init(address=head.address, log_to_driver=False)
    assert wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, timeout=60)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(_args(smollm2_dir if MODEL == "smollm2" else MODEL)), name=APP, route_prefix=f"/{APP}")
    base = f"http://127.0.0.1:{port}/{APP}"

    # one replica per node, and the app serves through both
    where = _placement()
    assert sorted(where.values()) == sorted([head.node_id(), worker.node_id()]), where
    assert _served_by(base) == set(where), where
    on_worker = next(r for r, n in where.items() if n == worker.node_id())

    # the worker node goes away under load
    with cf.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(_post, base, i, 48) for i in range(12)]
        time.sleep(3)
        t_stop = time.monotonic()
        worker.stop()  # SIGTERM: Ray drains the node (up to 30 s), as on a KubeRay pod deletion
        drain_s = time.monotonic() - t_stop
        results = [f.result(timeout=400) for f in futs]
    for r in results:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 48 and r.json()["choices"][0]["finish_reason"] == "length"
        else:
            assert r.status_code == 503 and r.json()["error"]["message"], (r.status_code, r.text)
    ok = [r for r in results if r.status_code == 200]
    assert ok and any(r.headers["x-idlm-replica"] != on_worker for r in ok)

    # the head's replica carries the traffic; Serve keeps the lost replica pending (its slot is gone)
    def serving():
        rs = [_post(base, i, 4, timeout=120) for i in range(4)]
        return all(r.status_code == 200 for r in rs)
    assert wait_for(serving, timeout=120, interval=0.5)
    service_recovery_s = time.monotonic() - t_stop
    assert wait_for(lambda: _running() == 1, timeout=120)

    # the node returns: the pending replica starts on it and the replicas spread again
    t_back = time.monotonic()
    worker = nodes["worker"] = worker.restart()
    assert wait_for(lambda: _running() == 2, timeout=300, interval=0.5), serve.status().applications[APP]
    spread_s = time.monotonic() - t_back
    where = _placement()
    assert sorted(where.values()) == sorted([head.node_id(), worker.node_id()]), where
    assert on_worker not in where
    assert _served_by(base) == set(where), where
    print(f"\ntwo nodes: {len(ok)}/{len(results)} in-flight requests completed, "
          f"{len(results) - len(ok)} ended 503 when the worker node stopped (drained in {drain_s:.1f} s); "
          f"serving on the head alone "
          f"{service_recovery_s:.1f} s after the stop; replicas spread again {spread_s:.1f} s after the node returned")
