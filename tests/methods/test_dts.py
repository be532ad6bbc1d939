import math

import pytest
import torch

from harness import HyperparameterError, get_method
from harness.methods.dts import dts_paper_amr
from harness.methods.dts import (dts_encode, group_encode, predicted_stored_bytes,
                                 threshold_and_scale, truncated_svd)
from harness.methods.ties import inspect_for_ties, ties_merge
from harness.engine.passes import inspect_models
from tests.conftest import make_models


def test_golden_vector():
    x = torch.tensor([0.4, 0.3, 0.1, -0.2, -0.6, 0.0])
    expected = torch.tensor([0.4, math.sqrt(0.05), math.sqrt(0.05), -0.2, -0.6, 0.0])
    out = threshold_and_scale(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert out[5] == 0.0


def test_equal_values_split_by_position():
    # four equal positives: the first two (by position) form the high group
    code = group_encode(torch.tensor([0.5, 0.5, 0.5, 0.5, -1.0]))
    from harness.core.bits import unpack_bits
    assert unpack_bits(code.codes, 2, 5).tolist()[:4] == [0, 0, 1, 1]


def test_group_scales_are_rms():
    x = torch.tensor([3.0, 1.0, 2.0, 4.0, -1.0, -3.0, -2.0])
    # positives sorted 4,3 | 2,1 ; negatives by magnitude 3 | 2,1
    out = threshold_and_scale(x)
    hi, lo = math.sqrt((16 + 9) / 2), math.sqrt((4 + 1) / 2)
    nhi, nlo = 3.0, math.sqrt((4 + 1) / 2)
    expected = torch.tensor([hi, lo, lo, hi, -nlo, -nhi, -nlo])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_per_vector_grouping_groups_each_column():
    u = torch.tensor([[4.0, 0.1], [1.0, 0.2], [-2.0, -0.3]])
    whole = group_encode(u).decode()
    per_col = group_encode(u, 1).decode()
    # per column: column 0 positives {4} | {1}, column 1 positives {0.2} | {0.1}
    torch.testing.assert_close(per_col, torch.tensor([[4.0, 0.1], [1.0, 0.2], [-2.0, -0.3]]))
    assert not torch.equal(whole, per_col)


@pytest.mark.parametrize("grouped_dim", [None, 1])
def test_group_code_in_chunks_equals_whole(grouped_dim, monkeypatch):
    """The cut's member copy and the sums of squares go chunk by chunk (bounded temporaries):
    with chunks of 7 entries the code is the same. Quarter-integer values keep every sum of
    squares exact, whatever its order; they tie often, and a tenth are zeros."""
    import harness.methods.dts as dts

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(40, 30, generator=g) * 4).round() / 4
    whole = group_encode(x, grouped_dim)
    monkeypatch.setattr(dts, "_CHUNK_ENTRIES", 7)
    chunked = group_encode(x, grouped_dim)
    assert torch.equal(chunked.codes, whole.codes)
    assert torch.equal(chunked.scales, whole.scales)
    assert torch.equal(chunked.decode(), whole.decode())


def test_zeros_stored_as_positions_or_mask():
    sparse = torch.zeros(1000)
    sparse[3] = 1.0
    sparse[7] = -1.0
    code = group_encode(sparse)
    assert code.zeros_as == "mask"          # 998 zeros: a 125-byte mask beats 3992 bytes
    few = torch.arange(1.0, 101.0)
    few[10] = 0.0
    code = group_encode(few)
    assert code.zeros_as == "positions" and code.zeros.tolist() == [10]
    assert code.decode()[10] == 0.0


def test_canonical_signs_make_largest_entry_positive():
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    u, s, vh = truncated_svd(delta, 5, "canonical")
    pivots = u.abs().argmax(dim=0)
    assert bool((u[pivots, torch.arange(5)] > 0).all())
    torch.testing.assert_close((u * s) @ vh, (lambda a: (a[0][:, :5] * a[1][:5]) @ a[2][:5])(
        torch.linalg.svd(delta, full_matrices=False)))
    lu, ls, lvh = truncated_svd(delta, 5, "lapack")
    ru, _, _ = torch.linalg.svd(delta, full_matrices=False)
    assert torch.equal(lu, ru[:, :5])


def test_density_one_leaves_only_thresholding_error():
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(2))
    codec = dts_encode(delta, 1.0)
    u, s, vh = truncated_svd(delta, 9)
    expected = (threshold_and_scale(u) * s) @ threshold_and_scale(vh)
    assert torch.equal(codec.decode(), expected)


def test_rank_rounding_to_zero_drops_delta():
    delta = torch.randn(1, 768)
    assert dts_encode(delta, 0.3) is None          # int(0.3 * 1) = 0
    assert dts_encode(torch.randn(10, 10), 0.09) is None


def test_tensor_kinds():
    scalar = torch.tensor(0.25)
    assert dts_encode(scalar, 0.3).decode() == scalar
    vec = torch.tensor([0.4, 0.3, 0.1, -0.2, -0.6, 0.0])
    torch.testing.assert_close(dts_encode(vec, 0.3).decode(), threshold_and_scale(vec))
    conv = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(dts_encode(conv, 0.3).decode(),
                               threshold_and_scale(conv.reshape(-1)).reshape(4, 2, 3, 3))


def test_stored_bytes_match_prediction():
    delta = torch.randn(40, 24)
    for density in (0.05, 0.3, 1.0):
        codec = dts_encode(delta, density)
        assert codec.nbytes == predicted_stored_bytes((40, 24), density, 0)
    vec = torch.randn(300)
    vec[:5] = 0
    assert dts_encode(vec, 0.3).nbytes == predicted_stored_bytes((300,), 0.3, 5)


def test_dts_t_weights_are_pretrained_plus_decoded_delta(models):
    pre, ft = models
    result = get_method("dts-t").merge(pre, ft)
    w = result.weights_for("task1")
    delta = ft["task1"]["layer.weight"] - pre["layer.weight"]
    expected = pre["layer.weight"] + dts_encode(delta, 0.3).decode()
    assert torch.equal(w["layer.weight"], expected)
    assert torch.equal(w["frozen.weight"], pre["frozen.weight"])
    assert torch.equal(w["position_ids"], pre["position_ids"])
    assert result.kind == "personalized"
    # embed 20x8: r = int(0.3 * 8) = 2; layer 8x8: r = 2
    assert result.payloads["task1"].records["embed.weight"].s.numel() == 2


def test_dts_d_uses_ties_base(models):
    pre, ft = models
    result = get_method("dts-d").merge(pre, ft)
    spec, thresholds = inspect_for_ties(pre, ft)
    base = ties_merge(pre, ft, spec, thresholds, k=20, merge="sum", lam=0.3)
    for key in base:
        assert torch.equal(result.base[key], base[key])
    delta = ft["task0"]["layer.bias"] - base["layer.bias"]
    expected = base["layer.bias"] + threshold_and_scale(delta)
    assert torch.equal(result.weights_for("task0")["layer.bias"], expected)


def test_dts_d_reconstructs_better_than_dts_t_at_full_density(models):
    pre, ft = models
    for name in ("dts-t", "dts-d"):
        w = get_method(name, density=1.0).merge(pre, ft).weights_for("task0")
        err = (w["layer.weight"] - ft["task0"]["layer.weight"]).norm()
        assert err < (ft["task0"]["layer.weight"] - pre["layer.weight"]).norm()


def roberta_base_shapes():
    """RoBERTa-base's parameter shapes without the classifier (and without a pooler)."""
    h, inter = 768, 3072
    shapes = [(50265, h), (514, h), (1, h), (h,), (h,)]
    for _ in range(12):
        for _ in range(4):
            shapes += [(h, h), (h,)]
        shapes += [(h,), (h,), (inter, h), (inter,), (h, inter), (h,), (h,), (h,)]
    return shapes


def test_paper_amr_reproduces_roberta_table_2():
    shapes = roberta_base_shapes()
    assert sum(math.prod(s) for s in shapes) == 124_055_040
    assert round(dts_paper_amr(shapes, 0.3), 2) == 3.81
    assert round(dts_paper_amr(shapes, 0.1), 2) == 1.26
    assert round(dts_paper_amr(shapes, 0.08), 2) == 1.02


def test_paper_amr_edge_densities():
    shapes = roberta_base_shapes()
    # density 0: every matrix drops out, only the 1-D tensors' 3 bits remain
    one_d = sum(math.prod(s) for s in shapes if len(s) == 1)
    assert dts_paper_amr(shapes, 0.0) == pytest.approx(100 * 3 * one_d / 8 / (4 * 124_055_040))
    # density 1: full rank factors at 3 bits plus float32 singular values
    bits = sum(3 * math.prod(s) if len(s) == 1 else 3 * s[0] * min(s) + 32 * min(s)
               + 3 * min(s) * s[1] for s in shapes)
    assert dts_paper_amr(shapes, 1.0) == pytest.approx(100 * bits / 8 / (4 * 124_055_040))


def test_paper_count_reported_beside_stored(models):
    pre, ft = models
    result = get_method("dts-t").merge(pre, ft)
    paper = result.amr("paper")
    spec = inspect_models(pre, ft)
    expected = dts_paper_amr([spec.shapes[k] for k in spec.active_keys], 0.3)
    assert paper["task0"] == pytest.approx(expected)
    assert result.merged_params == spec.merged_params
    assert "frozen.weight" not in spec.active_keys


def wide_models(n_tasks=2):
    g = torch.Generator().manual_seed(5)
    pre = {f"m{i}": torch.randn(128, 128, generator=g) for i in range(3)}
    pre["bias"] = torch.randn(16, generator=g)
    ft = {f"t{t}": {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
          for t in range(n_tasks)}
    return pre, ft


@pytest.mark.parametrize("name", ["dts-t-star", "dts-d-star"])
def test_star_density_is_largest_under_budget(name):
    pre, ft = wide_models()
    result = get_method(name).merge(pre, ft)
    density = result.info["density"]
    assert max(result.amr().values()) < 1.0
    plain = "dts-t" if name == "dts-t-star" else "dts-d"
    above = get_method(plain, density=round(density + 0.001, 3)).merge(pre, ft)
    assert max(above.amr().values()) >= 1.0


def test_star_paper_count_and_unreachable_budget():
    pre, ft = wide_models()
    result = get_method("dts-t*", budget_count="paper").merge(pre, ft)
    assert max(result.amr("paper").values()) < 1.0
    with pytest.raises(ValueError, match="smallest reachable"):
        get_method("dts-t-star", budget=0.001).merge(pre, ft)


def test_density_out_of_range_is_rejected():
    with pytest.raises(HyperparameterError, match="density"):
        get_method("dts-d", density=1.5)
    with pytest.raises(HyperparameterError, match="density"):
        get_method("dts-t", density=-0.1)


def test_selection_matches_stable_sort_definition_with_many_ties():
    from harness.core.bits import unpack_bits

    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (500,), generator=g).float() / 2   # many exact ties and zeros
    ids = unpack_bits(group_encode(x).codes, 2, 500)
    for sign, high, low in ((1, 0, 1), (-1, 2, 3)):
        members = torch.nonzero(sign * x > 0).reshape(-1)
        order = torch.sort(sign * x[members], descending=True, stable=True).indices
        half = members.numel() // 2
        assert ids[members[order[:half]]].tolist() == [high] * half
        assert ids[members[order[half:]]].tolist() == [low] * (members.numel() - half)


def test_wide_matrices_decompose_like_tall_ones():
    wide = torch.randn(16, 40, generator=torch.Generator().manual_seed(6))
    u, s, vh = truncated_svd(wide, 10)
    torch.testing.assert_close(s, torch.linalg.svdvals(wide)[:10])
    pivots = u.abs().argmax(dim=0)
    assert bool((u[pivots, torch.arange(10)] > 0).all())
    ref_u, _, ref_vh = torch.linalg.svd(wide, full_matrices=False)
    flip = torch.sign(ref_u[pivots, torch.arange(10)])
    torch.testing.assert_close(u, ref_u[:, :10] * flip, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh, ref_vh[:10] * flip[:, None], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_blocked_svd_matches_lapack(shape, monkeypatch):
    import harness.core.tensors as state_dict
    from harness.engine.passes import BlockedDelta
    from harness.methods.dts import blocked_truncated_svd

    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 4000)          # a few rows per block
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(shape, generator=g)
    spectrum = torch.diag(torch.logspace(0, -3, shape[1]))       # distinct singular values
    src = ref + torch.randn(shape, generator=g) @ spectrum
    u, s, vh = truncated_svd(src - ref, 12)
    bu, bs, bvh = blocked_truncated_svd(BlockedDelta(ref, src), 12)
    torch.testing.assert_close(bs, s, rtol=1e-5, atol=0)
    torch.testing.assert_close(bu, u, rtol=0, atol=1e-4)
    torch.testing.assert_close(bvh, vh, rtol=0, atol=1e-4)
    assert bu.is_contiguous() and bvh.is_contiguous()
    assert blocked_truncated_svd(BlockedDelta(ref, ref.clone()), 3) is None


@pytest.mark.parametrize("method,params", [("dts-t", {}), ("dts-d", {}),
                                           ("svd", {"density": 0.5})])
def test_large_matrices_are_decomposed_in_blocks(method, params, monkeypatch):
    """Over IN_MEMORY_SVD_BYTES a matrix goes through the blocked SVD, never LAPACK's whole
    SVD, and serves the same task weights up to rounding (near DTS's median cuts)."""
    import harness.core.tensors as state_dict
    import harness.methods.dts as dts
    import harness.methods.svd as svd

    pre, ft = make_models(n_tasks=2)
    whole = get_method(method, **params).merge(pre, ft)
    monkeypatch.setattr(dts, "IN_MEMORY_SVD_BYTES", 0)
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 200)
    monkeypatch.setattr(dts, "top_factors", None)                 # any whole SVD would fail
    monkeypatch.setattr(svd, "top_factors", None)
    blocked = get_method(method, **params).merge(pre, ft)
    for task in whole.tasks:
        a, b = whole.weights_for(task), blocked.weights_for(task)
        for key in a:
            if a[key].is_floating_point():
                assert torch.linalg.vector_norm(a[key] - b[key]) <= \
                    1e-3 * torch.linalg.vector_norm(a[key]), key
    assert blocked.stored_bytes("task0") == whole.stored_bytes("task0")


def test_lapack_signs_keep_the_whole_svd(monkeypatch):
    import harness.methods.dts as dts

    monkeypatch.setattr(dts, "IN_MEMORY_SVD_BYTES", 0)
    spec = inspect_models(*make_models(n_tasks=2))
    assert dts.blocked_key(spec, "canonical")("embed.weight")
    assert not dts.blocked_key(spec, "lapack")("embed.weight")
    assert not dts.blocked_key(spec, "canonical")("conv.weight")


@pytest.mark.parametrize("negate", [False, True])
def test_median_cut_is_the_same_on_numpy_and_torch(negate):
    from harness.methods.dts import _cut_numpy, _cut_torch

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(1001, generator=g), torch.round(torch.randn(500, generator=g) * 2)):
        member, before = (x < 0 if negate else x > 0), x.clone()
        n = int(member.sum())
        for k in (1, n // 2 + 1, n):
            assert _cut_numpy(x, member, k, negate) == _cut_torch(x, member, k, negate)
        assert torch.equal(x, before)                           # inputs untouched


# ---- svd_solver ---------------------------------------------------------------------------
def decaying(shape, seed=0, decay=20.0):
    """A matrix with a fast-decaying spectrum, as task vectors have."""
    g = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    s = torch.exp(-torch.arange(min(shape), dtype=torch.float32) / decay)
    return (u * s) @ vh


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_svd_solvers_find_the_same_triplets(shape):
    from harness.core.svd import top_factors, truncated_svd

    delta = decaying(shape)
    u0, s0, vh0 = truncated_svd(delta, 12)
    exact = (u0 * s0) @ vh0
    optimal = float((delta - exact).norm())                   # Eckart-Young
    for solver in ("gram", "randomized"):
        u, s, vh = top_factors(delta, 12, solver=solver)
        assert u.shape == u0.shape and s.shape == s0.shape and vh.shape == vh0.shape
        if solver == "gram":                                   # exact up to rounding
            torch.testing.assert_close(s, s0, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close((u * s) @ vh, exact, rtol=0, atol=1e-4)
        else:                                                  # near the best rank-12 error
            assert float((delta - (u * s) @ vh).norm()) < 1.05 * optimal
            torch.testing.assert_close(s, s0, rtol=5e-2, atol=0)
        # canonical signs: the largest-magnitude entry of each u_i is positive
        assert bool((u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all())
        again = top_factors(delta, 12, solver=solver)
        assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))   # deterministic


def test_svd_solver_payloads_serve_what_exact_ones_do(models):
    pre, fts = models
    exact = get_method("dts-d").merge(pre, fts)
    for solver in ("gram", "randomized"):
        method = get_method("dts-d", svd_solver=solver)
        assert method.params()["svd_solver"] == solver
        result = method.merge(pre, fts)
        for task in fts:
            a, b = result.weights_for(task), exact.weights_for(task)
            error = max(float((a[k] - b[k]).abs().max()) for k in a)
            assert error < 1e-3, (solver, task, error)
        assert result.amr() == exact.amr()


def test_svd_solver_default_leaves_params_and_bits_as_before(models):
    pre, fts = models
    method = get_method("dts-t")
    assert "svd_solver" not in method.params()                 # records made before it match
    assert "svd_solver" not in get_method("dts-d-star").params()
    assert method.svd_solver == "exact"
    with pytest.raises(HyperparameterError, match="svd_solver.*canonical"):
        get_method("dts-t", svd_solver="gram", svd_signs="lapack")
    with pytest.raises(HyperparameterError, match="svd_solver"):
        get_method("dts-d-star", svd_solver="qr")
    starred = get_method("dts-t-star", svd_solver="gram", budget=20.0).merge(pre, fts)
    assert starred.hyperparameters["svd_solver"] == "gram"


def test_svd_baseline_takes_the_solvers_and_records_them(models):
    pre, fts = models
    exact = get_method("svd", density=0.5).merge(pre, fts)
    assert "svd_solver" not in exact.info and "svd_solver" not in exact.hyperparameters
    for solver in ("gram", "randomized"):
        result = get_method("svd", density=0.5, svd_solver=solver).merge(pre, fts)
        assert result.info["svd_solver"]["name"] == solver
        for task in fts:
            a, b = result.weights_for(task), exact.weights_for(task)
            assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-2
    dts = get_method("dts-d", svd_solver="randomized").merge(pre, fts)
    assert dts.info["svd_solver"] == {"name": "randomized", "oversampling": 10,
                                      "power_iterations": 1, "seed": 0}
