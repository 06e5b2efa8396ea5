"""``vigla bench``: FLOP counts against hand counts, measurement helpers, the CLI's outputs and failures."""
from __future__ import annotations

import argparse
import csv
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import vigla  # noqa: F401  (registers vigla's models)
from vigla.bench import cli, measure, report
from vigla.bench.flops import count_flops, count_model_flops
from vigla.engine.cuda_graph import side_stream
from vigla.ops.bigla import bigla


# ---------------------------------------------------------------------------------------------
# two tiny timm models for the CLI runs (registered in this test process only)

def _tiny_vit(embed_dim: int, img_size: int) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=1,
                             num_heads=2, mlp_ratio=2.0, num_classes=10)


if not timm.is_model("bench_test_vit"):
    @register_model
    def bench_test_vit(pretrained=False, img_size=32, **kwargs):  # kwargs: timm's cfg plumbing
        return _tiny_vit(32, img_size)

    @register_model
    def bench_test_vit_wide(pretrained=False, img_size=32, **kwargs):
        return _tiny_vit(64, img_size)


def _vit_macs(embed_dim: int, img_size: int, patch: int, depth: int, mlp_hidden: int,
              num_classes: int, cls_tokens: int = 1) -> int:
    """Hand count of a timm ViT: patch conv, per block qkv / QK^T / AV / proj / MLP, head."""
    n = (img_size // patch) ** 2
    t = n + cls_tokens
    c = embed_dim
    block = t * c * 3 * c + 2 * t * t * c + t * c * c + 2 * t * c * mlp_hidden
    return n * c * 3 * patch * patch + depth * block + c * num_classes


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def _run(argv: list[str]) -> int:
    return cli.main(_parse(argv))


FAST = ["--device", "cpu", "--batch-size", "2", "--warmup", "1", "--iters", "2"]
ONE = ["--models", "bench_test_vit"] + FAST
TWO = ["--models", "bench_test_vit", "bench_test_vit_wide"] + FAST


# ---------------------------------------------------------------------------------------------
# FLOP counts against hand counts

def test_deit_tiny_224_macs_match_hand_count():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224", img_size=224)
    counted = count_model_flops(model, 224)
    hand = _vit_macs(192, 224, 16, 12, 768, 1000)
    assert hand == 1_253_683_200  # the known ~1.26 GMACs
    assert counted["macs"] == hand
    assert counted["flops"] == 2 * hand
    # attention products are counted (torch has no formula for the CPU SDPA kernel: we register it)
    attn = 12 * 2 * 197 * 197 * 192
    assert sum(v for k, v in counted["by_op"].items() if "attention" in k or k == "bmm") == 2 * attn


def test_count_on_real_cpu_tensors_equals_fake_count():
    model = timm.create_model("bench_test_vit", img_size=32).eval()
    real = count_flops(model, torch.randn(3, 3, 32, 32))
    fake = count_model_flops(timm.create_model("bench_test_vit", img_size=32), 32)
    assert real["macs"] == 3 * fake["macs"]
    assert fake["macs"] == _vit_macs(32, 32, 8, 1, 64, 10)


class _MiniViGBlock(nn.Module):
    """A ViG block (Liao et al., AAAI 2025: BiGLA with direction-wise gates and 2-D gating locality
    injection, then a SwiGLU MLP) reduced to the ops that cost MACs: depthwise conv, qkv, low-rank
    direction-wise gates, BiGLA, gate projection, output projection, SwiGLU up and down."""

    def __init__(self, dim=16, heads=2, mlp_hidden=24, rank=4):
        super().__init__()
        self.heads, self.dk, self.dv = heads, dim // 2 // heads, dim // heads
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.qkv = nn.Linear(dim, 2 * dim, bias=False)
        self.gk1 = nn.Linear(dim, rank, bias=False)
        self.gk2 = nn.Linear(rank, dim)
        self.g = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * mlp_hidden, bias=False)
        self.down = nn.Linear(mlp_hidden, dim, bias=False)

    def forward(self, x, hw):  # x: [B, N, C]
        B, N, C = x.shape
        xc = self.dw(x.transpose(1, 2).reshape(B, C, *hw)).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(xc).split([C // 2, C // 2, C], dim=-1)
        gf, gb = (F.logsigmoid(self.gk2(self.gk1(xc))) / 16).chunk(2, dim=-1)
        split = lambda t, d: t.reshape(B, N, self.heads, d)  # noqa: E731
        o = bigla(split(q, self.dk), split(k, self.dk), split(v, self.dv),
                  split(gf, self.dk), split(gb, self.dk)).reshape(B, N, C)
        r = x + self.o(torch.sigmoid(self.g(xc)) * o)
        a, b = self.up(r).chunk(2, dim=-1)
        return r + self.down(F.silu(a) * b)


def test_vig_block_count_has_every_linear_conv_and_bigla_mac():
    dim, heads, hidden, rank, hw = 16, 2, 24, 4, (3, 5)
    n = hw[0] * hw[1]
    dk, dv, kdim = dim // 2 // heads, dim // heads, dim // 2
    block = _MiniViGBlock(dim, heads, hidden, rank)
    x = torch.randn(2, n, dim)
    counted = count_flops(block, x, hw)
    bigla_macs = 4 * n * heads * dk * dv
    hand = n * (9 * dim                          # depthwise 3x3
                + dim * 2 * dim                  # qkv (K + K + V = 2C)
                + dim * rank + rank * 2 * kdim   # low-rank gates
                + dim * dim + dim * dim          # gate proj, out proj
                + dim * 2 * hidden               # SwiGLU up
                + hidden * dim) + bigla_macs     # SwiGLU down; BiGLA core
    assert counted["macs"] == 2 * hand           # batch 2
    assert counted["by_op"]["vigla.bigla_fwd"] == 2 * 2 * bigla_macs
    assert counted["by_op"]["convolution"] == 2 * 2 * n * 9 * dim


def _vig_tiny_hand_macs(img_size: int) -> tuple[int, int, int]:
    """Hand count of ViG-T (the official configuration: stem, 12 blocks of BiGLA mixer and SwiGLU, head):
    (total, BiGLA core, SwiGLU down-projections)."""
    C, K, V, H, dk, dv, I, rank = 192, 96, 192, 3, 32, 64, 512, 16
    g1 = (img_size + 2 - 9) // 8 + 1
    g2 = (g1 + 1) // 2
    n = g2 * g2
    stem = g1 * g1 * (C // 2) * 3 * 81 + n * C * (C // 2) * 9
    core = 4 * n * H * dk * dv
    down = n * I * C
    block = n * (9 * C + C * 2 * C + C * rank + rank * 2 * K + C * V + V * C + C * 2 * I) + down + core
    return stem + 12 * block + C * 1000, 12 * core, 12 * down


@pytest.mark.parametrize("img_size", [224, 512])
def test_vig_tiny_count_includes_bigla_core_and_swiglu_down(img_size):
    stats = cli.model_stats("vig_tiny", img_size)
    total, core, down = _vig_tiny_hand_macs(img_size)
    assert stats["macs"] == total
    assert stats["flops_by_op"]["vigla.bigla_fwd"] == 2 * core
    if img_size == 224:
        assert stats["params_m"] == pytest.approx(5.83, abs=0.01)  # the official ViG-T's (pos-embed for 224)
        # without the two terms fvcore skips (inside custom autograd Functions) we get the official ~0.88 G
        assert (total - core - down) / 1e9 == pytest.approx(0.88, abs=0.005)


# ---------------------------------------------------------------------------------------------
# measurement helpers

def test_summarize_median_spread_and_throughput():
    s = measure.summarize([4.0, 1.0, 2.0, 3.0, 10.0], batch_size=8)
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 10.0
    assert (s["q25_ms"], s["q75_ms"]) == (2.0, 4.0)
    assert s["img_per_s"] == pytest.approx(8 * 1000 / 3.0)
    assert s["img_per_s_min"] == pytest.approx(800.0) and s["img_per_s_max"] == pytest.approx(8000.0)
    assert s["n"] == 5


def test_time_calls_counts_calls():
    calls = []
    times, first = measure.time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=3,
                                      after_warmup=lambda: calls.append("split"))
    assert calls == [1, 1, "split", 1, 1, 1] and len(times) == 3 and first >= 0


def test_each_phase_starts_without_the_last_phases_graphs(monkeypatch):
    """bench_one drops a ViG's replayed graphs after inference and after the batch-1 latency: a phase's peak
    memory holds its own graphs only (the setting itself is kept)."""
    events = []

    class Model(nn.Linear):
        cuda_graphs, cuda_graph_max_pixels = True, 99

        def set_cuda_graphs(self, enable=True, max_pixels=2 ** 24):
            events.append(("drop", enable, max_pixels))

    def phase(name):
        return lambda *a, **k: events.append(name) or {"status": "ok", "img_per_s": 1.0, "median_ms": 1.0}

    monkeypatch.setattr(cli, "build_model", lambda name, img: Model(2, 2))
    monkeypatch.setattr(cli, "model_stats", lambda name, img: {})
    monkeypatch.setattr(cli, "measure_inference", lambda m, b, *a, **k: phase(f"infer b{b}")())
    monkeypatch.setattr(cli, "measure_train", phase("train"))
    s = dict(device=torch.device("cpu"), grad_checkpointing=(), flops_only=False, amp="none", channels_last=False,
             warmup=1, iters=1, compile=False, cuda_graph=False, latency=True, latency_batch_size=1, train=True,
             optimizer="adamw")
    cli.bench_one("m", 32, 4, s)
    assert events == ["infer b4", ("drop", True, 99), "infer b1", ("drop", True, 99), "train"]


def test_cpu_memory_meter_sees_an_allocation():
    meter = measure.MemoryMeter(torch.device("cpu"))
    assert meter.kind == "cpu_peak_rss_growth"
    meter.start()
    x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page touched
    peak = meter.peak_mib()
    del x
    assert 60 < peak < 64 + 200


@pytest.mark.parametrize("optimizer, changes", [("adamw", True), ("none", False)])
def test_train_step_runs_the_optimizer(optimizer, changes):
    model = timm.create_model("bench_test_vit", img_size=32)
    before = model.head.weight.detach().clone()
    out = measure.measure_train(model, 2, 32, torch.device("cpu"), amp="none", channels_last=False,
                                warmup=1, iters=1, optimizer=optimizer)
    assert out["status"] == "ok" and out["optimizer"] == optimizer
    assert (not torch.equal(before, model.head.weight)) == changes
    assert all(p.grad is None for p in model.parameters())


def test_default_batch_sizes_follow_the_anchors():
    assert [cli.default_batch_size(r, "cuda") for r in (224, 512, 1024, 2048)] == [128, 128, 32, 8]
    assert [cli.default_batch_size(r, "cpu") for r in (224, 512, 1024, 2048)] == [8, 8, 2, 1]


def test_ratios_are_model_over_baseline_at_the_same_size():
    def row(model, size, ips, mib, gmacs, train=None):
        return {"model": model, "img_size": size, "gmacs": gmacs,
                "infer": {"status": "ok", "img_per_s": ips, "peak_mib": mib},
                "latency": {"status": "ok", "median_ms": 2.0}, "train": train}
    rows = [row("base", 224, 100.0, 50.0, 1.0, {"status": "ok", "img_per_s": 10.0, "peak_mib": 8.0}),
            row("m", 224, 250.0, 25.0, 0.5, {"status": "ok", "img_per_s": 30.0, "peak_mib": 4.0}),
            row("base", 512, 20.0, 100.0, 4.0),
            {"model": "m", "img_size": 512, "gmacs": 2.0, "infer": {"status": "oom", "error": "x"},
             "latency": None, "train": None}]
    report.add_ratios(rows, "base")
    assert rows[0]["ratios"]["img_per_s"] == 1.0
    assert rows[1]["ratios"] == {"img_per_s": 2.5, "latency_ms": 1.0, "peak_mib": 0.5, "gmacs": 0.5,
                                 "train_img_per_s": 3.0, "train_peak_mib": 0.5}
    assert rows[3]["ratios"]["img_per_s"] is None and rows[3]["ratios"]["gmacs"] == 0.5
    assert rows[2]["ratios"]["train_img_per_s"] is None


# ---------------------------------------------------------------------------------------------
# the CLI end to end

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = _run(TWO + ["--img-size", "32", "64", "--train", "--out", str(out), "--name", "t",
                      "--note", "shared CPU"])
    return rc, out


def test_cli_writes_json_with_the_schema(bench_run):
    rc, out = bench_run
    assert rc == 0
    result = json.loads((out / "t.json").read_text())
    assert result["schema"] == report.SCHEMA and tuple(result) == report.ENVELOPE_KEYS
    for key, typ in [("timestamp", str), ("command", str), ("git", dict), ("environment", dict),
                     ("settings", dict), ("notes", list), ("rows", list)]:
        assert isinstance(result[key], typ), key
    assert result["notes"] == ["shared CPU"] and result["complete"] is True
    assert isinstance(result["git"]["commit"], str) and result["git"]["commit"]
    env = result["environment"]
    for key in ("device", "device_type", "driver_version", "cuda_version", "torch", "timm", "triton"):
        assert key in env, key
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    s = result["settings"]
    assert s["baseline"] == "bench_test_vit" and s["amp"] == "none" and s["train"] is True
    assert s["img_sizes"] == [32, 64] and s["batch_sizes"] == [2, 2]
    assert s["memory"] == "cpu_peak_rss_growth"
    rows = result["rows"]
    assert [(r["model"], r["img_size"]) for r in rows] == [
        ("bench_test_vit", 32), ("bench_test_vit_wide", 32),
        ("bench_test_vit", 64), ("bench_test_vit_wide", 64)]
    for r in rows:
        assert isinstance(r["params"], int) and isinstance(r["macs"], int)
        assert r["flops"] == 2 * r["macs"] and r["gmacs"] == pytest.approx(r["macs"] / 1e9)
        for name in ("infer", "latency", "train"):
            m = r[name]
            assert m["status"] == "ok", (name, m)
            assert m["n"] == 2 and m["min_ms"] <= m["median_ms"] <= m["max_ms"]
            assert m["img_per_s"] > 0
        assert r["latency"]["batch_size"] == 1 and r["infer"]["batch_size"] == 2
        # RSS growth of a 0.02 M-parameter model can be 0 (freed pages get reused): only its type
        assert isinstance(r["infer"]["peak_mib"], float) and isinstance(r["train"]["peak_mib"], float)
        assert set(r["ratios"]) == set(report.RATIO_METRICS)
    assert rows[2]["macs"] == _vit_macs(32, 64, 8, 1, 64, 10)
    assert rows[0]["ratios"]["img_per_s"] == 1.0
    assert rows[3]["ratios"]["gmacs"] == pytest.approx(rows[3]["macs"] / rows[2]["macs"])


def test_cli_writes_csv_and_png(bench_run):
    _, out = bench_run
    with (out / "t.csv").open() as f:
        records = list(csv.DictReader(f))
    assert len(records) == 4
    assert {"model", "img_size", "gmacs", "infer_img_per_s", "infer_peak_mib", "latency_median_ms",
            "train_img_per_s", "ratio_img_per_s"} <= set(records[0])
    assert float(records[1]["infer_img_per_s"]) > 0
    result = json.loads((out / "t.json").read_text())
    for key in ("device", "driver_version", "torch", "timm", "triton", "git_commit", "timestamp", "command"):
        assert key in records[0], key
    assert records[0]["torch"] == torch.__version__ and records[3]["command"] == result["command"]
    assert records[0]["git_commit"] == result["git"]["commit"]
    assert (out / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oom_at_one_size_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real = cli.measure_inference

    def fake(model, batch_size, img_size, *args, **kwargs):
        if img_size == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, batch_size, img_size, *args, **kwargs)

    monkeypatch.setattr(cli, "measure_inference", fake)
    rc = _run(TWO + ["--img-size", "64", "32", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["img_size"] for r in rows] == [64, 64, 32, 32]
    for r in rows[:2]:
        assert r["infer"]["status"] == "oom" and "out of memory" in r["infer"]["error"]
        assert r["latency"]["status"] == "oom"
        assert r["ratios"]["img_per_s"] is None
        assert r["macs"] > 0  # FLOPs don't need the device
    assert all(r["infer"]["status"] == "ok" for r in rows[2:])
    assert "OOM" in capsys.readouterr().out


def test_other_failures_are_recorded_and_exit_nonzero(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(cli, "measure_train", broken)
    rc = _run(ONE + ["--img-size", "32", "--train", "--out", str(tmp_path)])
    assert rc == 1
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["train"] == {"status": "error", "error": "ValueError: boom"}
    assert row["infer"]["status"] == "ok"


def test_compile_flag_wraps_the_model(tmp_path, monkeypatch):
    seen = []

    def fake_compile(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    rc = _run(ONE + ["--img-size", "32", "--compile", "--no-latency",
                                     "--out", str(tmp_path)])
    assert rc == 0 and seen == [{"dynamic": False}]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["compile"] is True and result["rows"][0]["latency"] is None


def test_grad_checkpointing_applies_to_the_named_models_only(tmp_path, monkeypatch):
    enabled = []
    original = VisionTransformer.set_grad_checkpointing

    def spy(self, enable=True):
        enabled.append((self.embed_dim, enable))
        return original(self, enable)

    monkeypatch.setattr(VisionTransformer, "set_grad_checkpointing", spy)
    rc = _run(TWO + ["--img-size", "32", "--no-latency", "--train", "--iters", "1",
                     "--grad-checkpointing", "bench_test_vit_wide", "--out", str(tmp_path)])
    assert rc == 0 and enabled == [(64, True)]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["grad_checkpointing"] == ["bench_test_vit_wide"]
    assert [r["grad_checkpointing"] for r in result["rows"]] == [False, True]
    assert all(r["train"]["status"] == "ok" for r in result["rows"])
    with open(tmp_path / "bench.csv") as f:
        assert [r["grad_checkpointing"] for r in csv.DictReader(f)] == ["False", "True"]
    enabled.clear()
    assert _run(TWO + ["--img-size", "32", "--no-latency", "--train", "--iters", "1",
                       "--grad-checkpointing", "--out", str(tmp_path)]) == 0
    assert enabled == [(32, True), (64, True)]  # no names: every model


def test_compile_mode_is_passed_on(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    rc = _run(ONE + ["--img-size", "32", "--compile", "--compile-mode", "reduce-overhead",
                     "--no-latency", "--iters", "1", "--out", str(tmp_path)])
    assert rc == 0 and seen == [{"dynamic": False, "mode": "reduce-overhead"}]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["compile_mode"] == "reduce-overhead"


def test_baseline_is_added_to_the_run(tmp_path):
    rc = _run(["--models", "bench_test_vit_wide", "--baseline", "bench_test_vit", "--device", "cpu",
               "--img-size", "32", "--batch-size", "2", "--warmup", "1", "--iters", "1",
               "--no-latency", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["bench_test_vit", "bench_test_vit_wide"]


def test_rows_are_handed_over_as_they_finish(capsys):
    s = cli._resolve(_parse(ONE + ["--img-size", "32", "48", "--iters", "1", "--no-latency"]))
    seen = []
    result = cli.run(s, "cmd", [], on_row=lambda r: seen.append(json.loads(json.dumps(r))))
    assert [(len(r["rows"]), r["complete"]) for r in seen] == [(1, False), (2, True)]
    assert seen[-1] == json.loads(json.dumps(result))
    assert "[2/2] bench_test_vit @48 b2" in capsys.readouterr().err


def test_skip_missing_drops_unknown_names_but_not_the_baseline(tmp_path, capsys):
    argv = ONE + ["--img-size", "32", "--iters", "1", "--no-latency", "--out", str(tmp_path)]
    assert _run(argv[:2] + ["no_such_model"] + argv[2:] + ["--skip-missing"]) == 0
    assert "skipping unknown model 'no_such_model'" in capsys.readouterr().err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["bench_test_vit"]
    assert _run(argv + ["--baseline", "no_such_model", "--skip-missing"]) == 2


def test_flops_only_counts_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_model", None)  # only model_stats may build models
    monkeypatch.setattr(cli, "model_stats", lambda name, r: {"params": 10, "params_m": 1e-5,
                                                             "macs": r * r, "gmacs": r * r / 1e9})
    rc = _run(["--models", "bench_test_vit", "bench_test_vit_wide", "--img-size", "32", "64",
               "--flops-only", "--train", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert all(r["infer"] is None and r["latency"] is None and r["train"] is None for r in result["rows"])
    assert result["settings"]["train"] is False
    assert [r["ratios"]["gmacs"] for r in result["rows"]] == [1.0, 1.0, 1.0, 1.0]
    table = capsys.readouterr().out
    assert "GMACs" in table and "img/s" not in table
    assert (tmp_path / "bench.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "not_a_model_xyz"], "unknown model 'not_a_model_xyz'"),
    (["--models", "deit_tiny_patch16_24"], "did you mean deit_tiny_patch16_224"),
    (["--models", "bench_test_vit", "--img-size", "32", "64", "--batch-size", "1", "2", "3"],
     "one value or one per --img-size (2), got 3"),
    (["--models", "bench_test_vit", "--iters", "0"], "must be >= 1"),
    (["--models", "bench_test_vit", "--grad-checkpointing"], "add --train"),
    (["--models", "bench_test_vit", "--train", "--grad-checkpointing", "vig_tiny"],
     "vig_tiny not among the benchmarked models"),
    (["--models", "bench_test_vit", "--cuda-graph"], "--cuda-graph needs --device cuda"),
    (["--models", "bench_test_vit", "--compile-mode", "max-autotune"], "needs --compile"),
])
def test_bad_arguments_give_a_clear_error(argv, message, capsys, tmp_path):
    assert _run(argv + ["--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigla bench: error:") and message in err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert _run(["--models", "bench_test_vit", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_and_bad_model_through_the_vigla_command(capsys):
    from vigla.cli import main as vigla_main
    with pytest.raises(SystemExit) as exit_info:
        vigla_main(["bench", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--img-size" in help_text and "--baseline" in help_text and "--train" in help_text
    assert vigla_main(["bench", "--models", "nope_model", "--device", "cpu"]) == 2
    assert "unknown model 'nope_model'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# on a GPU (pytest -m gpu): CUDA events, max_memory_allocated, a real OOM, torch.compile

@pytest.mark.gpu
def test_cli_on_gpu_records_a_real_oom_and_goes_on(tmp_path):
    # batch 100000 at 1024^2: the 1.2 TB input cannot be allocated; batch 1 and the 32^2 row can
    rc = _run(["--models", "bench_test_vit", "--device", "cuda", "--img-size", "1024", "32",
               "--batch-size", "100000", "2", "--train", "--warmup", "2", "--iters", "3",
               "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["memory"] == "cuda_max_memory_allocated+graph_pools"
    assert result["environment"]["device_type"] == "cuda" and result["settings"]["amp"] == "bf16"
    big, small = result["rows"]
    assert big["infer"]["status"] == "oom" and big["train"]["status"] == "oom"
    assert big["latency"]["status"] == "ok"
    for name in ("infer", "latency", "train"):
        assert small[name]["status"] == "ok" and small[name]["img_per_s"] > 0
    weights_mib = small["params"] * 4 / 2 ** 20
    assert small["infer"]["peak_mib"] > weights_mib
    assert small["train"]["peak_mib"] > 3 * weights_mib  # weights, grads, two AdamW moments


@pytest.mark.gpu
def test_cli_on_gpu_with_compile(tmp_path):
    rc = _run(["--models", "bench_test_vit", "--device", "cuda", "--img-size", "32", "--compile",
               "--batch-size", "4", "--warmup", "2", "--iters", "3", "--out", str(tmp_path)])
    assert rc == 0
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["infer"]["status"] == "ok" and row["latency"]["status"] == "ok"
    assert row["infer"]["first_call_ms"] > row["infer"]["median_ms"]  # the compilation


# a new process: Dynamo's caches and the ops' per-device cache empty, as a user's first compiled call finds them
_COMPILED_VIG = """
import copy, json, torch, timm, vigla
torch.manual_seed(0)
eager = timm.create_model("vig_tiny", img_size=64, drop_path_rate=0.0).cuda()
model = copy.deepcopy(eager)
compiled = torch.compile(model, fullgraph=True, dynamic=False)
x = torch.randn(4, 3, 64, 64, device="cuda")
dy = torch.randn(4, 1000, device="cuda")
out = {}
for name, m, module in (("compiled", compiled, model), ("eager", eager, eager)):
    with torch.autocast("cuda", torch.bfloat16):
        y = m(x).float()
    y.backward(dy)
    out[name] = (y, [p.grad.float() for p in module.parameters()])
    m.eval()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        out[name + "_infer"] = m(x).float()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print(json.dumps({"train": rel(out["compiled"][0], out["eager"][0]),
                  "infer": rel(out["compiled_infer"], out["eager_infer"]),
                  "grads": max(rel(a, b) for a, b in zip(out["compiled"][1], out["eager"][1]) if b.norm() > 0)}))
"""


@pytest.mark.gpu
def test_compiled_vig_in_a_fresh_process_is_the_eager_vig():
    """``torch.compile(fullgraph=True)`` of ViG-T in a new process: a bf16 training step and an inference forward
    trace whole (no graph break), without a Dynamo warning, and give the eager model's output and gradients
    within bf16's tolerance (the compiled graph reorders roundings)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _COMPILED_VIG], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Guard failed" not in proc.stderr and "graph break" not in proc.stderr.lower(), proc.stderr[-2000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["train"] < 2e-2 and errors["infer"] < 2e-2 and errors["grads"] < 5e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bench_test_vit", "vig_tiny"])
def test_cuda_graph_replay_gives_the_eager_output(name):
    """The replay computes the captured input (CudaGraphModel copies it into its static buffer), and a graph
    of another input computes that input: the replay is the model, not a stale output."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = cli.build_model(name, 64).to(device).eval()
    x, other = torch.randn(2, 2, 3, 64, 64, device=device)
    with torch.inference_mode(), measure.autocast(device, "bf16"):
        eager, eager_other = model(x).float(), model(other).float()
    replay = measure.cuda_graph_forward(model, x, "bf16")
    x.copy_(other)  # the graph holds its own copy of the input: this must not change its output
    torch.testing.assert_close(replay().float(), eager, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(measure.cuda_graph_forward(model, other, "bf16")().float(), eager_other,
                               rtol=1e-2, atol=1e-2)
    assert not torch.allclose(eager, eager_other, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_memory_meter_counts_what_a_captured_graph_holds():
    """A captured graph's intermediates are no live tensors, yet its pool holds them through every replay: the
    meter counts them in a window of replays, and no longer once the graph is gone."""
    device = torch.device("cuda")
    meter, mib = measure.MemoryMeter(device), 2 ** 20
    x = torch.ones(16 * mib // 4, device=device)  # 16 MiB

    def f():
        return (x * 2 + 1).sum()  # two 16 MiB intermediates

    graph = torch.cuda.CUDAGraph()
    with side_stream(device):
        f()
    with torch.cuda.graph(graph):
        out = f()
    meter.start()
    graph.replay()
    meter.split()
    graph.replay()
    held = meter.peak_mib()
    assert out.item() == 3 * x.numel()
    assert held >= 16 + 16 and measure.graph_pool_slack(device) >= 16 * mib
    del graph, out
    meter.start()
    x.add_(1)
    assert meter.peak_mib() < 16 + 8


@pytest.mark.gpu
def test_cli_on_gpu_with_cuda_graph(tmp_path):
    rc = _run(["--models", "bench_test_vit", "--device", "cuda", "--img-size", "32", "--cuda-graph", "--train",
               "--batch-size", "4", "--warmup", "2", "--iters", "3", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["cuda_graph"] is True
    row = result["rows"][0]
    assert row["infer"]["status"] == "ok" and row["latency"]["status"] == "ok"
    assert row["train"]["status"] == "ok" and row["train"]["first_call_ms"] > row["train"]["median_ms"]
    assert _run(["--models", "bench_test_vit", "--device", "cuda", "--cuda-graph", "--train", "--amp", "fp16",
                 "--out", str(tmp_path / "fp16")]) == 2


def test_profiled_kernels_counts_device_events_once():
    """Kernels only (an op's own row would repeat its kernels' time), copies and fills aside, per step."""
    from types import SimpleNamespace

    from vigla.bench.measure import profiled_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    prof = SimpleNamespace(events=lambda: [ev("aten::mm", cpu, 900.0), ev("gemm", cuda, 300.0),
                                           ev("gemm", cuda, 100.0), ev("_fwd_kernel", cuda, 200.0),
                                           ev("Memcpy HtoD", cuda, 50.0), ev("Memset", cuda, 5.0)])
    k = profiled_kernels(prof, iters=2)
    assert k["kernel_launches"] == 1.5 and k["kernel_ms"] == pytest.approx(0.3)
    assert [(r["op"], r["calls"]) for r in k["kernels"]] == [("gemm", 1.0), ("_fwd_kernel", 0.5)]
    assert k["kernels"][0]["share"] == pytest.approx(2 / 3)


@pytest.mark.gpu
def test_release_workspaces_frees_what_a_side_stream_left():
    """cuBLAS keeps a workspace for each stream a GEMM ran on; the bench drops them between rows, so that a row's
    peak does not hold an earlier row's."""
    device = torch.device("cuda")
    a = torch.randn(512, 512, device=device)
    measure.release_workspaces(device)
    before = torch.cuda.memory_allocated(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        b = a @ a
    torch.cuda.current_stream(device).wait_stream(stream)
    held = torch.cuda.memory_allocated(device) - before - b.numel() * b.element_size()
    measure.release_workspaces(device)
    assert held > 0  # the side stream's workspace
    assert torch.cuda.memory_allocated(device) - before == b.numel() * b.element_size()
    torch.testing.assert_close(b, a @ a)
