"""The front doors' cache salts: which prefix-cache partition a request runs in.

The engine shares cached prompt blocks only between requests of the same salt
(`splitserve.workers.cache_salt`), and a request's ``cached_tokens`` counts only hits on
blocks of its own salt. A salt comes from two places, combined here:

- the request: OpenAI body field ``cache_salt``, gRPC ``GenerateRequest.cache_salt``
  (vLLM's name): callers that share a salt share the cache; one that keeps its salt secret
  and unguessable keeps its prefixes to itself;
- the API key, with ``server.cache_salt_per_key``: every request is salted with a hash of
  the key the door authenticated it with, so callers with different keys never share a
  block, whatever salts they send (one key per service today: its requests share among
  themselves, and nothing with requests of another service's doors or of unsalted ones).

What is protected: whether a prompt prefix was recently sent under another salt or key can
no longer be read from ``cached_tokens``, nor from the time to first token of a hit. What is
not: the cache's size and load are shared (another tenant's requests still take blocks and
steps), and two callers who send the same request salt under the same key share.
"""

from __future__ import annotations

import hashlib

from splitserve.router.messages import ErrorCode, RouterError
from splitserve.workers.cache_salt import check_cache_salt


def tenant_key(spec) -> str | None:
    """The API key whose hash salts every request of doors serving ``spec`` (a `ServerSpec`),
    or None when ``cache_salt_per_key`` is off or no key is configured. Today a service has
    one key, so the key a door authenticated a caller with is always this one."""
    if not getattr(spec, "cache_salt_per_key", False):
        return None
    return spec.resolved_api_key()


def door_cache_salt(request_salt: str | None, authenticated_key: str | None) -> str | None:
    """The salt the engine gets for one request: the request's own (checked: a bad one is
    INVALID_ARGUMENT), and, when ``authenticated_key`` is given (per-key salting), a keyed
    hash of it under that key, so no two keys ever give the same salt and a caller without
    the key cannot compute another tenant's salt."""
    try:
        check_cache_salt(request_salt)
    except ValueError as err:
        raise RouterError(ErrorCode.INVALID_ARGUMENT, str(err)) from None
    if authenticated_key is None:
        return request_salt
    key = hashlib.blake2b(authenticated_key.encode("utf-8", "surrogatepass"), digest_size=32,
                          person=b"splitserve-key").digest()
    h = hashlib.blake2b(digest_size=32, key=key, person=b"splitserve-tnnt")
    # A leading byte tells "no request salt" from any salt (an empty one is refused above).
    h.update(b"\0" if request_salt is None else b"\1" + request_salt.encode("utf-8", "surrogatepass"))
    return "key:" + h.hexdigest()
