"""benchmarks/decode_kernel_asm.py: the decode kernel compiled for Hopper here (no GPU: ptxas
and cuobjdump ship with Triton). It checks the claim `DecodeConfig.widen_early` rests on: over
an FP8 cache, widening where the tiles are loaded removes the byte-wise shared-memory loads of
V from the loop and cuts its instructions per byte of K/V."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench_modules import BENCH


def test_widening_early_removes_the_byte_loads_from_the_fp8_loop():
    # In a process of its own: another test may have imported the kernels under Triton's
    # interpreter, whose functions cannot be compiled for a GPU target.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import decode_kernel_asm as a; "
            "print(json.dumps([a.compile_counts('fp8', 32, 4, widen=w, arch=90) for w in (False, True)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    late, early = json.loads(run.stdout.strip().splitlines()[-1])
    assert late["ops"].get("LDS.U8", 0) >= 16 and "LDS.U8" not in early["ops"]
    assert early["ops"].get("LDSM.16.MT88.4", 0) > 0  # V reaches its MMA through a transposing ldmatrix
    assert early["instructions_per_kib"] < 0.8 * late["instructions_per_kib"]
    assert early["cp_async_in_ptx"] > 0  # still pipelined
