"""Fixtures for the kernel tests: running the Triton kernels on CPU, in Triton's interpreter.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled or
interpreted (``TRITON_INTERPRET``), and its own library functions (``tl.max``, ``tl.sum``...)
are decorated when ``triton`` is first imported, which in a whole-suite run has already
happened (torch and transformers import it) with the variable unset. So instead of setting
the variable for the whole process, `triton_interpreter` swaps, for one test only, every
compiled-mode function of ``triton.language`` and of our ``*_triton`` modules for an
interpreted twin and sets ``TRITON_INTERPRET=1``; monkeypatch restores all of it after the
test, so no other folder's tests see a change.

The interpreter's ``tl.dot`` multiplies bfloat16 operands as their raw uint16 bits (seen in
triton 3.9), and rounds float32 -> bfloat16 by truncation; the fixture widens bfloat16 dot
operands to float32 first (what the tensor cores compute: exact products, float32
accumulation) and rounds to nearest even through torch, as the GPU does. Its float32 ->
float8e4nv cast loses the carry when rounding up crosses a power of two (31.9 gives 16, not
32); the fixture casts through torch there too (round to nearest even, as ``cvt.rn.satfinite``).
"""

from __future__ import annotations

import importlib

import pytest

TRITON_MODULES = [
    "splitserve.kernels.activation_triton",
    "splitserve.kernels.attention_triton",
    "splitserve.kernels.norm_triton",
    "splitserve.kernels.rotary_triton",
    "splitserve.kernels.kv_pack_triton",
    "splitserve.kernels.moe_triton",
    "splitserve.kernels.moe_route_triton",
    "splitserve.kernels.linear_triton",
    "splitserve.kernels.fp8_triton",
]


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run this test's Triton kernels in the interpreter (CPU tensors)."""
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    modules = [tl, tl.standard, tl.math, *(importlib.import_module(name) for name in TRITON_MODULES)]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                monkeypatch.setattr(module, name, InterpretedFunction(value.fn))

    builder = interpreter.InterpreterBuilder
    plain_dot = builder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(builder, "create_dot", dot)

    plain_cast = builder.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            import numpy as np
            import torch

            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return plain_cast(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast)

    plain_fp_to_fp = builder.create_fp_to_fp

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            import numpy as np
            import torch

            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn).view(torch.uint8)
            return interpreter.TensorHandle(rounded.numpy(), tl.float8e4nv)
        return plain_fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(builder, "create_fp_to_fp", fp_to_fp)
