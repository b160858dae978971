"""The e2e app shared by every test module of this package that asks for `cluster` (or `client`):
one real local Ray cluster serving `support.SHARED_ARGS`, started by the first such test and
stopped right after the last one (in collection order), so CI starts SmolLM2 replicas once and a
module that starts its own Ray cluster (test_dashboards, test_slow) never overlaps with it."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.cluster.support import SHARED_ARGS, RayServe

_APP: dict = {}
_LAST_USER: list[str] = []


def pytest_collection_modifyitems(config, items):
    users = [it.nodeid for it in items if "cluster" in getattr(it, "fixturenames", ())]
    _LAST_USER[:] = users[-1:]


def _stop() -> None:
    rs = _APP.pop("rs", None)
    _APP.clear()
    if rs is not None:
        rs.stop()


def pytest_runtest_teardown(item, nextitem):
    if _LAST_USER and item.nodeid == _LAST_USER[0]:
        _stop()


def pytest_sessionfinish(session, exitstatus):
    _stop()  # an interrupted run (-x, ^C) ends before the last user


@pytest.fixture
def cluster():
    """(RayServe, base URL) of the shared app."""
    if "rs" not in _APP:
        rs = RayServe().start()
        _APP["rs"] = rs
        try:
            _APP["base"] = rs.deploy(SHARED_ARGS, "idlm", "/")
        except BaseException:
            _stop()
            raise
    return _APP["rs"], _APP["base"]


@pytest.fixture
def client(cluster):
    return OpenAI(base_url=f"{cluster[1]}/v1", api_key="unused", max_retries=0, timeout=120)
