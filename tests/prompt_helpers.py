"""Helpers test modules import (a uniquely named module: several folders have a conftest.py)."""

from __future__ import annotations


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    """Seeded random token-id prompts of the given lengths (ids from 3: past the specials)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]
