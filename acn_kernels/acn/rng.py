"""Counter-based random draws: every number is a pure function of (seed, stream, pass, example index).

docs/design.md ("The model") requires that an example's draws (its neighbour pick u_b, its
reparameterisation noise eps, the pass order, its initial code) depend neither on the batch it
lands in nor on the process that handles it.
There is therefore no generator state to carry around: a draw is the SplitMix64 hash (Steele,
Lea and Flood, 2014) of its coordinates, computed with int64 tensor ops, which wrap modulo 2^64
identically on CPU and GPU. The float conversions use the top 53 bits, so uniforms are exact
float64 values in [0, 1) on every device.

Streams keep independent uses apart: :data:`NEIGHBOUR` (the pick among the candidates),
:data:`EPS` (eps in the loss), :data:`ORDER` (the pass's example order), and the held-out
evaluation streams :data:`EVAL_NEIGHBOUR` and :data:`EVAL_EPS`; :data:`BANK_INIT` initialises the
code bank's rows (:func:`acn_kernels.acn.bank.initial_codes`), sharded or not.
"""

from __future__ import annotations

import math

import torch

NEIGHBOUR = 1
EPS = 2
ORDER = 3
EVAL_NEIGHBOUR = 4
EVAL_EPS = 5
BANK_INIT = 6

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser on int64 tensors: a bijection of the 64-bit words."""
    x = (x ^ _srl(x, 30)) * _signed(_C1)
    x = (x ^ _srl(x, 27)) * _signed(_C2)
    return x ^ _srl(x, 31)


def mix_int(x: int) -> int:
    """:func:`mix` on a Python integer (the unsigned word), the reference the tests compare to."""
    x &= _M64
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def _key(seed: int, stream: int, pass_index: int) -> int:
    """One int64 word per (seed, stream, pass): chained hashing keeps the three apart."""
    h = mix_int((int(seed) & _M64) ^ ((stream * _GOLDEN) & _M64))
    return _signed(mix_int(h ^ (int(pass_index) & _M64)))


def hash_words(seed: int, stream: int, pass_index: int, index: torch.Tensor) -> torch.Tensor:
    """int64 [*index.shape]: the hash of (seed, stream, pass, index) for each example index."""
    if index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor, got {index.dtype}")
    return mix(index ^ _key(seed, stream, pass_index))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1) from the top 53 bits of each word (exact on every device)."""
    return _srl(h, 11).to(torch.float64) * (2.0**-53)


def uniform(seed: int, stream: int, pass_index: int, index: torch.Tensor) -> torch.Tensor:
    """float64 [B] in [0, 1): one uniform per example index [B] (int64)."""
    return _to_unit(hash_words(seed, stream, pass_index, index))


def normal(
    seed: int,
    stream: int,
    pass_index: int,
    index: torch.Tensor,
    dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws [B, dim] in ``dtype``, one row per example index [B] (int64).

    Box-Muller on two counter-based uniforms per element, computed in float64. Row b depends only
    on (seed, stream, pass_index, index[b]), never on the other rows.
    """
    base = hash_words(seed, stream, pass_index, index).unsqueeze(-1)
    j = torch.arange(dim, device=index.device, dtype=torch.int64)
    u1 = 1.0 - _to_unit(mix(base ^ (2 * j)))  # (0, 1]: log stays finite
    u2 = _to_unit(mix(base ^ (2 * j + 1)))
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)


def permutation(seed: int, pass_index: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [n]: the order in which pass ``pass_index`` visits the examples 0..n-1.

    The examples sorted by their hash; the hash is a bijection, so there are no ties.
    """
    return torch.argsort(hash_words(seed, ORDER, pass_index, torch.arange(n, device=device)))


__all__ = ["BANK_INIT", "EPS", "EVAL_EPS", "EVAL_NEIGHBOUR", "NEIGHBOUR", "ORDER", "hash_words", "mix", "mix_int",
           "normal", "permutation", "uniform"]
