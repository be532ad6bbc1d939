"""Hostile ``torch.save`` files: no opcode that resolves or calls a global runs code of the
file's choosing, and a damaged file is an error naming it (never a partial load or a crash)."""

import io
import os
import pickle
import random
import struct
import zipfile

import pytest
import torch

from harness.io.torch_pickle import (CheckpointFileError, StandIn, StandInUnpickler,
                                     allowed_globals, load_untrusted)

MARKER = "merge_harness_hostile_marker"
CODE = f"import builtins; builtins.{MARKER} = True"


@pytest.fixture(autouse=True)
def no_marker():
    import builtins

    if hasattr(builtins, MARKER):
        delattr(builtins, MARKER)
    yield
    ran = hasattr(builtins, MARKER)
    if ran:
        delattr(builtins, MARKER)
    assert not ran, "a hostile pickle ran code"


def _u(text: str) -> bytes:
    """SHORT_BINUNICODE of ``text``."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _stack_global(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + b"\x93"


def _call_exec() -> bytes:
    """After a callable on the stack: call it with (CODE,)."""
    return b"(" + _u(CODE) + b"tR"


# every opcode family that resolves a global, each aimed at exec/eval/os.system
HOSTILE = {
    "GLOBAL dotted builtins": b"\x80\x04ctorch._utils\n_rebuild_tensor.__builtins__.get\n("
                              + _u("exec") + b"tR" + _call_exec() + b".",
    "STACK_GLOBAL dotted": b"\x80\x04" + _stack_global("torch._utils",
                                                       "_rebuild_tensor.__globals__.get")
                           + b"(" + _u("exec") + b"tR" + _call_exec() + b".",
    "GLOBAL builtins exec": b"\x80\x02c__builtin__\nexec\n" + _call_exec() + b".",
    "STACK_GLOBAL builtins eval": b"\x80\x04" + _stack_global("builtins", "eval") + _call_exec()
                                  + b".",
    "GLOBAL os.system": b"\x80\x02cos\nsystem\n(" + _u("touch /tmp/" + MARKER) + b"tR.",
    "GLOBAL posix.system": b"\x80\x02cposix\nsystem\n(" + _u("touch /tmp/" + MARKER) + b"tR.",
    "INST builtins exec": b"(" + b"X" + struct.pack("<I", len(CODE)) + CODE.encode()
                          + b"ibuiltins\nexec\n.",
    "OBJ builtins exec": b"\x80\x02(cbuiltins\nexec\n" + _u(CODE) + b"o.",
    "NEWOBJ subprocess.Popen": b"\x80\x02csubprocess\nPopen\n(" + _u("true") + b"t\x81.",
    "REDUCE torch.nn dotted": b"\x80\x04" + _stack_global("torch.nn.modules.module",
                                                          "Module.__init__.__globals__.get")
                              + b"(" + _u("exec") + b"tR" + _call_exec() + b".",
    "Storage-suffixed dotted": b"\x80\x04" + _stack_global("torch", "serialization.pickle."
                                                                    "FakeStorage") + b".",
    "BUILD __setstate__ of a stand-in": b"\x80\x02cevil\nThing\n)\x81}" + _u("__setstate__")
                                        + b"cbuiltins\nexec\nsb" + b"}" + _u("x") + _u(CODE)
                                        + b"sb.",
    "BUILD onto an allowed object": b"\x80\x02ccollections\nOrderedDict\n)R}" + _u("update")
                                    + b"cbuiltins\nexec\nsb.",
    "__reduce__ of a real class": pickle.dumps(type("Runs", (), {"__reduce__": lambda self: (
        exec, (CODE,))})(), protocol=2),
    "protocol 5 reduce": pickle.dumps(type("Runs5", (), {"__reduce__": lambda self: (
        eval, (f"__import__('builtins').__setattr__('{MARKER}', True)",))})(), protocol=5),
    "extension registry": b"\x80\x02\x82\x01" + _call_exec() + b".",
}


def _inert(value) -> bool:
    """A stand-in class or instance, an allowed global, or plain data holding only those."""
    if isinstance(value, (StandIn, str, bytes, int, float, type(None), torch.Tensor)):
        return True
    if isinstance(value, type):
        return issubclass(value, StandIn) or value in allowed_globals().values()
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_inert(v) for v in value)
    if isinstance(value, dict):
        return all(_inert(k) and _inert(v) for k, v in value.items())
    allowed = list(allowed_globals().values())
    if isinstance(value, tuple(a for a in allowed if isinstance(a, type))):
        return True                                   # an instance: a slice, a device...
    return any(value is a for a in allowed)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_no_global_resolves_to_code(name):
    import copyreg

    copyreg.add_extension("builtins", "exec", 1)       # a registry entry naming exec
    try:
        try:
            result = StandInUnpickler(io.BytesIO(HOSTILE[name])).load()
        except Exception:
            return                                      # refusing is fine; running is not
        assert _inert(result)
    finally:
        copyreg.remove_extension("builtins", "exec", 1)
    assert not os.path.exists("/tmp/" + MARKER)


def test_only_exact_allowed_names_resolve():
    table = allowed_globals()
    assert all("." not in name for _, name in table)
    unpickler = StandInUnpickler(io.BytesIO(b""))
    assert unpickler.find_class("torch._utils", "_rebuild_tensor_v2") is torch._utils \
        ._rebuild_tensor_v2
    for module, name in [("torch._utils", "_rebuild_tensor.__builtins__"), ("builtins", "exec"),
                         ("torch.nn.modules.linear", "Linear"), ("torch", "load"),
                         ("torch", "Tensor"), ("os", "system"), ("torch._utils", "_rebuild_")]:
        found = unpickler.find_class(module, name)
        assert isinstance(found, type) and issubclass(found, StandIn), (module, name)
    with pytest.raises(pickle.UnpicklingError):
        unpickler.find_class(b"os", "system")


def _torch_zip(tmp_path, pickled: bytes, name="hostile.pt"):
    """A torch.save zip whose data.pkl is ``pickled``."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_data_pkl_in_a_torch_zip_runs_nothing(tmp_path, name):
    path = _torch_zip(tmp_path, HOSTILE[name])
    try:
        load_untrusted(str(path))
    except CheckpointFileError as error:
        assert str(path) in str(error)


def test_legacy_formats_are_refused_naming_the_file(tmp_path):
    raw = tmp_path / "raw.pt"
    raw.write_bytes(HOSTILE["GLOBAL dotted builtins"])
    with pytest.raises(CheckpointFileError, match="raw.pt is not in torch.save's zip format"):
        load_untrusted(str(raw))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFileError, match="legacy"):
        load_untrusted(str(legacy))


def test_non_regular_files_and_compressed_members_are_refused(tmp_path):
    with pytest.raises(CheckpointFileError, match="not a regular file"):
        load_untrusted(str(tmp_path))
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.pt")
        with pytest.raises(CheckpointFileError, match="fifo.pt is not a regular file"):
            load_untrusted(str(tmp_path / "fifo.pt"))
    with pytest.raises(CheckpointFileError, match="missing.pt does not exist"):
        load_untrusted(str(tmp_path / "missing.pt"))
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
    with pytest.raises(CheckpointFileError, match="compressed"):
        load_untrusted(str(path))


def test_a_real_module_loads_as_stand_ins_with_its_tensors(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.GELU(), torch.nn.LayerNorm(2))
    module.register_buffer("counter", torch.arange(3))
    torch.save(module, tmp_path / "module.pt")
    loaded = load_untrusted(str(tmp_path / "module.pt"))
    assert isinstance(loaded, StandIn) and type(loaded).__name__ == "Sequential"
    assert {type(m).__name__ for m in loaded.modules()} == {"Sequential", "Linear", "GELU",
                                                             "LayerNorm"}
    expected = module.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def _fuzz_cases(blob: bytes, rng: random.Random, count: int):
    for _ in range(count):
        data = bytearray(blob)
        if rng.random() < 0.25:
            yield bytes(data[:rng.randrange(len(data))])
            continue
        for _ in range(rng.choice((1, 1, 2, 8))):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        yield bytes(data)


def test_fuzzed_checkpoints_load_exactly_or_fail_naming_the_file(tmp_path):
    state = {"weight": torch.arange(12, dtype=torch.float32).view(3, 4),
             "bias": torch.ones(3, dtype=torch.bfloat16), "steps": torch.tensor(7)}
    torch.save(torch.nn.ParameterDict({k: torch.nn.Parameter(v, requires_grad=False)
                                       for k, v in state.items() if v.is_floating_point()}),
               tmp_path / "module.pt")
    torch.save(state, tmp_path / "state.pt")
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for name in ("module.pt", "state.pt"):
        original = load_untrusted(str(tmp_path / name))
        expected = original.state_dict() if isinstance(original, torch.nn.Module) else original
        for index, data in enumerate(_fuzz_cases((tmp_path / name).read_bytes(), rng, 150)):
            path = tmp_path / f"fuzzed-{index}.pt"
            path.write_bytes(data)
            try:
                loaded = load_untrusted(str(path))
            except CheckpointFileError as error:
                assert str(path) in str(error)
                outcomes["refused"] += 1
                continue
            got = loaded.state_dict() if isinstance(loaded, torch.nn.Module) else loaded
            assert set(got) == set(expected)
            assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                       for k, v in expected.items())
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 200


class Foreign:
    """A class the unpickler must never import or call."""


def test_fuzzed_raw_pickles_never_escape_the_table():
    """Random flips of a pickle that names torch's rebuilders and a foreign class: the unpickler
    either fails or builds objects from stand-ins and allowed globals only."""
    buffer = io.BytesIO()
    pickle.Pickler(buffer, protocol=2).dump({"module": Foreign(), "shape": torch.Size([2, 3]),
                                             "set": {1, 2}, "names": ["a", "b"]})
    blob = buffer.getvalue()
    loaded = StandInUnpickler(io.BytesIO(blob)).load()
    assert isinstance(loaded["module"], StandIn) and loaded["shape"] == torch.Size([2, 3])
    rng = random.Random(1)
    survived = 0
    for data in _fuzz_cases(blob, rng, 400):
        try:
            loaded = StandInUnpickler(io.BytesIO(data)).load()
        except Exception:
            continue
        survived += 1
        assert _inert(loaded)
    assert survived > 0
