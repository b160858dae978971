"""Tiny random HF model directories for loader / engine / cluster tests (files on disk, real tokenizer).

Owns: `make_tiny_model_dir(path, family="llama"|"qwen3"|"sdar", ...)`, which writes what a real
checkpoint directory holds: config.json, generation_config.json, model.safetensors (written by
transformers' own `save_pretrained`, so our loader is checked against HF's layout) and a real
`tokenizers` byte-level BPE tokenizer with a ChatML chat template.

Weights use a large init std (0.15) so logits are peaked: greedy comparisons between two
implementations must not sit on near-ties that fp32 summation-order noise could flip.
(`tests/tiny.py` builds in-memory models without files or tokenizer, for engine-only tests.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Token ids shared by every tiny tokenizer (special tokens come first, as in SmolLM2).
EOT_ID = 0  # <|endoftext|>: pad
IM_START_ID = 1  # <|im_start|>
IM_END_ID = 2  # <|im_end|>: eos, ends every chat turn
RESERVED_ID = (
    3  # <|reserved_0|>: never produced by text; usable as MASK by R-ISD tests (like SmolLM2's id 16)
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reserved_0|>"]
MASK_TOKEN = "<|MASK|>"  # sdar only: added after training, like I-DLM's <|MASK|> (151669) at the vocab's end

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "A prime number has exactly two divisors: one and itself. 2, 3, 5, 7 and 11 are prime.",
    "def is_palindrome(s): return s == s[::-1]",
    "Hello! How are you today? I am fine, thank you for asking.",
    "The water cycle: evaporation, condensation, precipitation and collection.",
    "Serving language models needs a paged key-value cache and continuous batching.",
    "Diffusion language models predict masked tokens; introspective decoding verifies drafts.",
    "user assistant system message content answer question",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42",
]


def _tokenizer(vocab_size: int, with_mask: bool):
    """Byte-level BPE trained on a small fixed corpus: any text encodes and decodes round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    target = vocab_size - 1  # one id left for <|MASK|> (sdar); merges stop early if the corpus runs out
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=512,
    )
    if with_mask:
        fast.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    assert [fast.convert_tokens_to_ids(t) for t in SPECIALS] == [EOT_ID, IM_START_ID, IM_END_ID, RESERVED_ID]
    return fast


def make_tiny_model_dir(
    path: str | os.PathLike,
    family: str = "llama",
    vocab_size: int = 384,
    seed: int = 0,
    std: float = 0.15,
    **overrides,
) -> str:
    """Writes a tiny random HF model directory and returns its path.

    family: "llama" (tied embeddings, like SmolLM2), "qwen3" (q/k-norm, untied) or "sdar" (a
    Qwen3-shaped checkpoint whose config.json is I-DLM-8B's, scaled down: `SDARForCausalLM`,
    `model_type: sdar`, `block_size`, `mask_token_id` = the tokenizer's `<|MASK|>`).
    `overrides` go to the transformers config (e.g. num_hidden_layers=3, tie_word_embeddings=False).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if family not in ("llama", "qwen3", "sdar"):
        raise ValueError(f"family must be llama, qwen3 or sdar, not {family!r}")
    if vocab_size < 272:  # 256 byte tokens + specials + a few merges
        raise ValueError("vocab_size must be >= 272 for a byte-level tokenizer")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(vocab_size, with_mask=family == "sdar")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=EOT_ID,
    )
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(**{**common, "tie_word_embeddings": True, "rope_theta": 1e5, **overrides})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen3Config(**{**common, "tie_word_embeddings": False, "rope_theta": 1e6, **overrides})
        model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.05 * torch.randn_like(p))  # near 1, but not exactly: norms are exercised
            else:
                p.normal_(0.0, std)
    model.save_pretrained(str(out))
    eos = [IM_END_ID] if family == "llama" else [IM_END_ID, EOT_ID]  # Qwen3 lists both in generation_config
    GenerationConfig(eos_token_id=eos, pad_token_id=EOT_ID).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if family == "sdar":
        mask_id = tok.convert_tokens_to_ids(MASK_TOKEN)
        assert mask_id < vocab_size
        c = json.loads((out / "config.json").read_text())
        # I-DLM-8B's config.json fields (docs: reference/idlm-reference.md §6), scaled down.
        c.update(
            {
                "architectures": ["SDARForCausalLM"],
                "model_type": "sdar",
                "auto_map": {
                    "AutoConfig": "configuration_sdar.SDARConfig",
                    "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
                },
                "block_size": 3,
                "mask_token_id": mask_id,
                "attn_implementation": "flex_attention",
                "fuse_cross_entropy": True,
                "use_regular_causal": True,
                "use_sliding_window": False,
                "sliding_window": None,
                "torch_dtype": "float32",
            }
        )
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return str(out)


def as_qwen3_dir(sdar_dir: str | os.PathLike, out: str | os.PathLike) -> str:
    """A view of an sdar directory that HF transformers loads as plain `Qwen3ForCausalLM` (same
    weight file, linked) — the oracle for SDAR checkpoints, which HF cannot load without remote code."""
    src, dst = Path(sdar_dir), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    c = json.loads((src / "config.json").read_text())
    c.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    for k in ("auto_map", "attn_implementation"):
        c.pop(k, None)
    (dst / "config.json").write_text(json.dumps(c, indent=2))
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    return str(dst)
