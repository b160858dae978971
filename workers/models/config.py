"""Model architecture description shared by the Llama and Qwen3 families.

Owns: `ModelConfig`, built from an HF `config.json` dict (`LlamaForCausalLM`, `Qwen3ForCausalLM`,
`SDARForCausalLM` — I-DLM checkpoints are Qwen3-shaped with a `<|MASK|>` token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM"}
QWEN3_ARCHS = {"Qwen3ForCausalLM", "SDARForCausalLM"}
# I-DLM's MASK id in the Qwen3 vocabulary (added special token `<|MASK|>`).
IDLM_MASK_TOKEN_ID = 151669


@dataclass
class ModelConfig:
    family: str  # "llama" | "qwen3"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    mask_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        model_type = cfg.get("model_type", "")
        if arch in QWEN3_ARCHS or model_type in ("qwen3", "sdar"):
            family = "qwen3"
        elif arch in LLAMA_ARCHS or model_type in ("llama", "mistral"):
            family = "llama"
        else:
            raise ValueError(f"architectures: unsupported model {arch or model_type!r} (Llama and Qwen3 families only)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type not in ("default", None):
            raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        mask_id = cfg.get("mask_token_id")
        if mask_id is None and arch == "SDARForCausalLM":
            mask_id = IDLM_MASK_TOKEN_ID
        return cls(
            family=family,
            architecture=arch or model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            attention_bias=bool(cfg.get("attention_bias", False)),
            mask_token_id=mask_id,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )
