"""benchmarks/decode_kernel_asm.py: the decode kernel compiled for Hopper here (no GPU: ptxas
and cuobjdump ship with Triton). It checks the claim `DecodeConfig.widen_early` rests on: over
an FP8 cache, widening where the tiles are loaded removes the byte-wise shared-memory loads of
V from the loop and cuts its instructions per byte of K/V."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_widening_early_removes_the_byte_loads_from_the_fp8_loop():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("decode_kernel_asm", BENCH / "decode_kernel_asm.py")
    asm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(asm)

    late = asm.compile_counts("fp8", 32, 4, widen=False, arch=90)
    early = asm.compile_counts("fp8", 32, 4, widen=True, arch=90)
    assert late["ops"].get("LDS.U8", 0) >= 16 and "LDS.U8" not in early["ops"]
    assert early["ops"].get("LDSM.16.MT88.4", 0) > 0  # V reaches its MMA through a transposing ldmatrix
    assert early["instructions_per_kib"] < 0.8 * late["instructions_per_kib"]
    assert early["cp_async_in_ptx"] > 0  # still pipelined
