import math

import pytest
import torch

from harness import get_method
from harness.methods.emr import emr_elect
from harness.methods.t_switch import t_switch_codes
from harness.methods.tall_mask import tall_masks
from tests.conftest import make_models


def test_emr_hand_computed():
    pre = {"w": torch.zeros(4), "v": torch.zeros(2)}
    ft = {"a": {"w": torch.tensor([1.0, -2.0, 0.5, 0.0]), "v": torch.tensor([1.0, 1.0])},
          "b": {"w": torch.tensor([3.0, 1.0, -1.0, 0.0]), "v": torch.tensor([-1.0, 2.0])}}
    # w: mean [2, -0.5, -0.25, 0] -> flag [+,-,-,-]
    # masks a [T,T,F,F], b [T,F,T,F]; tau_uni = flag*max|tau*M| = [3,-2,-1,0]
    uni, masks = emr_elect([ft["a"]["w"], ft["b"]["w"]])
    assert uni.tolist() == [3.0, -2.0, -1.0, 0.0]
    assert masks.tolist() == [[True, True, False, False], [True, False, True, False]]
    result = get_method("emr").merge(pre, ft)
    # v: mean [0, 1.5] -> flag [-,+]; masks a [F,T] b [T,T]; uni [-1, 2]
    # lambda_a = (mean|w_a| + mean|v_a|) / (mean|uni_w*M_a| + mean|uni_v*M_a|)
    lam_a = (3.5 / 4 + 1.0) / (5.0 / 4 + 2.0 / 2)
    lam_b = (5.0 / 4 + 1.5) / (4.0 / 4 + 3.0 / 2)
    assert result.info["lambda"]["a"] == pytest.approx(lam_a)
    w = result.weights_for("a")["w"]
    torch.testing.assert_close(w, torch.tensor(lam_a, dtype=torch.float32) *
                               torch.tensor([3.0, -2.0, 0.0, 0.0]))
    assert result.weights_for("b")["v"].tolist() == pytest.approx([-lam_b, 2 * lam_b])
    # unseen: the unified model
    assert result.weights_for_unseen()["w"].tolist() == [3.0, -2.0, -1.0, 0.0]
    # payload: 1 bit per entry (packed per key) plus one float32
    assert result.stored_bytes("a") == 1 + 1 + 4


def _signed_zero_taus(n_tasks: int, n: int = 4001) -> list[torch.Tensor]:
    """Random task-vector blocks with exact cancellations and zeros of both signs."""
    g = torch.Generator().manual_seed(n_tasks + n)
    taus = [torch.randn(n, generator=g) * 1e-3 for _ in range(n_tasks)]
    taus[1][:800] = -taus[0][:800]
    for t, tau in enumerate(taus):
        tau[800:1200] = 0.0 if t % 2 else -0.0
        tau[torch.rand(n, generator=g) < 0.1] = 0.0
    return taus


@pytest.mark.parametrize("n_tasks", [2, 3, 8])
def test_emr_block_rule_matches_the_reference_bit_for_bit(n_tasks):
    """The merge's fused rule gives emr_elect's tau_uni (zero signs included), its masks, and
    the float64 sums for lambda."""
    from harness.core.tensors import BlockBuffers
    from harness.methods.emr import _elect_and_sum

    buffers = BlockBuffers()
    for taus in (_signed_zero_taus(n_tasks, 9001), _signed_zero_taus(n_tasks)):  # reused
        uni, masks = emr_elect(taus)
        originals = [tau.clone() for tau in taus]
        sums = torch.zeros(2, n_tasks, dtype=torch.float64)
        fused_uni, fused_masks = _elect_and_sum(sums, buffers, taus)
        assert all(torch.equal(a, b) for a, b in zip(taus, originals))     # inputs untouched
        assert torch.equal(fused_uni.view(torch.int32), uni.view(torch.int32))
        assert torch.equal(fused_masks, masks)
        for row, (tau, mask) in enumerate(zip(taus, masks)):
            assert sums[0, row] == tau.abs().sum(dtype=torch.float64)
            assert sums[1, row] == (uni * mask).abs().sum(dtype=torch.float64)


@pytest.mark.parametrize("with_buffers", [False, True])
def test_tall_masks_match_the_formula_bit_for_bit(with_buffers):
    from harness.core.tensors import BlockBuffers

    buffers = BlockBuffers() if with_buffers else None
    lams = [0.4, 0.2, 0.6]
    for taus in (_signed_zero_taus(3, 9001), _signed_zero_taus(3)):
        originals = [tau.clone() for tau in taus]
        mtl, masks = tall_masks(taus, lams, buffers)
        expected = taus[0] + taus[1] + taus[2]
        assert torch.equal(mtl.view(torch.int32), expected.view(torch.int32))
        for tau, lam, mask in zip(taus, lams, masks):
            assert torch.equal(mask, tau.abs() > lam * (expected - tau).abs())
        assert all(torch.equal(a, b) for a, b in zip(taus, originals))     # inputs untouched


def test_emr_empty_masks_give_zero_lambda_and_warn():
    pre = {"w": torch.zeros(2)}
    ft = {"a": {"w": torch.tensor([1.0, 1.0])}, "b": {"w": torch.tensor([-0.1, -0.1])}}
    with pytest.warns(UserWarning, match="'b'"):
        result = get_method("emr").merge(pre, ft)
    assert result.info["lambda"]["b"] == 0.0
    assert result.weights_for("b")["w"].tolist() == [0.0, 0.0]


def test_tall_mask_is_strict_and_uses_unscaled_sum():
    a, b = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, -1.0, 1.0])
    mtl, (ma, mb) = tall_masks([a, b], [0.5, 0.5])
    assert mtl.tolist() == [3.0, 0.0, 1.0]
    # |a| = [1, 1, 0] > 0.5 * |mtl - a| = [1, 0.5, 0.5] -> [F, T, F] (strict)
    assert ma.tolist() == [False, True, False]
    assert mb.tolist() == [True, True, True]


def test_tall_mask_task_weights_and_unseen():
    pre = {"w": torch.zeros(3)}
    ft = {"a": {"w": torch.tensor([1.0, 1.0, 0.0])}, "b": {"w": torch.tensor([2.0, -1.0, 1.0])}}
    result = get_method("tall-mask", lam={"a": 0.5, "b": 0.2}).merge(pre, ft)
    assert result.weights_for("a")["w"].tolist() == [0.0, 0.0, 0.0]
    assert result.weights_for("b")["w"].tolist() == [3.0, 0.0, 1.0]
    ta = get_method("task-arithmetic").merge(pre, ft).base["w"]
    assert torch.equal(result.weights_for_unseen()["w"], ta)
    with pytest.raises(ValueError, match="no lam given for task 'b'"):
        get_method("tall-mask", lam={"a": 0.5}).merge(pre, ft)


def test_t_switch_keeps_all_when_count_rounds_to_zero():
    codes, alpha = t_switch_codes(torch.tensor([0.5, 0.2, -0.3]), 0.6)
    assert codes.tolist() == [1, 1, 2]
    assert float(alpha) == pytest.approx(math.sqrt((0.25 + 0.04 + 0.09) / 3))


def test_t_switch_per_sign_keep_counts_and_ties():
    tau = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0, -1.0, -2.0, -6.0, -0.5, -0.5])
    # k = 0.6: positives n=5 keep int(2.0)=2 -> 5,4 ; negatives n=5 keep 2 -> -6,-2
    codes, alpha = t_switch_codes(tau, 0.6)
    assert codes.tolist() == [1, 1, 0, 0, 0, 0, 2, 2, 0, 0]
    assert float(alpha) == pytest.approx(math.sqrt((25 + 16 + 4 + 36) / 4))
    # k = 0.4: positives keep int(5 * 0.6) = 3 -> 5, 4, 3 and the 3 tied with it
    codes, _ = t_switch_codes(tau, 0.4)
    assert codes.tolist()[:5] == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("shape", [(64, 64), (300, 300)])     # kthvalue; radix select
@pytest.mark.parametrize("k", [0.6, 0.7, 0.0, 0.99999])
def test_t_switch_selection_matches_kthvalue_over_each_signs_members(shape, k):
    """The authors' rule as written: per sign, kthvalue over the gathered members; ties
    (bfloat16-rounded values), zeros of both signs, a count rounding to 0 (k = 0.99999)."""
    def keep_largest(values, member):
        n = int(member.sum())
        keep = int(n * (1 - k))
        if keep == 0:
            return member
        return member & (values >= torch.kthvalue(values[member], n - keep + 1).values)

    g = torch.Generator().manual_seed(shape[0])
    tau = (torch.randn(shape, generator=g) * 1e-3).bfloat16().float()
    tau.view(-1)[:500] = 0.0
    tau.view(-1)[500:600] = -0.0
    positive, negative = keep_largest(tau, tau > 0), keep_largest(-tau, tau < 0)
    codes, _ = t_switch_codes(tau, k)
    assert torch.equal(codes, positive.to(torch.uint8) + 2 * negative.to(torch.uint8))


def test_t_switch_all_zero_tensor_scale_is_zero_not_nan():
    codes, alpha = t_switch_codes(torch.zeros(4), 0.6)
    assert float(alpha) == 0.0 and codes.tolist() == [0, 0, 0, 0]


def test_t_switch_serves_alpha_times_sign_and_pretrained_for_unseen():
    pre = {"w": torch.zeros(5), "s": torch.tensor(1.0)}
    ft = {"a": {"w": torch.tensor([1.0, 3.0, -2.0, -4.0, 0.0]), "s": torch.tensor(1.5)}}
    result = get_method("t-switch", k=0.5).merge(pre, ft)
    alpha = math.sqrt((9 + 16) / 2)
    assert result.weights_for("a")["w"].tolist() == pytest.approx([0, alpha, 0, -alpha, 0])
    assert result.weights_for("a")["s"] == 1.5              # 0-d kept exactly
    assert result.weights_for_unseen()["w"].tolist() == [0.0] * 5
    assert result.stored_bytes("a") == 2 + 4 + 4          # 5 codes, alpha, the 0-d value


def test_svd_baseline_density_matches_dts_t():
    g = torch.Generator().manual_seed(0)
    pre = {f"m{i}": torch.randn(64, 64, generator=g) for i in range(3)}
    pre["b"] = torch.randn(8, generator=g)
    ft = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
          for t in ("a", "b")}
    dts = get_method("dts-t").merge(pre, ft)
    svd = get_method("svd").merge(pre, ft)
    density = svd.info["density"]
    assert max(svd.amr().values()) <= max(dts.amr().values())
    above = get_method("svd", density=round(density + 0.001, 3)).merge(pre, ft)
    assert max(above.amr().values()) > max(dts.amr().values())
    # the reconstruction is the exact truncated SVD
    r = int(density * 64)
    u, s, vh = torch.linalg.svd(ft["a"]["m0"] - pre["m0"], full_matrices=False)
    expected = pre["m0"] + (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close(svd.weights_for("a")["m0"], expected)


def test_svd_warns_when_matched_density_keeps_no_matrix():
    g = torch.Generator().manual_seed(1)
    # float32 conv: 216 bytes; DTS-T: 242 bytes in all; one rank of the matrix: 260 more
    pre = {"m": torch.randn(32, 32, generator=g), "conv": torch.randn(2, 3, 3, 3, generator=g)}
    ft = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
          for t in ("a", "b")}
    with pytest.warns(UserWarning, match="rank 0 for every matrix"):
        result = get_method("svd").merge(pre, ft)
    assert result.info["density"] < 1 / 32


@pytest.mark.parametrize("method,shared", [("tall-mask", "tau_mtl"), ("emr", "tau_uni")])
def test_masks_in_row_blocks_keep_their_bits(method, shared, monkeypatch):
    """Shared tensor and masks keep their bits; EMR's lambda moves only by float64 rounding."""
    import harness.core.tensors as state_dict

    pre, ft = make_models(n_tasks=3)
    whole = get_method(method).merge(pre, ft)
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 1)           # blocks of one row
    blocks = get_method(method).merge(pre, ft)
    assert all(torch.equal(whole.shared[shared][k], blocks.shared[shared][k])
               for k in whole.shared[shared])
    for task in whole.tasks:
        a, b = whole.payloads[task].records, blocks.payloads[task].records
        assert a.keys() == b.keys() and all(torch.equal(a[k].bits, b[k].bits) for k in a)
        if method == "emr":
            assert blocks.info["lambda"][task] == pytest.approx(whole.info["lambda"][task],
                                                                rel=1e-14)
