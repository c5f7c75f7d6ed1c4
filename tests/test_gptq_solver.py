"""The GPTQ solver: against round-to-nearest and an exhaustive search, every bit width, groups
that do not divide the input, act-order's g_idx, static groups, dead inputs, bad settings."""

from __future__ import annotations

import itertools

import pytest
import torch

from optgptq.compress.quant import quantizer
from optgptq.compress.quant.gptq import GPTQ, add_gram_, rtn, solve
from optgptq.compress.quant.quantizer import MSE_NORM, QuantSpec, find_params, quantize_column


def _layer(seed: int, n: int = 48, k: int = 96, tokens: int = 1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.4 + torch.eye(k)   # correlated inputs
    x = torch.randn(tokens, k, generator=g) @ mix
    return torch.randn(n, k, generator=g), x


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).t()).square().sum())


def _dequant(r) -> torch.Tensor:
    g = r.g_idx.long()
    rows = torch.arange(r.codes.shape[0]).unsqueeze(1)
    return r.scales[g, rows] * (r.codes.float() - r.zeros[g, rows].float())


CASES = [QuantSpec(2, 32, sym=False, desc_act=False, mse=False),
         QuantSpec(3, 40, sym=True, desc_act=True, mse=False),
         QuantSpec(4, -1, sym=False, desc_act=True, mse=False),
         QuantSpec(4, 64, sym=True, desc_act=False, mse=False),
         QuantSpec(8, 50, sym=False, desc_act=True, static_groups=True, mse=False),
         QuantSpec(3, 32, sym=False, static_groups=True, desc_act=False, mse=False),
         QuantSpec(4, 32, sym=False, desc_act=True, mse=True)]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"b{s.bits}g{s.group_size}"
                         f"{'s' if s.sym else 'a'}{'A' if s.desc_act else ''}"
                         f"{'S' if s.static_groups else ''}{'M' if s.mse else ''}")
def test_gptq_beats_rtn_and_its_codes_are_consistent(spec):
    w, x = _layer(spec.bits * 100 + spec.group_size)
    solver = GPTQ(w.shape[1])
    solver.add_batch(x[:300])
    solver.add_batch(x[300:].reshape(2, -1, x.shape[1]))     # any leading shape
    r, base = solver.quantize(w, spec), rtn(w, spec)
    assert _out_err(x, w, r.weight) < 0.8 * _out_err(x, w, base.weight)
    # the stored codes, scales, zeros and g_idx are exactly the weights the solver used
    assert torch.equal(_dequant(r), r.weight) and torch.equal(_dequant(base), base.weight)
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= spec.maxq
    assert torch.equal(r.scales, r.scales.half().float())
    groups = spec.num_groups(w.shape[1])
    assert r.scales.shape == r.zeros.shape == (groups, w.shape[0])
    if spec.sym:
        assert bool((r.zeros == 1 << (spec.bits - 1)).all())
    else:
        assert int(r.zeros.min()) >= 1 and int(r.zeros.max()) <= spec.maxq
    counts = torch.bincount(r.g_idx.long(), minlength=groups)
    width = spec.group_width(w.shape[1])
    assert counts[:-1].eq(width).all() and 0 < counts[-1] <= width   # short last group
    if spec.static_groups or not spec.desc_act:
        assert torch.equal(r.g_idx.long(), torch.arange(w.shape[1]) // width)
    else:   # act-order: groups are runs of the columns sorted by decreasing Hessian diagonal
        h = 2 * x.t() @ x / x.shape[0]
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        assert torch.equal(r.g_idx.long()[order], torch.arange(w.shape[1]) // width)
        if groups > 1:
            assert not torch.equal(r.g_idx.long(), torch.arange(w.shape[1]) // width)


def test_hessian_is_the_running_mean():
    _, x = _layer(1)
    solver = GPTQ(x.shape[1])
    for chunk in x.split([100, 500, 424]):
        solver.add_batch(chunk)
    torch.testing.assert_close(solver.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [64, 200, 700])   # one block, a ragged last block, several
def test_symmetric_update_equals_the_full_product(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(300, k, generator=g)
    h = torch.randn(k, k, generator=g)
    h = h + h.t()
    expect = 0.25 * h + 0.5 * x.t() @ x
    add_gram_(h, x, beta=0.25, alpha=0.5)
    torch.testing.assert_close(h, expect, rtol=1e-5, atol=1e-4)
    assert torch.equal(h, h.t())


def test_clipping_search_in_row_chunks_equals_all_rows_at_once(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(77, 64, generator=g) * torch.rand(77, 1, generator=g)   # 77: a ragged chunk
    spec = QuantSpec(4, 64, sym=False, mse=True, desc_act=False)
    chunked = find_params(w, spec)
    monkeypatch.setattr(quantizer, "MSE_ROWS", 1000)
    whole = find_params(w, spec)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_clipping_search_runs_on_row_major_rows(monkeypatch):
    """The solver hands its groups over as column-major views; the search's error sums must
    still run along each row in memory order (else their rounding, and near-tied choices,
    depend on the caller's layout), so it gets row-major rows and the same parameters."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=g) * torch.rand(96, 1, generator=g)
    spec = QuantSpec(4, 64, sym=False, mse=True, desc_act=False)
    seen, search = [], quantizer._best_candidate
    monkeypatch.setattr(quantizer, "_best_candidate",
                        lambda rows, *a: seen.append(rows.stride()) or search(rows, *a))
    view = w.t().contiguous().t()
    assert view.stride() == (1, 96)
    params = find_params(view, spec)
    assert seen and all(stride[-1] == 1 for stride in seen)
    expect = find_params(w, spec)
    assert torch.equal(params[0], expect[0]) and torch.equal(params[1], expect[1])


def test_gptq_is_no_worse_than_exhaustive_search_allows():
    """On a 6-input layer, every code combination on RTN's scale grid is tried: the optimum
    bounds GPTQ from below in every row; in total GPTQ beats round-to-nearest."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g) @ (torch.randn(6, 6, generator=g) * 0.5 + torch.eye(6))
    w = torch.randn(3, 6, generator=g)
    spec = QuantSpec(2, -1, sym=False, static_groups=True, desc_act=False, mse=False)
    r = solve(w, 2 * x.t() @ x / 64, spec)
    base = rtn(w, spec)
    grid = torch.tensor(list(itertools.product(range(4), repeat=6)), dtype=torch.float32)
    for row in range(3):
        s, z = base.scales[0, row], base.zeros[0, row]
        cand = s * (grid - z)                                     # [4096, 6]
        errs = (x @ (w[row] - cand).t()).square().sum(0)
        best = float(errs.min())
        got = float((x @ (w[row] - r.weight[row])).square().sum())
        assert best - 1e-4 <= got
    assert _out_err(x, w, r.weight) < _out_err(x, w, base.weight)


def test_diagonal_hessian_means_round_to_nearest():
    w, _ = _layer(2)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5)
    spec = QuantSpec(4, 32, sym=False, desc_act=False, mse=False)
    assert torch.equal(solve(w, h, spec).codes, rtn(w, spec).codes)


def test_dead_inputs_get_zero_weight():
    w, x = _layer(3)
    x[:, [4, 17]] = 0
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    r = solver.quantize(w, QuantSpec(4, 32, sym=True, desc_act=True, mse=False))
    assert torch.isfinite(r.weight).all()
    assert bool((r.weight[:, [4, 17]] == 0).all())
    with pytest.raises(AssertionError, match="add_batch after"):
        solver.add_batch(x)


@pytest.mark.parametrize("field,kwargs", [("bits", {"bits": 5}), ("group_size", {"group_size": 0}),
                                          ("damp", {"damp": 0.0}), ("block_size", {"block_size": 0})])
def test_bad_settings_are_named(field, kwargs):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_quantize_without_inputs_is_an_error():
    with pytest.raises(ValueError, match="no calibration inputs"):
        GPTQ(8).quantize(torch.randn(4, 8), QuantSpec())


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_rounds_worse_and_clips_tails(sym):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(200, 64, generator=g) * torch.rand(200, 1, generator=g)
    errs, scales = [], []
    for mse in (False, True):
        spec = QuantSpec(4, 64, sym=sym, mse=mse, desc_act=False)
        scale, zero = find_params(w, spec)
        q, deq = quantize_column(w, scale[:, None], zero[:, None], spec.maxq)
        assert torch.equal(scale, scale.half().float()) and int(q.min()) >= 0
        errs.append((deq - w).abs().pow(MSE_NORM).sum(1))
        scales.append(scale)
    assert bool((errs[1] <= errs[0] * (1 + 1e-6)).all())     # the full range is a candidate
    clipped = scales[1] < scales[0]
    assert 0.2 < float(clipped.float().mean()) < 1           # Gaussian tails: often worth it
    assert bool((errs[1][clipped] < errs[0][clipped]).all())


def test_clipping_search_finds_the_grid_minimum():
    """The search's error (|e| ** 2.4 computed as exp(2.4 log |e|)) picks, in every row, a
    candidate whose float64 ``sum |e| ** 2.4`` is the grid's minimum to rounding."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 64, generator=g) * torch.rand(64, 1, generator=g)
    spec = QuantSpec(4, 64, sym=False, mse=True, desc_act=False)
    scale, zero = find_params(w, spec)
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    errors = []
    for i in range(int(quantizer.MSE_MAX_SHRINK * quantizer.MSE_GRID)):
        p = 1 - i / quantizer.MSE_GRID
        s, z = quantizer._scale_zero(p * lo, p * hi, spec)
        deq = quantize_column(w, s[:, None], z[:, None], spec.maxq)[1]
        errors.append((deq - w).double().abs().pow(MSE_NORM).sum(1))
    deq = quantize_column(w, scale[:, None], zero[:, None], spec.maxq)[1]
    got = (deq - w).double().abs().pow(MSE_NORM).sum(1)
    assert torch.allclose(got, torch.stack(errors).min(0).values, rtol=1e-5, atol=0)
