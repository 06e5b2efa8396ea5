"""Build every vigla model and run one real image through it.

The image is the first Fashion-MNIST test image (an ankle boot), upsampled to 224x224, repeated to
RGB and normalized with the ImageNet mean/std the models' pretrained_cfg asks for. Weights are
random (seed 0), so the top-5 ids only show that the pipeline runs end to end; ``ms`` is one
batch-1 forward after a warm-up call, on the CPU.

    python examples/forward_all.py                   # all vigla models
    python examples/forward_all.py --filter 'vig_h*' # some of them
    python examples/forward_all.py --threads 1       # on a busy shared CPU (far faster there)
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

import vigla  # noqa: F401  (registers the models with timm)

FMNIST_TEST_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def vigla_models() -> list[str]:
    """Names of the timm models that vigla registers."""
    return [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("vigla.")]


def first_test_image(path: str, size: int, cfg: dict) -> torch.Tensor:
    """``[1, 3, size, size]`` float image, normalized with ``cfg``'s mean/std."""
    with gzip.open(path, "rb") as f:
        header = f.read(16)  # IDX: magic, count, rows, cols (big-endian int32)
        rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
        pixels = np.frombuffer(f.read(rows * cols), dtype=np.uint8).reshape(rows, cols)
    img = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None, None]
    img = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    img = img.expand(1, 3, size, size)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (img - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="*", help="glob on the model names")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n for n in vigla_models() if fnmatch.fnmatch(n, args.filter)]
    if not names:
        raise SystemExit(f"no vigla model matches {args.filter!r}; known: {', '.join(vigla_models())}")
    print(f"{'model':<28} {'params (M)':>10}  {'output':<14} {'top-5 class ids':<26} {'ms':>8}")
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        x = first_test_image(FMNIST_TEST_IMAGES, args.size, model.pretrained_cfg)
        with torch.inference_mode():
            model(x)  # warm-up: the first call pays one-off setup costs
            start = time.perf_counter()
            logits = model(x)
            ms = (time.perf_counter() - start) * 1e3
        params = sum(p.numel() for p in model.parameters()) / 1e6
        top5 = logits.topk(5, dim=-1).indices[0].tolist()
        print(f"{name:<28} {params:>10.2f}  {str(tuple(logits.shape)):<14} {str(top5):<26} {ms:>8.1f}")


if __name__ == "__main__":
    main()
