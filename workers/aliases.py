"""Defaults attached to model aliases: the demo adapter shipped for `smollm2` and the reserved
token used as MASK by base models that have none.

Owns: `default_adapter(source)` and `default_mask_token_id(source, model_config)`.
"""

from __future__ import annotations

from pathlib import Path

from workers.models.config import ModelConfig

# SmolLM2 has no MASK token: `<empty_output>` (id 16) is a reserved special token that chat text
# never produces, so R-ISD uses it as MASK and the gated LoRA learns to read it.
SMOLLM2_MASK_TOKEN_ID = 16
ADAPTERS_DIR = Path(__file__).parent / "adapters"
_DEMO_ADAPTERS = {"smollm2": ADAPTERS_DIR / "smollm2-risd"}


def default_adapter(source: str) -> str | None:
    path = _DEMO_ADAPTERS.get(source)
    if path is not None and (path / "adapter_config.json").exists():
        return str(path)
    return None


def default_mask_token_id(source: str, cfg: ModelConfig) -> int | None:
    if cfg.mask_token_id is not None:
        return cfg.mask_token_id
    if source == "smollm2" or (cfg.family == "llama" and cfg.vocab_size == 49152):
        return SMOLLM2_MASK_TOKEN_ID
    return None
