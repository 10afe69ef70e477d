"""/metrics after traffic, parsed with prometheus_client: the router's counters and the front
doors' match exactly what was sent (successes, tokens, refusals, by API and status)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitserve.router.client import Client
from splitserve.router.messages import RouterError
from splitserve.workers.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "One, two, three,"]
N = 4


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    def total(m):
        return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= ls)
    return total(after) - total(before)


def test_counters_match_the_traffic(servers, smollm2_tokenizer):
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    before = scrape(servers.http_url)
    with Client(servers.grpc_address) as client:
        for p in PROMPTS:
            client.generate(p, params)
        for bad in ([10**6], [1, 2, 3, 10**7]):  # refused by the engine: counted by the router too
            try:
                client.generate(bad, params)
            except RouterError:
                pass
    body = {"max_tokens": N, "temperature": 0, "ignore_eos": True}
    for p in PROMPTS:
        r = httpx.post(f"{servers.http_url}/v1/completions", json={**body, "prompt": p}, timeout=60)
        assert r.status_code == 200
    assert httpx.post(f"{servers.http_url}/v1/completions", json={**body, "prompt": p, "top_p": 7},
                      timeout=60).status_code == 400  # refused at the door
    after = scrape(servers.http_url)

    served = 2 * len(PROMPTS)
    prompt_tokens = 2 * sum(len(smollm2_tokenizer.encode(p)) for p in PROMPTS)
    assert delta(before, after, "splitserve:request_success_total", finished_reason="length") == served
    assert delta(before, after, "splitserve:request_success_total") == served
    assert delta(before, after, "splitserve:generation_tokens_total") == served * N
    assert delta(before, after, "splitserve:prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "splitserve:e2e_request_latency_seconds_count") == served
    assert delta(before, after, "splitserve:time_to_first_token_seconds_count") == served
    assert delta(before, after, "splitserve:inter_token_latency_seconds_count") == served * (N - 1)
    assert delta(before, after, "splitserve:request_errors_total", code="INVALID_ARGUMENT") == 2
    api = "splitserve:api_requests_total"
    assert delta(before, after, api, api="grpc", method="Generate", code="OK") == len(PROMPTS)
    assert delta(before, after, api, api="grpc", method="Generate", code="INVALID_ARGUMENT") == 2
    assert delta(before, after, api, api="http", method="/v1/completions", code="OK") == len(PROMPTS)
    assert delta(before, after, api, api="http", method="/v1/completions", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, api) == served + 3
    assert after[("splitserve:num_requests_inflight", frozenset())] == 0
    assert after[("splitserve:group_healthy", frozenset({("group", "decode-0"), ("role", "decode")}))] == 1
    assert delta(before, after, "splitserve:kv_transfer_bytes_total") > 0  # prefill -> decode moved KV
