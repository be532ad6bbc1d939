"""The CPU playing a CUDA device, so device placement is tested without a GPU.

Tensors moved to "cuda" are tagged; an operation mixing tagged and untagged tensors (0-d scalars
excepted, as torch allows) raises as a real device mismatch would; tensor factories given a
tagged tensor's device produce tagged tensors; ``.cpu()`` gives an untagged copy. Code that forgot
a device somewhere fails here the way it would on a GPU. Copies across devices that also cast
(which torch does on the CPU, through a temporary) are recorded in ``casting_crossings``.
"""

import weakref

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda")
CROSSING = {Tensor.copy_, Tensor.__setitem__}      # the operations that may cross devices


def _is_cuda(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cuda") or (
        isinstance(value, str) and value.startswith("cuda"))


class EmulatedDevice(TorchFunctionMode):
    """The CPU playing a CUDA device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._tags: dict[int, weakref.ref] = {}
        self.ops_on_device: set[str] = set()
        self.casting_crossings: list[tuple[str, torch.dtype, torch.dtype]] = []

    def on_device(self, t) -> bool:
        ref = self._tags.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._tags[id(t)] = weakref.ref(t)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:
            return func(*args, **kwargs)
        if func == Tensor.device.__get__:               # method-wrappers: compare, not `is`
            return CUDA if self.on_device(args[0]) else func(*args)
        if func == Tensor.is_cuda.__get__:
            return self.on_device(args[0])
        source = args[0] if args and isinstance(args[0], Tensor) else None
        wants_device = any(_is_cuda(v) for v in tree_flatten((args[1:], kwargs))[0])
        plain_args, plain_kwargs = tree_map(lambda v: "cpu" if _is_cuda(v) else v,
                                            (args, kwargs))
        if func is Tensor.cpu or (func is Tensor.to and source is not None and not wants_device
                                  and any(str(v) == "cpu" for v in
                                          tree_flatten((args[1:], kwargs))[0])):
            out = func(*plain_args, **plain_kwargs)
            return out.clone() if self.on_device(source) and out is source else out
        if func in (Tensor.to, Tensor.cuda) and wants_device | (func is Tensor.cuda):
            out = func(*plain_args, **plain_kwargs)
            if out is source and not self.on_device(source):
                out = out.clone()
            return self._tag(out)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        here = [t for t in tensors if self.on_device(t)]
        there = [t for t in tensors if not self.on_device(t) and t.dim() > 0]
        if here and there and func not in CROSSING:
            raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors to be "
                               "on the same device, found cuda and cpu")
        if here and there:                              # a copy across devices: does it cast?
            source = args[1] if func is Tensor.copy_ else args[2]
            if isinstance(source, Tensor) and source.dtype != args[0].dtype:
                self.casting_crossings.append((func.__name__, source.dtype, args[0].dtype))
        out = func(*plain_args, **plain_kwargs)
        if here and func not in CROSSING:
            self.ops_on_device.add(getattr(func, "__name__", str(func)))
            return self._tag(out)
        if wants_device:                                # a factory asked for the device
            return self._tag(out)
        return out
