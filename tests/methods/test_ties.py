import contextlib
import os

import pytest
import torch

from harness import get_method
from harness.core.select import StreamingKthSmallest
from harness.methods.ties import trim_below, trim_rank
from tests.conftest import make_models


def official_ties(pre, ft, k=20, merge="sum", lam=0.3):
    """The authors' algorithm on flattened models (flatten, kthvalue, elect, disjoint merge)."""
    keys = [key for key, v in pre.items() if v.is_floating_point()]
    flat_pre = torch.cat([pre[key].reshape(-1) for key in keys])
    tvs = torch.stack([torch.cat([m[key].reshape(-1) for key in keys]) - flat_pre
                       for m in ft.values()])
    d = tvs.shape[1]
    kth = d - int(d * (k / 100))
    thresholds = tvs.abs().kthvalue(kth, dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= thresholds)
    sign = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    agg = selected.sum(0)
    if merge == "mean":
        agg = agg / torch.clamp((selected != 0).sum(0).float(), min=1)
    merged = flat_pre + lam * agg
    out, offset = {}, 0
    for key in keys:
        n = pre[key].numel()
        out[key] = merged[offset:offset + n].reshape(pre[key].shape)
        offset += n
    return out


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_algorithm_bit_for_bit(merge, seed):
    pre, ft = make_models(n_tasks=4, seed=seed)
    result = get_method("ties", merge_function=merge).merge(pre, ft)
    reference = official_ties(pre, ft, merge=merge)
    for key, value in reference.items():
        assert torch.equal(result.base[key], value), key


def test_hand_computed_trim_elect_disjoint():
    # two keys, whole-model d = 6; k = 50 keeps |tau| >= the 3rd smallest (6 - int(3))
    pre = {"a": torch.zeros(3), "b": torch.zeros(3)}
    ft = {"x": {"a": torch.tensor([1.0, -4.0, 0.5]), "b": torch.tensor([2.0, 0.1, -3.0])},
          "y": {"a": torch.tensor([-2.0, 1.0, 3.0]), "b": torch.tensor([0.2, 5.0, -1.0])}}
    # x: |tau| sorted .1 .5 1 2 3 4 -> threshold 1 -> a [1,-4,0] b [2,0,-3]
    # y: sorted .2 1 1 2 3 5 -> threshold 1 -> a [-2,1,3] b [0,5,-1]
    # sum: a [-1,-3,3] b [2,5,-4] -> signs [-,-,+] [+,+,-]
    # disjoint sum: a [-2,-4,3] b [2,5,-4]
    result = get_method("ties", k=50, lam=1.0).merge(pre, ft)
    assert result.base["a"].tolist() == [-2.0, -4.0, 3.0]
    assert result.base["b"].tolist() == [2.0, 5.0, -4.0]
    mean = get_method("ties", k=50, lam=0.5, merge_function="mean").merge(pre, ft)
    assert mean.base["a"].tolist() == [-1.0, -2.0, 1.5]


def test_zero_elected_sign_uses_majority_or_merges_to_zero():
    pre = {"a": torch.zeros(4)}
    # entry 0 sums to 0 with nonzero members; the other entries elect + twice, - once
    ft = {"x": {"a": torch.tensor([1.0, 2.0, 2.0, -2.0])},
          "y": {"a": torch.tensor([-1.0, 1.0, 1.0, -1.0])}}
    result = get_method("ties", k=100, lam=1.0).merge(pre, ft)
    assert result.base["a"].tolist() == [1.0, 3.0, 3.0, -3.0]   # majority + keeps the +1
    ft_tie = {"x": {"a": torch.tensor([1.0, 2.0, -2.0, 0.5])},
              "y": {"a": torch.tensor([-1.0, 1.0, -1.0, 0.0])}}
    # signs: 0, +, -, +  -> majority + ; entry 0 keeps +1
    assert get_method("ties", k=100, lam=1.0).merge(pre, ft_tie).base["a"].tolist() == \
        [1.0, 3.0, -3.0, 0.5]
    ft_even = {"x": {"a": torch.tensor([1.0, 2.0, -2.0, 0.0])},
               "y": {"a": torch.tensor([-1.0, 1.0, -1.0, 0.0])}}
    # signs: 0, +, -, 0 -> majority 0 -> entry 0 merges to 0 (spec)
    assert get_method("ties", k=100, lam=1.0).merge(pre, ft_even).base["a"].tolist() == \
        [0.0, 3.0, -3.0, 0.0]


@pytest.mark.parametrize("streamed", [False, True])
def test_keys_written_under_a_passing_majority_are_patched(streamed, tmp_path, monkeypatch):
    """Each key is written with its undecided entries under the majority sign of the keys so
    far; only the keys written under another sign than the final majority are patched."""
    import harness.engine.outputs as outputs
    from harness.io.shards import ShardWriter

    patched = []
    for cls in (ShardWriter, outputs.CpuOutput):
        original = cls.patch

        def patch(self, key, positions, values, original=original):
            patched.append(key)
            original(self, key, positions, values)

        monkeypatch.setattr(cls, "patch", patch)

    def merge(pre, ft):
        with contextlib.ExitStack() as stack:
            if streamed:
                stack.enter_context(outputs.stream_outputs(tmp_path / f"out{len(patched)}"))
            result = get_method("ties", k=99, lam=1.0).merge(pre, ft)    # keeps every |tau| >= 1
            return {key: value.clone() for key, value in result.base.items()}

    # "a" elects -, - and leaves entry 0 undecided (running sign -); "b" then elects + 5 times
    pre = {"a": torch.zeros(3), "b": torch.zeros(5), "c": torch.zeros(2)}
    ft = {"x": {"a": torch.tensor([1.0, -2.0, -2.0]), "b": torch.ones(5),
                "c": torch.tensor([2.0, -2.0])},
          "y": {"a": torch.tensor([-1.0, -1.0, -1.0]), "b": torch.ones(5),
                "c": torch.tensor([-2.0, 1.0])}}    # "c": entry 0 undecided under majority +
    result = merge(pre, ft)
    reference = official_ties(pre, ft, k=99, lam=1.0)
    assert all(torch.equal(result[key], reference[key]) for key in pre)
    assert result["a"].tolist() == [1.0, -3.0, -3.0] and result["c"].tolist() == [2.0, -2.0]
    assert patched == ["a"]                         # "c" was written under the final sign
    # the final majority is 0: "a"'s entry, written under -, goes back to theta_0
    patched.clear()
    pre = {"a": torch.tensor([0.5, 0.0]), "b": torch.zeros(1)}
    ft = {"x": {"a": torch.tensor([1.5, -2.0]), "b": torch.ones(1)},
          "y": {"a": torch.tensor([-0.5, -1.0]), "b": torch.ones(1)}}
    assert merge(pre, ft)["a"].tolist() == [0.5, -3.0]
    assert patched == ["a"]


def test_streaming_kth_value_is_exact():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(n, generator=g).abs() for n in (10, 1000, 37)]
    chunks.append(torch.zeros(50))
    values = torch.cat(chunks)
    for k in (1, 50, 51, 500, values.numel()):
        sel = StreamingKthSmallest()
        for c in chunks:
            sel.add_high(c)
        sel.choose_bin(k)
        for c in chunks:
            sel.add_low(c)
        assert sel.value() == float(values.kthvalue(k).values)


def test_kth_value_on_a_bin_edge_needs_one_pass():
    """Values with zero low 16 bits (bfloat16 task vectors' usual case) sit on bin edges: pass 1
    alone finds the k-th of them; one value inside a bin, counted in pass 1, still ranks
    right."""
    values = torch.tensor([0.5, 0.25, 0.25, 0.75, 0.0, 1.5]).bfloat16().float()
    inside = torch.tensor([0.2500001])     # between the 2nd 0.25 and 0.5
    for k, expected in [(1, 0.0), (2, 0.25), (3, 0.25), (5, 0.5), (7, 1.5)]:
        sel = StreamingKthSmallest()
        sel.add_high(values)
        sel.add_high(inside.clone(), overwrite=True)
        sel.choose_bin(k)
        assert not sel.needs_low and sel.value() == expected
    sel = StreamingKthSmallest()
    sel.add_high(values)
    sel.add_high(inside)
    sel.choose_bin(4)       # the value inside bin 0.25's: pass 2 needed
    assert sel.needs_low
    sel.add_low(values)
    sel.add_low(inside)
    assert sel.value() == float(inside)


@pytest.mark.parametrize("dtype, passes", [(torch.bfloat16, 2), (torch.float32, 3)])
def test_bfloat16_thresholds_come_from_the_validation_pass(dtype, passes):
    """bfloat16 task vectors put each task's trim threshold on a bin edge: the inputs are read
    twice (validation with the threshold's histogram, then the merge), float32 ones three
    times (the threshold's low bits in between); the same result as the official algorithm."""
    pre, ft = make_models(dtype=dtype)
    reads = {t: 0 for t in ft}

    class Counting(dict):
        def __init__(self, task, tensors):
            super().__init__(tensors)
            self.task = task

        def __getitem__(self, key):
            if key == "layer.weight":
                reads[self.task] += 1
            return super().__getitem__(key)

    result = get_method("ties").merge(pre, {t: Counting(t, m) for t, m in ft.items()})
    assert set(reads.values()) == {passes}
    def float32(m):
        return {k: v.float() if v.is_floating_point() else v for k, v in m.items()}

    reference = official_ties(float32(pre), {t: float32(m) for t, m in ft.items()})
    assert torch.equal(result.base["layer.weight"], reference["layer.weight"].to(dtype))


def test_trim_below_keeps_magnitudes_at_the_cut():
    tau = torch.tensor([0.5, -0.5, 0.49999997, -0.75, 0.0, -0.49999997, 1e-45])
    assert trim_below(tau.clone(), 0.5).tolist() == [0.5, -0.5, 0.0, -0.75, 0.0, 0.0, 0.0]
    assert torch.equal(trim_below(tau.clone(), 0.0), tau)          # cut 0 keeps everything
    assert trim_below(tau.clone(), 1e-45)[-1] == tau[-1]            # the smallest subnormal


def test_trim_rank():
    assert trim_rank(10, 20) == 8
    assert trim_rank(10, 100) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_computed_in_float32_and_returned_in_theirs(dtype):
    pre, ft = make_models(dtype=dtype)
    if dtype == torch.float64:       # values float32 cannot hold: each is rounded to float32
        g = torch.Generator().manual_seed(5)     # before any arithmetic, as for other dtypes
        ft = {t: {k: v + 1e-9 * torch.randn(v.shape, generator=g, dtype=dtype)
                  if v.is_floating_point() else v for k, v in m.items()} for t, m in ft.items()}
    result = get_method("ties").merge(pre, ft)
    assert result.base["layer.weight"].dtype == dtype
    pre32 = {k: v.float() if v.is_floating_point() else v for k, v in pre.items()}
    ft32 = {t: {k: v.float() if v.is_floating_point() else v for k, v in m.items()}
            for t, m in ft.items()}
    reference = official_ties(pre32, ft32)
    for key in ("layer.weight", "embed.weight", "conv.weight"):
        assert torch.equal(result.base[key], reference[key].to(dtype)), key


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("held_bytes", [None, 0])
def test_row_blocks_give_the_same_bits(merge, held_bytes, monkeypatch):
    """Large keys are merged in row blocks (bounded memory); every step is elementwise across
    tasks, so blocks of one row, undecided entries included, match the official algorithm.
    With no memory for entries awaiting the majority sign, they wait in files: same bits."""
    import harness.core.tensors as state_dict
    import harness.engine.deferred as deferred

    if held_bytes is not None:
        monkeypatch.setattr(deferred, "HELD_BYTES", held_bytes)
    spilled, folders = [], []
    original = deferred.HeldEntries._spill

    def spill(self, key, *entries):
        spilled.append(key)
        folders.append(self.folder)
        original(self, key, *entries)

    monkeypatch.setattr(deferred.HeldEntries, "_spill", spill)

    pre, ft = make_models(n_tasks=4, seed=3)
    pre["tie"] = torch.zeros(3, 2)
    for t, task in enumerate(ft):
        ft[task]["tie"] = torch.tensor([[1.0, -1.0], [2.0, 1.0], [-1.0, 1.0]]) * (-1) ** t
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 1)
    assert len(state_dict.row_chunks((20, 8), 4)) == 20
    result = get_method("ties", merge_function=merge, k=90).merge(pre, ft)
    reference = official_ties(pre, ft, k=90, merge=merge)
    for key, value in reference.items():
        assert torch.equal(result.base[key], value), key
    assert ("tie" in spilled) == (held_bytes == 0)
    assert not any(os.path.exists(folder) for folder in folders)    # removed when done


def test_undecided_entries_wait_as_two_candidate_values():
    """An undecided entry waits as its position (int32) and its merged value under each
    majority sign in the key's dtype: 8 bytes for bfloat16, whatever the number of tasks."""
    import harness.methods.ties as ties
    from harness.core.tensors import BlockBuffers
    from harness.engine.passes import inspect_models

    pre = {"w": torch.zeros(2, 2, dtype=torch.bfloat16)}
    ft = {t: {"w": torch.tensor([[s, 2.0], [0.0, -s]], dtype=torch.bfloat16)}
          for t, s in (("x", 1.0), ("y", -1.0), ("z", 0.0))}
    spec = inspect_models(pre, ft)
    cut = {t: None for t in spec.tasks}
    sources = [ft[t]["w"] for t in spec.tasks]
    _, signs, (positions, candidates) = ties._merge_key(pre["w"], sources, [], spec, "w", cut,
                                                        0.5, "sum", buffers=BlockBuffers())
    assert signs == 1                                   # only entry (0, 1) elects a sign
    assert positions.dtype == torch.int32 and positions.tolist() == [0, 3]
    assert candidates.dtype == torch.bfloat16
    assert candidates.tolist() == [[-0.5, -0.5], [0.5, 0.5]]    # theta_0 + 0.5 * (-1 or +1)


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("seed", [1, 3])
def test_float32_thresholds_inside_a_bin_with_ties_at_them(merge, seed):
    """Task vectors of integers up to 300 (times 2^-10) put the thresholds of k = 10 inside
    their bins (more mantissa bits than the high 16 bits hold), where the low-bits pass finds
    them; key "c" holds +v, -v and 0 right at the thresholds, so entries there are kept, cancel
    and wait for the majority sign: the official algorithm's bits."""
    import harness.methods.ties as ties

    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randint(-1000, 1001, shape, generator=g) * 2.0**-10
           for k, shape in (("a", (40, 30)), ("b", (300,)), ("c", (50,)))}
    ft = {f"t{t}": {k: v + torch.randint(-300, 301, v.shape, generator=g) * 2.0**-10
                    for k, v in pre.items()} for t in range(3)}
    for task, change in (("t0", 271), ("t1", -271), ("t2", 0)):
        ft[task]["c"] = pre["c"] + change * 2.0**-10
    spec, thresholds = ties.inspect_for_ties(pre, ft)
    for selector in thresholds.selectors.values():      # pass 1 alone leaves them in a bin
        selector.choose_bin(ties.trim_rank(sum(v.numel() for v in pre.values()), 10.0))
    assert any(selector.needs_low for selector in thresholds.selectors.values())
    result = get_method("ties", k=10, merge_function=merge).merge(pre, ft)
    reference = official_ties(pre, ft, k=10, merge=merge)
    for key, value in reference.items():
        assert torch.equal(result.base[key], value), key
    assert bool((result.base["c"] < pre["c"]).all())    # +v, -v cancel: the majority, -, merges


def test_small_blocks_are_counted_in_batches_with_the_same_results():
    """Blocks under BATCH_BELOW values wait and are histogrammed together: the same zero and
    non-finite counts per call, and the same k-th value, as one whole pass."""
    import harness.core.select as select

    g = torch.Generator().manual_seed(3)
    values = torch.randn(50_000, generator=g).abs()
    values[::7] = 0.0
    values[5] = float("inf")
    pieces = list(values.split(37))
    for k in (1, 1000, 25_000, 49_999):
        whole = StreamingKthSmallest()
        assert whole.add_high(values) == (int((values == 0).sum()), 1)
        whole.choose_bin(k)
        if whole.needs_low:
            whole.add_low(values)
        batched = StreamingKthSmallest()
        for piece in pieces:
            assert piece.numel() < select.BATCH_BELOW
            assert batched.add_high(piece) == (int((piece == 0).sum()),
                                               int((~torch.isfinite(piece)).sum()))
        assert batched.zeros == whole.zeros
        batched.choose_bin(k)
        assert (batched.bin, batched.on_edge) == (whole.bin, whole.on_edge)
        if batched.needs_low:
            for piece in pieces:
                batched.add_low(piece)
        assert batched.value() == whole.value() == values.sort().values[k - 1].item()
