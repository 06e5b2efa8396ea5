"""Evaluation of dense models: COCO box / mask mAP (pycocotools' ``COCOeval``) and semantic-segmentation mIoU.

* Detection: the detector's outputs (boxes in the original image's pixels, scores, labels, and for Mask R-CNN
  masks thresholded at 0.5 and RLE-encoded) against the split's json, restricted to the images evaluated.
  Reported as percentages: ``box_ap`` (AP at IoU 0.50:0.95), ``box_ap50``, ``box_ap75``, ``box_ap_small`` /
  ``_medium`` / ``_large`` (None where the split has no such object), and the same ``mask_*`` for masks.
* Segmentation: logits upsampled (bilinear) to each image's original size, argmax, a confusion matrix over
  the labels ``0..K`` (the background included, as PASCAL VOC counts it; 255 ignored). ``miou``: the mean of
  the per-class IoU over the classes that occur in the labels or the predictions; ``pixel_acc``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from vigla.engine.precision import autocast

from .data import IGNORE, CocoSplit, quiet, require_pycocotools

__all__ = ["coco_metrics", "evaluate_detector", "evaluate_segmenter", "segmentation_metrics"]

_STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _ground_truth(split: CocoSplit):
    """pycocotools' ``COCO`` of the split (built once; ``area`` and ``iscrowd`` filled in where missing)."""
    if getattr(split, "_coco_api", None) is None:
        require_pycocotools()
        from pycocotools.coco import COCO

        data = copy.deepcopy(split.coco)
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        with quiet():
            api = COCO()
            api.dataset = data
            api.createIndex()
        split._coco_api = api
    return split._coco_api


def coco_metrics(split: CocoSplit, detections: dict[str, list[dict]], image_ids: list) -> dict[str, float | None]:
    """``detections``: ``{"bbox": [...], "segm": [...]}`` in COCO's result format -> ``box_*`` / ``mask_*``
    percentages (:data:`_STAT_NAMES`) over ``image_ids``. No detection at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    gt = _ground_truth(split)
    out: dict[str, float | None] = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        if iou_type not in detections:
            continue
        dets = detections[iou_type]
        if not dets:
            out.update({f"{prefix}_{n}": 0.0 for n in _STAT_NAMES})
            continue
        with quiet():
            result = gt.loadRes(copy.deepcopy(dets))
            ev = COCOeval(gt, result, iou_type)
            ev.params.imgIds = sorted(set(image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out.update({f"{prefix}_{n}": (None if s < 0 else round(100 * float(s), 3))
                    for n, s in zip(_STAT_NAMES, ev.stats)})
    return out


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, loader, split: CocoSplit, device: torch.device,
                      amp_dtype: torch.dtype | None = None, masks: bool = False, progress=None) -> dict:
    """COCO mAP of a torchvision detector over ``loader`` (batches of :func:`~vigla.dense.data.collate_detection`)
    -> :func:`coco_metrics`'s dict plus ``images``, ``unreadable`` and ``detections``."""
    mask_api = require_pycocotools()
    was_training = model.training
    model.eval()
    dets: dict[str, list[dict]] = {"bbox": [], "segm": []} if masks else {"bbox": []}
    image_ids, unreadable = [], []
    for images, targets, errors in loader:
        unreadable += errors
        if images:
            with autocast(device, amp_dtype):
                outputs = model([img.to(device, non_blocking=True).float().div_(255) for img in images])
            for target, out in zip(targets, outputs):
                image_id = split.images[int(target["image_id"])]["id"]
                image_ids.append(image_id)
                _add_detections(dets, out, image_id, split.cat_ids, mask_api if masks else None)
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    metrics = coco_metrics(split, dets, image_ids) if image_ids else {}
    return {**metrics, "images": len(image_ids), "unreadable": len(unreadable), "detections": len(dets["bbox"]),
            "unreadable_files": unreadable[:5]}


def _add_detections(dets: dict, out: dict, image_id, cat_ids: list, mask_api) -> None:
    boxes = out["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores, labels = out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()
    for box, score, label in zip(xywh, scores, labels):
        dets["bbox"].append({"image_id": image_id, "category_id": cat_ids[label - 1], "bbox": box, "score": score})
    if mask_api is not None and len(scores):
        binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_api.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle, score, label in zip(rles, scores, labels):
            rle["counts"] = rle["counts"].decode()
            dets["segm"].append({"image_id": image_id, "category_id": cat_ids[label - 1], "segmentation": rle,
                                 "score": score})


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """``confusion[true, predicted]`` pixel counts ``[K, K]`` -> ``miou``, ``pixel_acc`` (percentages) and
    ``iou`` per class (None for a class absent from both labels and predictions)."""
    conf = confusion.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    present = ~torch.isnan(iou)
    total = conf.sum()
    return {"miou": round(100 * iou[present].mean().item(), 3) if present.any() else 0.0,
            "pixel_acc": round(100 * (inter.sum() / total).item(), 3) if total > 0 else 0.0,
            "iou": [None if torch.isnan(v) else round(100 * v.item(), 3) for v in iou]}


@torch.no_grad()
def evaluate_segmenter(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
                       amp_dtype: torch.dtype | None = None, progress=None) -> dict:
    """mIoU of a :class:`~vigla.dense.models.SegmentationModel` over ``loader`` (evaluation batches of
    :func:`~vigla.dense.data.collate_segmentation`) -> :func:`segmentation_metrics`'s dict plus ``images`` and
    ``unreadable``."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    n, unreadable = 0, []
    for images, labels, sizes, errors in loader:
        unreadable += errors
        if images is not None:
            with autocast(device, amp_dtype):
                logits = model(images.to(device, non_blocking=True).float().div_(255))
            for k, (lab, (h, w)) in enumerate(zip(labels, sizes)):
                up = F.interpolate(logits[k:k + 1, :, :h, :w].float(), size=tuple(lab.shape), mode="bilinear",
                                   align_corners=False)
                pred = up.argmax(1)[0].cpu()
                valid = lab != IGNORE
                confusion += torch.bincount(lab[valid] * num_classes + pred[valid],
                                            minlength=num_classes ** 2).view(num_classes, num_classes)
                n += 1
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return {**segmentation_metrics(confusion), "images": n, "unreadable": len(unreadable),
            "unreadable_files": unreadable[:5]}
