"""vigla.engine.cuda_graph.CudaGraphModel and ``vigla eval --cuda-graph``."""
import pytest
import timm
import torch

import vigla  # noqa: F401
from vigla.engine.cuda_graph import CudaGraphModel


def test_cuda_graph_model_refuses_a_cpu_model():
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        CudaGraphModel(torch.nn.Linear(2, 2), batch_size=4)


def test_eval_cuda_graph_on_cpu_is_a_one_line_error(tmp_path, capsys):
    from vigla.cli import main

    rc = main(["eval", str(tmp_path / "missing.safetensors"), "--model", "vig_tiny", "--device", "cpu",
               "--cuda-graph"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--cuda-graph needs a CUDA device" in err[0], err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "deit_tiny_patch16_224"])
def test_cuda_graph_model_equals_eager_with_padding_and_pieces(name):
    """Batches smaller than the captured one are padded, larger ones split; same logits as eager."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().eval()
    graphed = CudaGraphModel(model, batch_size=4, amp_dtype=torch.bfloat16)
    for n in (4, 3, 9):
        x = torch.randn(n, 3, 224, 224, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eager = model(x).float()
        got = graphed(x).float()
        assert got.shape == eager.shape
        torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="captured for"):
        graphed(torch.randn(2, 3, 112, 112, device="cuda"))
