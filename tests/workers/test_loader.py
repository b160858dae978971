"""Loader: HF directories (Llama, Qwen3, I-DLM's SDARForCausalLM), GGUF alias, PEFT adapters.
Oracles: HF transformers' own models on the same saved weights, and `peft` reading our adapters."""

import json

import pytest
import torch

from workers import LLM, SamplingParams
from workers.loader import load_adapter, load_model, resolve_model, save_adapter


def _save_tiny_hf(path, family: str, sdar: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=1e5)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    model.save_pretrained(str(path), safe_serialization=True)
    if sdar:
        # I-DLM-8B's config.json fields, scaled down: SDARForCausalLM is Qwen3-shaped with a MASK token.
        c = json.loads((path / "config.json").read_text())
        c.update({"architectures": ["SDARForCausalLM"], "model_type": "sdar", "block_size": 3,
                  "mask_token_id": 150, "attn_implementation": "flex_attention", "fuse_cross_entropy": True,
                  "use_regular_causal": True, "eos_token_id": 151})
        (path / "config.json").write_text(json.dumps(c))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_dir_logits_match_transformers(tmp_path, family):
    hf = _save_tiny_hf(tmp_path, family).eval()
    ours, cfg = load_model(tmp_path)
    ids = torch.randint(0, 160, (1, 20))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(20)[None]))[0]
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    assert cfg.tie_word_embeddings == (family == "llama")


def test_sdar_checkpoint_loads_and_decodes(tmp_path):
    from transformers import Qwen3ForCausalLM

    _save_tiny_hf(tmp_path, "qwen3", sdar=True)
    model, cfg = load_model(tmp_path)
    assert cfg.architecture == "SDARForCausalLM" and cfg.family == "qwen3" and cfg.qk_norm
    assert cfg.mask_token_id == 150 and 151 in cfg.eos_token_ids
    # the same weights read by HF as plain Qwen3 give the same logits
    c = json.loads((tmp_path / "config.json").read_text())
    c.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    (tmp_path / "q3").mkdir()
    (tmp_path / "q3" / "config.json").write_text(json.dumps(c))
    (tmp_path / "q3" / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "q3")).eval()
    ids = torch.randint(0, 150, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits[0], model.compute_logits(model(ids, torch.arange(12)[None]))[0], atol=1e-4)
    # and it decodes with ISD (its own MASK id), greedy output equal to AR
    from workers.engine import LoadedModel

    loaded = LoadedModel(model, cfg, None, cfg.mask_token_id, "sdar-tiny")
    p = [[1, 2, 3, 4], [5, 6]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ar = [o.token_ids for o in LLM(loaded=loaded, mode="ar").generate(p, sp)]
    isd = LLM(loaded=loaded, mode="isd", stride=4)
    assert [o.token_ids for o in isd.generate(p, sp)] == ar
    assert isd.engine.mask_token_id == 150


def test_adapter_roundtrip_and_peft_compat(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _save_tiny_hf(tmp_path / "base", "llama")
    model, _ = load_model(tmp_path / "base")
    torch.manual_seed(1)
    model.add_lora(4, 8, ["q_proj", "v_proj", "down_proj"], init_b_zero=False)
    save_adapter(model, tmp_path / "ad", mask_token_id=7, stride=4)
    fresh, _ = load_model(tmp_path / "base")
    info = load_adapter(fresh, tmp_path / "ad")
    assert info.mask_token_id == 7 and info.stride == 4 and info.rank == 4
    ids = torch.randint(0, 160, (1, 10))
    gate = torch.zeros_like(ids, dtype=torch.bool)
    gate[0, 6:] = True
    with torch.no_grad():
        a = model(ids, torch.arange(10)[None], lora_mask=gate)
        b = fresh(ids, torch.arange(10)[None], lora_mask=gate)
    assert torch.equal(a, b)
    # peft reads the files: LoRA everywhere equals our gate fully on
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ref = pm(ids).logits[0]
        ours = fresh.compute_logits(fresh(ids, torch.arange(10)[None], lora_mask=torch.ones_like(gate)))[0]
    assert torch.allclose(ref, ours, atol=1e-4)


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="^model"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="^model"):
        resolve_model(str(tmp_path))  # a directory without config.json
    with pytest.raises(ValueError, match="^model"):
        resolve_model("someone/not-downloaded-model")
    with pytest.raises(ValueError, match="^adapter"):
        load_adapter(load_model(_save_dir(tmp_path))[0], tmp_path)


def _save_dir(tmp_path):
    d = tmp_path / "m"
    _save_tiny_hf(d, "llama")
    return d


def test_smollm2_alias_is_cached(tmp_path):
    import time

    t = time.monotonic()
    d = resolve_model("smollm2")
    assert time.monotonic() - t < 5.0, "second resolve must reuse the converted cache"
    assert (torch.tensor(0) == 0) and json.loads(open(f"{d}/config.json").read())["vocab_size"] == 49152
