"""Loader: HF directories (Llama, Qwen3, I-DLM's SDARForCausalLM), the SmolLM2 GGUF alias and its
cache, strict loading, PEFT adapters and the gated-LoRA row guarantee.

Oracles nobody here wrote: HF transformers' own models on the same files, the `gguf` package's
dequantization of the shipped GGUF, and `peft` reading our adapters.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.models import RESERVED_ID, as_qwen3_dir, make_tiny_model_dir
from workers import loader
from workers.loader import load_adapter, load_model, load_tokenizer, resolve_model, save_adapter
from workers.models.linear import LoRALinear


def _dense_logits(model, ids: torch.Tensor, lora_mask=None) -> torch.Tensor:
    pos = torch.arange(ids.shape[-1]).expand_as(ids)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, lora_mask=lora_mask))


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    ).eval()


def _chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- HF directories ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_dir_logits_match_transformers(family, tiny_llama_dir, tiny_qwen3_dir):
    d = tiny_llama_dir if family == "llama" else tiny_qwen3_dir
    ours, cfg = load_model(d)
    hf = _hf(d)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits
    got = _dense_logits(ours, ids)
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    assert cfg.tie_word_embeddings == (family == "llama")
    if family == "llama":  # tied: the file holds no lm_head, the two parameters are one tensor
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:  # generation_config.json's eos ids are added to config.json's
        assert cfg.eos_token_ids == [2, 0]


def test_tokenizer_has_chat_template(tiny_qwen3_dir):
    tok = load_tokenizer(tiny_qwen3_dir)
    ids = _chat_ids(tok, "What is the capital of France?")
    assert (
        tok.decode(ids)
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token_id == 2


def test_sharded_checkpoint_and_bf16(tmp_path, tiny_qwen3_dir):
    hf = _hf(tiny_qwen3_dir)
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded, _ = load_model(tmp_path)
    single, _ = load_model(tiny_qwen3_dir)
    ids = torch.randint(0, 380, (1, 16))
    assert torch.equal(_dense_logits(sharded, ids), _dense_logits(single, ids))
    # dtype cast: weights follow, rotary frequencies stay fp32 (as in HF)
    bf, _ = load_model(tiny_qwen3_dir, dtype=torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(bf.rotary.inv_freq, single.rotary.inv_freq)


def test_strict_loading_names_bad_keys(tmp_path, tiny_qwen3_dir):
    d = tmp_path / "m"
    d.mkdir()
    for f in Path(tiny_qwen3_dir).iterdir():
        (d / f.name).symlink_to(f)
    sd = load_file(str(Path(tiny_qwen3_dir) / "model.safetensors"))
    (d / "model.safetensors").unlink()
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    broken["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    broken["model.rotary_emb.inv_freq"] = torch.zeros(8)  # tolerated: some checkpoints carry it
    save_file(broken, str(d / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.layers\.0\.self_attn\.extra"
    ):
        load_model(d)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shapes.*model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(d)


# -- SDARForCausalLM (I-DLM checkpoints) --------------------------------------------------------
def test_sdar_checkpoint_loads_and_decodes(tmp_path, tiny_sdar_dir):
    from workers import LLM, SamplingParams
    from workers.engine import LoadedModel

    model, cfg = load_model(tiny_sdar_dir)
    tok = load_tokenizer(tiny_sdar_dir)  # config.json has an auto_map: must not ask to trust remote code
    mask_id = tok.convert_tokens_to_ids("<|MASK|>")
    assert cfg.architecture == "SDARForCausalLM" and cfg.family == "qwen3" and cfg.qk_norm
    assert cfg.mask_token_id == mask_id and cfg.eos_token_ids == [2, 0]
    # the same weights read by HF as plain Qwen3 give the same logits
    hf = _hf(as_qwen3_dir(tiny_sdar_dir, tmp_path / "q3"))
    ids = torch.tensor([_chat_ids(tok, "Explain photosynthesis briefly.")])
    with torch.no_grad():
        ref = hf(ids).logits
    assert torch.allclose(ref, _dense_logits(model, ids), atol=1e-4)
    # and it decodes with ISD using its own MASK id; greedy output equals AR
    loaded = LoadedModel(model, cfg, tok, cfg.mask_token_id, "sdar-tiny")
    prompts = [ids[0].tolist(), [5, 6, 7]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ar = [o.token_ids for o in LLM(loaded=loaded, mode="ar").generate(prompts, sp)]
    isd = LLM(loaded=loaded, mode="isd", stride=4)
    assert [o.token_ids for o in isd.generate(prompts, sp)] == ar
    assert isd.engine.mask_token_id == mask_id


def test_sdar_mask_id_defaults_to_idlm():
    from workers.models.config import ModelConfig

    raw = {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    assert ModelConfig.from_hf(raw).mask_token_id == 151669


# -- SmolLM2 (GGUF alias) -----------------------------------------------------------------------
@pytest.mark.parametrize("gemm,atol", [("torch", 1e-4), ("onednn", 3e-4)])
def test_smollm2_logits_match_transformers(smollm2_dir, monkeypatch, gemm, atol):
    """Same logits as HF on the same weights. With torch's GEMM (MKL, as HF uses) they agree to
    1e-4; oneDNN's packed GEMM (the engine's CPU default) sums in another order, which moves
    these logits (magnitude ~30) by at most ~1e-4 more."""
    monkeypatch.setenv("IDLM_CPU_GEMM", gemm)
    ours, cfg = load_model(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.family == "llama"
    assert tok.convert_ids_to_tokens(loader.SMOLLM2_MASK_TOKEN_ID) == "<empty_output>"
    ids = torch.tensor([_chat_ids(tok, "What is the capital of France? Answer in one sentence.")])
    with torch.no_grad():
        ref = _hf(smollm2_dir)(ids).logits
    got = _dense_logits(ours, ids)
    assert torch.allclose(ref, got, atol=atol, rtol=0), (ref - got).abs().max()


def test_smollm2_conversion_equals_gguf_dequantization(smollm2_dir):
    """The converted checkpoint equals the `gguf` package's own dequantization of the shipped file,
    with llama.cpp's Q/K row permutation undone: every tensor is named, and the embedding, the
    final norm and all tensors of the first, a middle and the last layer are compared (all 30
    layers take ~40 s on 2 cores)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cfg = json.loads((Path(smollm2_dir) / "config.json").read_text())
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    reader = GGUFReader(str(loader.smollm2_gguf_path()))
    seen = set()
    n_layers = cfg["num_hidden_layers"]
    check_layers = {"0", str(n_layers // 2), str(n_layers - 1)}
    with safe_open(str(Path(smollm2_dir) / "model.safetensors"), "pt") as f:
        for t in reader.tensors:
            kind = None
            if t.name == "token_embd.weight":
                hf_name = "model.embed_tokens.weight"
            elif t.name == "output_norm.weight":
                hf_name = "model.norm.weight"
            else:
                _, layer, kind, _ = t.name.split(".")
                hf_name = f"model.layers.{layer}.{names[kind]}.weight"
                if layer not in check_layers:
                    seen.add(hf_name)
                    continue
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            if kind in heads:  # llama.cpp interleaves the two rotary halves of each head
                n = heads[kind]
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            assert torch.equal(f.get_tensor(hf_name), w), hf_name
            seen.add(hf_name)
        assert seen == set(f.keys())


def test_smollm2_alias_is_cached(smollm2_dir):
    st = Path(smollm2_dir) / "model.safetensors"
    before = st.stat().st_mtime_ns
    t = time.monotonic()
    assert resolve_model("smollm2") == smollm2_dir
    assert time.monotonic() - t < 5.0, "second resolve must reuse the converted cache"
    assert st.stat().st_mtime_ns == before  # not rewritten
    assert not [p for p in Path(smollm2_dir).parent.iterdir() if ".tmp-" in p.name]


def test_gguf_cache_keying_and_atomicity(tmp_path, monkeypatch):
    """`.gguf` paths: converted once per (path, size, mtime); a failed conversion leaves nothing.
    The conversion itself is stubbed (the real one is covered by the smollm2 tests above)."""
    calls = []

    def fake_convert(gguf, dest):
        calls.append(gguf)
        if gguf.read_bytes() == b"bad":
            (dest / "config.json").write_text("{}")  # half written, then the conversion dies
            raise RuntimeError("conversion failed")
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(b"")
        st = gguf.stat()
        (dest / "idlm_conversion.json").write_text(
            json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
        )

    monkeypatch.setattr(loader, "_gguf_to_hf_dir", fake_convert)
    monkeypatch.setenv("IDLM_CACHE_DIR", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"weights")
    first = resolve_model(str(g))
    assert Path(first).parent == tmp_path / "cache" and Path(first).name.startswith("m-")
    assert resolve_model(str(g)) == first and len(calls) == 1
    os.utime(g, ns=(g.stat().st_atime_ns, g.stat().st_mtime_ns + 10**9))  # the file changed
    second = resolve_model(str(g))
    assert second != first and len(calls) == 2
    assert resolve_model(str(g), cache_dir=str(tmp_path / "other")).startswith(str(tmp_path / "other"))
    # the alias directory has a fixed name: its provenance record makes a changed file reconvert
    fixed = tmp_path / "cache" / "alias"
    loader._convert_gguf(g, fixed)
    loader._convert_gguf(g, fixed)
    assert len(calls) == 4  # 3 so far (the "other" cache dir converted too) + 1
    g.write_bytes(b"new weights")
    loader._convert_gguf(g, fixed)
    assert len(calls) == 5 and json.loads((fixed / "idlm_conversion.json").read_text())["size"] == 11
    # the same wheel in another venv: same bytes, other mtime -> the content hash keeps the cache;
    # other bytes of the same size -> reconverted
    rec = json.loads((fixed / "idlm_conversion.json").read_text())
    (fixed / "idlm_conversion.json").write_text(json.dumps({**rec, "sha256": loader._file_sha256(g)}))
    os.utime(g, ns=(g.stat().st_atime_ns, g.stat().st_mtime_ns + 10**9))
    loader._convert_gguf(g, fixed)
    assert len(calls) == 5
    g.write_bytes(b"NEW weights")
    loader._convert_gguf(g, fixed)
    assert len(calls) == 6
    b = tmp_path / "b.gguf"
    b.write_bytes(b"bad")
    with pytest.raises(RuntimeError, match="conversion failed"):
        resolve_model(str(b))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [Path(first).name, Path(second).name, "alias"]
    )


@pytest.mark.slow
def test_gguf_file_path_converts_like_alias(tmp_path, smollm2_dir):
    g = tmp_path / "smol.gguf"
    g.symlink_to(loader.smollm2_gguf_path())
    d = resolve_model(str(g), cache_dir=str(tmp_path / "cache"))
    a, b = load_file(f"{d}/model.safetensors"), load_file(f"{smollm2_dir}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    """A hub id already in the local HF cache resolves to its `main` snapshot directory, found
    on disk (the cache layout huggingface-cli writes); nothing is fetched."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--cached-model"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someone/cached-model") == str(snap)
    with pytest.raises(ValueError, match="^model: 'someone/other' is not in the local Hugging Face cache"):
        resolve_model("someone/other")


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="^model: GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="^model: directory .* has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(
        ValueError, match="^model: 'someone/not-downloaded-model' is not in the local Hugging Face cache"
    ):
        resolve_model("someone/not-downloaded-model")
    with pytest.raises(ValueError, match="^model: 'no-such-alias' is not an alias"):
        resolve_model("no-such-alias")
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match="unsupported model"):
        load_model(tmp_path)


# -- adapters -------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _with_lora(model_dir, seed=1, targets=TARGETS):
    model, cfg = load_model(model_dir)
    torch.manual_seed(seed)
    model.add_lora(4, 8, targets, init_b_zero=False)
    with torch.no_grad():  # a B large enough that the adapter visibly changes the logits
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B.values():
                    b.normal_(0, 0.1)
    return model, cfg


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_adapter_roundtrip_and_peft_compat(tmp_path, family, tiny_llama_dir, tiny_qwen3_dir):
    from peft import PeftModel

    d = tiny_llama_dir if family == "llama" else tiny_qwen3_dir
    model, cfg = _with_lora(d, targets=["q_proj", "v_proj", "down_proj"])
    save_adapter(model, tmp_path / "ad", mask_token_id=RESERVED_ID, stride=4, base_model_name_or_path=d)
    fresh, _ = load_model(d)
    info = load_adapter(fresh, tmp_path / "ad")
    assert (info.mask_token_id, info.stride, info.rank, info.alpha) == (RESERVED_ID, 4, 4, 8.0)
    assert sorted(info.target_modules) == ["down_proj", "q_proj", "v_proj"] and fresh.has_lora
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    gate = torch.zeros_like(ids, dtype=torch.bool)
    gate[0, 6:] = True
    assert torch.equal(_dense_logits(model, ids, gate), _dense_logits(fresh, ids, gate))
    # peft reads the files: its LoRA (applied everywhere) equals our gate fully on
    pm = PeftModel.from_pretrained(_hf(d), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ref = pm(ids).logits
    ours = _dense_logits(fresh, ids, torch.ones_like(gate))
    assert torch.allclose(ref, ours, atol=1e-4)
    assert not torch.allclose(ref, _dense_logits(fresh, ids), atol=1e-2)  # the adapter does something


def test_gated_lora_changes_only_mask_rows(tiny_llama_dir):
    """Rows before the first gated (MASK) row are bit-identical to the base model's; that is the
    R-ISD losslessness argument (MASK rows come after the clean rows in causal order)."""
    from workers.attention import AttentionMetadata

    base, cfg = load_model(tiny_llama_dir)
    lora, _ = _with_lora(tiny_llama_dir)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    gate = torch.zeros_like(ids, dtype=torch.bool)
    gate[0, 20:] = True
    gate[1, 15:] = True
    ref, got = _dense_logits(base, ids), _dense_logits(lora, ids, gate)
    assert torch.equal(got[0, :20], ref[0, :20]) and torch.equal(got[1, :15], ref[1, :15])
    assert (got[0, 20:] - ref[0, 20:]).abs().amin(-1).gt(0).all()  # every gated row changed
    assert torch.equal(_dense_logits(lora, ids, torch.zeros_like(gate)), ref)  # gate off: base model
    # paged mode, a ragged flat batch of two requests with MASK suffixes
    L, H = cfg.num_layers, cfg.num_kv_heads

    def paged(model, mask):
        kv = [(torch.zeros(64, H, cfg.head_dim), torch.zeros(64, H, cfg.head_dim)) for _ in range(L)]
        meta = AttentionMetadata.build([24, 24], [0, 0], [[0, 1], [2, 3]], 16)
        flat, pos = ids.reshape(-1), torch.arange(24).repeat(2)
        with torch.no_grad():
            return model.compute_logits(model(flat, pos, kv, meta, lora_mask=mask)).view(2, 24, -1)

    ref_p, got_p = paged(base, None), paged(lora, gate.reshape(-1))
    assert torch.equal(got_p[0, :20], ref_p[0, :20]) and torch.equal(got_p[1, :15], ref_p[1, :15])
    assert not torch.allclose(got_p[0, 20:], ref_p[0, 20:])


def test_bad_adapters_raise_and_leave_model_unchanged(tmp_path, tiny_llama_dir, tiny_qwen3_dir):
    q3, _ = _with_lora(tiny_qwen3_dir)
    save_adapter(q3, tmp_path / "q3", mask_token_id=RESERVED_ID)
    # tiny qwen3 and llama share shapes; change one so the adapter is for a different base
    sd = load_file(str(tmp_path / "q3" / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    sd[k] = torch.zeros(4, 99)
    save_file(sd, str(tmp_path / "q3" / "adapter_model.safetensors"))
    model, _ = load_model(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"^adapter: .*down_proj\.lora_A.*shape"):
        load_adapter(model, tmp_path / "q3")
    assert not model.has_lora and not any(m.has_lora for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(ValueError, match="^adapter: .* has no adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="^adapter: .* has no adapter_model.safetensors"):
        load_adapter(model, tmp_path / "empty")
    plain, _ = load_model(tiny_llama_dir)
    with pytest.raises(ValueError, match="^adapter: the model has no LoRA weights"):
        save_adapter(plain, tmp_path / "none", mask_token_id=RESERVED_ID)


def test_default_smollm2_mask_token():
    from workers.aliases import SMOLLM2_MASK_TOKEN_ID

    assert loader.SMOLLM2_MASK_TOKEN_ID == SMOLLM2_MASK_TOKEN_ID == 16


def test_attention_bias_checkpoint_matches_transformers(tmp_path):
    """`attention_bias: true` puts a bias on q/k/v *and* o_proj in HF Llama/Qwen3."""
    d = make_tiny_model_dir(tmp_path, "qwen3", attention_bias=True)
    ours, _ = load_model(d)
    assert ours.model.layers[0].self_attn.o_proj.bias is not None
    ids = torch.randint(0, 380, (1, 12))
    with torch.no_grad():
        ref = _hf(d)(ids).logits
    assert torch.allclose(ref, _dense_logits(ours, ids), atol=1e-4)
