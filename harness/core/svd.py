"""Truncated SVDs of float32 matrices, as DTS and the SVD baseline store them: exact (LAPACK,
signs made canonical), through the float64 Gram matrix (whole or block by block, for matrices
too large to decompose at once), or by a seeded randomized range finder.

Pure tensor functions: what is decomposed comes in as a tensor, or as any object with a
``shape`` and a ``blocks()`` iterator of ``(index, float32 block)`` along its longer side (the
engine's ``BlockedDelta``), so that a matrix larger than memory is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor


class MatrixBlocks(Protocol):
    """A matrix read in blocks along its longer side: ``(index, float32 block)`` pairs, where
    ``index`` places the block (rows of a tall matrix; ``(slice(None), columns)`` of a wide
    one)."""

    shape: tuple[int, ...]

    def blocks(self) -> Iterator[tuple[object, Tensor]]: ...

_CHUNK_ENTRIES = 2**22   # entries per chunk of scans that would otherwise copy a whole tensor


SVD_SOLVERS = ("exact", "gram", "randomized")
RANDOMIZED_OVERSAMPLING = 10       # extra columns of the random test matrix (Halko et al. 2011)
RANDOMIZED_POWER_ITERATIONS = 1    # subspace iterations, each re-orthonormalized
RANDOMIZED_SEED = 0                # the test matrix's seed: the same factors on every run


def solver_info(solver: str) -> dict:
    """What a result records of an approximate solver (nothing for ``"exact"``): its name and
    settings, so a record says how its factors were found."""
    if solver == "exact":
        return {}
    settings = {"name": solver}
    if solver == "randomized":
        settings |= {"oversampling": RANDOMIZED_OVERSAMPLING,
                     "power_iterations": RANDOMIZED_POWER_ITERATIONS, "seed": RANDOMIZED_SEED}
    return {"svd_solver": settings}


def truncated_svd(delta: Tensor, rank: int, signs: str = "canonical"
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``rank`` SVD ``U_r, S_r, V_r`` of a float32 matrix (thin, never full U).

    ``signs="canonical"`` flips each pair so the largest-magnitude entry of ``u_i`` (the first
    on a tie) is positive (a wide matrix is decomposed through its transpose, which LAPACK
    does faster); ``"lapack"`` keeps the signs ``torch.linalg.svd(delta)`` returns.
    """
    if signs == "canonical" and delta.shape[0] < delta.shape[1]:
        # LAPACK is faster on tall matrices; the signs are normalized below anyway
        v, s, uh = torch.linalg.svd(delta.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
    if signs == "canonical":
        _canonical_signs(u, vh)
    return u.contiguous(), s.contiguous(), vh.contiguous()


def top_factors(delta: Tensor, rank: int, signs: str = "canonical",
                solver: str = "exact") -> tuple[Tensor, Tensor, Tensor] | None:
    """The top-``rank`` singular triplets of a float32 matrix in memory by ``solver``:
    ``"exact"`` :func:`truncated_svd` (with ``signs``), ``"gram"`` :func:`gram_truncated_svd`
    (None for a zero matrix: nothing to store), ``"randomized"``
    :func:`randomized_truncated_svd`; the approximate two always with canonical signs."""
    if solver == "gram":
        return gram_truncated_svd(delta, rank)
    if solver == "randomized":
        return randomized_truncated_svd(delta, rank)
    return truncated_svd(delta, rank, signs)


def _canonical_signs(u: Tensor, vh: Tensor) -> None:
    """Flip each pair in place so the largest-magnitude entry of ``u_i`` (the first on a tie)
    is positive; ``u`` is scanned in row chunks, never copied whole."""
    rank = u.shape[1]
    best = torch.full((rank,), -1.0, device=u.device)
    sign = torch.ones(rank, device=u.device)
    columns = torch.arange(rank, device=u.device)
    step = max(1, _CHUNK_ENTRIES // max(1, rank))
    for start in range(0, u.shape[0], step):
        chunk = u[start:start + step]
        value = chunk[chunk.abs().argmax(dim=0), columns]
        better = value.abs() > best
        best = torch.where(better, value.abs(), best)
        sign = torch.where(better, torch.sign(value), sign)
    flip = torch.where(sign == 0, 1.0, sign)
    u.mul_(flip)
    vh.mul_(flip[:, None])


def blocked_truncated_svd(delta: MatrixBlocks, rank: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top-``rank`` SVD, canonical signs, of a matrix read in blocks along its longer side;
    None when the matrix is zero or ``rank`` is 0. The matrix is never held whole.

    The shorter side's singular vectors are the top eigenvectors of the float64 Gram matrix
    (the sum of ``B^T B`` over blocks ``B``); a second read gives the longer side's as ``B V``
    normalized, and S as their norms. In float64 this is at least as accurate as a float32
    LAPACK SVD for singular values within a factor 1e9 of the largest. Memory: the Gram matrix
    (shorter side squared, float64) and the longer side's float32 factor.
    """
    if rank == 0:
        return None
    m, n = delta.shape
    wide = m < n
    orient = (lambda block: block.T) if wide else (lambda block: block)
    gram = None
    for _, block in delta.blocks():
        b = orient(block).to(torch.float64)
        gram = b.T @ b if gram is None else gram.addmm_(b.T, b)
    if gram is None or not bool(gram.any()):
        return None
    small = torch.linalg.eigh(gram).eigenvectors[:, -rank:].flip(1)   # largest first
    del gram
    long = max(m, n)
    big = torch.empty((rank, long) if wide else (long, rank), dtype=torch.float32,
                      device=small.device)
    squares = torch.zeros(rank, dtype=torch.float64, device=small.device)
    for index, block in delta.blocks():
        projected = orient(block).to(torch.float64) @ small
        squares += projected.square().sum(dim=0)
        if wide:
            big[:, index[1]] = projected.T
        else:
            big[index] = projected
    norms = squares.sqrt()
    inverse = torch.where(norms > 0, 1 / norms, 0.0).to(torch.float32)
    big.mul_(inverse[:, None] if wide else inverse)
    small = small.to(torch.float32)
    u, vh = (small.contiguous(), big) if wide else (big, small.T.contiguous())
    _canonical_signs(u, vh)
    return u, norms.to(torch.float32), vh


class _WholeMatrix:
    """A matrix in memory seen as one block, so the Gram route of the blocked SVD applies."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix, self.shape = matrix, tuple(matrix.shape)

    def blocks(self):
        wide = self.shape[0] < self.shape[1]
        yield ((slice(None), slice(None)) if wide else slice(None)), self.matrix


def gram_truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top-``rank`` SVD, canonical signs, of a matrix in memory through the float64 Gram matrix
    of its shorter side (what :func:`blocked_truncated_svd` does block by block): one product
    and a symmetric eigen-decomposition instead of LAPACK's SVD. None when the matrix is zero
    or ``rank`` is 0. As accurate as float32 LAPACK for singular values within 1e9 of the
    largest (the Gram matrix squares the condition number, float64 absorbs it)."""
    return blocked_truncated_svd(_WholeMatrix(delta), rank)


def randomized_truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD, canonical signs, by a randomized range finder (Halko, Martinsson and
    Tropp 2011, algorithms 4.4 and 5.1): ``rank + RANDOMIZED_OVERSAMPLING`` Gaussian probes,
    ``RANDOMIZED_POWER_ITERATIONS`` subspace iterations re-orthonormalized after each product,
    then the small projected matrix ``B = Q^T A`` decomposed through the eigenvectors of the
    float64 ``B B^T``.

    Hand-written rather than ``torch.svd_lowrank``, for two reasons: the probes come from a
    generator seeded with ``RANDOMIZED_SEED`` (svd_lowrank draws from the global random state,
    so two runs would store different factors), and the orthonormalizations are Cholesky QR in
    float64 (products of the float32 matrix, then a small Cholesky factor; Householder QR,
    which svd_lowrank uses, costs several times more at these ranks). A probe block that is
    numerically rank-deficient (an exactly low-rank delta) falls back to Householder QR."""
    m, n = delta.shape
    if rank == 0:
        zero = delta.new_zeros
        return zero((m, 0)), zero(0), zero((0, n))
    probes = min(rank + RANDOMIZED_OVERSAMPLING, m, n)
    generator = torch.Generator(device=delta.device).manual_seed(RANDOMIZED_SEED)
    test = torch.randn((n, probes), generator=generator, device=delta.device,
                       dtype=delta.dtype)
    basis = _orthonormal_columns(delta @ test)
    for _ in range(RANDOMIZED_POWER_ITERATIONS):
        basis = _orthonormal_columns(delta @ _orthonormal_columns(delta.T @ basis))
    small = basis.T @ delta                                    # probes x n
    values, vectors = torch.linalg.eigh(small.to(torch.float64) @ small.T.to(torch.float64))
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]   # largest first
    s = values.clamp(min=0).sqrt()
    # directions whose singular value is lost in rounding carry nothing: zero, not noise
    kept = s > s[0] * 1e-7 if rank else s > 0
    inverse = torch.where(kept, 1 / torch.where(kept, s, 1.0), 0.0)
    vh = ((vectors.T @ small.to(torch.float64)) * inverse[:, None]).to(torch.float32)
    u = (basis @ vectors.to(torch.float32)).contiguous()
    s = torch.where(kept, s, 0.0).to(torch.float32)
    _canonical_signs(u, vh)
    return u, s.contiguous(), vh.contiguous()


def _orthonormal_columns(y: Tensor) -> Tensor:
    """An orthonormal basis of ``y``'s columns: Cholesky QR (the Gram matrix in float64), or
    Householder QR when that Gram matrix is not numerically positive definite."""
    y64 = y.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(y64.T @ y64)
    if int(info) != 0:
        return torch.linalg.qr(y).Q
    return torch.linalg.solve_triangular(factor, y64.T, upper=False).T.to(y.dtype)
