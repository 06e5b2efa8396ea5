"""``python -m benchmarks``: the suites' commands, the runner, the results index and the generated write-up."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import index, runner, summarize
from benchmarks.suites import ROOT, SUITES, TEST_PARTS, Options, Step, plan
from vigla.bench import cli as bench_cli
from vigla.bench.report import ENVELOPE_KEYS

RESULTS = ROOT / "benchmarks" / "results"


def _all_steps(tmp_path: Path) -> list[tuple[str, str, Step]]:
    opts = Options(out=tmp_path, fmnist_dir=tmp_path, imagenette=tmp_path)
    return [(s.name, part, step) for s in SUITES.values() for part in s.parts
            for step in plan(s.name, [part], opts)]


def _check_command(argv: list[str], out: Path) -> None:
    """A step's command is runnable: its script exists and takes every option given to it."""
    if argv[0] == "ncu":  # Nsight Compute wraps a Python command
        argv = argv[argv.index("python"):]
    if argv[0] in ("sh", "tar"):
        return
    assert argv[0] == "python", argv
    if argv[1:4] == ["-m", "vigla", "bench"]:
        parser = argparse.ArgumentParser(exit_on_error=False)
        bench_cli.add_arguments(parser)
        args = parser.parse_args(argv[4:])
        assert Path(args.out).is_relative_to(out) or "compile_warm" in args.out, args.out
        return
    if argv[1:3] == ["-m", "pytest"]:
        files = [a for a in argv[3:] if a.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), files
        return
    script = ROOT / argv[1]
    assert script.is_file(), script
    source = script.read_text()
    for flag in (a for a in argv[2:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{script.name} has no option {flag}"


def test_every_gpu_test_file_is_in_exactly_one_part():
    gpu = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bgpu\b)|marks=pytest\.mark\.gpu\b", re.M)
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if gpu.search(p.read_text())}
    parts = [f for _, files in TEST_PARTS.values() for f in files]
    assert sorted(parts) == sorted(marked), "a file with GPU tests is in no part of `tests`, or in two"


def test_every_step_is_a_valid_command_under_the_naming_rule(tmp_path):
    steps = _all_steps(tmp_path)
    assert {suite for suite, _, _ in steps} == set(SUITES)
    for suite, part, step in steps:
        _check_command(step.argv, tmp_path)
        assert step.cap < 600, step.name  # one call on the device machine
        if step.log is None:  # a result step: <suite>_<what>, its files and log under --out
            assert step.name.startswith(f"{suite}_"), step.name
            assert all(f.startswith(step.name + ".") or f.startswith(step.name + "_") for f in step.outputs)
    names = [step.name for _, _, step in steps if step.log is None]
    assert len(names) == len(set(names))
    for suite in SUITES.values():  # each part fits one call
        for part in suite.parts:
            part_steps = plan(suite.name, [part], Options(out=tmp_path, fmnist_dir=tmp_path))
            parallel = max((s.cap for s in part_steps if s.parallel), default=0)
            assert parallel + sum(s.cap for s in part_steps if not s.parallel) < 600, (suite.name, part)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_dry_run_prints_every_command(suite, tmp_path, capsys):
    argv = [suite, "--dry-run", "--out", str(tmp_path)] + (["--fmnist-dir", str(tmp_path)] if suite == "train" else [])
    assert bench_main.main(argv) == 0
    printed = capsys.readouterr().out
    for step in plan(suite, [], Options(out=tmp_path, fmnist_dir=tmp_path)):
        assert shlex.join(step.argv) in printed, step.name
        assert f"# {step.name}: cap {step.cap} s" in printed
    assert not list(tmp_path.iterdir())  # nothing ran


def test_bad_invocations_are_one_line_errors(capsys):
    assert bench_main.main(["models", "vig_x", "--dry-run"]) == 2
    assert "suite models has no part vig_x (parts: vig_t, vig_s, interleaved, all)" in capsys.readouterr().err
    assert bench_main.main(["models", "--dry-run", "--", "--foo"]) == 2
    assert "takes no arguments after `--`" in capsys.readouterr().err


def test_train_without_data_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.__main__.train_data", lambda opts: (None, None))
    assert bench_main.main(["train", "--dry-run"]) == 2
    assert "train: no data" in capsys.readouterr().err


def test_a_smoke_run_never_writes_into_the_record(capsys):
    assert bench_main.main(["cpu", "--smoke", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert str(RESULTS) not in printed and "vigla_benchmarks/smoke" in printed


def test_commit_comes_from_vigla_commit_else_git(monkeypatch):
    monkeypatch.setenv("VIGLA_COMMIT", "abc1234")
    assert runner.commit() == "abc1234"
    monkeypatch.delenv("VIGLA_COMMIT")
    sha = runner.commit()
    assert sha is None or re.fullmatch(r"[0-9a-f]{7,40}", sha)


def test_steps_are_capped_logged_and_tabled(tmp_path, capsys):
    steps = [Step("ok_step", ["python", "-c", "print('hello')"], 60, ["ok_step.json"]),
             Step("failing_step", ["python", "-c", "import sys; sys.exit(3)"], 60),
             Step("slow_step", ["python", "-c", "import time; time.sleep(60)"], 1)]
    (tmp_path / "ok_step.json").write_text("{}")
    outcomes = runner.run_steps(steps, tmp_path, runner.environment(), "abc1234", tail=5)
    assert [(o.status, o.rc) for o in outcomes[:2]] == [("ok", 0), ("failed", 3)]
    assert outcomes[2].status == "capped" and outcomes[2].seconds < 15
    log = (tmp_path / "logs" / "ok_step.log").read_text().splitlines()
    assert log[0].startswith("# commit abc1234 | ") and log[2] == "# $ python -c 'print('\"'\"'hello'\"'\"')'"
    assert "hello" in log and log[-1].startswith("# ok: exit 0")
    lines = runner.table(outcomes, tmp_path).splitlines()
    assert lines[1].split() == ["ok_step", "ok", "0", lines[1].split()[3], "ok_step.json"]
    assert lines[2].split()[:3] == ["failing_step", "failed", "3"] and lines[3].split()[1] == "capped"


def test_flops_suite_runs_for_real_at_a_tiny_size(tmp_path, capsys):
    assert bench_main.main(["flops", "--smoke", "--out", str(tmp_path), "--tail", "0"]) == 0
    result = json.loads((tmp_path / "flops_all_models.json").read_text())
    assert tuple(result) == ENVELOPE_KEYS and result["complete"] is True
    assert [(r["model"], r["img_size"]) for r in result["rows"]] == [("deit_tiny_patch16_224", 224), ("vig_tiny", 224)]
    assert result["rows"][1]["ratios"]["gmacs"] == pytest.approx(1.168 / 1.254, abs=0.01)
    assert (tmp_path / "flops_all_models.png").is_file()
    header = (tmp_path / "logs" / "flops_all_models.log").read_text().splitlines()[:3]
    assert header[0].startswith("# commit ") and "vigla bench --flops-only" in header[2]
    last = capsys.readouterr().out.strip().splitlines()
    head = max(i for i, line in enumerate(last) if line.split()[:2] == ["step", "status"])
    assert last[-1].split()[:3] == ["flops_all_models", "ok", "0"]  # the table's last row
    assert all(line.split()[1] == "ok" for line in last[head + 1:])  # (a wheel set-up step may precede it)


# ------------------------------------------------------------------------------------ the record

def test_committed_results_are_one_envelope_with_index_and_write_up_up_to_date():
    for path in RESULTS.glob("*.json"):
        result = json.loads(path.read_text())
        assert tuple(result) == ENVELOPE_KEYS, path.name
        assert path.stem.split("_")[0] in SUITES, path.name
    assert not [p for p in RESULTS.rglob("*") if p.is_file() and p.parent not in (RESULTS, RESULTS / "logs")]
    assert index.main(RESULTS, check=True) == 0, "run: python -m benchmarks index"
    assert summarize.main(RESULTS, check=True) == 0, "run: python -m benchmarks summarize"


def _bench_result(rows: list[tuple[str, int, float, float]], commit: str = "1234567") -> dict:
    return {"schema": "vigla.bench/1", "timestamp": "2026-01-01T00:00:00+00:00", "command": "python -m vigla bench",
            "git": {"commit": commit, "dirty": False}, "environment": {"device": "Test GPU"}, "settings": {},
            "notes": [], "complete": True,
            "rows": [{"model": m, "img_size": s, "infer": {"status": "ok", "img_per_s": ips, "peak_mib": mib},
                      "train": {"status": "ok", "img_per_s": ips / 3, "peak_mib": 2 * mib}} for m, s, ips, mib in rows]}


def test_summary_and_write_up_read_the_numbers_from_the_files(tmp_path):
    rows = [(m, s, ips, mib) for s, k in zip(summarize.SIZES, (0.5, 1.0, 2.0, 4.0))
            for m, ips, mib in (("deit_tiny_patch16_224", 100.0, 10.0), ("vig_tiny", 100.0 * k, 5.0))]
    (tmp_path / "models_vig_t_eager.json").write_text(json.dumps(_bench_result(rows)))
    res = summarize.Results(tmp_path)
    table = summarize.summary(res)
    assert table[2] == "| ViG-T ÷ DeiT-T, inference img/s, eager | 0.50 | 1.00 | 2.00 | 4.00 |"
    assert "| ViG-T ÷ DeiT-T, training peak memory | 0.50 | 0.50 | 0.50 | 0.50 |" in table
    assert "One Test GPU" in table[-1] and len(table) == 2 + 4 + 2  # no row for files that are missing
    page = summarize.performance(summarize.Results(tmp_path))
    assert "| inference img/s, eager | 0.50 | 1.00 | 2.00 | 4.00 | `models_vig_t_eager` (1234567) |" in page
    assert "## Every model" not in page and "| `models_vig_t_eager.json` | 1234567 | Test GPU | 2026-01-01 |" in page
    readme = f"intro\n{summarize.BEGIN}\nold table\n{summarize.END}\nrest\n"
    new = summarize.readme_with_summary(readme, table)
    assert new.startswith(f"intro\n{summarize.BEGIN}\n| ratio") and new.endswith(f"{summarize.END}\nrest\n")
    assert "old table" not in new
    with pytest.raises(ValueError, match="no summary markers"):
        summarize.readme_with_summary("no markers", table)


def test_eager_cells_at_224_come_from_the_pair_timed_in_turn(tmp_path):
    """A single eager window at 224 is host-bound: where the pair was timed in turn, its median is the cell
    (marked), in the summary and in the write-up's sentence; the other sizes stay the one run's."""
    rows = [(m, s, ips, 10.0) for s in summarize.SIZES
            for m, ips in (("deit_tiny_patch16_224", 100.0), ("vig_tiny", 140.0))]
    (tmp_path / "models_vig_t_eager.json").write_text(json.dumps(_bench_result(rows)))
    (tmp_path / "models_vig_t_cuda_graph.json").write_text(json.dumps(_bench_result(rows)))
    turns = {**_bench_result([]), "rows": [{"round": 0, "infer_ratio": 0.7, "train_ratio": 0.4},
                                           {"round": "median", "infer_ratio": 0.75, "train_ratio": 0.45}]}
    (tmp_path / "models_vig_t_interleaved.json").write_text(json.dumps(turns))
    off = {**turns, "rows": [{"round": 0, "infer_ratio": 0.5, "train_ratio": 0.3},
                             {"round": "median", "infer_ratio": 0.5, "train_ratio": 0.3}]}
    (tmp_path / "models_vig_t_interleaved_eager_features.json").write_text(json.dumps(off))
    table = summarize.summary(summarize.Results(tmp_path))
    assert "| ViG-T ÷ DeiT-T, inference img/s, eager | 0.75 ⁱ | 1.40 | 1.40 | 1.40 |" in table
    assert "| ViG-T ÷ DeiT-T, training img/s, eager | 0.45 ⁱ | 1.40 | 1.40 | 1.40 |" in table
    assert "| ViG-T ÷ DeiT-T, inference img/s, CUDA graphs | 1.40 | 1.40 | 1.40 | 1.40 |" in table
    assert "static copy of the input are part of ViG-T's peak there). At 224² DeiT's eager figures are bound by the " \
           "device machine's host (its Python and launch time), whose" in table[-1]  # no interleaved file: no host time
    turns["rows"][-1]["deit_tiny_patch16_224_infer_ms"] = 8.44
    (tmp_path / "models_vig_t_interleaved.json").write_text(json.dumps(turns))
    note = summarize.summary(summarize.Results(tmp_path))[-1]
    assert "DeiT-T's eager forward at batch 128 took 8.4 ms in the ViG-T pair's run" in note
    page = summarize.performance(summarize.Results(tmp_path))
    assert "0.50x DeiT-T's img/s in inference and 0.30x in training, timed in turn with the replay off" in page
    assert "0.75x DeiT-T's img/s eager (timed in turn); a whole forward replayed as one CUDA graph, at 1.40x" in page
    assert "ViG-T (replay off) and DeiT-T timed in turn" in page


def test_kernel_split_reads_each_kernels_share_and_the_spills():
    """The operator section's split: each kernel's forward+backward time and share per shape, "-" for a kernel a
    shape does not launch, and only the compiled kernels that spill named."""
    result = {"settings": {"compiled_kernels": [
                  {"kernel": "_bigla_bwd_kernel", "K": 32, "BT": 64, "UPPER": 1, "registers": 255, "spills": 110},
                  {"kernel": "_bigla_fwd_kernel", "K": 32, "BT": 32, "UPPER": None, "registers": 128, "spills": 0}]},
              "rows": [{"name": "ViG-T @224", "vigla_kernel_ms": {"fwdbwd": {
                  "_bigla_bwd_kernel": 0.6, "_bigla_walk_kernel": 0.3, "_bigla_fwd_kernel": 0.1}}},
                       {"name": "no split"}]}
    lines = summarize.kernel_split(result)
    assert "| ViG-T @224 | 1.000 | 0.300 (30%) | - | 0.100 (10%) | 0.600 (60%) |" in lines
    assert not any("no split" in line for line in lines)
    assert lines[-1] == ("Kernels that spill registers (registers / spilled): _bigla_bwd_kernel d_k=32 chunk 64 "
                         "scan 1: 255 / 110.")
    assert summarize.kernel_split({"rows": [{"name": "x"}]}) == []


def test_compiled_kernels_lists_each_bigla_kernels_registers_once(monkeypatch):
    """``bench_bigla.compiled_kernels``: one row per BiGLA kernel and launch signature in the launcher's cache (the
    constexprs read from the key, made by the launcher's own ``_signature``), duplicates merged, other kernels and
    the ``--alt`` versions' left out, None for a field a Triton version lacks."""
    from types import SimpleNamespace

    import torch

    from benchmarks import bench_bigla
    from vigla.ops import launcher

    def key(n, **meta):  # the launcher's key of a launch with a tensor, an int and these keywords
        return 0, False, None, launcher._signature((torch.zeros(4), n), meta)[0]

    def fast(name, entries):
        return SimpleNamespace(fn=SimpleNamespace(__name__=name), compiled=entries)

    def kernel(regs, spills, warps=4):
        return SimpleNamespace(n_regs=regs, n_spills=spills, metadata=SimpleNamespace(num_warps=warps))

    def entry(compiled):  # the launcher's cache entry
        return launcher.Compiled(None, None, None, None, compiled)

    meta = dict(K=32, V=64, BT=64, UPPER=1, num_warps=4)
    monkeypatch.setattr(launcher, "_FAST", {
        1: fast("_bigla_bwd_kernel", {key(1, **meta): entry(kernel(255, 110)),
                                      key(2, **meta): entry(kernel(255, 110))}),
        2: fast("_swiglu_fwd_kernel", {key(1, BT=64): entry(kernel(64, 0))}),
        3: fast("_bigla_walk_kernel", {key(1, K=16, V=32, BT=32): entry(SimpleNamespace(metadata=None))}),
        5: fast("_bigla_fwd_kernel", {key(1, K=32, V=64, BT=64, PASS=1, num_warps=4): entry(kernel(128, 0))}),
        4: SimpleNamespace(fn=SimpleNamespace(__name__="_bigla_bwd_kernel", fn=SimpleNamespace(
            __module__=bench_bigla.ALT_PREFIX + "old")), compiled={key(3, **meta): entry(kernel(200, 7))}),
    })
    rows = bench_bigla.compiled_kernels()
    assert rows == [
        dict(kernel="_bigla_bwd_kernel", K=32, V=64, BT=64, UPPER=1, PASS=None, num_warps=4, registers=255,
             spills=110),
        dict(kernel="_bigla_fwd_kernel", K=32, V=64, BT=64, UPPER=None, PASS=1, num_warps=4, registers=128, spills=0),
        dict(kernel="_bigla_walk_kernel", K=16, V=32, BT=32, UPPER=None, PASS=None, num_warps=None, registers=None,
             spills=None)]
    # with only the launches of the default plans (a --configs variant's kernel left out)
    fwd = launcher._FAST[5]
    assert bench_bigla.compiled_kernels({(id(fwd), k) for k in fwd.compiled}) == [rows[1]]


def test_index_groups_by_stem_and_names_the_problems(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "models_vig_t_eager.json").write_text(json.dumps(_bench_result([], commit="abcdef0123")))
    (tmp_path / "models_vig_t_eager.png").write_bytes(b"png")
    (tmp_path / "logs" / "models_vig_t_eager.log").write_text("# commit abcdef0 | GPU | torch\n# started\n# $ x\n")
    (tmp_path / "logs" / "tests_kernels.log").write_text("# commit 7654321 | Other GPU, driver 1 | torch\n"
                                                         "# started\n# $ python -m pytest tests\n")
    (tmp_path / "old_layout.json").write_text(json.dumps({"commit": "x", "rows": []}))
    text = index.render(tmp_path)
    assert ("| `logs/models_vig_t_eager.log`, `models_vig_t_eager.json`, `models_vig_t_eager.png` | "
            "`python -m benchmarks models vig_t` | abcdef0 | Test GPU | 2026-01-01 |") in text
    assert "| `logs/tests_kernels.log` | `python -m benchmarks tests kernels` | 7654321 | Other GPU | - |" in text
    assert "* **tests_kernels**: `python -m pytest tests`" in text
    problems = text.split("## Problems")[1]
    assert "old_layout.json is not in the results envelope" in problems
    assert "old_layout: the name does not start with a suite" in problems


def test_main_module_runs_as_a_command():
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and all(name in proc.stdout for name in SUITES)


def test_stale_commit_warning(monkeypatch):
    """A tree whose tracked files differ from the commit git names (a copied tree with an older .git, as on
    the device machine) gets a warning line unless VIGLA_COMMIT names its commit; a clean tree gets none."""
    import subprocess

    def fake_git(status: str):
        def run(argv, **kwargs):
            out = status if "status" in argv else "abc1234\n"
            return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")
        return run

    monkeypatch.delenv("VIGLA_COMMIT", raising=False)
    monkeypatch.setattr(runner.subprocess, "run", fake_git(" M vigla/a.py\n M vigla/b.py\n"))
    warning = runner.stale_commit_warning()
    assert warning and "abc1234" in warning and "2 tracked files" in warning and "VIGLA_COMMIT" in warning
    monkeypatch.setattr(runner.subprocess, "run", fake_git(""))
    assert runner.stale_commit_warning() is None
    monkeypatch.setattr(runner.subprocess, "run", fake_git(" M vigla/a.py\n"))
    monkeypatch.setenv("VIGLA_COMMIT", "def5678")
    assert runner.stale_commit_warning() is None


ALT_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_bigla as b
torch.manual_seed(0)
mk = lambda *s: torch.randn(*s)
x = [mk(1, 20, 1, 16), mk(1, 20, 1, 16), mk(1, 20, 1, 32), -torch.rand(1, 20, 1, 16), -torch.rand(1, 20, 1, 16)]
do = mk(1, 20, 1, 32)
same, changed = b.load_alt(sys.argv[1]), b.load_alt(sys.argv[2])
fwd, fwdbwd = b._calls("kernels", x, do, None, changed)
fwd(); fwdbwd()
print(json.dumps([b.alt_rel_diff(x, do, same), b.alt_rel_diff(x, do, changed)]))
"""


def test_bench_bigla_alt_kernels_are_compared_with_ours(tmp_path):
    """``bench_bigla.py --alt FILE``: another version of the kernels' module loads inside the package, its
    launchers run, and its largest relative difference from this version is 0 for the same file and
    catches a changed readout scale (Triton's interpreter, CPU tensors)."""
    import os
    import subprocess

    pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")
    source = ROOT / "vigla" / "ops" / "bigla" / "triton_kernels.py"
    text = source.read_text()
    assert text.count("    out = out * half_scale\n") == 1  # the forward's readout scale
    changed = tmp_path / "changed.py"
    changed.write_text(text.replace("    out = out * half_scale\n", "    out = out * half_scale * 1.01\n"))
    proc = subprocess.run([sys.executable, "-c", ALT_SCRIPT, str(source), str(changed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    same, diff = json.loads(proc.stdout.strip().splitlines()[-1])
    assert same == 0.0 and 0.005 < diff < 0.02, (same, diff)


def test_sass_bigla_attributes_a_kernels_instructions_to_its_source_lines():
    """``benchmarks/sass_bigla.py`` on this machine (no GPU): the walk kernel of ViG-T's default forward plan
    compiled for sm_90, its registers and instructions read from the cubin, and its instructions placed on the
    kernel's own source lines (the gate formation among them), or with ``depth`` 1 on the lines inside the helpers
    the kernel calls (the gate's exponential inside ``_load_gate``), every instruction on some line either way."""
    pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")
    from benchmarks import sass_bigla

    if not Path(sass_bigla._tool("nvdisasm")).exists():
        pytest.skip(reason="this Triton carries no nvdisasm (its NVIDIA backend's tools): nothing to disassemble")
    mod, path = sass_bigla.load_version(None)
    name, fn, consts, warps, regs, stages = sass_bigla.kernels_of(mod, 128, 196, 3, 32, 64)[0]
    assert name == "walk (2 chains)" and consts["BT"] == 32 and regs == 128
    kernel, source = sass_bigla.compile_kernel(fn, consts, warps, regs, stages), path.read_text().splitlines()
    row = sass_bigla.analyse(kernel, source, 500)
    assert 0 < row["registers"] <= regs and row["instructions"] > 200
    assert sum(line["instructions"] for line in row["lines"]) == row["instructions"]
    assert any("_load_gate(" in (line["source"] or "") for line in row["lines"])
    inner = sass_bigla.analyse(kernel, source, 500, depth=1)
    assert sum(line["instructions"] for line in inner["lines"]) == inner["instructions"] == row["instructions"]
    gate_exp = [line for line in inner["lines"] if "t = tl.exp2(-tl.abs(x)" in (line["source"] or "")]
    assert gate_exp and not any("t = tl.exp2(-tl.abs(x)" in (line["source"] or "") for line in row["lines"])


@pytest.mark.parametrize("name", ["vig_tiny", "vig_small", "vig_h_tiny"])
def test_official_design_is_vigla_model_in_float64(name):
    """benchmarks/official_design.py's official compositions (separate projections, prenorm residual or
    channel-first LayerNorm2d, flipped directions' recurrence, SwiGLU then down-projection) on a vigla model's
    own parameters give the model's logits in float64: the speed comparison compares the same network."""
    import timm
    import torch

    from benchmarks.official_design import official_design

    torch.manual_seed(0)
    small = (dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)) if name.startswith("vig_h")
             else dict(depth=2))
    model = timm.create_model(name, img_size=64, num_classes=10, **small).double().eval()
    with torch.no_grad():  # non-trivial biases and norm weights: a swapped parameter shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want, got = model(x), official_design(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# Nsight Compute's source page as `ncu --import R --page source --csv --print-source sass` prints it (columns
# cut to those read): a kernel name row, a header, an instruction per row; a second launch after it
NCU_SOURCE_CSV = '''"Kernel Name","_bigla_walk_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","# Samples","Instructions Executed"
"0x7f00","      LDC R1, c[0x0][0x28]","4","4","8"
"0x7f10","      MUFU.EX2 R9, R2","1","1","24"
"0x7f20","@!P0  FMUL R9, R9, R9","10","10","16"
"0x7f30","      FMUL.FTZ R3, R3, 1.4426950216293334961","0","0","24"
"0x7f40","      EXIT","1","1","8"
"Kernel Name","_bigla_fwd_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","# Samples","Instructions Executed"
"0x8f00","      LDC R1, c[0x0][0x28]","2","2","1,024"
"0x8f10","      EXIT","0","0","1,024"
'''


def test_ncu_source_summary_counts_per_warp_and_by_opcode():
    from benchmarks.ncu_source import opcode, parse, summarize

    launches = parse(NCU_SOURCE_CSV)
    assert [name for name, _ in launches] == ["_bigla_walk_kernel", "_bigla_fwd_kernel"]
    assert opcode("@!P0  FMUL R9, R9, R9") == "FMUL" and opcode("FMUL.FTZ R3, R3, 2") == "FMUL"
    walk = summarize(*launches[0], top=3)
    assert walk["warps"] == 8 and walk["instructions_executed"] == 80 and walk["instructions_per_warp"] == 10
    assert walk["opcodes_executed_pct"] == {"FMUL": 50.0, "MUFU": 30.0, "LDC": 10.0}  # the top 3 of 4
    assert walk["opcodes_stalled_pct"]["FMUL"] == 62.5 and walk["stall_samples"] == 16
    assert walk["hottest"][0] == {"sass": "@!P0  FMUL R9, R9, R9", "stall_samples": 10, "executed_per_warp": 2.0}
    fwd = summarize(*launches[1])
    assert fwd["warps"] == 1024 and fwd["instructions_per_warp"] == 2  # thousands separators read


def test_ncu_source_without_a_report_is_a_one_line_error(tmp_path, capsys):
    from benchmarks.ncu_source import main

    assert main(["--report", str(tmp_path / "none.ncu-rep"), "--out", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no report at" in err and not list(tmp_path.iterdir())


def test_interleaved_compile_mode_without_compile_is_a_one_line_error(tmp_path, capsys):
    from benchmarks.interleaved import main

    assert main(["--compile-mode", "reduce-overhead", "--out", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile-mode needs --compile" in err and not list(tmp_path.iterdir())


def test_mlp_rule_ab_without_a_gpu_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from benchmarks.mlp_rule_ab import main

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU" in err and not list(tmp_path.iterdir())


def test_bench_bigla_shape_outside_the_table(monkeypatch):
    """``bench_bigla.py --shape NAME=B,T,H,K,V``: the row it names; a malformed one is refused by argparse in one
    line."""
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_bigla

    assert bench_bigla.parse_shape("ViG-T @512 b128=128,1024,3,32,64") == ("ViG-T @512 b128", 128, 1024, 3, 32, 64)
    for bad in ("a=1,2", "=1,2,3,4,5", "1,2,3,4,5", "a=1,2,3,4,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=B,T,H,K,V"):
            bench_bigla.parse_shape(bad)


def test_sass_bigla_refuses_a_negative_depth(monkeypatch, capsys):
    """``sass_bigla.py --depth -1``: argparse's exit 2 and one error line naming the flag, before anything compiles."""
    from benchmarks import sass_bigla

    monkeypatch.setattr(sys, "argv", ["sass_bigla.py", "--depth", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        sass_bigla.main()
    assert exit_info.value.code == 2 and "--depth takes 0 or more" in capsys.readouterr().err


def test_ncu_kernels_reads_each_launch_of_a_text_report(tmp_path):
    """The Nsight Compute section: each launch's metrics in order, durations in microseconds whatever ncu's unit."""
    text = "\n".join([
        "==PROF== Profiling \"_bigla_walk_kernel\" - 0: 0%....50%....100% - 20 passes",
        "  _bigla_walk_kernel (2, 1, 384)x(64, 1, 1), Context 1, Stream 7, Device 0, CC 9.0",
        "    Section: GPU Speed Of Light Throughput",
        "    DRAM Throughput                   %        55.79",
        "    Duration                         us       117.76",
        "    L2 Hit Rate                                      %        36.95",
        "    Issued Warp Per Scheduler                        0.39",
        "    Eligible Warps Per Scheduler        warp         0.48",
        "    Registers Per Thread             register/thread               255",
        "    Theoretical Occupancy                     %         12.50",
        "    Achieved Occupancy                        %        10.67",
        "  _bigla_fwd_kernel (1, 16, 384)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0",
        "    DRAM Throughput                   %         0.20",
        "    Duration                         ms          1.25",
        "    Registers Per Thread             register/thread               128"])
    walk, fwd = summarize.ncu_kernels(text)
    assert walk == {"kernel": "_bigla_walk_kernel", "grid": "2, 1, 384", "threads": 64, "dram_pct": 55.79,
                    "duration": 117.76, "l2_hit_pct": 36.95, "issued_per_scheduler": 0.39,
                    "eligible_per_scheduler": 0.48, "registers": 255, "theoretical_pct": 12.5, "occupancy_pct": 10.67}
    assert fwd["duration"] == 1250.0 and fwd["registers"] == 128 and "occupancy_pct" not in fwd
    (tmp_path / "logs").mkdir()
    (tmp_path / "ncu_vig_t_224.txt").write_text(text)
    (tmp_path / "logs" / "ncu_vig_t_224.log").write_text("# commit abcdef0123 | NVIDIA H100 80GB HBM3, driver 1\n")
    lines = summarize.ncu_section(tmp_path)
    assert "`ncu_vig_t_224.txt` (abcdef0, NVIDIA H100 80GB HBM3):" in lines
    assert "| _bigla_walk_kernel (2, 1, 384) x 64 | 117.8 | 56 | 37 | 11 / 12 | 255 | 0.48 | 0.39 |" in lines
    assert "| _bigla_fwd_kernel (1, 16, 384) x 128 | 1250.0 | 0 | - | - / - | 128 | - | - |" in lines
