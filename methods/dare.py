"""DARE (Yu et al., ICML 2024, "Language models are Super Mario"): drop and rescale task
vectors, then merge them with Task Arithmetic."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core.tensors import BlockBuffers
from harness.engine.method import hp, require
from harness.engine.templates import SharedMerge
from harness.methods.task_arithmetic import task_arithmetic


def key_generator(seed: int, task: str, key: str) -> torch.Generator:
    """A generator seeded from (seed, task, key): the same bits whatever the key order."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def drop_and_rescale(tau: Tensor, p: float, generator: torch.Generator,
                     buffers: BlockBuffers | None = None, name: str = "dropped") -> Tensor:
    """Drop each entry with probability ``p`` and scale the survivors by ``1 / (1 - p)``.

    The draws are made on the CPU (the same bits on any device); the keep mask is 1.0 / 0.0 in
    float32 (comparing into bool is several times slower on the CPU). The draws and the result
    (buffer ``name``) live in ``buffers``, valid until their next use, else in new tensors.
    """
    buffers = BlockBuffers() if buffers is None else buffers
    draws = buffers.view("draws", tau, device="cpu")
    keep = torch.ge(torch.rand(tau.shape, generator=generator, out=draws), p, out=draws)
    return torch.mul(tau, keep.to(tau.device), out=buffers.view(name, tau)).div_(1 - p)


@dataclass(frozen=True)
class Dare(SharedMerge):
    """DARE with rescaling, then Task Arithmetic: ``theta_0 + lam * sum_t DARE_p(tau_t)``.

    Random drops are seeded per (seed, task, key), so a seed fixes the result bit for bit,
    independent of the order in which a lazy checkpoint yields its keys. Large keys go through
    in row blocks that draw from their key's generators in row order, which gives the bits of
    one draw for the whole key (torch's CPU generator fills a tensor in sequence; a test pins
    this).
    """

    name = "dare"
    display_name = "DARE"
    family = "task vectors"
    year = 2024
    p: float = hp(0.5, "drop probability of each task-vector entry")
    lam: float = hp(0.3, "Task Arithmetic scaling coefficient")
    seed: int = hp(0, "random seed of the drop masks")

    def check(self):
        require(0 <= self.p < 1, self.name, "p", f"must be in [0, 1), got {self.p}")
        require(self.lam >= 0, self.name, "lam", f"must be >= 0, got {self.lam}")

    def rule(self, spec):
        buffers = BlockBuffers()

        @functools.lru_cache(maxsize=1)           # one key's generators, for all its blocks
        def generators(key):
            return [key_generator(self.seed, t, key) for t in spec.tasks]

        def merge_block(key, theta0, taus, out):
            dropped = [drop_and_rescale(tau, self.p, generator, buffers, f"dropped{row}")
                       for row, (generator, tau) in enumerate(zip(generators(key), taus))]
            return task_arithmetic(theta0, dropped, self.lam, out)
        return merge_block
