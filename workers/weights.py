"""Reading checkpoint tensors from a Hugging Face folder, one tensor at a time.

Tensors are yielded lazily (safetensors memory-maps the files), so peak memory is the model
plus one tensor, and a tensor-parallel rank can later skip what it does not hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from typing import Any

from safetensors import safe_open
from tqdm.auto import tqdm


def iter_safetensors(folder: Path, progress: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield (name, lazy slice) for every tensor in ``folder``'s ``*.safetensors`` files.

    The slice reads from disk only what is indexed (``t[a:b]``, ``t[:, a:b]``, ``t[:]``), so
    a tensor-parallel rank reads its shard and nothing more."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = [(h, name) for h in handles for name in h.keys()]
    for handle, name in tqdm(names, desc="Loading weights", unit="tensor", disable=not progress, leave=False):
        yield name, handle.get_slice(name)
