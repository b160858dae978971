"""AR greedy on SmolLM2 (fp32) equals HF transformers greedy `generate` token for token, on 20
chat prompts x 64 new tokens, both one request at a time and all 20 batched together. HF is the
oracle nobody here wrote; it runs one prompt at a time (no padding effects).
Runs in the default test run (~2 min on 2 cores: HF generate dominates)."""

import copy

import pytest
import torch

from workers import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a limerick about a cat who loves jazz.",
    "Explain photosynthesis to a ten-year-old.",
    "What are the main differences between TCP and UDP?",
    "Give three tips for staying focused while studying.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is a prime number? Give examples.",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a bakery that sells only croissants.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why do leaves change color in autumn?",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle.",
    "What is the difference between weather and climate?",
    "Give me a recipe idea using rice, eggs and spinach.",
    "How many continents are there, and which is the largest?",
    "Explain what an API is, briefly.",
    "Write a short thank-you note to a teacher.",
    "What causes the seasons on Earth?",
]
N_NEW = 64


@pytest.fixture(scope="module")
def setup(smollm2_dir):
    from transformers import AutoModelForCausalLM

    d = smollm2_dir
    llm = LLM(model=d, mode="ar", max_num_batched_tokens=4096)
    prompts = [llm.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True).eval()
    # No EOS stopping and no EOS suppression (min_new_tokens would mask the EOS logit, which
    # changes the argmax; the engine's ignore_eos only disables stopping).
    gen = copy.deepcopy(hf.generation_config)
    gen.eos_token_id = [hf.config.vocab_size]  # an id the model can never emit: never stops
    gen.pad_token_id = llm.tokenizer.eos_token_id
    gen.do_sample = False
    gen.max_new_tokens = N_NEW
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
            ref.append(out[0, len(p):].tolist())
            assert len(ref[-1]) == N_NEW
    return llm, prompts, ref


def test_ar_batch1_equals_hf_generate(setup):
    llm, prompts, ref = setup
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    ours = [llm.generate([p], params)[0].token_ids for p in prompts]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert not mismatches, f"prompts {mismatches} differ from HF"


def test_ar_batched_equals_hf_generate(setup):
    llm, prompts, ref = setup
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert not mismatches, f"prompts {mismatches} differ from HF"
