"""Decoder-only transformer for the Llama (SmolLM2) and Qwen3 (I-DLM / SDAR) families.

Owns: the `CausalLM` module and its layers (RMSNorm, rotary embedding, attention with optional
q/k-norm, SwiGLU MLP). Projections are fused as in vLLM: one `qkv_proj` and one `gate_up_proj` GEMM
per layer (`workers.models.linear.LoRALinear`, slices named after the HF projections). HF checkpoints
and PEFT adapters name the separate projections; `workers.loader` merges them at load.

Two attention modes share the weights:
- paged: a ragged flat batch `[T]` against the paged KV cache (`AttentionMetadata`), used by the engine;
- dense: a padded `[B, L]` batch with an optional custom boolean mask, used by training and tests.

Gated LoRA: the adapters apply only at MASK rows; every other row runs the frozen base weights
exactly, which is what makes R-ISD lossless. The engine passes `lora_from` (its flat batch puts all
MASK rows last, so the LoRA rows are one slice); dense callers pass a boolean `lora_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionMetadata, dense_attention
from workers.batch_invariance import rows_independent
from workers.models.config import ModelConfig
from workers.models.linear import LoRALinear, LoraRows, mkl_packed_available


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op; in fp32 it equals the HF formula below bit for bit
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


class RopeTables:
    """cos and sign-folded sin of one forward's positions, `[N, 1, D]` (broadcast over heads), so
    each layer applies rotary with one cat, two muls and an add (HF's `rotate_half` convention:
    `x*cos + rotate_half(x)*sin`, and `-x2*sin == x2*(-sin)` exactly)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> None:
        half = cos.shape[-1] // 2
        self.half = half
        self.cos = cos.reshape(-1, 1, cos.shape[-1]).to(dtype)  # [N, 1, D]
        sin = sin.reshape(-1, 1, sin.shape[-1])
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).to(dtype)  # [N, 1, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, H, D]
        h = self.half
        return x * self.cos + torch.cat([x[..., h:], x[..., :h]], dim=-1) * self.sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        self.qkv_proj = LoRALinear(
            cfg.hidden_size,
            [("q_proj", self.nh * self.hd), ("k_proj", self.nkv * self.hd), ("v_proj", self.nkv * self.hd)],
            bias=b,
        )
        self.o_proj = LoRALinear(self.nh * self.hd, [("o_proj", cfg.hidden_size)], bias=b)  # HF: o_proj also uses attention_bias
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.hd**-0.5

    def qkv(self, x: torch.Tensor, rope: RopeTables, lora_rows: LoraRows):
        """x [N, H] -> q [N, Hq, D], k, v [N, Hkv, D] with q/k-norm and rotary applied."""
        nh, nkv = self.nh, self.nkv
        qkv = self.qkv_proj(x, lora_rows).view(-1, nh + 2 * nkv, self.hd)  # [N, Hq+2Hkv, D]
        if self.q_norm is not None:
            q, k, v = qkv.split([nh, nkv, nkv], dim=1)
            return rope(self.q_norm(q)), rope(self.k_norm(k)), v
        qk = rope(qkv[:, : nh + nkv])  # q and k heads in one rotary pass (elementwise: same bits)
        return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]

    def forward(self, x, rope, kv, meta, dense_mask, lora_rows):
        lead = x.shape[:-1]
        q, k, v = self.qkv(x.reshape(-1, x.shape[-1]), rope, lora_rows)
        if meta is not None:
            o = meta.attend(q, k, v, kv[0], kv[1], self.scale)  # SDPA gather or Triton kernel path
        else:
            o = dense_attention(*(t.reshape(*lead, -1, self.hd) for t in (q, k, v)), dense_mask, self.scale)
        return self.o_proj(o.reshape(-1, self.nh * self.hd), lora_rows).view(*lead, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = LoRALinear(cfg.hidden_size, [("gate_proj", self.inter), ("up_proj", self.inter)])
        self.down_proj = LoRALinear(cfg.intermediate_size, [("down_proj", cfg.hidden_size)])

    def forward(self, x, lora_rows):
        lead = x.shape[:-1]
        gu = self.gate_up_proj(x.reshape(-1, x.shape[-1]), lora_rows)  # [N, 2I]
        h = F.silu(gu[:, : self.inter]) * gu[:, self.inter :]
        return self.down_proj(h, lora_rows).view(*lead, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv, meta, dense_mask, lora_rows):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, meta, dense_mask, lora_rows)
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
        self.lm_head = LoRALinear(cfg.hidden_size, [("lm_head", cfg.vocab_size)])
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
        lora_from: int | None = None,  # paged mode: rows lora_from.. (all MASK rows) get the LoRA
    ) -> torch.Tensor:  # hidden states, same leading shape as input_ids, [..., H]
        x = self.model.embed_tokens(input_ids)
        rope = RopeTables(*self.rotary(positions), x.dtype)
        lora_rows: LoraRows = None
        if self.has_lora:
            if lora_from is not None:
                lora_rows = slice(lora_from, None)
            elif lora_mask is not None:
                lora_rows = lora_mask.reshape(-1).nonzero().squeeze(1)
        for i, layer in enumerate(self.model.layers):
            kv = kv_caches[i] if kv_caches is not None else None
            x = layer(x, rope, kv, meta, dense_mask, lora_rows)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `hidden` [R, H]. On the CPU a bf16/fp16 model computes them in fp32 (from an
        fp32 copy of the head, made once): rounding logits to bf16 would tie near-equal top tokens.
        That copy runs on MKL's packed sgemm at every row count, whose rows do not depend on how
        many share the product at vocabulary-sized outputs (batch invariance; `F.linear` and
        oneDNN's fp32 kernels do not have it); where a probe finds they do (tiny test vocabularies),
        one product per row. (On CUDA the head's product accumulates in fp32 and is returned in
        the model dtype.)"""
        w = self.lm_head.weight
        if w.dtype == torch.float32 or w.device.type != "cpu" or torch.is_grad_enabled():
            return self.lm_head(hidden)
        head = self.__dict__.get("_lm_head_fp32")
        if head is None or head[0] is not w or head[1] != w._version:
            with torch.inference_mode(False):  # a normal tensor (it has a version counter)
                lin = LoRALinear(self.config.hidden_size, [("lm_head", self.config.vocab_size)], device="meta")
                lin.weight = nn.Parameter(w.detach().float(), requires_grad=False)
                lin.gemm_rows = self.lm_head.gemm_rows
                lin.fixed_backend = "mkl" if mkl_packed_available() else None
                with torch.inference_mode():
                    per_row = not rows_independent(lin, lin.in_features, torch.float32)
            head = self.__dict__["_lm_head_fp32"] = (w, w._version, lin, per_row)  # not a submodule: no state_dict entry
        h = hidden.float()
        if head[3] and h.shape[0] > 1:
            return torch.cat([head[2](h[i : i + 1]) for i in range(h.shape[0])])
        return head[2](h)

    def hf_projections(self) -> dict[str, tuple[str, str]]:
        """HF module path of every projection (`model.layers.0.self_attn.q_proj`, `lm_head`) ->
        (path of the fused `LoRALinear` holding it, slice name). A slice's HF path is its fused
        module's parent path plus the slice name, so checkpoints and PEFT adapters map both ways."""
        out = {}
        for name, mod in self.named_modules():
            if isinstance(mod, LoRALinear):
                parent = name.rpartition(".")[0]
                for s in mod.slice_names:
                    out[f"{parent}.{s}" if parent else s] = (name, s)
        return out

    def add_lora(self, rank: int, alpha: float, target_modules: list[str], init_b_zero: bool = True) -> None:
        """Attach (untrained) gated-LoRA weights to the named projections (HF names: `q_proj`, ...)
        of every layer."""
        projs = {hf: v for hf, v in self.hf_projections().items() if hf.startswith("model.layers.")}
        missing = sorted(set(target_modules) - {hf.rpartition(".")[2] for hf in projs})
        if missing:
            raise ValueError(f"target_modules: {missing} are not projections of this model's layers")
        mods = dict(self.named_modules())
        for hf, (name, s) in projs.items():
            if hf.rpartition(".")[2] in target_modules:
                mods[name].add_lora(rank, alpha / rank, [s], init_b_zero=init_b_zero)
        self.has_lora = True
