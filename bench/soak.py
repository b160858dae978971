"""Soak and chaos run: a bounded mixed load over real HTTP against a fresh local Ray cluster serving
the app on 2 replicas, killing a replica actor every `--kill-every` seconds.

    .venv/bin/python bench/soak.py                   # SmolLM2 (risd), 2000 requests, C=32, kill every 30 s
    .venv/bin/python bench/soak.py --tiny --requests 200 --concurrency 16 --kill-every 10   # smoke

The load and the class each request ends in are bench/soak_load.py's. Before the load each greedy
reference request runs alone (the "solo" text every greedy request under load must equal). During
it a chaos task kills a random replica actor (`ray.kill`, as a crashed process) and times how long
Serve takes to have every replica RUNNING again; replica RSS is sampled through
`EngineReplica.stats`. After it: every replica idle with every KV block free, the RSS growth of
each replica that lived through the run, and the error lines in the replicas' own logs.
`passed` is the verdict on all of it. Writes bench/results/soak[_tiny].json
(tests/cluster/test_soak.py runs it small; the figures are in README "Reliability").
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.soak_load import Outcome, Spec, send, workload  # noqa: E402

APP = "soak"
OUT = ROOT / "bench" / "results"


def app_args(tiny: bool, replicas: int) -> tuple[dict, str]:
    replica = {"num_replicas": replicas, "max_ongoing_requests": 64, "max_queued_requests": 256,
               "health_check_period_s": 2, "ray_actor_options": {"num_cpus": 1}}
    if tiny:
        from tests.models import make_tiny_model_dir

        d = make_tiny_model_dir(tempfile.mkdtemp(prefix="idlm-soak-"), "sdar")
        return {"model": d, "served_model_name": "tiny", "mode": "isd", "stride": 4, "max_model_len": 512,
                "kv_cache_tokens": 4096, "max_num_seqs": 32, "replica": replica}, "tiny"
    return {"model": "smollm2", "mode": "risd", "stride": 4, "max_num_seqs": 32, "max_num_batched_tokens": 1024,
            "kv_cache_tokens": 16384, "max_model_len": 2048, "replica": replica}, "smollm2"


def _replicas() -> dict[str, object]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#EngineReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    out = {}
    for n in names:
        try:
            out[n[len(prefix):]] = ray.get_actor(n, namespace="serve")
        except ValueError:  # died between the listing and the lookup
            pass
    return out


def _running() -> int:
    from ray import serve

    d = serve.status().applications[APP].deployments["EngineReplica"]
    return d.replica_states.get("RUNNING", 0)


def _all_stats(replicas: int, tries: int = 40) -> dict[str, dict]:
    """`stats()` of every replica (by id): handle calls until each has answered."""
    from ray import serve

    h = serve.get_deployment_handle("EngineReplica", app_name=APP)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        try:
            st = h.stats.remote().result(timeout_s=30)
        except Exception:  # noqa: BLE001 (a replica just killed)
            continue
        seen[st["replica"]] = st
        if len(seen) >= replicas:
            break
    return seen


class Chaos(threading.Thread):
    """Kills a random replica every `every_s` and times its recovery; samples replica RSS."""

    def __init__(self, every_s: float, replicas: int, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.every_s, self.replicas, self.rng = every_s, replicas, rng
        self.kills: list[dict] = []
        self.rss: dict[str, list[int]] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        for rid, st in _all_stats(self.replicas, tries=6).items():
            self.rss.setdefault(rid, []).append((time.monotonic(), st["rss_bytes"]))

    def growth_mb(self, warmup_s: float, min_life_s: float = 0.0) -> dict[str, float]:
        """Per replica sampled for at least `min_life_s`: last RSS - its first sample taken
        `warmup_s` after it was first seen (allocator pools and lazy inits fill in the warm-up)."""
        out = {}
        for rid, xs in self.rss.items():
            after = [b for t, b in xs if t >= xs[0][0] + warmup_s]
            if len(after) >= 2 and xs[-1][0] - xs[0][0] >= min_life_s:
                out[rid] = round((after[-1] - after[0]) / 2**20, 1)
        return out

    def series_mb(self, rid: str, every_s: float = 30.0) -> list[tuple[float, int]]:
        """(seconds since the load began, RSS MB) of one replica, one sample per `every_s`."""
        out, last = [], -math.inf
        for t, b in self.rss.get(rid, []):
            if t - last >= every_s:
                out.append((round(t - self.t_start, 1), round(b / 2**20)))
                last = t
        return out

    def run(self) -> None:
        import ray

        next_kill = time.monotonic() + self.every_s if self.every_s > 0 else float("inf")
        while not self.stop.wait(2.0):
            self.sample()
            if time.monotonic() < next_kill:
                continue
            live = _replicas()
            if not live:
                continue
            # The longest-lived replica is spared, so one replica lives through the whole load and
            # its RSS says whether memory grows over time; a replica killed after a minute or two
            # only shows its allocator filling up to its high-water mark.
            spared = next((rid for rid in self.rss if rid in live), None)
            victim = self.rng.choice(sorted(set(live) - {spared}) or sorted(live))
            t0 = time.monotonic()
            ray.kill(live[victim], no_restart=True)
            # Recovered: a replacement actor exists and Serve counts every replica RUNNING again
            # (right after the kill the controller may still count the victim as running).
            while len(set(_replicas()) - {victim}) < self.replicas or _running() != self.replicas:
                time.sleep(0.25)
                if time.monotonic() - t0 > 300:
                    break
            self.kills.append({"replica": victim, "at_s": round(t0 - self.t_start, 1),
                               "recovered_s": round(time.monotonic() - t0, 2)})
            next_kill = time.monotonic() + self.every_s

    def start(self) -> None:
        self.t_start = time.monotonic()
        super().start()


async def run_load(base: str, model: str, specs: list[Spec], concurrency: int, timeout_s: float) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(s: Spec) -> Outcome:
            async with sem:
                return await send(client, base, model, s)

        return list(await asyncio.gather(*(one(s) for s in specs)))


def log_errors(app: str) -> dict[str, int]:
    """ERROR lines in each replica's own Serve log (a killed replica's log included)."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()  # this cluster's, not any other's
    out = {}
    for f in glob.glob(os.path.join(logs, "serve", f"replica_{app}_EngineReplica_*.log")):
        with open(f, errors="replace") as fh:
            out[os.path.basename(f)] = sum(1 for line in fh if " ERROR " in line)
    return out


def summarize(outs: list[Outcome], specs: list[Spec], solo: dict[int, Outcome]) -> dict:
    mismatch = []
    for o, s in zip(outs, specs):
        if o.cls == "ok" and s.greedy_key is not None:
            ref = solo[s.greedy_key]
            if (o.text, o.finish_reason, o.completion_tokens) != (ref.text, ref.finish_reason, ref.completion_tokens):
                o.cls, o.why = "lost", f"greedy differs from solo: {o.text[:60]!r} vs {ref.text[:60]!r}"
                mismatch.append(o.i)
    by = Counter(o.cls for o in outs)
    return {"sent": len(outs), "completed": by["ok"], "cancelled_by_client": by["cancelled"],
            "failed_503": by["503"], "failed_4xx": by["4xx"], "lost": by["lost"],
            "greedy_checked": sum(1 for o, s in zip(outs, specs) if s.greedy_key is not None and o.cls == "ok"),
            "greedy_mismatch": len(mismatch),
            "streamed": sum(s.stream for s in specs), "client_disconnects_planned": sum(s.disconnect_after is not None
                                                                                          for s in specs),
            "lost_examples": [asdict(o) for o in outs if o.cls == "lost"][:10],
            "seconds_p50": sorted(o.seconds for o in outs)[len(outs) // 2] if outs else None,
            "seconds_max": max((o.seconds for o in outs), default=None)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random ISD model (smoke) instead of SmolLM2")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=30.0, help="seconds between replica kills; 0: none")
    ap.add_argument("--disconnect", type=float, default=0.10, help="fraction of clients closing mid-stream")
    ap.add_argument("--rss-bound-mb", type=float, default=256.0, help="allowed RSS growth per replica")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    from ray import serve

    from cluster.app import build_app
    from tests.cluster.support import RayServe

    args, model = app_args(a.tiny, a.replicas)
    lengths = [4, 12, 32, 64] if a.tiny else [8, 24, 64, 128]
    refs, specs = workload(a.requests, a.seed, a.disconnect, lengths, long_words=60 if a.tiny else 400)
    rs = RayServe(num_cpus=max(8, 2 * a.replicas + 2)).start()
    try:
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        base = f"http://127.0.0.1:{rs.http_port}/{APP}"
        t0 = time.monotonic()
        solo = {s.greedy_key: o for s, o in zip(refs, asyncio.run(run_load(base, model, refs, 1, a.timeout)))}
        bad_refs = [asdict(o) for o in solo.values() if o.cls != "ok"]
        chaos = Chaos(a.kill_every, a.replicas, random.Random(a.seed))
        chaos.sample()
        chaos.start()
        t_load = time.monotonic()
        outs = asyncio.run(run_load(base, model, specs, a.concurrency, a.timeout))
        load_s = time.monotonic() - t_load
        chaos.stop.set()
        chaos.join(timeout=400)
        while _running() != a.replicas and time.monotonic() - t_load < load_s + 300:
            time.sleep(0.5)
        idle = {}
        for _ in range(240):  # the aborted streams' requests drain (bounded: 120 s)
            idle = _all_stats(a.replicas)
            if len(idle) == a.replicas and all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in idle.values()):
                break
            time.sleep(0.5)
        chaos.sample()
        res = summarize(outs, specs, solo)
        warmup = min(60.0, load_s / 4)
        # The bound applies to the replicas that lived through most of the load (the spared one);
        # the killed ones are reported as they are (their allocator's fill-up, not growth).
        growth = chaos.growth_mb(warmup_s=warmup, min_life_s=0.75 * load_s)
        survivor = max(chaos.rss, key=lambda r: chaos.rss[r][-1][0] - chaos.rss[r][0][0], default=None)
        res.update({
            "model": model, "mode": args["mode"], "replicas": a.replicas, "concurrency": a.concurrency,
            "kill_every_s": a.kill_every, "disconnect": a.disconnect, "seed": a.seed, "load_seconds": round(load_s, 1),
            "setup_seconds": round(t_load - t0, 1), "solo_refs": len(refs), "solo_refs_failed": bad_refs,
            "kills": chaos.kills, "recovery_s_max": max((k["recovered_s"] for k in chaos.kills), default=None),
            "kv_blocks_leaked": sum(round(s["kv_cache_usage"] * s["num_blocks"]) for s in idle.values()),
            "replicas_idle": len(idle) == a.replicas and all(s["num_running"] == 0 for s in idle.values()),
            "aborted_on_replicas": sum(s["requests"].get("abort", 0) for s in idle.values()),
            "rss_mb_last": {rid: round(xs[-1][1] / 2**20) for rid, xs in chaos.rss.items()},
            "rss_growth_mb": growth, "rss_bound_mb": a.rss_bound_mb,
            "rss_growth_mb_short_lived": {r: g for r, g in chaos.growth_mb(warmup_s=warmup).items() if r not in growth},
            "rss_mb_series_longest_lived": chaos.series_mb(survivor) if survivor else [],
            "replica_log_error_lines": log_errors(APP),
        })
        res["passed"] = bool(res["lost"] == 0 and res["failed_4xx"] == 0 and not bad_refs and res["kv_blocks_leaked"] == 0
                             and res["replicas_idle"] and bool(growth) and all(g <= a.rss_bound_mb for g in growth.values())
                             and sum(res["replica_log_error_lines"].values()) == 0
                             and (a.kill_every > 0 or res["failed_503"] == 0))
    finally:
        rs.stop()
    out = a.out or OUT / f"soak{'_tiny' if a.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("lost_examples", "solo_refs_failed")}, indent=1))
    return res


if __name__ == "__main__":
    main()
