"""Top-1 / top-5 / loss of a model over a loader, summed across ranks."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op when ``dtype`` is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, prep, amp_dtype: torch.dtype | None = None, progress=None) -> dict:
    """-> {"top1": %, "top5": %, "loss": mean cross-entropy, "images": n, "unreadable": n}.

    ``loader`` yields (uint8 images, targets, load errors); ``prep`` moves and normalises a batch.
    Top-5 becomes top-k with k = number of classes when there are fewer than 5."""
    was_training = model.training
    model.eval()
    device = prep.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, images, unreadable
    for images, targets, errors in loader:
        x, y = prep(images), targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk.eq(y[:, None])
        sums += torch.stack([hit[:, 0].sum(), hit.any(-1).sum(), F.cross_entropy(logits, y, reduction="sum"),
                             torch.tensor(float(len(y)), device=device),
                             torch.tensor(float(len(errors)), device=device)]).double()
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    c1, c5, loss, n, bad = all_reduce_sum(sums).tolist()
    d = max(n, 1.0)
    return {"top1": 100 * c1 / d, "top5": 100 * c5 / d, "loss": loss / d, "images": int(n), "unreadable": int(bad)}
