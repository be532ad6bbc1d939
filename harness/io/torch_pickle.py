"""Reading ``torch.save`` files from untrusted sources: nothing a file names is imported or run.

A pickle resolves globals by name (opcodes GLOBAL, STACK_GLOBAL, INST, the extension registry)
and then calls them (REDUCE, NEWOBJ, OBJ, INST, BUILD through ``__setstate__``). The unpickler
here resolves **exact** ``(module, name)`` pairs from a fixed table of inert objects (the tensor
and storage rebuilders torch's own ``weights_only`` loader trusts, dtypes, ``torch.Size``,
``OrderedDict``, ``set``...) and turns every other name into a fresh :class:`StandIn` class, so
the pickled module tree still yields its ``state_dict`` while no code of the file's choosing
runs. Dotted names are never followed (protocol 4 would walk ``a.b.c`` attribute by attribute:
``_rebuild_tensor.__builtins__`` reaches ``exec``), and nothing is imported.

Only the zip format that ``torch.save`` writes since torch 1.6 is read, and its members are
checked against their CRC-32 before torch's reader sees them (so a damaged file is an error, not
a partial load); the legacy raw-pickle and tar formats are refused. Every failure is a
:class:`CheckpointFileError` naming the file.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import os
import pickle
import stat
import zipfile
from typing import Any

import torch


class CheckpointFileError(ValueError):
    """A ``torch.save`` file that cannot be read safely: the message names the file."""


class StandIn(torch.nn.Module):
    """Whatever a checkpoint names outside the allowed table (the authors' classes, open_clip's,
    torch's own modules, transforms, functions): accepts any arguments, does nothing, and keeps
    the pickled attributes, so a module tree of stand-ins still has its parameters and buffers.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:       # (dict, slots)
            first, second = state
            state = {**(first if isinstance(first, dict) else {}),
                     **(second if isinstance(second, dict) else {})}
        if not isinstance(state, dict):
            return
        state = {k: v for k, v in state.items() if isinstance(k, str)}
        if "_parameters" in state:
            super().__setstate__(state)
        else:
            torch.nn.Module.__init__(self)
            self.__dict__.update({k: v for k, v in state.items() if k not in self.__dict__})


_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
               "_rebuild_parameter", "_rebuild_parameter_with_state")


@functools.cache
def allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a checkpoint may resolve to real objects: inert when called with any
    arguments (containers, shapes, devices, dtypes, storage types, torch's tensor rebuilders)."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice, ("builtins", "complex"): complex,
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    }
    for name in _REBUILDERS:
        if hasattr(torch._utils, name):
            table[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
        elif name.endswith("Storage") and isinstance(value, type):
            table[("torch", name)] = value
    return table


@functools.cache
def _stand_in(module: str, name: str) -> type:
    return type(name, (StandIn,), {"__module__": f"stand_in.{module}"})


class StandInUnpickler(pickle.Unpickler):
    """An unpickler whose globals are exact entries of :func:`allowed_globals` or stand-ins."""

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global's module and name must be strings")
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)     # protocol 2 names
        found = allowed_globals().get((module, name))
        return found if found is not None else _stand_in(module, name)


class _StandInPickle:
    """The ``pickle_module`` that ``torch.load`` uses for these files."""

    Unpickler = StandInUnpickler

    @staticmethod
    def load(file, **kwargs):
        return StandInUnpickler(file, **kwargs).load()


MAX_MEMBERS = 1 << 20


def check_archive(path: str) -> None:
    """Raise :class:`CheckpointFileError` unless ``path`` is a regular file in torch's zip
    format whose members are stored uncompressed (as torch writes them) and match their CRC-32.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointFileError(f"checkpoint {path} does not exist") from None
    except OSError as error:
        raise CheckpointFileError(f"checkpoint {path} cannot be read: {error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointFileError(f"checkpoint {path} is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not members or len(members) > MAX_MEMBERS:
                raise CheckpointFileError(f"checkpoint {path} has {len(members)} archive "
                                          "members: not a torch.save file")
            if not any(m.filename.endswith("/data.pkl") or m.filename == "data.pkl"
                       for m in members):
                raise CheckpointFileError(f"checkpoint {path} holds no data.pkl: not a "
                                          "torch.save file")
            for member in members:
                if member.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointFileError(
                        f"checkpoint {path}: member {member.filename!r} is compressed, which "
                        "torch.save never does")
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        raise CheckpointFileError(
            f"checkpoint {path} is not in torch.save's zip format (the legacy raw-pickle and "
            "tar formats of torch < 1.6 are not read: load and save it again with a current "
            "torch where its source is trusted)") from None
    except CheckpointFileError:
        raise
    except Exception as error:       # zipfile raises many kinds on a damaged directory
        raise CheckpointFileError(f"checkpoint {path} is damaged ({type(error).__name__}: "
                                  f"{error})") from None
    if damaged is not None:
        raise CheckpointFileError(f"checkpoint {path} is damaged: member {damaged!r} does not "
                                  "match its CRC-32")


def load_untrusted(path: str) -> Any:
    """The object a ``torch.save`` file holds, with every class outside the allowed table
    replaced by a stand-in; tensors on the CPU. Raises :class:`CheckpointFileError`."""
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_StandInPickle)
    except Exception as error:       # a damaged or hostile pickle: any error at all
        raise CheckpointFileError(f"checkpoint {path} is not a readable torch.save file "
                                  f"({type(error).__name__}: {error})") from None
