"""Graceful shutdown (`pytest -m slow -s`): SIGTERM to `idlm-serve run CONFIG` (cluster.serve_run,
Ray's `serve run` with a drain on SIGTERM) lets the in-flight streams finish, then stops Serve and
exits.

The launcher runs as a subprocess this test owns, attached to a head node started with the real
CLI on 127.0.0.1, and serves a tiny ISD model from a Serve config file. Six streams (chat and
completions, `ignore_eos`, long enough to run ~10 s) are open when it gets SIGTERM: every one ends
with `[DONE]` after a usage chunk of exactly `max_tokens` tokens, the process exits 0 within the
drain bound, and the application is gone from the cluster. A second case gives the replicas a
1 s `graceful_shutdown_timeout_s`: the streams still open then end with a clean in-band error
event (never cut without one, never a hang) and the process still exits. Prints the figures of
README "Reliability".
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from bench.soak_load import send
from tests.cluster.multinode import ENV, RayNode
from tests.cluster.serve_cli import app_details, dashboard_up, head_node, spec, tiny_args, write_config
from tests.cluster.support import free_port, wait_for

pytestmark = pytest.mark.slow
APP = "grace"
STREAMS = 6


@pytest.fixture
def head(monkeypatch):
    with head_node(monkeypatch, "idlmgs-", num_cpus=4) as node:
        yield node


class Launcher:
    """`python -m cluster.serve_run run CONFIG --address HEAD`, owned by its PID."""

    def __init__(self, config, address: str, log_path) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.serve_run", "run", str(config), "--address",
                                      address, "--drain-timeout", "120"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=ENV)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


async def _streams(base: str, max_tokens: int, sigterm, t_sig: list[float]):
    async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
        async def one(i):
            out = await send(client, base, "tiny", spec(i, max_tokens, stream=True))
            return out, time.monotonic()
        tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
        await asyncio.sleep(3)  # every stream is open and generating
        assert not any(t.done() for t in tasks)
        t_sig.append(time.monotonic())
        sigterm()
        return await asyncio.gather(*tasks)


def _run(head: RayNode, tmp_path, graceful_s: float, max_tokens: int):
    from tests.models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny", "sdar", max_position_embeddings=2048)
    port = free_port()
    args = tiny_args(model, 1, 16)
    args["replica"]["graceful_shutdown_timeout_s"] = graceful_s  # the ingress: graceful_s + 10 s
    cfg = write_config(tmp_path / "app.yaml", APP, args, port)
    base = f"http://127.0.0.1:{port}"
    launcher = Launcher(cfg, head.address, tmp_path / "serve_run.log")
    try:
        assert wait_for(lambda: _ready(base) or launcher.proc.poll() is not None, timeout=300)
        assert launcher.proc.poll() is None, (tmp_path / "serve_run.log").read_text()
        t_sig: list[float] = []
        outs = asyncio.run(_streams(base, max_tokens, lambda: os.kill(launcher.proc.pid, signal.SIGTERM), t_sig))
        rc = launcher.proc.wait(timeout=180)
        exit_s = time.monotonic() - t_sig[0]
    finally:
        launcher.stop()
    log = (tmp_path / "serve_run.log").read_text()
    assert wait_for(lambda: dashboard_up(head.dashboard_address), timeout=30)
    assert app_details(head.dashboard_address, APP) is None, log  # Serve stopped the app
    return outs, [t - t_sig[0] for _, t in outs], rc, exit_s, log


def test_sigterm_lets_in_flight_streams_finish(head, tmp_path):
    outs, ends, rc, exit_s, log = _run(head, tmp_path, graceful_s=60.0, max_tokens=600)
    bad = [(o.i, o.cls, o.status, o.why) for o, _ in outs if o.cls != "ok"]
    assert not bad, (bad, log[-3000:])
    assert all(o.completion_tokens == 600 and o.finish_reason == "length" for o, _ in outs)
    assert rc == 0, log[-3000:]
    assert max(ends) > 3, ends  # the streams really ran on after the signal
    print(f"\ngraceful shutdown: SIGTERM with {STREAMS} streams open (600 tokens each): {STREAMS} of {STREAMS} "
          f"completed with [DONE] and full usage, the last {max(ends):.1f} s after the signal; "
          f"`idlm-serve run` exited 0 {exit_s:.1f} s after it")


def test_sigterm_past_graceful_timeout_ends_streams_cleanly(head, tmp_path):
    outs, ends, rc, exit_s, log = _run(head, tmp_path, graceful_s=1.0, max_tokens=1800)
    cut = [o for o, _ in outs if o.cls != "ok"]
    assert cut, "no stream outlasted a 1 s graceful timeout"
    assert all(o.cls == "503" and o.why.startswith("in-band") for o in cut), [(o.cls, o.why) for o in cut]
    assert exit_s < 60, exit_s
    print(f"\ngraceful timeout 1 s: {len(cut)} of {STREAMS} streams cut with an in-band error event "
          f"{max(ends):.1f} s after SIGTERM; exited {rc} {exit_s:.1f} s after it")
