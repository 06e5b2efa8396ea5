"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``, by shape only (no arithmetic).

Convention (the one the bench reports):

* One **MAC** is a multiply-accumulate; **FLOPs = 2 x MACs**. FlopCounterMode counts 2 FLOPs per
  MAC for every op it knows, so ``macs = flops // 2`` exactly.
* Counted: matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``: every ``nn.Linear``, attention
  done by hand), convolutions **including depthwise and grouped ones** (the weight shape already
  holds ``C_in / groups``), fused attention (``scaled_dot_product_attention``: ``QK^T`` and ``AV``),
  and vigla's BiGLA core ``torch.ops.vigla.bigla_fwd`` (4·B·T·H·K·V MACs, see
  :func:`vigla.ops.bigla.bigla_macs`).
* Not counted: elementwise and reduction work (norms, activations, gating, softmax, residual adds,
  pooling, biases), as in fvcore. Our count does include the two terms the official ViG count misses
  (fvcore skips what runs inside custom autograd Functions): the SwiGLU down-projection and the BiGLA core.
* Per image, inference forward, ``eval()`` mode.

Counting builds the model on the meta device and runs it under ``FakeTensorMode`` with CPU-device
fake tensors: shapes only, no arithmetic and no activation memory, so a 2048² DeiT-B costs as little
to count as a 224² one (under a second), on any machine. The ops are dispatched as on a real CPU
(SDPA goes to its CPU kernel, whose formula torch lacks and this module registers).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_model_flops"]


def _register_cpu_sdpa() -> None:
    # On real CPU tensors SDPA dispatches to this overload, which torch's registry does not know:
    # without a formula the attention products would silently count as zero.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        # sdpa_flop is the registered, already shape-wrapped formula: register it raw.
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)


_register_cpu_sdpa()


def _op_name(op) -> str:
    return str(op).removeprefix("aten.")


def count_flops(fn, *args, **kwargs) -> dict:
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode.

    Returns ``{"flops": int, "macs": int, "by_op": {op_name: flops}}`` for the whole call (the
    batch the inputs hold; divide by it for a per-image figure).
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    flops = int(counter.get_total_flops())
    by_op = {_op_name(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": flops, "macs": flops // 2, "by_op": by_op}


def count_model_flops(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> dict:
    """FLOPs and MACs of one ``in_chans x img_size x img_size`` image through ``model`` (eval forward).

    ``model`` should be built on the meta device (``with torch.device("meta")``: no init cost). It
    is given uninitialised CPU storage (``to_empty``: no page is touched) and run on a fake input
    under ``FakeTensorMode``: every op is dispatched as on the CPU, by shape only, without
    arithmetic or activation memory. A CPU-device model works too (its weights stay as they are).
    """
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    was_training = model.training
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(1, in_chans, img_size, img_size)
            return count_flops(model, x)
    finally:
        model.train(was_training)
