"""In-memory tiny random models for engine tests (no files, no tokenizer).

`tiny_loaded(family, ...)` returns a `LoadedModel` the engine takes directly. Weights use a large
init std so greedy choices are not near-ties (fp32 batch-shape noise must not flip an argmax).
"""

from __future__ import annotations

import torch

from workers.engine import LoadedModel
from workers.models.config import ModelConfig
from workers.models.transformer import CausalLM


def tiny_loaded(
    family: str = "qwen3",
    vocab_size: int = 128,
    seed: int = 0,
    std: float = 0.15,
    lora_rank: int = 0,
    num_layers: int = 2,
    tie: bool = False,
) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family=family,
        architecture="Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qk_norm=family == "qwen3",
        mask_token_id=vocab_size - 1,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
    )
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
        if lora_rank:
            model.add_lora(lora_rank, 2 * lora_rank, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_b_zero=False)
    return LoadedModel(model.eval(), cfg, None, vocab_size - 1, f"tiny-{family}")


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g)
    # keep clear of the MASK id (vocab - 1)
    return [torch.randint(0, vocab - 1, (int(n_),), generator=g).tolist() for n_ in lens]


@torch.no_grad()
def naive_greedy(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy AR by full recomputation in dense mode: an oracle independent of the paged engine."""
    ids = list(prompt)
    for _ in range(n):
        h = model(torch.tensor(ids)[None], torch.arange(len(ids))[None])
        ids.append(int(model.compute_logits(h[0, -1]).argmax()))
    return ids[len(prompt) :]


def greedy_setup(family: str, n: int = 8, seed: int = 3, max_new: int = 24):
    """(loaded with a rank-4 LoRA switched off, n random prompts, their dense greedy continuations):
    the setup of the ISD exactness tests that compare against AR."""
    loaded = tiny_loaded(family, lora_rank=4)
    loaded.model.has_lora = False
    prompts = random_prompts(n, loaded.config.vocab_size, seed=seed)
    return loaded, prompts, [naive_greedy(loaded.model, p, max_new) for p in prompts]
