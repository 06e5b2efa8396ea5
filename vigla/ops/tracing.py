"""When vigla's ops leave their custom ops and fused kernels for plain PyTorch formulas.

The custom ops (``vigla::bigla_fwd``, ``vigla::locality_mix``, ``vigla::swiglu``) and the Triton
kernels behind them serve eager mode and ``torch.compile``. A graph meant to run elsewhere
(``torch.export``, the ONNX exporters, TorchScript) needs ordinary aten ops instead: each op's
public function checks :func:`exporting` (and ``torch.jit.is_scripting()``, which TorchScript
evaluates at compile time) first and then runs its plain formula.
"""
import torch  # no `from __future__ import annotations`: TorchScript reads the stub's signature

__all__ = ["exporting"]


@torch.jit.unused
def exporting() -> bool:
    """True while ``torch.export`` (non-strict, also under the dynamo ONNX exporter) or
    ``torch.jit.trace`` (also under the legacy ONNX exporter) records the call.

    False under ``torch.compile``: before PyTorch 2.14 Dynamo folds ``torch.compiler.is_exporting()``
    to True inside every compiled region (pytorch/pytorch#176347), so a Dynamo-traced call
    (``torch.compile``, strict ``torch.export``) keeps the custom ops.
    """
    if torch.jit.is_tracing():
        return True
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
