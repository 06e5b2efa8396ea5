"""Dense prediction with vigla's backbones: feature pyramids for torchvision's detectors, a segmentation model,
COCO-format data (and a composite data set made from real photos), training and evaluation (``vigla dense``).

See docs/dense.md."""
from .backbone import BackboneFPN, MultiScaleTrunk, SimpleFeaturePyramid, backbone_with_fpn, pad_to_multiple
from .models import DETECTORS, SegmentationModel, SemanticFPNHead, build_detector, build_segmenter

__all__ = [
    "BackboneFPN", "DETECTORS", "MultiScaleTrunk", "SegmentationModel", "SemanticFPNHead", "SimpleFeaturePyramid",
    "backbone_with_fpn", "build_detector", "build_segmenter", "pad_to_multiple",
]
