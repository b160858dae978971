"""AppConfig: the deploy files validate, bad configs fail at start naming the field, and the
deployment options / EngineConfig built from it are what the config says. No Ray cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import AppConfig
from workers.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["idlm.yaml", "idlm-gpu.yaml"])
def test_deploy_files_validate(name):
    doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.stride == 4
    ec = cfg.to_engine_config()
    assert isinstance(ec, EngineConfig) and ec.model == cfg.model and ec.mode == cfg.mode
    if name == "idlm.yaml":
        assert doc["http_options"]["host"] == "127.0.0.1"
        assert cfg.model == "smollm2" and cfg.replica.deployment_options()["num_replicas"] == 2
    else:
        assert cfg.model == "yifanyu/I-DLM-8B" and cfg.mode == "isd" and cfg.dtype == "bfloat16" and cfg.device == "cuda"
        opts = cfg.replica.deployment_options()
        assert opts["ray_actor_options"]["num_gpus"] == 1
        assert (opts["autoscaling_config"]["min_replicas"], opts["autoscaling_config"]["max_replicas"]) == (1, 8)
        assert "num_replicas" not in opts


def test_engine_config_fields():
    cfg = AppConfig.model_validate({
        "model": "m", "mode": "risd", "stride": 3, "adapter": "/a", "dtype": "bfloat16", "max_num_seqs": 7,
        "max_num_batched_tokens": 99, "kv_cache_tokens": 512, "kv_block_size": 8, "max_model_len": 300,
        "enforce_eager": True,
    })
    ec = cfg.to_engine_config()
    assert ec.enforce_eager is True and AppConfig().to_engine_config().enforce_eager is False
    assert (ec.mode, ec.stride, ec.adapter, ec.dtype) == ("risd", 3, "/a", "bfloat16")
    assert (ec.max_num_seqs, ec.max_num_batched_tokens, ec.kv_cache_tokens, ec.kv_block_size, ec.max_model_len) == (7, 99, 512, 8, 300)
    assert cfg.model_name == "m"
    assert AppConfig.model_validate({"model": "m", "served_model_name": "x"}).model_name == "x"


@pytest.mark.parametrize("args,field", [
    ({"modle": "smollm2"}, "modle"),
    ({"mode": "fast"}, "mode"),
    ({"stride": 0}, "stride"),
    ({"stride": 17}, "stride"),
    ({"dtype": "int4"}, "dtype"),
    ({"enforce_eager": "sometimes"}, "enforce_eager"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"temperature": 1.0}, "temperature"),
    ({"stride": 8, "max_num_batched_tokens": 10}, "max_num_batched_tokens"),
    ({"replica": {"num_replicas": 0}}, "replica.num_replicas"),
    ({"replica": {"num_cpus": 1}}, "replica.num_cpus"),
    ({"replica": {"ray_actor_options": {"num_gpu": 1}}}, "replica.ray_actor_options.num_gpu"),
    ({"replica": {"max_queued_requests": -1}}, "replica.max_queued_requests"),
    ({"replica": {"num_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}}, "replica"),
    ({"replica": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}}, "replica.autoscaling_config"),
    ({"replica": {"autoscaling_config": {"target_ongoing_requests": 0}}}, "replica.autoscaling_config.target_ongoing_requests"),
    ({"ingress": {"max_ongoing": 3}}, "ingress.max_ongoing"),
    ({"router": {"policy": "random"}}, "router.policy"),
    ({"router": {"imbalance_rel": 0.5}}, "router.imbalance_rel"),
    ({"router": {"kv_usage_limit": 0}}, "router.kv_usage_limit"),
    ({"router": {"cold_policy": "hash"}}, "router.cold_policy"),
    ({"router": {"weights": 1}}, "router.weights"),
    ({"enable_prefix_caching": "maybe"}, "enable_prefix_caching"),
])
def test_bad_config_names_field(args, field):
    with pytest.raises(ValidationError) as ei:
        AppConfig.model_validate(args)
    text = str(ei.value)
    assert field in text, text


def test_build_app_fails_at_start_naming_field():
    from cluster.app import build_app

    with pytest.raises(ValueError, match="kv_cache_tokenz"):
        build_app({"model": "smollm2", "kv_cache_tokenz": 5})


def test_build_app_options():
    from cluster.app import build_app

    app = build_app({"replica": {"num_replicas": 3, "max_ongoing_requests": 5, "max_queued_requests": 7,
                                 "ray_actor_options": {"num_cpus": 0.5}}})
    ingress = app._bound_deployment
    replica = ingress.init_args[1]._bound_deployment
    assert (ingress.name, replica.name) == ("OpenAIIngress", "EngineReplica")
    assert replica.num_replicas == 3 and replica.max_ongoing_requests == 5
    assert replica.max_queued_requests == 7 and replica.ray_actor_options["num_cpus"] == 0.5


def test_graceful_shutdown_options():
    """Serve stops replicas (rolling update, scale-down, idlm-serve run's SIGTERM drain) after their
    in-flight streams, up to `graceful_shutdown_timeout_s`: 60 s by default (it was 5 s, which cut
    streams on a rolling update: tests/cluster/test_rolling_update.py), and the ingress outlives
    the engine replicas by 10 s unless set."""
    from cluster.app import build_app

    def deployments(args):
        ingress = build_app(args)._bound_deployment
        return ingress, ingress.init_args[1]._bound_deployment

    ingress, replica = deployments({})
    assert replica._deployment_config.graceful_shutdown_timeout_s == 60.0
    assert replica._deployment_config.graceful_shutdown_wait_loop_s == 2.0
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 70.0
    ingress, replica = deployments({"replica": {"graceful_shutdown_timeout_s": 300, "graceful_shutdown_wait_loop_s": 1},
                                    "ingress": {"graceful_shutdown_wait_loop_s": 0.5}})
    assert (replica._deployment_config.graceful_shutdown_timeout_s, ingress._deployment_config.graceful_shutdown_timeout_s) == (300, 310)
    assert (replica._deployment_config.graceful_shutdown_wait_loop_s, ingress._deployment_config.graceful_shutdown_wait_loop_s) == (1, 0.5)
    assert deployments({"ingress": {"graceful_shutdown_timeout_s": 30}})[0]._deployment_config.graceful_shutdown_timeout_s == 30
    with pytest.raises(ValueError, match="replica.graceful_shutdown_timeout_s"):
        build_app({"replica": {"graceful_shutdown_timeout_s": -1}})


def test_router_and_prefix_cache_options():
    """`router.policy: prefix` gives the replica deployment our RequestRouter (kwargs carry the
    policy's settings and the metric labels); `pow2` leaves Serve's default; the prefix cache
    switch reaches the engine."""
    from cluster.app import build_app
    from cluster.config import RouterOptions

    def replica_of(args):
        return build_app(args)._bound_deployment.init_args[1]._bound_deployment

    rrc = replica_of({"mode": "ar", "router": {"imbalance_abs": 3, "stats_period_s": 2}})._deployment_config.request_router_config
    assert rrc.request_router_class == "cluster.router:IdlmPrefixRouter"
    assert rrc.request_routing_stats_period_s == 2
    kw = rrc.request_router_kwargs
    assert kw["imbalance_abs"] == 3 and (kw["model"], kw["mode"], kw["stride"]) == ("smollm2", "ar", 1)
    assert RouterOptions.from_router_kwargs(kw).imbalance_abs == 3  # what initialize_state receives
    rrc = replica_of({"router": {"policy": "pow2"}})._deployment_config.request_router_config
    assert rrc.is_default_request_router()
    assert AppConfig().to_engine_config().enable_prefix_caching is True
    assert AppConfig(enable_prefix_caching=False).to_engine_config().enable_prefix_caching is False


def test_api_key_from_environment_when_unset():
    """The Helm chart passes a Secret as IDLM_API_KEY; an explicit `api_key` wins over it."""
    from cluster.config import API_KEY_ENV

    assert API_KEY_ENV == yaml.safe_load((ROOT / "helm/idlm/values.yaml").read_text())["apiKey"]["envName"]
    assert AppConfig(model="smollm2").resolved_api_key({}) is None
    assert AppConfig(model="smollm2").resolved_api_key({API_KEY_ENV: "s3cret"}) == "s3cret"
    assert AppConfig(model="smollm2", api_key="explicit").resolved_api_key({API_KEY_ENV: "s3cret"}) == "explicit"
    assert AppConfig(model="smollm2").resolved_api_key({API_KEY_ENV: ""}) is None
