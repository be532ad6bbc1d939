
import pytest
import torch

from harness.tasks.tiny import TinySuite, make_split


def test_splits_are_deterministic_sized_and_balanced_enough():
    a, la = make_split("a-vs-b", "train")
    b, lb = make_split("a-vs-b", "train")
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert len(a) == 4000 and len(make_split("a-vs-b", "test")[0]) == 1000
    assert 0.3 < float(la.float().mean()) < 0.7


def test_train_and_test_do_not_overlap():
    train, _ = make_split("b-vs-c", "train")
    test, _ = make_split("b-vs-c", "test")
    seen = {tuple(x.tolist()) for x in train}
    assert not [x for x in test if tuple(x.tolist()) in seen]


def test_split_definition():
    suite = TinySuite("/nonexistent")
    assert suite.split_tasks("unseen") == ["a-vs-c", "e-vs-g"]
    assert len(suite.split_tasks("seen")) == 6
    with pytest.raises(ValueError, match="split"):
        suite.split_tasks("both")


def test_backbones_have_no_head_and_heads_stay_per_task(tiny_cache):
    suite = TinySuite(tiny_cache)
    backbone = suite.load_finetuned("a-vs-b")
    assert not [k for k in backbone if k.startswith("head")]
    assert set(backbone) == set(suite.load_pretrained())
    assert not torch.equal(suite._head("a-vs-b")["weight"], suite._head("b-vs-c")["weight"])


def test_corrupt_cache_entry_is_detected_and_rebuilt(tiny_cache, tmp_path):
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(tiny_cache, folder)
    target = folder / "tiny" / "task-e-vs-f.safetensors"
    good = target.read_bytes()
    data = bytearray(good)
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    suite = TinySuite(str(folder))
    with pytest.warns(UserWarning, match="task-e-vs-f.safetensors does not match its checksum"):
        assert not suite.cache.has("task-e-vs-f")
    suite.prepare(progress=False)
    assert target.read_bytes() == good      # rebuilt bit for bit from the same seeds
    assert suite.cache.has("pretrained")


def test_unprepared_suite_says_what_to_do(tmp_path):
    from harness.tasks.base import SuiteUnavailableError

    with pytest.raises(SuiteUnavailableError, match="prepare"):
        TinySuite(str(tmp_path)).load_pretrained()
