"""OpenAI-compatible HTTP ingress (FastAPI under `@serve.ingress`).

Owns: request validation (pydantic, `extra="forbid"`: unsupported parameters get a 400, never
silence), chat templating and tokenization, context-length checks, OpenAI error bodies, optional
bearer-token auth, SSE streaming (`stream_options.include_usage`, `data: [DONE]`), and mapping of
Serve backpressure / replica failures to 503 with Retry-After. Generation itself happens on the
replicas, reached through a streaming deployment handle (Ray Serve balances across them).
"""


import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import AppConfig
from cluster.prefix_routing import PromptHasher, generate_request, make_usage
from cluster.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

app = FastAPI(title="idlm-serve", docs_url=None, redoc_url=None)
RETRY_AFTER_S = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError):
    return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", []) if x != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if err.get("type") == "json_invalid":
        msg, param = "request body is not valid JSON", None
    elif err.get("type") == "extra_forbidden":
        msg = f"unsupported parameter: {param}"
    return error_response(400, f"{param}: {msg}" if param else msg, param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), type_="invalid_request_error" if e.status_code < 500 else "server_error")


# Module-level helpers the ingress class uses must be defined above it: Serve serializes the
# decorated class at decoration time, capturing only the globals that exist by then.
def _replica_error(e: Exception) -> APIError:
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, ValueError):
        msg = str(cause)
        return APIError(400, msg, msg.split(":")[0] if ":" in msg else None)
    if isinstance(e, BackPressureError):
        return APIError(503, "server overloaded", code="overloaded", type_="server_error", headers={"Retry-After": RETRY_AFTER_S})
    return APIError(503, f"replica unavailable: {type(e).__name__}", code="replica_unavailable", type_="server_error",
                    headers={"Retry-After": RETRY_AFTER_S})


# -- request bodies ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, min_length=1)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: bool = False


# -- the deployment ---------------------------------------------------------------------------
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
        mcfg = ModelConfig.from_hf(json.loads(open(f"{model_dir}/config.json").read()))
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
        length = request.headers.get("content-length")
        if length and int(length) > self.cfg.max_request_bytes:
            raise APIError(413, f"request body exceeds {self.cfg.max_request_bytes} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > self.cfg.max_request_bytes:
            raise APIError(413, f"request body exceeds {self.cfg.max_request_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(raw)
        except ValueError:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return cls.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            errs = e.errors() if hasattr(e, "errors") else []
            err = errs[0] if errs else {}
            param = ".".join(str(x) for x in err.get("loc", [])) or None
            msg = f"unsupported parameter: {param}" if err.get("type") == "extra_forbidden" else f"{param}: {err.get('msg', e)}"
            raise APIError(400, msg, param) from None

    def _params(self, body: _Common, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, "n: only n=1 is supported", "n")
        if body.logprobs:
            raise APIError(400, "logprobs: not supported", "logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty/frequency_penalty: not supported", "presence_penalty")
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"prompt: {prompt_len} tokens exceeds the context length {self.max_model_len}",
                           "messages", "context_length_exceeded")
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens: prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the context "
                           f"length {self.max_model_len}", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=-1 if body.top_k is None else body.top_k,
                seed=body.seed,
                stop=stop,
                ignore_eos=body.ignore_eos,
            )
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(":")[0]) from None

    async def _stream(self, req: GenerateRequest):
        gen = self.replica.options(stream=True).generate.remote(req)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "replica returned no output", type_="server_error") from None
        except BackPressureError as e:
            raise APIError(503, f"server overloaded: {e}", code="overloaded", type_="server_error",
                           headers={"Retry-After": RETRY_AFTER_S}) from None
        except Exception as e:
            raise _replica_error(e) from None
        return first, gen

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
        msgs = [m.as_template_dict() for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise APIError(400, f"messages: cannot apply the chat template: {e}", "messages") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if body.top_logprobs is not None:
            raise APIError(400, "top_logprobs: not supported", "top_logprobs")
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._params(body, len(ids), mt)
        return await self._run(body, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body: CompletionRequest = await self._body(request, CompletionRequest)
        if body.echo:
            raise APIError(400, "echo: not supported", "echo")
        if isinstance(body.prompt, str):
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=False)
        else:
            ids = list(body.prompt)
            V = len(self.tokenizer)
            if any(t < 0 or t >= V for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {V})", "prompt")
        if not ids:
            raise APIError(400, "prompt: must not be empty", "prompt")
        params = self._params(body, len(ids), body.max_tokens)
        return await self._run(body, ids, params, chat=False)

    async def _run(self, body: _Common, ids: list[int], params: SamplingParams, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = generate_request(rid, ids, params, self.hasher, body.cache_salt)
        first, gen = await self._stream(req)
        headers = {"x-idlm-replica": first.get("replica", "")}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(rid, body.model, first, gen, chat, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, n_out, n_prompt, reason, metrics = [], 0, len(ids), None, None
        d = first
        try:
            while True:
                text.append(d.get("text", ""))
                n_out, n_prompt = d.get("num_output_tokens", n_out), d.get("num_prompt_tokens", n_prompt)
                if d.get("finished"):
                    reason, metrics = d.get("finish_reason"), d.get("metrics")
                    break
                d = await gen.__anext__()
        except Exception as e:
            raise _replica_error(e) from None
        usage = make_usage(n_prompt, n_out, d.get("num_cached_tokens", 0))
        finish = "length" if reason == "length" else "stop"
        if chat:
            resp = ChatCompletion(
                id=rid, created=int(time.time()), model=body.model, object="chat.completion", usage=usage,
                choices=[Choice(index=0, finish_reason=finish,
                                message=ChatCompletionMessage(role="assistant", content="".join(text)))],
            )
        else:
            resp = Completion(
                id=rid, created=int(time.time()), model=body.model, object="text_completion", usage=usage,
                choices=[CompletionChoice(index=0, finish_reason=finish, text="".join(text))],
            )
        out = resp.model_dump(exclude_none=True)
        if metrics:
            out["idlm"] = {k: metrics[k] for k in ("num_forwards", "tokens_per_forward", "acceptance_rate") if k in metrics}
        return JSONResponse(out, headers=headers)

    async def _sse(self, rid, model, first, gen, chat: bool, include_usage: bool):
        created = int(time.time())
        n_prompt, n_out = first.get("num_prompt_tokens", 0), 0

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = ChoiceDelta(role="assistant" if role else None, content=text)
                c = ChatCompletionChunk(id=rid, created=created, model=model, object="chat.completion.chunk",
                                        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)])
            else:
                c = Completion(id=rid, created=created, model=model, object="text_completion",
                               choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish or "stop")])
                if finish is None:
                    d = c.model_dump(exclude_none=True)
                    d["choices"][0]["finish_reason"] = None
                    return f"data: {json.dumps(d)}\n\n"
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        try:
            if chat:
                yield chunk("", None, role=True)
            d = first
            while True:
                n_out = d.get("num_output_tokens", n_out)
                finished = d.get("finished", False)
                if d.get("text"):
                    yield chunk(d["text"], None)
                if finished:
                    yield chunk("" if chat else "", "length" if d.get("finish_reason") == "length" else "stop")
                    break
                d = await gen.__anext__()
            if include_usage:
                usage = make_usage(n_prompt, n_out, d.get("num_cached_tokens", 0))
                cls = ChatCompletionChunk if chat else Completion
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield f"data: {cls(id=rid, created=created, model=model, object=obj, choices=[], usage=usage).model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # mid-stream failure: report it in-band, the status is already 200
            err = _replica_error(e)
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.code}})}\n\n"
        finally:
            gen.cancel()  # client gone or done: make sure the replica stops and frees the KV

