"""OpenAI-compatible HTTP ingress (FastAPI under `@serve.ingress`).

Owns: the Serve deployment `OpenAIIngress`: optional bearer-token auth, request-size limits, body
parsing into the request models, the served-model check, and the wiring of each endpoint to its
module in `cluster.openai` (chat, completions), to the replicas through a streaming deployment
handle (Ray Serve balances across them; `n` and multi-prompt requests fan out into one replica
stream per choice), and to JSON or SSE (`stream_options.include_usage`, `data: [DONE]`).
"""

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Model
from ray import serve

from cluster.config import AppConfig
from cluster.openai import chat, completions
from cluster.openai.body import read_json_object
from cluster.openai.errors import APIError, install_handlers, replica_error, validation_error
from cluster.openai.generation import Job, Usage, collect, start
from cluster.openai.logprobs import TokenStrings
from cluster.openai.request_models import ChatRequest, CompletionRequest
from cluster.openai.schema import install_openapi
from cluster.prefix_routing import PromptHasher

# The OpenAPI document is served at /openapi.json (schema fuzzers and client generators read it);
# the interactive docs pages stay off.
app = FastAPI(title="idlm-serve", docs_url=None, redoc_url=None)
install_handlers(app)
install_openapi(app)


# Module-level helpers the ingress class uses must be defined above it: Serve serializes the
# decorated class at decoration time, capturing only the globals that exist by then.
async def _sse(formatter, st, usage: Usage, include_usage: bool):
    try:
        async for obj in formatter.stream(st, usage, include_usage):
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # mid-stream failure: report it in-band, the status is already 200
        err = e if isinstance(e, APIError) else replica_error(e)
        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.code}})}\n\n"
    finally:
        st.cancel()  # client gone or done: make sure the replicas stop and free the KV


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: dict, replica) -> None:
        from workers.loader import load_tokenizer, resolve_model
        from workers.models.config import ModelConfig

        self.cfg = AppConfig.model_validate(config)
        self.api_key = self.cfg.resolved_api_key()
        self.replica = replica
        self.hasher = PromptHasher(self.cfg)
        model_dir = resolve_model(self.cfg.model)
        self.tokenizer = load_tokenizer(model_dir)
        self.strings = TokenStrings(self.tokenizer)
        mcfg = ModelConfig.from_hf(json.loads(open(f"{model_dir}/config.json").read()))
        self.vocab_size = mcfg.vocab_size
        limit = self.cfg.max_model_len or mcfg.max_position_embeddings
        self.max_model_len = min(limit, mcfg.max_position_embeddings)
        self.created = int(time.time())

    # -- helpers -------------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        key = self.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key",
                           type_="authentication_error")

    async def _body(self, request: Request, cls):
        self._check_auth(request)
        data = await read_json_object(request, self.cfg.max_request_bytes)
        try:
            body = cls.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            raise validation_error(e.errors() if hasattr(e, "errors") else []) from None
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "model", "model_not_found")
        return body

    async def _run(self, rid: str, body, jobs: list[Job], formatter):
        st = await start(self.replica, rid, jobs, self.hasher, body.cache_salt)
        headers = {"x-idlm-replica": st.firsts[0].get("replica", "")}
        usage = st.usage
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(formatter, st, usage, include_usage), media_type="text/event-stream",
                                     headers=headers)
        return JSONResponse(formatter.response(await collect(st), usage), headers=headers)

    # -- endpoints -----------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check_auth(request)
        m = Model(id=self.cfg.model_name, created=self.created, object="model", owned_by="idlm-serve")
        return {"object": "list", "data": [m.model_dump()]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body: ChatRequest = await self._body(request, ChatRequest)
        jobs = chat.prepare(self.tokenizer, body, self.max_model_len, self.vocab_size)
        rid = "chatcmpl-" + uuid.uuid4().hex
        return await self._run(rid, body, jobs, chat.ChatFormatter(rid, body, self.strings))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body: CompletionRequest = await self._body(request, CompletionRequest)
        prompts, jobs, echo_only = completions.prepare(self.tokenizer, body, self.max_model_len, self.vocab_size)
        rid = "cmpl-" + uuid.uuid4().hex
        fmt = completions.CompletionFormatter(rid, body, self.strings, prompts, jobs, echo_only)
        return await self._run(rid, body, jobs, fmt)
