"""What the ingress adds for prefix caching and routing, kept apart from the OpenAI surface so the
ingress calls it in one line per use.

Owns: `PromptHasher` (the prompt's block digests under the engine's namespace: same module and same
config as the replicas and the router, workers.block_hash), `generate_request` (the wire request
with its `prefix_hashes` and `cache_salt`). The usage's `prompt_tokens_details.cached_tokens` is
summed in cluster.openai.generation.Usage.
"""

from __future__ import annotations

from cluster.config import AppConfig
from cluster.protocol import GenerateRequest
from workers.block_hash import prefix_hashes
from workers.sampling_params import SamplingParams


class PromptHasher:
    def __init__(self, cfg: AppConfig) -> None:
        engine = cfg.to_engine_config()
        self.engine = engine
        self.block_size = engine.kv_block_size
        self.root = engine.cache_namespace()
        self.max_blocks = cfg.router.max_prefix_blocks
        # Digests only matter to the prefix router; Serve's pow2 would carry them for nothing.
        self.enabled = cfg.router.policy == "prefix"

    def hashes(self, ids: list[int], cache_salt: str | None = None) -> list[bytes]:
        if not self.enabled:
            return []
        root = self.engine.cache_namespace(cache_salt) if cache_salt else self.root
        return prefix_hashes(ids, self.block_size, root, self.max_blocks)


def generate_request(rid: str, ids: list[int], params: SamplingParams, hasher: PromptHasher,
                     cache_salt: str | None = None) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=ids, params=params.to_dict(),
                           prefix_hashes=hasher.hashes(ids, cache_salt), cache_salt=cache_salt)

