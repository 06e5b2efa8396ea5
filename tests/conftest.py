import pytest
import torch


def _gpu_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (run on the GPU machine: pytest -m gpu)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "needs Triton"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ok, reason = _gpu_ready()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
