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


@pytest.fixture
def one_thread():
    """Small tensors: intra-op threads only add overhead (and spin on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
