"""Gated-LoRA adapters in PEFT format: the file layout (`adapter_config.json` +
`adapter_model.safetensors`) and how its per-projection LoRA weights map onto the engine's fused
`LoRALinear` slices (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`) and back.

Owns: `AdapterInfo`, `read_adapter_files` / `write_adapter_files` (the one owner of the layout),
`load_adapter`, `save_adapter`. workers.loader re-exports them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.models.linear import LoRALinear
from workers.models.transformer import CausalLM


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    target_modules: list[str]
    mask_token_id: int | None
    stride: int | None


_ADAPTER_CONFIG, _ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_adapter_files(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT adapter directory as stored: (adapter_config, {tensor name: tensor}) on the CPU in
    the stored dtype. Raises ValueError naming the missing file."""
    d = Path(adapter_dir)
    cfg = _read_json(d / _ADAPTER_CONFIG)
    if not cfg:
        raise ValueError(f"adapter: {d} has no {_ADAPTER_CONFIG}")
    if not (d / _ADAPTER_WEIGHTS).exists():
        raise ValueError(f"adapter: {d} has no {_ADAPTER_WEIGHTS}")
    return cfg, load_file(str(d / _ADAPTER_WEIGHTS))


def write_adapter_files(adapter_dir: str | os.PathLike, config: dict,
                        tensors: dict[str, torch.Tensor]) -> None:
    """Writes a PEFT adapter directory (the inverse of `read_adapter_files`)."""
    d = Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (d / _ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapter(model: CausalLM, adapter_dir: str | os.PathLike) -> AdapterInfo:
    """Attaches a PEFT LoRA adapter to `model`'s `LoRALinear` projections as a *gated* LoRA.

    The weights are applied only at rows the engine marks in `lora_mask` (MASK positions), not
    everywhere as PEFT would. `adapter_config.json` may carry our extension
    `"idlm": {"mask_token_id": int, "stride": int}` naming the token used as MASK.
    """
    d = Path(adapter_dir)
    cfg, weights = read_adapter_files(d)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter: {d} is a {cfg['peft_type']} adapter; only LoRA is supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise ValueError(f"adapter: {d} uses rank/alpha patterns or DoRA, which are not supported")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    projs = model.hf_projections()
    mods = dict(model.named_modules())
    # Validate everything before touching the model so a bad adapter leaves it unchanged.
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in weights.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        parts = name.rsplit(".", 2)  # "<hf module>.lora_A.weight"
        proj = projs.get(parts[0]) if len(parts) == 3 and parts[2] == "weight" else None
        if proj is None or parts[1] not in ("lora_A", "lora_B") or parts[0] == "lm_head":
            raise ValueError(f"adapter: weight {key!r} does not match a projection of the model")
        mod = mods[proj[0]]
        lo, hi = mod.slice_range(proj[1])
        want = (r, mod.in_features) if parts[1] == "lora_A" else (hi - lo, r)
        if tuple(w.shape) != want:
            raise ValueError(f"adapter: {key!r} has shape {tuple(w.shape)}, expected {want} (r={r})")
        pending.setdefault(parts[0], {})[parts[1]] = w
    if not pending:
        raise ValueError(f"adapter: {d} holds no LoRA weights")
    half = sorted(n for n, ab in pending.items() if len(ab) != 2)
    if half:
        raise ValueError(f"adapter: modules {half[:8]} have lora_A or lora_B but not both")
    for mod in mods.values():  # a second adapter replaces the first, it does not stack on it
        if isinstance(mod, LoRALinear):
            mod.clear_lora()
    for hf, ab in pending.items():
        name, sl = projs[hf]
        mods[name].set_lora(sl, ab["lora_A"], ab["lora_B"], scaling)
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
    dtype: torch.dtype = torch.float32,
) -> None:
    """Writes `model`'s LoRA weights as a PEFT adapter (`adapter_config.json` +
    `adapter_model.safetensors`, in `dtype`; `load_adapter` casts to the model's dtype) that
    `load_adapter` and `peft.PeftModel` both read; the `idlm` section records the MASK token id and
    stride the gated adapter was trained for."""
    d = Path(adapter_dir)
    tensors, targets, shapes = {}, set(), set()
    mods = dict(model.named_modules())
    for hf, (name, sl) in model.hf_projections().items():
        mod = mods[name]
        if sl in mod.lora_A:
            a, b = mod.lora_A[sl], mod.lora_B[sl]
            tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = a.detach().to(dtype).cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = b.detach().to(dtype).cpu().contiguous()
            targets.add(hf.rsplit(".", 1)[-1])
            shapes.add((a.shape[0], float(mod.lora_scaling)))
    if not tensors:
        raise ValueError("adapter: the model has no LoRA weights to save")
    if len(shapes) != 1:  # PEFT's config holds one r and one alpha for all modules
        raise ValueError(f"adapter: LoRA modules differ in (rank, scaling): {sorted(shapes)}")
    ((rank, scaling),) = shapes
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
    write_adapter_files(d, config, tensors)
