"""vigla.models._graph_replay: ViG's forward_features replayed from CUDA graphs in eager CUDA calls.

On a CPU: what a capture is keyed by, and that nothing replays there. On a GPU: replayed training steps and inference
against the same model with the replay off (values, gradients, drop-path draws, several steps of an optimizer, the
weights changed between inference calls), and every case where the replay must step aside (two forwards before a
backward, hooks, checkpointing, torch.compile, reference_ops)."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import vigla  # noqa: F401
from vigla.models._graph_replay import _layout, _key, replay_features, replay_stats


def _key_of(model, x):
    layout = _layout(model)
    return _key(layout, x, [d[n] for d, n in layout.params], [d[n] for d, n in layout.buffers])


def test_key_moves_with_what_a_capture_reads():
    model = timm.create_model("vig_tiny", drop_path_rate=0.1, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    base = _key_of(model, x)
    assert _key_of(model, x) == base
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(2)  # in place: the graphs read it where it lies
    assert _key_of(model, x) == base
    changes = {
        "batch": lambda m: None,
        "drop path rate": lambda m: setattr(m.blocks[3].drop_path1, "drop_prob", 0.3),
        "a submodule in eval": lambda m: m.blocks[1].eval(),
        "a frozen parameter": lambda m: m.pos_embed.requires_grad_(False),
        "a new parameter": lambda m: setattr(m.norm, "weight", torch.nn.Parameter(m.norm.weight.detach().clone())),
    }
    for what, change in changes.items():
        m = copy.deepcopy(model)
        change(m)
        xx = torch.randn(3, 3, 64, 64) if what == "batch" else x
        assert _key_of(m, xx) != base, what


def test_nothing_replays_on_a_cpu_or_without_autograd():
    model = timm.create_model("vig_tiny", num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    assert replay_features(model, model._forward_features, x) is None
    with torch.no_grad():
        assert replay_features(model, model._forward_features, x) is None
    assert replay_stats(model) == {"captures": 0, "replays": 0, "off": None}


def test_set_cuda_graphs_is_a_setting_and_scripting_still_works():
    model = timm.create_model("vig_tiny", num_classes=10)
    assert model.cuda_graphs
    model.set_cuda_graphs(False, max_pixels=None)
    assert not model.cuda_graphs and model.cuda_graph_max_pixels is None
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model.eval())
    torch.testing.assert_close(scripted(x), model(x))


def _pair(name, **kwargs):
    torch.manual_seed(0)
    replayed = timm.create_model(name, num_classes=10, **kwargs).cuda().train()
    eager = copy.deepcopy(replayed)
    eager.set_cuda_graphs(False)
    return replayed, eager


def _step(model, opt, x, y, seed):
    torch.manual_seed(seed)  # the same drop-path draws for both models
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return logits.detach().float(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("name, kwargs", [("vig_tiny", dict(drop_path_rate=0.2)), ("vig_h_tiny", {})])
def test_replayed_training_steps_match_eager(name, kwargs):
    """Three AdamW steps: the logits and every gradient as the eager model's (same kernels, same drop-path draws),
    one capture, three replays; the parameters after the steps equal."""
    replayed, eager = _pair(name, **kwargs)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (replayed, eager)]
    for step in range(3):
        x = torch.randn(4, 3, 96, 96, device="cuda")
        y = torch.randint(0, 10, (4,), device="cuda")
        got_logits, got = _step(replayed, opts[0], x, y, step)
        want_logits, want = _step(eager, opts[1], x, y, step)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-3, atol=1e-3)
        assert got.keys() == want.keys() and len(got) == len(list(eager.parameters()))
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert replay_stats(replayed) == {"captures": 1, "replays": 3, "off": None}
    assert replay_stats(eager)["replays"] == 0
    for (n, p), q in zip(replayed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.gpu
def test_two_forwards_then_one_backward_and_a_new_batch_size():
    """The second forward runs eagerly (the first one's activations wait for the backward); a smaller batch
    captures a second layout, and both stay kept."""
    replayed, eager = _pair("vig_tiny")
    xs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(2)]
    for m in (replayed, eager):
        for _ in range(2):  # the second round replays the first forward
            (m(xs[0]).square().mean() + m(xs[1]).mean()).backward()
    for (n, p), q in zip(replayed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert replay_stats(replayed)["replays"] == 2
    for n in (3, 4, 3):
        replayed(torch.randn(n, 3, 64, 64, device="cuda")).sum().backward()
    assert replay_stats(replayed) == {"captures": 2, "replays": 5, "off": None}


@pytest.mark.gpu
def test_a_stale_backward_is_a_clear_error():
    model, _ = _pair("vig_tiny")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    model(x).sum().backward()  # capture
    first = model(x).sum()
    first.backward(retain_graph=True)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="replayed again from its CUDA graph before this backward"):
        first.backward()


@pytest.mark.gpu
def test_hooks_checkpointing_and_compile_run_eagerly():
    model, _ = _pair("vig_tiny")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    for _ in range(2):
        model(x).sum().backward()
    assert len(seen) == 2 and replay_stats(model)["captures"] == 0
    handle.remove()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert replay_stats(model)["captures"] == 0
    model.set_grad_checkpointing(False)
    compiled = torch.compile(model)
    compiled(x).sum().backward()
    assert replay_stats(model)["captures"] == 0
    model(x).sum().backward()
    copy.deepcopy(model)(x).sum().backward()  # a copy (an EMA's) starts without the graphs
    assert replay_stats(model)["captures"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_replayed_inference_matches_eager_and_reads_new_weights(name):
    """Inference replays (bf16, inference_mode, batch 5 and batch 1) give the eager logits, before and after an
    optimizer step changed the weights, with no capture for the change; reference_ops() runs eagerly. Within bf16's
    rounding, not bit for bit: at so few rows a captured forward runs the MLP as three kernels where the eager one
    runs one (vigla.ops.add_norm.op.mlp_fused); replays of one graph are bit for bit the same."""
    replayed, eager = _pair(name)
    opt = torch.optim.AdamW(replayed.parameters(), lr=1e-2)
    for rounds in range(2):
        replayed.eval(), eager.eval()
        for n in (5, 1):
            x = torch.randn(n, 3, 96, 96, device="cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                got, want = replayed(x).float(), eager(x).float()
                again = replayed(x).float()
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(again, got, rtol=0, atol=0)
        replayed.train()
        replayed(torch.randn(4, 3, 96, 96, device="cuda")).square().mean().backward()
        opt.step()
        eager.load_state_dict(replayed.state_dict())
    stats = replay_stats(replayed)  # captured: batch 5 and batch 1 inference, training; replayed 2 x (2 x 2 + 1)
    assert stats["captures"] == 3 and stats["replays"] == 10 and stats["off"] is None, stats
    with vigla.ops.reference_ops(), torch.inference_mode():
        replayed.eval()(torch.randn(5, 3, 96, 96, device="cuda"))
    assert replay_stats(replayed)["replays"] == 10


@pytest.mark.gpu
def test_a_partly_frozen_backbone_and_an_input_gradient_match_eager():
    """Fine-tuning the last blocks with an input that needs its gradient (an adversarial step): ``x.grad`` and every
    trainable gradient as eager's, the frozen ones left None; then a fully frozen backbone replays the forward alone
    and only the head learns."""
    replayed, eager = _pair("vig_tiny")
    for m in (replayed, eager):
        m.patch_embed.requires_grad_(False)
        m.blocks[:4].requires_grad_(False)
    x = torch.randn(3, 3, 64, 64, device="cuda")
    grads = []
    for m in (replayed, eager):
        xx = x.clone().requires_grad_(True)
        for _ in range(2):  # capture, then replay
            m.zero_grad(set_to_none=True)
            xx.grad = None
            m(xx).square().mean().backward()
        grads.append([("x", xx.grad)] + [(n, p.grad) for n, p in m.named_parameters()])
    for (n, got), (_, want) in zip(*grads):
        assert (got is None) == (want is None), n
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert grads[1][0][1] is not None and replay_stats(replayed) == {"captures": 1, "replays": 2, "off": None}
    for m in (replayed, eager):
        m.requires_grad_(False).get_classifier().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
    head = [m.get_classifier().weight.grad for m in (replayed, eager)]
    torch.testing.assert_close(head[0], head[1], rtol=1e-4, atol=1e-6)
    assert replayed.blocks[-1].attn.qkv.weight.grad is None and replay_stats(replayed)["captures"] == 2


@pytest.mark.gpu
def test_a_cast_model_captures_anew_and_a_deleted_one_gives_its_memory_back():
    """``.to(torch.bfloat16)`` after a capture drops the graphs: the next call captures for the new weights and
    matches eager in bf16. Deleting the model frees it, its graphs and their memory (the graphs hold it weakly)."""
    import gc
    import weakref

    replayed, eager = _pair("vig_tiny")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        replayed.eval()(x)  # an fp32 capture
        for m in (replayed, eager):
            m.eval().to(torch.bfloat16)
        assert replay_stats(replayed)["captures"] == 0
        got, want = replayed(x.bfloat16()).float(), eager(x.bfloat16()).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert replay_stats(replayed) == {"captures": 1, "replays": 1, "off": None}
    replayed.train()(x.bfloat16()).float().square().mean().backward()  # a training capture too
    assert replay_stats(replayed)["captures"] == 2
    torch.cuda.synchronize()
    held, weights = torch.cuda.memory_allocated(), sum(p.numel() * p.element_size() for p in replayed.parameters())
    alive = weakref.ref(replayed)
    del replayed, got
    gc.collect()
    torch.cuda.synchronize()
    assert alive() is None
    assert torch.cuda.memory_allocated() <= held - 2 * weights  # the weights, their gradients and the graphs'


@pytest.mark.gpu
def test_an_input_off_the_current_device_runs_eagerly(monkeypatch):
    """A graph is captured and replayed on the current device's streams: an input on another GPU (model.to("cuda:1")
    without torch.cuda.set_device(1)) runs eagerly. One GPU stands in for two: the replay is told that the current
    device is 1."""
    import vigla.models._graph_replay as gr

    replayed, eager = _pair("vig_tiny")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    monkeypatch.setattr(gr, "current_device", lambda: 1)
    with torch.no_grad():
        got, want = replayed.eval()(x), eager.eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert replay_stats(replayed)["captures"] == 0
    monkeypatch.undo()
    with torch.no_grad():
        replayed(x)
    assert replay_stats(replayed)["captures"] == 1


@pytest.mark.gpu
def test_ddp_gradients_through_the_replay_match_eager():
    """One-process DistributedDataParallel (as ``torchrun --nproc_per_node 1``): a DDP forward replays, without a
    warning (DDP keeps its parameters' gradient accumulators from its first step, on the stream of that step, which a
    capture on a side stream may not reach: the capture differentiates aliases of the parameters), DDP's hooks fire
    and the gradients are eager's, step after step; a loss kept from an earlier step does not stop it either."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        replayed, eager = _pair("vig_tiny")
        x = torch.randn(3, 3, 64, 64, device="cuda")
        grads = []
        for m in (replayed, eager):
            wrapped = DDP(m, device_ids=[torch.cuda.current_device()])
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*CUDA-graph replay")
                for _ in range(3):
                    wrapped.zero_grad(set_to_none=True)
                    wrapped(x).square().mean().backward()
            grads.append([p.grad for p in m.parameters()])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert replay_stats(replayed) == {"captures": 1, "replays": 3, "off": None}
        kept = replayed(x).sum()  # its autograd graph alive, holding the parameters' accumulators
        kept.backward(retain_graph=True)
        replayed.zero_grad()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*CUDA-graph replay")
            replayed(x[:2]).sum().backward()  # a new layout: captured with the old graph alive
        assert replay_stats(replayed) == {"captures": 2, "replays": 5, "off": None}
    finally:
        dist.destroy_process_group()


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU: ``replay()`` runs what the capture would have recorded."""

    def __init__(self, run):
        self.replay = run


def _fake_captures(monkeypatch):
    """CPU stand-ins for the captures (the forward computed at each replay; the backward never run here), every
    call eligible: what replay_features decides (which capture, what it keeps, when it stops) can be checked."""
    import vigla.models._graph_replay as gr

    made = []

    def capture_forward(fn, x, params, buffers):
        static_in = x.clone()
        static_out = fn(static_in).detach()
        made.append("forward")
        graphs = gr._Graphs(fn, None, None, static_in, static_out, None, (), tuple(params), tuple(buffers))
        graphs.fwd = _FakeGraph(lambda: static_out.copy_(graphs.fn()(static_in)))  # the model weakly, as the graphs
        return graphs

    def capture(fn, x, params, buffers):
        if not fn(x).requires_grad:  # as the warm-up of _capture finds: only parameters outside fn train
            return None
        graphs = capture_forward(fn, x, params, buffers)
        made[-1] = "training"
        graphs.bwd = _FakeGraph(lambda: None)
        graphs.grads, graphs.params = (None,) * (1 + len(params)), tuple(params)
        return graphs

    monkeypatch.setattr(gr, "_capture_forward", capture_forward)
    monkeypatch.setattr(gr, "_capture", capture)
    monkeypatch.setattr(gr, "_eligible",
                        lambda model, x: model.__dict__.get("cuda_graphs", True) and gr._within_limit(model, x))
    monkeypatch.setattr(gr._Graphs, "follow", lambda self, device: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state())
    return made


def test_what_is_captured_kept_and_dropped(monkeypatch):
    """Grad mode with every parameter frozen, or only the head's trainable (a linear probe), replays the forward
    alone (its output needs no gradient, as eager's);
    a model keeps two layouts of each kind; .to() and set_cuda_graphs(False) drop them; the outputs are fresh
    tensors equal to the eager ones."""
    import vigla.models._graph_replay as gr

    made = _fake_captures(monkeypatch)
    model = timm.create_model("vig_tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model._forward_features(x)
        got = model.forward_features(x)
    assert made == ["forward"] and torch.equal(got, want)
    assert got.data_ptr() != gr._STATES[model].graphs[next(iter(gr._STATES[model].graphs))].static_out.data_ptr()
    model.train().requires_grad_(False)
    out = model.forward_features(x)
    assert made == ["forward", "forward"] and not out.requires_grad
    model.get_classifier().requires_grad_(True)  # a linear probe: its features need no gradient
    out = model.forward_features(x)
    assert made == ["forward", "forward", "forward"] and not out.requires_grad
    model.requires_grad_(True)
    out = model.forward_features(x)
    assert made[-1] == "training" and out.requires_grad and out.grad_fn is not None
    for n in (1, 3):
        with torch.no_grad():
            model.eval().forward_features(torch.randn(n, 3, 64, 64))
    kinds = [g.bwd is None for g in gr._STATES[model].graphs.values()]
    assert kinds.count(True) == 2 and kinds.count(False) == 1 and replay_stats(model)["captures"] == 6
    model.to(torch.float64)
    assert model not in gr._STATES
    model.set_cuda_graphs(False)
    with torch.no_grad():
        model.forward_features(x.double())
    assert model not in gr._STATES and len(made) == 6


def test_a_capture_differentiates_aliases_of_the_parameters(monkeypatch):
    """Inside the capture every parameter slot holds a new leaf on the parameter's storage (one for a parameter tied
    to two slots), so no accumulator of the model's parameters is in the captured graph; after it the model holds
    its own parameters again, and the graphs keep those."""
    import vigla.models._graph_replay as gr

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    params, slots = list(model.parameters()), []
    for m in model.modules():
        slots += [(m._parameters, n) for n in m._parameters]
    tied = [d[n] for d, n in slots]
    with gr._aliased(tuple(slots), tied) as aliases:
        inside = [d[n] for d, n in slots]
        assert inside == aliases and inside[0] is inside[2] and len({id(a) for a in aliases}) == 3
        assert all(a is not p and a.data_ptr() == p.data_ptr() and a.grad_fn is None for a, p in zip(aliases, tied))
        model(torch.randn(2, 4)).sum().backward()
        assert all(p.grad is None for p in params) and aliases[0].grad is not None
    assert [d[n] for d, n in slots] == tied and list(model.parameters()) == params

    made = _fake_captures(monkeypatch)
    vig = timm.create_model("vig_tiny", num_classes=10).train()
    seen = []
    capture = gr._capture
    monkeypatch.setattr(gr, "_capture", lambda fn, x, ps, bs: seen.append(list(ps)) or capture(fn, x, ps, bs))
    assert vig.forward_features(torch.randn(2, 3, 32, 32)).requires_grad
    own = list(vig.parameters())
    assert made == ["training"] and len(seen[0]) == len(own)
    assert all(a is not p and a.data_ptr() == p.data_ptr() for a, p in zip(seen[0], own))
    assert list(next(iter(gr._STATES[vig].graphs.values())).params) == own and list(vig.parameters()) == own


def test_only_calls_up_to_max_pixels_replay(monkeypatch):
    """A call of more than ``max_pixels`` input pixels (batch x height x width) runs eagerly and captures nothing
    (there the GPU's work outlasts the host's and a replay only holds memory); None lifts the limit; a bad limit is
    a clear error."""
    import vigla.models._graph_replay as gr

    made = _fake_captures(monkeypatch)
    model = timm.create_model("vig_tiny", num_classes=10).eval()
    assert model.cuda_graph_max_pixels == gr.MAX_PIXELS == 2 ** 24
    model.set_cuda_graphs(True, max_pixels=2 * 32 * 32)
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 32, 32))
        assert len(made) == 1
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(model.forward_features(x), model._forward_features(x))
        assert len(made) == 1 and replay_stats(model)["captures"] == 1
        model.set_cuda_graphs(True, max_pixels=None)
        model.forward_features(x)
    assert len(made) == 2 and model.cuda_graphs
    for bad in (0, -5, 1.5, True, "big"):
        with pytest.raises(ValueError, match="max_pixels must be a positive int or None"):
            model.set_cuda_graphs(True, max_pixels=bad)


def test_too_many_captures_turn_the_replay_off_with_one_warning(monkeypatch):
    import vigla.models._graph_replay as gr

    _fake_captures(monkeypatch)
    model = timm.create_model("vig_tiny", num_classes=10).eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="replay of forward_features is off for this model"):
        for n in range(1, gr.MAX_CAPTURES + 2):
            model.forward_features(torch.randn(n, 3, 32, 32))
    stats = replay_stats(model)
    assert stats["captures"] == gr.MAX_CAPTURES and "keep changing" in stats["off"]
    with torch.no_grad():  # eager from now on
        torch.testing.assert_close(model.forward_features(torch.randn(1, 3, 32, 32)).shape, torch.Size([1, 4, 192]))


def test_a_failed_capture_turns_the_replay_off_with_its_cause(monkeypatch):
    """A capture that raises runs the step eagerly and turns the replay off with one warning naming the error."""
    import vigla.models._graph_replay as gr

    _fake_captures(monkeypatch)

    def fail(*args):
        with gr._capturing():
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(gr, "_capture", fail)
    model = timm.create_model("vig_tiny", num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"\(the capture failed: operation not permitted when stream is capturing\)"):
        out = model.forward_features(x)
    assert out.grad_fn is not None and "the capture failed" in replay_stats(model)["off"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model.eval().forward_features(x), model._forward_features(x))


def test_a_deleted_model_is_freed_with_its_graphs(monkeypatch):
    """The graphs live in a weak table beside the model and refer to it weakly: deleting the model frees both."""
    import gc
    import weakref

    import vigla.models._graph_replay as gr

    _fake_captures(monkeypatch)
    model = timm.create_model("vig_tiny", num_classes=10).eval()
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 32, 32))
    gc.collect()  # earlier tests' models, in reference cycles
    assert len(gr._STATES) >= 1
    alive, states = weakref.ref(model), len(gr._STATES)
    del model
    gc.collect()
    assert alive() is None and len(gr._STATES) == states - 1


def test_gradients_line_up_with_the_input_and_every_parameter():
    """What the backward graph returns and a second derivative recomputes: d x (None unless x needs it), then one
    entry per parameter, None for a frozen one and for one the output does not use."""
    from vigla.models._graph_replay import _gradients

    w, frozen, unused = (torch.randn(3, requires_grad=True), torch.randn(3), torch.randn(2, requires_grad=True))
    for needs in (False, True):
        x = torch.randn(3, requires_grad=needs)
        out = (x * w * frozen).sum()
        got = _gradients(out, x, [w, frozen, unused], torch.tensor(2.0))
        assert len(got) == 4 and got[2] is None and got[3] is None
        torch.testing.assert_close(got[1], 2 * x.detach() * frozen)
        assert (got[0] is None) != needs and (not needs or torch.allclose(got[0], 2 * w.detach() * frozen))
