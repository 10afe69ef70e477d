"""The OpenAI-compatible HTTP front door through real HTTP, with httpx and the official
`openai` client: completions and chat, streamed (SSE) and not, token-exact with transformers;
usage; several prompts; /v1/models, /health, /metrics; deadline, disconnect and refusals."""

from __future__ import annotations

import json

import httpx
import pytest

N = 12
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def openai_client(servers):
    import openai

    with openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def _sse_events(text: str) -> list:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completion_is_token_exact_with_usage(servers, smollm2_tokenizer, smollm2_oracle):
    ids = smollm2_tokenizer.encode(PROMPT)
    for prompt in (PROMPT, ids):  # text or token ids
        r = httpx.post(f"{servers.http_url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        [choice] = body["choices"]
        assert choice["token_ids"] == smollm2_oracle(ids, N)
        assert choice["text"] == smollm2_tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
        assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
        assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == N
        assert body["usage"]["total_tokens"] == len(ids) + N


def test_streamed_completion_with_usage(servers, openai_client, smollm2_tokenizer, smollm2_oracle):
    ids = smollm2_tokenizer.encode(PROMPT)
    events = list(openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    *chunks, usage = events
    assert usage.choices == [] and usage.usage.completion_tokens == N and usage.usage.prompt_tokens == len(ids)
    assert len(chunks) > 1 and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == smollm2_tokenizer.decode(smollm2_oracle(ids, N),
                                                                                   skip_special_tokens=True)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_not_is_token_exact(openai_client, smollm2_tokenizer, smollm2_oracle):
    from splitserve.workers.llm import chat_prompt_ids

    expected = smollm2_oracle(chat_prompt_ids(smollm2_tokenizer, CHAT), N)
    out = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                                extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == expected and choice.message.role == "assistant"
    assert choice.message.content == smollm2_tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected) and out.object == "chat.completion"
    chunks = list(openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=N,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_several_prompts_get_one_choice_each(servers, smollm2_tokenizer, smollm2_oracle):
    prompts = [PROMPT, "def fibonacci(n):"]
    expected = [smollm2_oracle(smollm2_tokenizer.encode(p), 6) for p in prompts]
    body = {"prompt": prompts, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    r = httpx.post(f"{servers.http_url}/v1/completions", json=body, timeout=60)
    assert [c["token_ids"] for c in r.json()["choices"]] == expected
    r = httpx.post(f"{servers.http_url}/v1/completions", json={**body, "stream": True}, timeout=60)
    got: dict[int, list[int]] = {0: [], 1: []}
    for event in _sse_events(r.text):
        for c in event["choices"]:
            got[c["index"]] += c["token_ids"]
    assert [got[0], got[1]] == expected


def test_models_health_and_metrics(servers, openai_client):
    [model] = openai_client.models.list().data
    assert model.id == MODEL
    health = httpx.get(f"{servers.http_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{servers.http_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "splitserve:num_requests_inflight" in metrics.text


def test_deadline_is_504_and_disconnect_aborts(servers):
    """The idle check after the test (conftest.py) shows the requests ended: generating 1000
    tokens here would take far longer than it waits."""
    long = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{servers.http_url}/v1/completions", json={**long, "timeout_s": 0.5}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    with httpx.stream("POST", f"{servers.http_url}/v1/completions", json={**long, "stream": True}, timeout=60) as s:
        assert s.status_code == 200
        next(s.iter_lines())  # one event, then hang up: the server aborts the request
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a whole answer
        httpx.post(f"{servers.http_url}/v1/completions", json=long, timeout=1.0)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": PROMPT, "n": 2}, 400, "n=2"),
    ({"prompt": PROMPT, "logprobs": 1}, 400, "logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 100000}, 400, "KV blocks"),
    ({"prompt": [1, 2, 10**6]}, 400, "out of range"),
    ({"prompt": PROMPT, "max_tokenz": 4}, 400, "unknown field: 'max_tokenz'"),  # a typo is not ignored
    ({"prompt": PROMPT, "model": "m" * 10_000}, 404, "(10002 characters)"),  # not echoed whole
])
def test_refusals_are_openai_errors(servers, body, status, words):
    r = httpx.post(f"{servers.http_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and err["code"]
    assert len(err["message"]) < 300


def test_openai_fields_that_change_nothing_are_accepted(servers):
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "user": "u-1", "metadata": {"k": "v"}}
    assert httpx.post(f"{servers.http_url}/v1/completions", json=body, timeout=60).status_code == 200


def test_live_and_ready_are_probes_apart_from_health():
    """/live answers while the door does; /ready needs one ready group of each role, so one
    group being rebuilt keeps the service ready (and /health, all groups, says 503)."""
    import httpx

    from splitserve.cluster.serve_config import ServerSpec
    from splitserve.router.http_server import start_http_server
    from splitserve.router.messages import GroupStatus

    def status(name, role, state):
        return GroupStatus(name, role, state, None, 0, 0, 0.0, 8, 8, 0)

    class Groups:
        groups: list = []

        async def health(self):
            if self.groups is None:
                raise RuntimeError("the engine core is gone")
            return self.groups

    router = Groups()
    server = start_http_server(router, ServerSpec(grpc_port=0, http_port=0))
    url = f"http://127.0.0.1:{server.port}"
    try:
        router.groups = [status("prefill-0", "prefill", "ready"), status("decode-0", "decode", "restarting"),
                         status("decode-1", "decode", "ready")]
        codes = [httpx.get(f"{url}/{p}", timeout=10).status_code for p in ("live", "ready", "health")]
        assert codes == [200, 200, 503]
        router.groups = [status("prefill-0", "prefill", "ready"), status("decode-0", "decode", "failed")]
        assert [httpx.get(f"{url}/{p}", timeout=10).status_code for p in ("live", "ready")] == [200, 503]
        router.groups = None
        assert [httpx.get(f"{url}/{p}", timeout=10).status_code for p in ("live", "ready")] == [200, 503]
    finally:
        server.stop()
