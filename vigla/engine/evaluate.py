"""Top-1 / top-5 (more than 5 classes) / loss of a model over a loader, summed across ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, gather
from .precision import autocast

#: how many unreadable files :func:`evaluate` names (the count covers them all)
_NAMED_ERRORS = 5


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, prep, amp_dtype: torch.dtype | None = None, progress=None) -> dict:
    """-> {"top1": %, "top5": % or None, "loss": mean cross-entropy, "images": n, "unreadable": n,
    "unreadable_files": the first few "path: error", each rank's in rank order under DDP}.

    ``loader`` yields (uint8 images, targets, load errors); unreadable images are left out of the batch (see
    :func:`vigla.data.collate`) and counted. ``prep`` moves and normalises a batch. Top-5 is None for a model
    with 5 classes or fewer, where every image is in its top 5."""
    was_training = model.training
    model.eval()
    device = prep.device
    # correct1, correct5, loss sum, images, unreadable, images scored by a model with more than 5 classes
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    named = []
    for images, targets, errors in loader:
        named += errors[:_NAMED_ERRORS - len(named)]
        if len(targets):
            x, y = prep(images), targets.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[-1])
            hit = logits.topk(k, dim=-1).indices.eq(y[:, None])
            sums[:4] += torch.stack([hit[:, 0].sum(), hit.any(-1).sum(),
                                     F.cross_entropy(logits, y, reduction="sum"),
                                     torch.tensor(float(len(y)), device=device)]).double()
            sums[5] += len(y) if logits.shape[-1] > 5 else 0
        sums[4] += len(errors)
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    c1, c5, loss, n, bad, wide = all_reduce_sum(sums).tolist()
    if bad:  # every rank knows the count; each met the files of its own shard
        named = [error for errors in gather(named) for error in errors][:_NAMED_ERRORS]
    d = max(n, 1.0)
    top5 = 100 * c5 / d if wide or not n else None  # no image scored: 0, as top-1
    return {"top1": 100 * c1 / d, "top5": top5, "loss": loss / d, "images": int(n), "unreadable": int(bad),
            "unreadable_files": named}


def top5_text(result: dict, sep: str = " ") -> str:
    """``" top-5 12.34%"`` of an :func:`evaluate` result, for a report line; "" where top-5 is None."""
    return "" if result["top5"] is None else f"{sep}top-5 {result['top5']:.2f}%"
