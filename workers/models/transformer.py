"""Decoder-only transformer for the Llama (SmolLM2) and Qwen3 (I-DLM / SDAR) families.

Owns: the `CausalLM` module and its layers (RMSNorm, rotary embedding, attention with optional
q/k-norm, SwiGLU MLP) plus `LoRALinear`, the gated-LoRA linear of R-ISD. Parameter names match HF
checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...) so safetensors load directly.

Two attention modes share the weights:
- paged: a ragged flat batch `[T]` against the paged KV cache (`AttentionMetadata`), used by the engine;
- dense: a padded `[B, L]` batch with an optional custom boolean mask, used by training and tests.

Gated LoRA: `lora_mask` marks the rows (MASK positions) where adapters apply; every other row runs the
frozen base weights exactly, which is what makes R-ISD lossless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionMetadata, dense_attention, paged_attention
from workers.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoRALinear(nn.Linear):
    """nn.Linear plus an optional low-rank delta applied only at rows selected by `lora_rows`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A: nn.Parameter | None = None  # [r, in]
        self.lora_B: nn.Parameter | None = None  # [out, r]
        self.lora_scaling = 0.0

    def add_lora(self, rank: int, scaling: float, init_b_zero: bool = True) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        if not init_b_zero:
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_scaling = scaling

    def forward(self, x: torch.Tensor, lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None or lora_rows is None or lora_rows.numel() == 0:
            return y
        # x: [T, in] flat rows; delta only where the gate is on (MASK rows).
        xs = x.index_select(0, lora_rows)
        delta = (xs @ self.lora_A.t()) @ self.lora_B.t() * self.lora_scaling
        return y.index_add(0, lora_rows, delta.to(y.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_pos: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.max_pos = max_pos

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [..., D]
        return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., H, D]; cos/sin: [..., D] broadcast over heads (HF rotate_half convention).
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = LoRALinear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = LoRALinear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = LoRALinear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = LoRALinear(self.nh * self.hd, cfg.hidden_size, bias=b)  # HF: o_proj also uses attention_bias
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.hd**-0.5

    def forward(self, x, cos, sin, kv, meta, dense_mask, lora_rows):
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        q = self.q_proj(flat, lora_rows).view(*lead, self.nh, self.hd)
        k = self.k_proj(flat, lora_rows).view(*lead, self.nkv, self.hd)
        v = self.v_proj(flat, lora_rows).view(*lead, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if meta is not None:
            o = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        else:
            o = dense_attention(q, k, v, dense_mask, self.scale)
        o = o.reshape(-1, self.nh * self.hd)
        return self.o_proj(o, lora_rows).view(*lead, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, lora_rows):
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        h = F.silu(self.gate_proj(flat, lora_rows)) * self.up_proj(flat, lora_rows)
        return self.down_proj(h, lora_rows).view(*lead, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, meta, dense_mask, lora_rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta, dense_mask, lora_rows)
        return x + self.mlp(self.post_attention_layernorm(x), lora_rows)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.has_lora = False

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] (paged) or [B, L] (dense)
        positions: torch.Tensor,  # same shape as input_ids
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        meta: AttentionMetadata | None = None,
        dense_mask: torch.Tensor | None = None,  # [B, L, L] bool, dense mode only
        lora_mask: torch.Tensor | None = None,  # same shape as input_ids, bool: gated-LoRA rows
    ) -> torch.Tensor:  # hidden states, same leading shape as input_ids, [..., H]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        lora_rows = None
        if self.has_lora and lora_mask is not None:
            lora_rows = lora_mask.reshape(-1).nonzero().squeeze(1)
        for i, layer in enumerate(self.model.layers):
            kv = kv_caches[i] if kv_caches is not None else None
            x = layer(x, cos, sin, kv, meta, dense_mask, lora_rows)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def add_lora(self, rank: int, alpha: float, target_modules: list[str], init_b_zero: bool = True) -> None:
        """Attach (untrained) gated-LoRA weights to the named projections of every layer."""
        for name, mod in self.named_modules():
            if isinstance(mod, LoRALinear) and name.rsplit(".", 1)[-1] in target_modules:
                mod.add_lora(rank, alpha / rank, init_b_zero=init_b_zero)
        self.has_lora = True
