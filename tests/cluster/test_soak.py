"""Soak with chaos (`pytest -m slow`): bench/soak.py on a tiny ISD model, small enough for CI on
two cores (the SmolLM2 figures come from the full run, README "Reliability"): a mixed load over
2 replicas with client disconnects while a replica is killed every 10 s. Nothing is lost, every
kill's requests end as clean 503s, Serve restores the replica, greedy requests equal their solo
run, every KV block is free at the end, RSS stays bounded and the replicas log no error."""

from __future__ import annotations

import json

import pytest

from bench import soak  # the repository root is on sys.path (tests/ is a package)

pytestmark = pytest.mark.slow


def test_soak_with_replica_kills(tmp_path):
    out = tmp_path / "soak.json"
    res = soak.main(["--tiny", "--requests", "400", "--concurrency", "16", "--kill-every", "10",
                        "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["sent"] == 400 and res["lost"] == 0 and res["failed_4xx"] == 0, res["lost_examples"]
    assert res["completed"] + res["cancelled_by_client"] + res["failed_503"] == 400
    assert res["cancelled_by_client"] >= 20 and res["greedy_checked"] >= 100 and res["greedy_mismatch"] == 0
    assert len(res["kills"]) >= 1 and res["recovery_s_max"] < 60, res["kills"]
    assert res["kv_blocks_leaked"] == 0 and res["replicas_idle"]
    assert all(g <= res["rss_bound_mb"] for g in res["rss_growth_mb"].values()), res["rss_growth_mb"]
    assert sum(res["replica_log_error_lines"].values()) == 0, res["replica_log_error_lines"]
    assert res["passed"]
