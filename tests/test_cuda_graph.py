"""vigla.engine.cuda_graph: CudaGraphModel, ``vigla eval --cuda-graph`` and CudaGraphTrainStep."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vigla  # noqa: F401
from vigla.engine.cuda_graph import CudaGraphModel, CudaGraphTrainStep, side_stream


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


def test_cuda_graph_model_captures_again_after_an_in_place_change(monkeypatch):
    """The decision alone, on a CPU: a call replays while the weights are untouched and captures again
    after an in-place change (the GPU test below checks the logits)."""
    model = torch.nn.Linear(3, 2)
    graphed = CudaGraphModel.__new__(CudaGraphModel)
    torch.nn.Module.__init__(graphed)
    graphed.model, graphed.batch_size = model, 4
    graphed.shape = graphed.graph = graphed.versions = None
    captures = []

    def capture(shape):
        captures.append(shape)
        graphed.shape, graphed.graph, graphed.versions = shape, object(), graphed._versions()
        graphed.static_input = torch.zeros(4, *shape)

    monkeypatch.setattr(graphed, "capture", capture)
    monkeypatch.setattr(graphed, "replay", lambda: model(graphed.static_input))
    x = torch.randn(4, 3)
    graphed(x), graphed(x)
    assert len(captures) == 1
    with torch.no_grad():
        model.weight.add_(1)
    graphed(x)
    assert len(captures) == 2
    with pytest.raises(ValueError, match="captured for"):
        graphed(torch.randn(4, 5))


@pytest.mark.gpu
def test_the_warm_ups_share_one_side_stream_per_device():
    """Each capture's warm-up runs on the device's one side stream, ordered after the caller's work and before its
    later work: cuBLAS keeps a workspace per stream it ran on, so fresh streams would leave one more per capture."""
    index = torch.cuda.current_device()
    x = torch.ones(256, 256, device="cuda")
    with side_stream(torch.device("cuda")):
        first = torch.cuda.current_stream()
        y = x @ x
    with side_stream(torch.device("cuda", index)):
        second = torch.cuda.current_stream()
    assert first == second and first != torch.cuda.current_stream()
    assert y.sum().item() == 256.0 ** 3


@pytest.mark.gpu
def test_cuda_graph_model_follows_a_weight_change():
    """ViG's inference path reads weights cast once; after an in-place change the next call captures again
    and gives the changed model's logits (a replay alone would read the stale casts)."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=10).cuda().eval()
    graphed = CudaGraphModel(model, batch_size=2, amp_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    before = graphed(x).float()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.mul_(-1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x).float()
    got = graphed(x).float()
    assert not torch.allclose(eager, before, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "adamw"}, r"needs AdamW\(..., capturable=True\)"),
    ({"amp_dtype": torch.float16}, "fp16 needs a GradScaler"),
    ({"warmup": 0}, "needs warmup >= 1"),
    ({}, "needs the model on a CUDA device"),
])
def test_cuda_graph_train_step_refuses_what_it_cannot_capture(kwargs, message):
    model = torch.nn.Linear(2, 2)
    opt = kwargs.pop("optimizer", None)
    opt = torch.optim.AdamW(model.parameters()) if opt else None
    with pytest.raises(ValueError, match=message):
        CudaGraphTrainStep(model, opt, F.cross_entropy, **kwargs)


def _train_pair(name: str, lr, img_size: int = 64):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=img_size).cuda()
    twin = timm.create_model(name, num_classes=10, img_size=img_size).cuda()
    twin.load_state_dict(model.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, fused=True, capturable=c)
            for m, c in ((model, True), (twin, False))]
    return model, twin, opts


def _eager_step(model, opt, x, y, clip_grad=0.0):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    opt.step()
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "deit_tiny_patch16_224"])
def test_cuda_graph_train_step_equals_eager_steps(name):
    """Replayed steps train as eager ones, with a learning rate that changes at every step (a scheduler's
    floats) and the gradient norm clipped: the same losses step after step and the same weights at the end
    (full precision; two eager calls, then the capture). ViG's kernels are deterministic: its weights agree
    to float32 rounding. DeiT's fused attention backward is not, and AdamW turns that noise in near-zero
    gradients into updates of up to the learning rate: its weights agree to a few steps' worth of it."""
    model, twin, (opt, twin_opt) = _train_pair(name, 1e-3)
    step = CudaGraphTrainStep(model, opt, F.cross_entropy, warmup=2, clip_grad=1.0)
    batches = [(torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 10, (4,), device="cuda"))
               for _ in range(6)]
    twin.train()
    for i, (x, y) in enumerate(batches):
        lr = 1e-3 * (1 + i) / 6  # a warm-up: a graph that kept the first lr would fall behind
        opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = lr
        torch.testing.assert_close(step(x, y), _eager_step(twin, twin_opt, x, y, 1.0), rtol=1e-4, atol=1e-5)
    atol = 1e-5 if name == "vig_tiny" else 5 * 1e-3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol)
        assert p.grad is not None
    assert isinstance(opt.param_groups[0]["lr"], float)  # the schedule's value is left as it was set
    losses = [step(*batches[0]).item() for _ in range(3)]
    assert losses[2] < losses[0]  # it keeps training: the replay is not a stale result


@pytest.mark.gpu
def test_inference_after_replayed_steps_reads_the_new_weights():
    """ViG's inference path keeps weight casts keyed on the parameters' version counters, which a replayed
    optimizer step does not move on the host: each call moves them, so an evaluation after replayed steps
    gives the trained model's logits, not those of the weights cached before."""
    model, twin, (opt, twin_opt) = _train_pair("vig_tiny", 1e-2)
    step = CudaGraphTrainStep(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16, warmup=1)
    twin.set_cuda_graphs(False)  # both eager (the step turned the model's own replay off): the same kernels
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 10, (4,), device="cuda")

    def infer(m):
        m.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x).float()
        m.train()
        return out

    before = infer(model)  # fills the cache with the untrained weights' casts
    for _ in range(4):  # one eager step, the capture, replays
        step(x, y)
    twin.load_state_dict(model.state_dict())
    after = infer(model)
    assert not torch.allclose(after, before, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(after, infer(twin), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_train_step_refuses_a_changed_batch_or_a_fixed_learning_rate():
    model, _, (opt, _) = _train_pair("vig_tiny", 1e-3)
    step = CudaGraphTrainStep(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16)
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    assert torch.isfinite(step(x, y))
    with pytest.raises(ValueError, match="captured for inputs"):
        step(x[:3], y[:3])
    opt.param_groups[0]["lr"] = torch.tensor(1e-4, device="cuda")
    with pytest.raises(ValueError, match="replaced by a tensor"):
        step(x, y)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # no tensor lr: read at capture
    step = CudaGraphTrainStep(model, sgd, F.cross_entropy, amp_dtype=torch.bfloat16, warmup=1)
    for _ in range(3):
        assert torch.isfinite(step(x, y))
    sgd.param_groups[0]["lr"] = 1e-4
    with pytest.raises(ValueError, match="SGD reads its learning rate when the step is captured"):
        step(x, y)
