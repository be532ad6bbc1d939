import json
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from harness import LazyStateDict, MergeInputError, get_method, list_methods
from harness.engine.outputs import stream_outputs
from harness.engine.passes import inspect_models
from tests.conftest import make_models, merge_kwargs

OPTIONS = {"svd": {"density": 0.3}, "dts-t-star": {"budget": 60}, "dts-d-star": {"budget": 60}}
ALL = sorted(list_methods())


class method:
    """The method ``name`` (with OPTIONS), whose ``merge`` also gets the stand-in unlabeled
    inputs (``tests.conftest.merge_kwargs``) when it sees data."""

    def __init__(self, name):
        self.method = get_method(name, **OPTIONS.get(name, {}))

    def merge(self, pretrained, finetuned, **kwargs):
        return self.method.merge(pretrained, finetuned, **kwargs,
                                 **merge_kwargs(self.method, finetuned))


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_never_mutated(name):
    pre, ft = make_models()
    pre_copy = {k: v.clone() for k, v in pre.items()}
    ft_copy = {t: {k: v.clone() for k, v in m.items()} for t, m in ft.items()}
    result = method(name).merge(pre, ft)
    for task in ft:
        result.weights_for(task)
    if result.kind == "personalized":
        result.weights_for_unseen({t: 1 / len(ft) for t in ft})
    for k in pre:
        assert torch.equal(pre[k], pre_copy[k]), k
    for t in ft:
        for k in ft[t]:
            assert torch.equal(ft[t][k], ft_copy[t][k]), (t, k)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_input_dtype(name, dtype):
    pre, ft = make_models(dtype=dtype)
    weights = method(name).merge(pre, ft).weights_for("task1")
    for key, value in pre.items():
        assert weights[key].dtype == value.dtype, key


@pytest.mark.parametrize("name", ALL)
def test_lazy_safetensors_inputs_give_the_same_result(name, tmp_path):
    pre, ft = make_models()
    save_file(pre, tmp_path / "pre.safetensors")
    lazy_ft = {}
    for t, m in ft.items():
        # one sharded checkpoint in the Hugging Face layout, the others single files
        if t == "task0":
            folder = tmp_path / t
            folder.mkdir()
            keys = list(m)
            shards = {"model-1.safetensors": keys[:3], "model-2.safetensors": keys[3:]}
            for file, ks in shards.items():
                save_file({k: m[k] for k in ks}, folder / file)
            index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
            lazy_ft[t] = LazyStateDict(folder)
        else:
            save_file(m, tmp_path / f"{t}.safetensors")
            lazy_ft[t] = LazyStateDict(tmp_path / f"{t}.safetensors")
    eager = method(name).merge(pre, ft)
    lazy = method(name).merge(LazyStateDict(tmp_path / "pre.safetensors"), lazy_ft)
    for task in ft:
        a, b = eager.weights_for(task), lazy.weights_for(task)
        for key in a:
            assert torch.equal(a[key], b[key]), (task, key)


def bad(mutator):
    pre, ft = make_models()
    mutator(pre, ft)
    return pre, ft


CASES = [
    ("missing key", lambda p, f: f["task1"].pop("layer.bias"),
     "key 'layer.bias' is missing from task model 'task1'"),
    ("extra key", lambda p, f: f["task2"].__setitem__("head.weight", torch.zeros(2)),
     "key 'head.weight' of task model 'task2' is missing from the pretrained model"),
    ("shape", lambda p, f: f["task0"].__setitem__("layer.weight", torch.zeros(8, 9)),
     r"key 'layer.weight' has shape \(8, 9\) in task model 'task0'"),
    ("nan", lambda p, f: f["task2"]["layer.bias"].__setitem__(0, float("nan")),
     "key 'layer.bias' of task model 'task2' contains NaN"),
    ("inf", lambda p, f: p["conv.weight"].view(-1).__setitem__(3, float("inf")),
     "key 'conv.weight' of the pretrained model contains Inf"),
    ("task inf", lambda p, f: f["task0"]["embed.weight"].__setitem__((2, 3), float("-inf")),
     "key 'embed.weight' of task model 'task0' contains Inf"),
    ("non-float", lambda p, f: f["task1"].__setitem__("layer.weight", torch.zeros(8, 8,
                                                                                  dtype=torch.int64)),
     "key 'layer.weight' of task model 'task1' has dtype torch.int64, where a floating"),
    ("zero task", lambda p, f: f.__setitem__("task1", dict(p)),
     "task model 'task1' equals the pretrained model"),
    ("empty", lambda p, f: f.clear(), "task set is empty"),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_leaves_no_result(name, case, mutate, message, tmp_path):
    """Named before any output is complete: elementwise merges check values on the blocks they
    merge, and a streamed output that failed is discarded."""
    pre, ft = bad(mutate)
    with pytest.raises(MergeInputError, match=message), stream_outputs(tmp_path / "out", 600):
        method(name).merge(pre, ft)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class ReadCounted:
    """A tensor stand-in that counts the reads of its values (indexing), not of its layout."""

    def __init__(self, tensor, reads, name):
        self.tensor, self.reads, self.name = tensor, reads, name
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def is_floating_point(self):
        return self.tensor.is_floating_point()

    def __getitem__(self, index):
        self.reads[self.name] += 1
        return self.tensor[index]


@pytest.mark.parametrize("name", ["task-arithmetic", "weight-averaging", "dare", "emr",
                                  "tall-mask"])
def test_elementwise_merges_check_values_in_their_one_read(name):
    """Merges elementwise across tasks check values on the blocks they merge: each task tensor
    is read once, and the models are described as a validation pass does."""
    pre, ft = make_models()
    reads = Counter()
    counted = {t: {k: ReadCounted(v, reads, (t, k)) for k, v in m.items()} for t, m in ft.items()}
    result = method(name).merge(pre, counted)
    spec = inspect_models(pre, ft)
    assert reads == Counter({(t, k): 1 for t in ft for k in spec.float_keys})
    assert result.merged_params == spec.merged_params == sum(
        pre[k].numel() for k in spec.float_keys if k != "frozen.weight")
    reference = method(name).merge(pre, ft)
    for task in ft:
        for key, value in reference.weights_for(task).items():
            assert torch.equal(result.weights_for(task)[key], value), (task, key)


def test_unchecked_values_are_not_described():
    """A layout-only inspection refuses to say which keys changed until values are checked."""
    pre, ft = make_models()
    spec = inspect_models(pre, ft, values=False)
    assert spec.float_keys == inspect_models(pre, ft).float_keys
    with pytest.raises(RuntimeError, match="not checked yet"):
        spec.merged_params


def test_validation_in_row_blocks_sees_the_same(monkeypatch):
    """Validation reads large keys in row blocks; with blocks of one row it describes the models
    exactly as whole keys do, and a NaN in the last row is still found and named."""
    import harness.core.tensors as state_dict
    from harness.engine.passes import inspect_models

    pre, ft = make_models()
    whole = inspect_models(pre, ft)
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 1)
    assert len(state_dict.row_chunks((20, 8), 2)) == 20
    assert inspect_models(pre, ft) == whole
    ft["task1"]["embed.weight"][19, 7] = float("nan")
    with pytest.raises(MergeInputError, match="key 'embed.weight' of task model 'task1' contains"):
        inspect_models(pre, ft)


def test_nonzero_count_on_bit_patterns():
    """Validation counts non-zero task-vector entries on bit patterns: both zeros count as zero,
    everything else (subnormals, NaN, Inf) as non-zero, as ``torch.count_nonzero`` does."""
    from harness.core.tensors import count_nonzero

    values = torch.tensor([0.0, -0.0, 1.0, -1e-45, float("nan"), float("-inf"), 0.0, 3.5])
    scratch = torch.empty(values.shape, dtype=torch.int32)
    assert count_nonzero(values, scratch) == int(torch.count_nonzero(values)) == 5


def test_a_counting_hook_describes_the_models_as_validation_does():
    """TIES's threshold hook reports each block's non-zero and non-finite counts off its
    histogram, and validation takes them instead of counting: the same description, exact
    zeros of either sign included."""
    from harness.engine.passes import inspect_models
    from harness.methods.ties import inspect_for_ties

    pre, ft = make_models()
    ft["task0"]["layer.weight"][:3] = pre["layer.weight"][:3]        # exact zeros
    pre["layer.bias"][0], ft["task1"]["layer.bias"][0] = 0.0, -0.0   # -0.0 - 0.0 = -0.0
    spec, _ = inspect_for_ties(pre, ft)
    assert spec == inspect_models(pre, ft)
    assert spec.changed["task0"]["layer.weight"] == 64 - 24


@pytest.mark.parametrize("elementwise", [False, True])
def test_merge_shared_checks_values_on_whole_keys_or_blocks(elementwise):
    """A plugin's rule gets whole keys or row blocks (``elementwise``); either way a layout-only
    spec gets its values checked in the merge pass: the same description, NaN named."""
    from harness.engine.passes import merge_shared

    pre, ft = make_models()

    def rule(key, theta0, taus, out):
        return theta0 + 0.3 * sum(taus)
    spec = inspect_models(pre, ft, values=False)
    merged = merge_shared(pre, ft, spec, rule, "test", False, elementwise=elementwise)
    full = inspect_models(pre, ft)
    assert spec.values_checked and spec.shapes == full.shapes
    assert spec.zero_keys == full.zero_keys and spec.merged_params == full.merged_params
    for key, value in get_method("task-arithmetic").merge(pre, ft).base.items():
        assert torch.equal(merged[key], value), key
    ft["task2"]["layer.bias"][0] = float("nan")
    with pytest.raises(MergeInputError, match="key 'layer.bias' of task model 'task2' contains"):
        merge_shared(pre, ft, inspect_models(pre, ft, values=False), rule, "test", False,
                     elementwise=elementwise)


@pytest.mark.parametrize("name", ["task-arithmetic", "weight-averaging"])
def test_fused_checks_know_the_same_changed_keys_as_a_full_validation(name):
    """Task Arithmetic and Weight Averaging check the output and only compare each task with
    the pretrained model until it changes a key: the AMR parameter set is the same as counted
    by a validation pass, and a key no task changed stays out of it."""
    pre, ft = make_models()
    for task in ft:
        ft[task]["layer.bias"] = pre["layer.bias"].clone()      # unchanged by every task
    from harness.engine.passes import inspect_models

    exact = inspect_models(pre, ft)
    result = method(name).merge(pre, ft)
    assert result.merged_params == exact.merged_params
    assert "layer.bias" in exact.zero_keys


def test_a_task_vector_that_overflows_is_named_by_the_fused_checks():
    pre, ft = make_models()
    pre["layer.weight"][0, 0] = 3e38
    for task in ft:
        ft[task]["layer.weight"][0, 0] = 3e38
    ft["task1"]["layer.weight"][0, 0] = -3e38                 # both finite, the difference not
    with pytest.raises(MergeInputError, match="'layer.weight' for task model 'task1' overflows"):
        method("task-arithmetic").merge(pre, ft)
