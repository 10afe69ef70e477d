"""Issue 17, must-show 4: ``splitserve serve --model <a Qwen3-MoE folder>`` through both front
doors. A tiny Qwen3-MoE (transformers' Qwen3MoeForCausalLM, float32, a sparse and a dense MLP
layer, the default model's tokenizer so text prompts work) is saved as a folder; the serve
command line's config is served in this process (`build_local_router`, no Ray: the groups of
mode auto, a prefill and a decode group, KV moved in memory) on loopback gRPC and HTTP ports;
greedy completions through each door equal transformers' greedy tokens on the same folder."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from router_helpers import wait_idle

N = 8
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, smollm2_tokenizer):
    """(folder, transformers model): tiny-qwen3-moe with the tokenizer's vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.workers.model_source import random_config

    config = random_config("tiny-qwen3-moe")
    config.vocab_size = len(smollm2_tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe-served")
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def moe_servers(moe_folder):
    import torch

    from splitserve.cluster.cli import build_parser, serve_config_from_args
    from splitserve.cluster.groups import local_service
    from splitserve.router.grpc_server import start_grpc_server
    from splitserve.router.http_server import start_http_server
    from splitserve.router.local_handle import build_local_router

    torch.set_num_threads(1)
    args = build_parser().parse_args(["serve", "--model", str(moe_folder[0]), "--device", "cpu",
                                      "--grpc-port", "0", "--http-port", "0"])
    cfg = serve_config_from_args(args)
    assert cfg.model == str(moe_folder[0])
    # The default KV budget is 2 GiB a group; a few blocks serve these prompts.
    router = build_local_router(local_service(dataclasses.replace(cfg, num_kv_blocks=64)))
    grpc_server, http_server = start_grpc_server(router, cfg.server), start_http_server(router, cfg.server)
    try:
        yield router, grpc_server.port, http_server.port
    finally:
        grpc_server.stop()
        http_server.stop()
        router.close()


def _hf_greedy(model, ids: list[int]) -> list[int]:
    import torch

    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False,
                             eos_token_id=model.config.eos_token_id, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_qwen3_moe_folder_served_token_exact_through_grpc_and_http(moe_folder, moe_servers, smollm2_tokenizer):
    from splitserve.router.client import Client
    from splitserve.workers.sampling_params import SamplingParams

    router, grpc_port, http_port = moe_servers
    expected = {p: _hf_greedy(moe_folder[1], smollm2_tokenizer.encode(p)) for p in PROMPTS}
    with Client(f"127.0.0.1:{grpc_port}") as client:
        for prompt in PROMPTS:
            assert client.generate(prompt, SamplingParams(max_tokens=N, temperature=0.0)).token_ids == expected[prompt]
    r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                   json={"prompt": PROMPTS, "max_tokens": N, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in choices] == [expected[p] for p in PROMPTS]
    assert [c["text"] for c in choices] == [smollm2_tokenizer.decode(expected[p], skip_special_tokens=True)
                                            for p in PROMPTS]
    groups = wait_idle(router)["groups"]
    assert len(groups) == 2, groups  # mode auto served it disaggregated: a prefill and a decode group
    assert all(free == total for free, total in groups.values()), groups
