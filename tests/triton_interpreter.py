"""Source prepended to the scripts that run Triton kernels in the interpreter (``TRITON_INTERPRET=1``).

Triton's interpreter (3.x) keeps bf16 tensors as raw ``uint16`` bits; its ``tl.dot`` multiplies those bits
as integers (every bf16 product comes out wrong) and its float32 -> bf16 cast truncates (a bias of half a
unit in the last place where the GPU rounds to nearest even). ``BF16_FIX`` makes its dot take bf16
operands as the float32 values they hold (the GPU's bf16 tensor-core products: exact products, fp32
accumulation) and its cast round to nearest even, so the kernels' bf16 paths run on the CPU with the
GPU's arithmetic.

:func:`run` runs such a script in Triton's interpreter and returns the JSON it prints last.
"""
import json
import os
import subprocess
import sys

BF16_FIX = r"""
import numpy as _np
import triton.language as _tl
from triton.runtime import interpreter as _interp

_create_dot = _interp.InterpreterBuilder.create_dot


def _as_f32(t):
    if t.dtype.scalar != _tl.bfloat16:
        return t
    data = _interp._convert_float(t.data, _tl.bfloat16, _tl.float32, None).view(_np.float32)
    return _interp.TensorHandle(data, _tl.float32)


def _dot_bf16_as_f32(self, a, b, d, *args):
    return _create_dot(self, _as_f32(a), _as_f32(b), d, *args)


def _cast_rtne(self, src, dst_type):
    if src.dtype.scalar == _tl.float32 and dst_type.scalar == _tl.bfloat16:
        import torch
        bits = torch.from_numpy(_np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
        return _interp.TensorHandle(bits.numpy().view(_np.uint16), _tl.bfloat16)
    return _cast_impl(self, src, dst_type)


_cast_impl = _interp.InterpreterBuilder.cast_impl
_interp.InterpreterBuilder.create_dot = _dot_bf16_as_f32
_interp.InterpreterBuilder.cast_impl = _cast_rtne
_interp.InterpreterBuilder.create_fp_trunc = lambda self, src, dst_type: _cast_rtne(self, src, dst_type)
_interp.InterpreterBuilder.create_fp_to_fp = lambda self, src, dst_type, rounding: _cast_rtne(self, src, dst_type)
"""


def run(script: str, *args: str):
    """The JSON value on the last line ``script`` prints, run with ``args`` by a fresh Python in Triton's
    interpreter (``TRITON_INTERPRET=1``); the script's error output when it fails."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
