"""Cache salts (vLLM's ``cache_salt``): partitions of the prefix cache, one per salt.

A request may carry a salt. The block manager keys the hash of the request's first prompt
block with it (keyed BLAKE2b, `salt_key`), and the hash chain carries that into every later
block, so requests share cached KV blocks only when their salts are equal (or both absent).
A caller's ``cached_tokens`` then counts only hits on blocks computed for its own salt: it
cannot learn whether a prompt prefix was recently sent under another salt.

What it does not hide: how full the cache is, and timing effects of other tenants' load
(their requests still take blocks and compute from the same pool). A salt that another party
can guess protects nothing against that party; use long random salts (vLLM suggests 256 bits,
e.g. 43 base64 characters), or the front doors' per-API-key salts.

Torch-free: the front doors validate salts with `check_cache_salt` too.
"""

from __future__ import annotations

import hashlib

#: Longest salt accepted (characters): enough for any random salt, small enough to hash once.
MAX_CACHE_SALT_CHARS = 1024


def check_cache_salt(cache_salt: str | None) -> None:
    """Raise ValueError unless ``cache_salt`` is None or a non-empty string of at most
    `MAX_CACHE_SALT_CHARS` characters (an empty salt would look like salting while sharing)."""
    if cache_salt is None:
        return
    if not isinstance(cache_salt, str) or not cache_salt:
        raise ValueError("cache_salt must be a non-empty string when given")
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt is {len(cache_salt)} characters long; at most {MAX_CACHE_SALT_CHARS} allowed")


def salt_key(cache_salt: str) -> bytes:
    """The BLAKE2b key a salt gives a sequence's first block (32 bytes, whatever the salt)."""
    return hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=32,
                           person=b"splitserve-salt").digest()
