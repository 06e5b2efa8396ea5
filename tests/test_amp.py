"""The eager training Functions' mixed-precision helpers (:mod:`vigla.ops.amp`).

* CPU: ``cast_concat`` equals ``torch.cat`` of the casts per group (zeros where asked), every group contiguous and
  128 bytes apart, nothing shared with its sources; ``mm_to`` equals ``(a @ b).to(dtype)`` off CUDA, ``colsum`` the
  reduction.
* GPU (``pytest -m gpu``): ``mm_to``'s float32-output GEMM of bf16 / fp16 inputs against the float64 product, no
  further from it than the bf16 product cast afterwards, and ``cast_concat`` on CUDA tensors; ``colsum``'s GEMM
  against the float64 sum, its row of ones grown, the reduction inside a CUDA-graph capture and where the GEMM
  fails.
"""
import pytest
import torch

from vigla.ops import amp


def _groups(device="cpu"):
    w_a, w_b, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(6)
    return [t.to(device) for t in (w_a, w_b, b)], torch.randn(4, 2).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cast_concat_is_the_cat_of_the_casts(dtype):
    (w_a, w_b, b), w_c = _groups()
    w, bias, c = amp.cast_concat([[w_a, w_b], [5, b], [w_c]], dtype)
    assert torch.equal(w, torch.cat([w_a, w_b]).to(dtype))
    assert torch.equal(bias, torch.cat([torch.zeros(5), b]).to(dtype))
    assert torch.equal(c, w_c.to(dtype))
    for t, shape in zip((w, bias, c), ((8, 7), (11,), (4, 2))):
        assert t.dtype == dtype and t.shape == shape and t.is_contiguous()
        assert (t.data_ptr() - w.data_ptr()) % 128 == 0  # CUDA's blocks start 512-byte aligned
    w_a.add_(1.0)  # copies, not views of the sources
    assert not torch.equal(w[:5], w_a.to(dtype))


def test_cast_concat_zero_runs_are_zero_in_a_reused_buffer():
    """The zeros are written (a memset), not assumed of fresh memory (the allocator hands back used blocks)."""
    for _ in range(3):
        junk = torch.full((4096,), float("nan"), dtype=torch.bfloat16)
        del junk
        _, bias = amp.cast_concat([[torch.randn(3, 2)], [40, torch.randn(2)]], torch.bfloat16)
        assert torch.equal(bias[:40], torch.zeros(40, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mm_to_off_cuda_is_the_product_then_the_cast(dtype):
    a, b = torch.randn(9, 5, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16)
    got = amp.mm_to(a, b, dtype)
    assert got.dtype == dtype and torch.equal(got, (a @ b).to(dtype))


@pytest.mark.parametrize("dtype, out", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                        (torch.float64, torch.float64)])
def test_colsum_off_cuda_is_the_reduction(dtype, out):
    x = torch.randn(37, 5).to(dtype)
    got = amp.colsum(x, out)
    assert got.dtype == out and torch.equal(got, x.sum(0, dtype=out))


@pytest.mark.gpu
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_colsum_on_cuda_is_the_float32_sum_of_half_rows(half):
    """Bias gradients' shapes (ViG-T's at 224, then longer and shorter): float32 out, within float32 accumulation of
    the float64 sum (the row of ones grows for the longer one, a slice serves the shorter); inside a CUDA-graph
    capture a row too short for ``x`` falls back to the reduction, and the replay is still the sum."""
    amp._ONES.clear()
    amp._RETIRED.clear()
    for R, C in ((25088, 192), (100352, 64), (300, 7)):
        x = torch.randn(R, C, device="cuda").to(half)
        got, exact = amp.colsum(x, torch.float32), x.double().sum(0)
        assert got.dtype == torch.float32 and got.shape == (C,)
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() <= 1e-5
    assert amp._ONES[(x.device, half)].shape == (1, 100352)
    assert [t.shape[1] for t in amp._RETIRED if t.dtype == half][-1:] == [25088]  # outgrown, kept alive
    x = torch.randn(200000, 3, device="cuda").to(half)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = amp.colsum(x, torch.float32)
    assert amp._ONES[(x.device, half)].shape == (1, 100352)  # not grown inside the capture
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(got.double(), x.double().sum(0), rtol=1e-5, atol=1e-2)


@pytest.mark.gpu
def test_colsum_without_the_float32_gemm_is_the_reduction(monkeypatch):
    """Where the float32-output GEMM fails (a GPU or build without it), the sum is the float32 reduction, not the
    product rounded to bf16 that mm_to's fallback gives, in that call and the next."""
    mm = torch.mm

    def no_out_dtype(a, b, **kwargs):
        if "out_dtype" in kwargs:
            raise RuntimeError("mm.dtype: not on this build")
        return mm(a, b, **kwargs)

    monkeypatch.setattr(amp, "_MM_OUT_DTYPE", True)
    monkeypatch.setattr(torch, "mm", no_out_dtype)
    x = torch.randn(25088, 192, device="cuda").to(torch.bfloat16)
    for _ in range(2):
        assert torch.equal(amp.colsum(x, torch.float32), x.sum(0, dtype=torch.float32))
    assert not amp._MM_OUT_DTYPE


@pytest.mark.gpu
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_mm_to_on_cuda_writes_float32_from_half_inputs(half):
    """A weight gradient's shape (rows of a batch summed: ``[O, R] x [R, I]``, R = 25088 as ViG-T's at 224): float32
    out, within float32-accumulation rounding of the float64 product, and no further from it than the product
    rounded to the inputs' dtype and cast."""
    a = torch.randn(592, 25088, device="cuda").to(half)
    b = torch.randn(25088, 192, device="cuda").to(half)
    got = amp.mm_to(a, b, torch.float32)
    exact = a.double() @ b.double()
    rounded = (a @ b).float()
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert got.dtype == torch.float32 and err <= 1e-4
    assert err <= ((rounded.double() - exact).norm() / exact.norm()).item()
    (w_a, w_b, bias), w_c = _groups("cuda")
    w, b_in, c = amp.cast_concat([[w_a, w_b], [2, bias], [w_c]], half)
    assert torch.equal(w, torch.cat([w_a, w_b]).to(half)) and torch.equal(c, w_c.to(half))
    assert torch.equal(b_in, torch.cat([torch.zeros(2, device="cuda"), bias]).to(half))
