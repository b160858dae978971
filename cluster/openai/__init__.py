"""The OpenAI-compatible HTTP surface, split by concern (as vLLM's `entrypoints/openai`):

- `errors`: the OpenAI error body, `APIError`, FastAPI exception handlers, replica-failure mapping;
- `request_models`: the pydantic request bodies (`extra="forbid"`: unsupported parameters get 400);
- `sampling`: request body -> `workers.SamplingParams`, with the limits that need the served model;
- `generation`: fan-out of one HTTP request into per-sample replica streams (`n`, several prompts),
  their first-delta error mapping, collection and merging;
- `logprobs`: token strings / bytes and the chat and completions logprobs shapes;
- `chat`, `completions`: the two endpoints' prompt building, responses and SSE chunks.

`cluster.ingress` binds them into the Serve deployment. Nothing here imports torch.
"""
