"""The committed gRPC code is what `splitserve.proto` compiles to, and it imports with the
oldest protobuf and grpcio pyproject.toml allows (its generator's versions are the floors)."""

from __future__ import annotations

import math
import re

import pytest

from splitserve.router import protogen
from splitserve.router import splitserve_pb2 as pb
from splitserve.router.convert import request_from_proto, request_to_proto
from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.sampling_params import SamplingParams


def test_committed_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    for fresh in protogen.generate(tmp_path):
        committed = (protogen.HERE / fresh.name).read_text()
        assert protogen.versionless(committed) == protogen.versionless(fresh.read_text()), (
            f"{fresh.name} is stale: run `python -m splitserve.router.protogen` (grpcio-tools 1.66)")


def test_generated_with_the_oldest_allowed_versions():
    pb2 = (protogen.HERE / "splitserve_pb2.py").read_text()
    grpc_py = (protogen.HERE / "splitserve_pb2_grpc.py").read_text()
    gencode = tuple(int(x) for x in re.search(r"# Protobuf Python Version: (\d+)\.(\d+)", pb2).groups())
    generator = tuple(int(x) for x in re.search(r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)", grpc_py).groups())
    assert gencode <= (5, 28), "protobuf>=5.28 must import the generated code"
    assert generator <= (1, 66), "grpcio>=1.66 must import the generated code"


def test_unset_fields_get_the_documented_defaults():
    req = request_from_proto(pb.GenerateRequest(text="hi"), "r1", None)
    assert req.sampling == SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0)
    assert (req.request_id, req.text, req.timeout_s) == ("r1", "hi", None)


def test_round_trip_of_every_field():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, min_p=0.25, seed=2**63 + 5,
                            stop=("a", "b"), stop_token_ids=(4, 5), ignore_eos=True, min_tokens=2)
    for prompt, field in (("text", "text"), ([1, 2], "token_ids"), ([{"role": "user", "content": "x"}], "chat")):
        req = request_from_proto(request_to_proto(prompt, params, "id"), "id", 3.0)
        assert req.sampling == params and getattr(req, field) == prompt and req.timeout_s == 3.0


@pytest.mark.parametrize("sampling, words", [
    (pb.SamplingParams(temperature=math.nan), "temperature"),
    (pb.SamplingParams(top_p=1.5), "top_p"),
    (pb.SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
])
def test_bad_values_are_invalid_argument(sampling, words):
    with pytest.raises(RouterError) as err:
        request_from_proto(pb.GenerateRequest(text="x", sampling=sampling), "r", None)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and words in err.value.message


def test_cache_salt_round_trip_and_checks():
    assert request_from_proto(pb.GenerateRequest(text="x"), "r", None).cache_salt is None
    msg = request_to_proto("x", SamplingParams(), "r", cache_salt="s1")
    assert msg.HasField("cache_salt") and request_from_proto(msg, "r", None).cache_salt == "s1"
    # Per-key salting: the door's key is mixed in, set or not (`router.cache_salt`).
    salted = {request_from_proto(request_to_proto("x", SamplingParams(), "r", cache_salt=s), "r", None, k).cache_salt
              for s in (None, "s1") for k in ("k1", "k2")}
    assert len(salted) == 4 and None not in salted and "s1" not in salted
    with pytest.raises(RouterError) as err:  # set but empty: refused, not taken for unset
        request_from_proto(pb.GenerateRequest(text="x", cache_salt=""), "r", None)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and "cache_salt" in err.value.message
