"""Streaming outputs: model-sized results written shard by shard, atomically, read back lazily."""

import contextlib
import json
import os

import pytest
import torch

from harness import LazyStateDict, get_method
from harness.io.shards import INDEX
from harness.engine.outputs import stream_outputs
from harness.core.errors import MergeInputError
from harness.engine.passes import inspect_models, merge_shared
from tests.conftest import make_models

SMALL = 600       # bytes per shard: several shards even for the test models


@pytest.mark.parametrize("method", ["weight-averaging", "task-arithmetic", "ties", "dare",
                                    "emr", "tall-mask", "dts-d"])
def test_streamed_outputs_are_bit_identical(method, tmp_path):
    pretrained, finetuned = make_models()
    plain = get_method(method).merge(pretrained, finetuned)
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        streamed = get_method(method).merge(pretrained, finetuned)
    for task in plain.tasks:
        a, b = plain.weights_for(task), streamed.weights_for(task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folders = sorted(os.listdir(tmp_path / "out"))
    assert folders and not any(".partial-" in f for f in folders)
    for folder in folders:
        index = json.loads((tmp_path / "out" / folder / INDEX).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((tmp_path / "out" / folder / s).exists() for s in shards)
    if method in ("weight-averaging", "task-arithmetic", "ties", "dare", "dts-d"):
        assert isinstance(streamed.base, LazyStateDict)


def test_an_interrupted_merge_leaves_nothing_that_looks_complete(tmp_path):
    pretrained, finetuned = make_models()
    spec = inspect_models(pretrained, finetuned)
    seen = []

    def failing(key, theta0, taus, out):
        seen.append(key)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return theta0 + sum(taus)

    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        with pytest.raises(KeyboardInterrupt):
            merge_shared(pretrained, finetuned, spec, failing, "test", False)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_a_shard_that_disagrees_with_its_index_is_named(tmp_path):
    pretrained, finetuned = make_models()
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        result = get_method("task-arithmetic").merge(pretrained, finetuned)
    folder = os.path.dirname(result.base.path)
    index = json.loads(open(result.base.path).read())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    index["weight_map"][key] = other
    open(result.base.path, "w").write(json.dumps(index))
    with pytest.raises(MergeInputError, match=f"shard .*{other}.* does not hold '{key}'"):
        LazyStateDict(result.base.path)
    with open(os.path.join(folder, shard), "r+b") as f:
        f.truncate(20)
    with pytest.raises(MergeInputError, match=f"cannot read the safetensors file .*{shard}"):
        LazyStateDict(os.path.join(folder, shard))


def test_mapped_input_pages_are_handed_back_after_each_key(tmp_path):
    """Merge loops release the pages of memory-mapped inputs after each key; a tensor still
    held reads the same values afterwards (the pages fault back from the file), and memory
    that is not a mapping of the input file is never released."""
    from safetensors.torch import save_file

    from harness.io.pages import MAPPED_PAGES, iter_keys

    original = {"big": torch.randn(1024, 1024), "small": torch.randn(4)}
    save_file(original, tmp_path / "model.safetensors")
    lazy = LazyStateDict(tmp_path)

    def resident_file_kb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssFile"))
    held = []
    for key in iter_keys(["big", "small"], "test", False):
        held.append(lazy[key])
        if key == "big":
            float(held[-1].sum())                       # touch every page
            assert MAPPED_PAGES.pending
            before = resident_file_kb()
            MAPPED_PAGES.release()
            assert before - resident_file_kb() >= 3 * 1024    # most of the 4 MiB handed back
    assert not MAPPED_PAGES.pending
    assert torch.equal(held[0], original["big"]) and torch.equal(held[1], original["small"])
    for _ in iter_keys(["one"], "test", False):
        MAPPED_PAGES.touched(str(tmp_path / "model.safetensors"), torch.randn(1024, 1024))
        assert not MAPPED_PAGES.pending                 # not inside the file's mapping
    lazy["big"]
    assert not MAPPED_PAGES.pending     # outside merge loops nothing is noted: a file read
    #                                     there may be closed and its addresses reused later


def test_row_blocks_keep_only_a_block_of_a_mapped_tensor_resident(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import harness.core.tensors as state_dict
    from harness.io.pages import iter_keys, row_blocks

    save_file({"big": torch.randn(4096, 1024)}, tmp_path / "model.safetensors")   # 16 MiB
    lazy = LazyStateDict(tmp_path)
    monkeypatch.setattr(state_dict, "CHUNK_BYTES", 2**20)      # 16 blocks of 1 MiB

    def resident_file_kb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssFile"))
    float(torch.randn(256, 1024).sum())           # the kernel's own code pages, loaded now
    total, grew = 0.0, []
    for key in iter_keys(["big"], "test", False):
        tensor, before = lazy[key], resident_file_kb()
        for rows in row_blocks(tuple(tensor.shape), 1):
            total += float(tensor[rows].sum())
            grew.append(resident_file_kb() - before)
    assert len(grew) == 16 and max(grew) < 8 * 1024           # never half of the 16 MiB
    assert total == pytest.approx(float(lazy["big"].sum()), rel=1e-4)


def test_row_blocks_are_cache_sized_on_the_cpu_and_larger_on_another_device():
    from harness.core.tensors import CHUNK_BYTES, DEVICE_CHUNK_BYTES, merge_device, row_chunks

    shape = (DEVICE_CHUNK_BYTES // 8 // 1024, 1024)     # 2 tasks' float32: one device block
    assert len(row_chunks(shape, 2)) == DEVICE_CHUNK_BYTES // CHUNK_BYTES > 1
    with merge_device("cuda"):                  # only the setting: no tensor goes anywhere
        assert row_chunks(shape, 2) == [slice(0, shape[0])]


def test_tensor_byte_ranges_point_at_each_tensors_bytes(tmp_path):
    from safetensors.torch import save_file

    from harness.io.pages import tensor_byte_ranges

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 4).bfloat16(), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "m.safetensors").read_bytes()
    ranges = tensor_byte_ranges(str(tmp_path / "m.safetensors"))
    assert sorted(ranges) == sorted(tensors)
    for key, (offset, length) in ranges.items():
        flat = tensors[key].reshape(-1)
        assert raw[offset:offset + length] == flat.view(torch.uint8).numpy().tobytes(), key


def test_merge_loops_ask_for_the_next_keys_bytes_ahead_of_reading_them(tmp_path, monkeypatch):
    """Before each key, the next keys' byte ranges in every lazy input read in the loop are
    queued once, up to the budget (the next key at least); in-memory inputs and keys already
    queued are not."""
    from safetensors.torch import save_file

    from harness.io.pages import READ_AHEAD, iter_keys, tensor_byte_ranges

    keys = [f"k{i}" for i in range(5)]
    for name in ("base", "task"):
        save_file({k: torch.randn(64, 16) for k in keys}, tmp_path / f"{name}.safetensors")
    base, task = (LazyStateDict(tmp_path / f"{name}.safetensors") for name in ("base", "task"))
    in_memory = {k: torch.randn(64, 16) for k in keys}
    queued = []
    monkeypatch.setattr(READ_AHEAD, "_submit", lambda *job: queued.append(job))
    monkeypatch.setattr(READ_AHEAD, "AHEAD_BYTES", 2 * 64 * 16 * 4)     # two tensors' bytes
    seen = {}
    for key in iter_keys(keys, "test", False):
        seen[key] = len(queued)
        base[key], task[key], in_memory[key]
    ranges = {name: tensor_byte_ranges(str(tmp_path / f"{name}.safetensors"))
              for name in ("base", "task")}
    expected = [(str(tmp_path / f"{name}.safetensors"), *ranges[name][k])
                for k in keys[2:] for name in ("base", "task")]
    assert queued == expected            # each range once, in the loop's order, nothing more
    # the inputs are known once the first key has read them; then one key ahead (the budget)
    assert seen == {"k0": 0, "k1": 2, "k2": 4, "k3": 6, "k4": 6}
    assert not READ_AHEAD.sources        # forgotten with the loop
    base["k0"]
    assert not READ_AHEAD.sources        # outside merge loops nothing is noted


@contextlib.contextmanager
def evicted_file(path, size: int):
    """A file of ``size`` random bytes, written and dropped from the page cache: its
    descriptor."""
    path.write_bytes(os.urandom(size))
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)            # clean pages: the kernel can drop them
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        yield descriptor
    finally:
        os.close(descriptor)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_page_cached_tells_pages_in_memory_from_evicted_ones(tmp_path):
    from harness.io.pages import page_cached

    with evicted_file(tmp_path / "bytes.bin", 3 * 2**20) as descriptor:
        assert not page_cached(descriptor, 2**20 + 5)
        os.pread(descriptor, 10, 2**20)                 # brings that page (at least) back
        assert page_cached(descriptor, 2**20 + 5)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_a_file_read_from_the_disk_is_told_by_pages_spread_over_it(tmp_path):
    """A file counts as on the disk while some of the pages sampled across it is evicted, even
    where the pages a merge reads first, or any one page, are cached; fully cached, it does
    not."""
    from harness.io.pages import page_cached, read_from_disk

    with evicted_file(tmp_path / "bytes.bin", 9 * 2**20) as descriptor:
        assert read_from_disk(descriptor)
        os.pread(descriptor, 6 * 2**20, 0)              # the first two thirds, every sample there
        assert page_cached(descriptor, 6 * 2**20 - 1) and read_from_disk(descriptor)
        os.pread(descriptor, 3 * 2**20, 6 * 2**20)      # the rest
        assert not read_from_disk(descriptor)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_ranges_of_a_file_on_the_disk_are_hinted_and_counted_and_of_a_cached_one_not(tmp_path):
    from harness.io.pages import _ReadAhead

    path = str(tmp_path / "bytes.bin")
    with evicted_file(tmp_path / "bytes.bin", 4 * 2**20) as descriptor:
        read_ahead, from_disk = _ReadAhead(), {}
        read_ahead._hint(path, 2**20, 2**20, from_disk)
        read_ahead._hint(path, 3 * 2**20, 0, from_disk)        # an empty tensor
        assert from_disk == {path: True} and read_ahead.hinted_bytes == 2**20
        os.pread(descriptor, 4 * 2**20, 0)
        cached, from_cache = _ReadAhead(), {}
        cached._hint(path, 2**20, 2**20, from_cache)
        assert from_cache == {path: False} and cached.hinted_bytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patches_reach_pending_and_written_shards_bit_for_bit(dtype, tmp_path):
    from harness.io.shards import ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(6, 5, generator=g).to(dtype) for name in ("a", "b", "c")}
    writer = ShardWriter(str(tmp_path / "out"), shard_bytes=2 * tensors["a"].nbytes)
    for name, tensor in tensors.items():
        writer[name] = tensor.clone()
    assert writer._open.header.keys() == {"c"}             # a and b are in a finished shard
    positions = torch.tensor([0, 7, 29])
    values = torch.tensor([1.5, -2.25, 3.0e-3])            # float32, cast on the way in
    for name in tensors:
        writer.patch(name, positions, values)
        tensors[name].view(-1)[positions] = values.to(dtype)
    with pytest.raises(KeyError):
        writer.patch("missing", positions, values)
    read = writer.finish()
    assert all(torch.equal(read[name], tensors[name]) for name in tensors)


@pytest.mark.parametrize("held_bytes", [None, 0])
def test_streamed_ties_patches_undecided_entries_into_written_shards(held_bytes, tmp_path,
                                                                     monkeypatch):
    import harness.engine.deferred as deferred

    if held_bytes is not None:
        monkeypatch.setattr(deferred, "HELD_BYTES", held_bytes)
    pre, ft = make_models(n_tasks=4, seed=3)
    pre = {"tie": torch.zeros(3, 2), **pre}         # first: its shard is written before the end
    for t, task in enumerate(ft):                   # elected sign 0: waits for the majority
        tie = torch.tensor([[1.0, -1.0], [2.0, 1.0], [-1.0, 1.0]]) * (-1) ** t
        ft[task] = {"tie": tie, **ft[task]}
    plain = get_method("ties", k=90).merge(pre, ft)
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        streamed = get_method("ties", k=90).merge(pre, ft)
    index = json.loads(open(streamed.base.path).read())["weight_map"]
    assert index["tie"] != max(index.values())      # not the shard still pending at the end
    assert not torch.equal(plain.base["tie"], pre["tie"])
    assert all(torch.equal(plain.base[k], streamed.base[k]) for k in pre)
    leftovers = [name for name in os.listdir(tmp_path / "out") if name.startswith(".")]
    assert not leftovers        # no partial output, no folder of spilled undecided entries


@pytest.mark.parametrize("staging_pages", [None, 2])
def test_shards_written_as_tensors_arrive_load_with_safetensors(staging_pages, tmp_path,
                                                                monkeypatch):
    """Every tensor kind a merge output holds (0-d, empty, bool, integer, mixed float dtypes,
    a run of many small keys that fills a shard's header room) reads back from the files with
    safetensors itself, with the metadata transformers expects; keys of the open shard read
    back before it is finished (its staged partial page written, then completed). With a
    staging buffer of two pages, tensors also straddle and overflow it."""
    from safetensors import safe_open

    import harness.io.shards as sharded
    from harness.io.shards import ShardWriter

    if staging_pages:
        monkeypatch.setattr(sharded._ShardFile, "STAGING", staging_pages * sharded._PAGE)
    g = torch.Generator().manual_seed(0)
    tensors = {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "mask": torch.rand(5, 3, generator=g) > 0.5, "ids": torch.arange(7),
               "half": torch.randn(3, 3, generator=g).half(),
               "bf16": torch.randn(5, generator=g).bfloat16(),
               **{f"layer.{i}.bias": torch.randn(3, generator=g) for i in range(120)},
               "big": torch.randn(64, 64, generator=g)}
    writer = ShardWriter(str(tmp_path / "out"), shard_bytes=2**13)      # 4 KiB header room
    for name, tensor in tensors.items():
        writer[name] = tensor
        assert torch.equal(writer[name], tensor)        # from the open shard or a finished one
    read = writer.finish()
    assert list(read) == list(tensors)
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2          # the 120 small keys need more than one header's room
    for shard in shards:
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in f.keys())
    with pytest.raises(KeyError, match="write-once"):
        writer["scalar"] = torch.tensor(1.0)


def test_a_failed_write_surfaces_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """The writer thread's error (a full disk) stops the merge at the next key with that
    error, and the partial output is removed with its files closed."""
    import errno

    import harness.io.shards as sharded

    def full_disk(fd, offset, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    pretrained, finetuned = make_models()
    monkeypatch.setattr(sharded, "_write_at", full_disk)
    open_files = len(os.listdir("/proc/self/fd"))
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        with pytest.raises(OSError, match="No space left"):
            get_method("task-arithmetic").merge(pretrained, finetuned)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert len(os.listdir("/proc/self/fd")) == open_files


def test_the_write_queue_stays_bounded(tmp_path, monkeypatch):
    """Tensors wait in memory for the writer thread up to IN_FLIGHT_BYTES (or one tensor
    larger than that), however slow the disk."""
    import threading

    import harness.io.shards as sharded

    release = threading.Event()
    write = sharded._write_at

    def slow_write(fd, offset, data):
        release.wait(0.05)
        write(fd, offset, data)

    monkeypatch.setattr(sharded, "_write_at", slow_write)
    monkeypatch.setattr(sharded, "IN_FLIGHT_BYTES", 4096)
    monkeypatch.setattr(sharded._ShardFile, "STAGING", sharded._PAGE)   # a write per 4 KiB
    writer = sharded.ShardWriter(str(tmp_path / "out"), shard_bytes=2**20)
    tensors = [torch.full((256,), float(i)) for i in range(12)] + [torch.zeros(4096)]
    for i, tensor in enumerate(tensors):                  # 1 KiB each, then one of 16 KiB
        writer[f"t{i}"] = tensor
        assert writer._in_flight_bytes <= max(4096, tensor.nbytes)
    release.set()
    read = writer.finish()
    assert all(torch.equal(read[f"t{i}"], t) for i, t in enumerate(tensors))


def test_a_streamed_merge_loads_with_transformers(tmp_path):
    """A merged Qwen2 written by the streaming writer (several shards, bfloat16) loads with
    ``from_pretrained`` and computes what the in-memory merge computes."""
    transformers = pytest.importorskip("transformers")

    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=100)
    torch.manual_seed(0)
    models = [transformers.Qwen2ForCausalLM(config).to(torch.bfloat16) for _ in range(3)]
    pretrained, *tasks = [m.state_dict() for m in models]
    finetuned = {f"task{t}": sd for t, sd in enumerate(tasks)}
    plain = get_method("ties").merge(pretrained, finetuned).base
    with stream_outputs(tmp_path / "out", shard_bytes=20_000):
        folder = os.path.dirname(get_method("ties").merge(pretrained, finetuned).base.path)
    assert len(set(json.loads(open(os.path.join(folder, INDEX)).read())["weight_map"]
                   .values())) > 1
    config.save_pretrained(folder)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    reference = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    reference.load_state_dict(plain)
    tokens = torch.tensor([[1, 5, 7, 42]])
    assert torch.equal(loaded(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_without_direct_io_gets_buffered_writes(refused, tmp_path, monkeypatch):
    """Shards are written with O_DIRECT where it is taken; a file system that refuses it when
    the file is opened, or at its first write (EINVAL), gets the same bytes written through
    the page cache."""
    import errno
    import fcntl

    import harness.io.shards as sharded

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    pretrained, finetuned = make_models()
    plain = get_method("ties").merge(pretrained, finetuned).base
    opened, write, files = os.open, sharded._write_at, []

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return opened(path, flags, *args, **kwargs)

    def refusing_write(fd, offset, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        write(fd, offset, data)

    class Recorded(sharded._ShardFile):
        def __init__(self, *args):
            super().__init__(*args)
            files.append(self)

    if refused == "open":
        monkeypatch.setattr(os, "open", refusing_open)
    else:
        monkeypatch.setattr(sharded, "_write_at", refusing_write)
    monkeypatch.setattr(sharded, "_ShardFile", Recorded)
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        streamed = get_method("ties").merge(pretrained, finetuned).base
    assert files and not any(file.direct for file in files)
    assert all(torch.equal(plain[k], streamed[k]) for k in pretrained)


def test_shards_are_written_without_pwrite(tmp_path, monkeypatch):
    """Where ``os.pwrite`` is missing (Windows) the writer seeks and writes: same files."""
    pretrained, finetuned = make_models()
    plain = get_method("ties").merge(pretrained, finetuned).base
    monkeypatch.delattr(os, "pwrite")
    with stream_outputs(tmp_path / "out", shard_bytes=SMALL):
        streamed = get_method("ties").merge(pretrained, finetuned).base
    assert all(torch.equal(plain[k], streamed[k]) for k in pretrained)


@pytest.mark.parametrize("layout", ["v1", "v2", "none"])
def test_memory_size_takes_the_cgroup_limit_where_it_is_lower(layout, tmp_path):
    from harness.io.pages import memory_size

    machine = memory_size(str(tmp_path / "missing"))      # no cgroup file: the machine's memory
    proc = tmp_path / "cgroup"
    if layout == "v1":
        proc.write_text("5:cpu,cpuacct:/a\n4:memory:/job/7\n0::/\n")
        limit = tmp_path / "root" / "memory" / "job" / "7" / "memory.limit_in_bytes"
    else:
        proc.write_text("0::/user/job\n")
        limit = tmp_path / "root" / "user" / "job" / "memory.max"
    limit.parent.mkdir(parents=True)
    limit.write_text("3221225472\n" if layout != "none" else "max\n")
    expected = min(machine, 3 * 2**30) if layout != "none" else machine
    assert memory_size(str(proc), str(tmp_path / "root")) == expected
    if layout != "none":            # a lower limit above the process's own cgroup counts too
        (limit.parent.parent / limit.name).write_text(str(2**30))
        assert memory_size(str(proc), str(tmp_path / "root")) == min(machine, 2**30)
