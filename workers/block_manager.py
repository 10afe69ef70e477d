"""KV block accounting: allocation, reference counts, prefix caching, LRU eviction.

The block manager never touches tensors; it decides which cache blocks a sequence owns, and
says so (`Allocation`, the count `cache_full_blocks` returns): the scheduler records it on the
sequence, which is how one owner writes a sequence's progress (scheduler.py). The only thing it
keeps on a sequence is the memo of its block hashes (``block_hashes``: tokens never change).

- A block is *free* when no sequence references it. Free blocks wait in an LRU queue; a
  free block may still hold a cached prefix (it keeps its hash) and is reused by a later
  request with the same prefix, or evicted (hash dropped) when the queue hands it out.
- Prefix caching keys a full block by a hash chain: hash(parent block's hash, its tokens),
  so a block is only reused under the very same prefix. Only computed, full blocks are
  registered (`cache_full_blocks`).
- Cache salts (`splitserve.workers.cache_salt`): a sequence's salt keys the hash of its
  first block (keyed BLAKE2b, the key derived from the salt), and the chain carries it into
  every later block. Sequences with different salts (or one salted, one not) therefore never
  share a block, and a hit (``num_cached_tokens``) can only come from a sequence of the same
  salt: a tenant cannot probe whether another tenant's prompt prefix is cached. Unsalted
  sequences hash exactly as before and share with each other.
- Lifecycle per sequence: `find_cached_prefix` -> `can_allocate` -> `allocate` (takes the
  hits, adds new blocks, returns both) every step it grows -> `cache_full_blocks` after the
  step -> `free` of its block ids when it finishes, aborts or is preempted. `num_free_blocks == num_blocks` when no
  sequence runs: the leak check the tests apply after every scenario.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from splitserve.workers.cache_salt import salt_key
from splitserve.workers.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    #: Prefix hash while the block's content is registered in the cache.
    block_hash: bytes | None = None


@dataclass(frozen=True)
class CachedPrefix:
    """The longest run of leading blocks of a sequence already in the cache."""

    block_ids: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


_NO_PREFIX = CachedPrefix(())


@dataclass(frozen=True)
class Allocation:
    """What `allocate` gave a sequence, for its owner to record: the prefix-cache hits (already
    computed: their tokens count as computed) first, then fresh blocks, in block-table order."""

    hit_block_ids: tuple[int, ...]
    new_block_ids: tuple[int, ...]
    #: Tokens the hits hold (whole blocks).
    num_hit_tokens: int

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self.hit_block_ids + self.new_block_ids


def hash_block(parent: bytes | None, tokens: list[int], key: bytes = b"") -> bytes:
    """Chain hash of one full block: identifies the block *and* everything before it.
    ``key`` (`salt_key`, first block only) makes it a keyed hash: a different salt, or
    none, gives unrelated hashes for the same tokens."""
    h = hashlib.blake2b(digest_size=16, key=key)
    h.update(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # LRU order: the front is handed out (evicted) first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.num_prefix_queries = 0  # tokens looked up
        self.num_prefix_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached-but-unreferenced ones count: evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """Leading full blocks of ``seq`` that are cached. At least one token is always left
        to compute, because the step that samples needs the last token's logits."""
        if not self.enable_prefix_caching:
            return _NO_PREFIX
        max_blocks = (seq.num_tokens - 1) // self.block_size
        ids = []
        for i in range(max_blocks):
            block_id = self._cached.get(self._block_hash(seq, i))
            if block_id is None:
                break
            ids.append(block_id)
        return CachedPrefix(tuple(ids))

    def cache_full_blocks(self, seq: Sequence) -> int:
        """Register the sequence's newly computed full blocks so later requests can reuse them;
        returns how many leading blocks of it are registered now (its new
        ``num_registered_blocks``, for the caller to record)."""
        if not self.enable_prefix_caching:
            return seq.num_registered_blocks
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            h = self._block_hash(seq, i)
            block = self.blocks[seq.block_ids[i]]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id
        return max(seq.num_registered_blocks, num_full)

    def _block_hash(self, seq: Sequence, index: int) -> bytes:
        # Hashes survive preemption (the tokens do not change), so each is computed once.
        if index < len(seq.block_hashes):
            return seq.block_hashes[index]
        parent = seq.block_hashes[index - 1] if index else None
        # The salt keys the first block only; the chain carries it into every later one.
        key = salt_key(seq.cache_salt) if index == 0 and seq.cache_salt is not None else b""
        bs = self.block_size
        h = hash_block(parent, seq.token_slice(index * bs, (index + 1) * bs), key)
        seq.block_hashes.append(h)
        return h

    # ---- allocation --------------------------------------------------------------------

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix) -> int:
        owned = len(seq.block_ids) + prefix.num_blocks
        total = seq.num_scheduled_tokens + prefix.num_blocks * self.block_size + num_new_tokens
        return max(0, self.blocks_needed(total) - owned)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = _NO_PREFIX) -> bool:
        # Taking a cached hit that sits in the free queue removes it from the free pool.
        hits_in_free = sum(1 for b in prefix.block_ids if self.blocks[b].ref_count == 0)
        need = self._num_new_blocks(seq, num_new_tokens, prefix)
        return need + hits_in_free <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = _NO_PREFIX) -> Allocation:
        """Take ``seq``'s prefix hits and enough blocks for ``num_new_tokens`` more tokens, for it;
        the caller appends them to its block table (nothing is written into ``seq``)."""
        if not self.can_allocate(seq, num_new_tokens, prefix):
            raise RuntimeError(f"out of KV blocks for {seq.request_id}; call can_allocate first")
        need = self._num_new_blocks(seq, num_new_tokens, prefix)
        if not seq.block_ids:  # admission: count the lookup once, when it is acted on
            self.num_prefix_queries += seq.num_tokens
            self.num_prefix_hits += prefix.num_blocks * self.block_size
        for block_id in prefix.block_ids:
            self._take(block_id)
        new = []
        for _ in range(need):
            block_id = next(iter(self._free))
            self._evict(block_id)
            self._take(block_id)
            new.append(block_id)
        return Allocation(prefix.block_ids, tuple(new), prefix.num_blocks * self.block_size)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block (a sequence's block table, which its owner then
        clears); cached blocks stay reusable until evicted."""
        # Tail blocks go to the queue first so they are evicted before the shared head.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            self.blocks[block_id].block_hash = None
        self._cached.clear()

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
