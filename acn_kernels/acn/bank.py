"""The code bank: one stored code per training example, and the pass's unique-neighbour rule.

:class:`CodeBank` implements steps 1-5 of the batch in docs/design.md ("The model"): write the
batch's fresh codes, then resolve one neighbour per query in batch order, with counter-based
picks, the end-of-pass fallback and chunking beyond ``MAX_K``: a masked_topk search per chunk and
the fused walk over its lists (:func:`~acn_kernels.ops.resolve_neighbours`). Its sharded form,
:class:`~acn_kernels.acn.distributed.DistributedCodeBank`, shares this construction and this
write, resolve and rollback; it overrides only the hooks that gather a batch over the ranks and
search every shard.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checks import FALLBACK, NEEDS_SEARCH, check_exclude_index, check_int, check_k
from ..ops import MAX_K, MaskedTopK, ResolvedNeighbours, masked_topk, resolve_neighbours
from . import rng

# Bits of a deferred argument error (CodeBank.raise_deferred_errors), in the order the
# immediate checks raise them.
_NONFINITE, _RANGE, _DUPLICATE = 1, 2, 4


def initial_codes(seed: int, rows: torch.Tensor, code_dim: int) -> torch.Tensor:
    """float32 [len(rows), code_dim] on rows' device: the N(0, 1) initial codes of bank rows ``rows`` (int64).

    Counter-based (:data:`acn_kernels.acn.rng.BANK_INIT`): row i's code depends only on (seed, i),
    so a bank sharded over any number of processes starts as the single-process one.
    """
    return rng.normal(seed, rng.BANK_INIT, 0, rows, code_dim, torch.float32)


def _type_name(x: object) -> str:
    """``numpy.ndarray`` for a numpy array, ``list`` for a list: what a type error says was given."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__qualname__}"


class Neighbours(NamedTuple):
    """Result of :meth:`CodeBank.neighbours` and :meth:`CodeBank.pick`: codes [B, D] (the picked
    rows' stored codes, in the bank's dtype, no gradient) and indices [B] int64 (which bank row
    each query picked), named as :class:`~acn_kernels.MaskedTopK`'s ``indices``."""

    codes: torch.Tensor
    indices: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        """:attr:`indices` under its former name (kept for code written against it)."""
        return self.indices


class PassOverrunWarning(UserWarning):
    """A batch asked for more picks than its pass has unused rows left: ``new_pass()`` was most
    likely not called after the previous pass (or an example was picked for twice in one pass).
    The picks beyond the pass fall back to ignoring the used mask, and without a new pass the
    counter-based picks repeat those of the pass before."""


class CodeBank(nn.Module):
    """Codes of every training example [N, D] and the rows used as neighbours in the current pass.

    Args (the integers may be Python, numpy or 0-dim integer tensors, not bools; a bad one raises
    TypeError or ValueError naming it):
        num_codes: N, the number of training examples (rows), at least 2.
        code_dim: D.
        k: K, how many nearest eligible rows each query draws its neighbour from (default 5).
        seed: seeds the initial codes and the counter-based neighbour picks
            (:mod:`acn_kernels.acn.rng`).
        max_search_k: the largest k of one :func:`~acn_kernels.masked_topk` call (default and
            maximum ``MAX_K``). A batch of G queries may need K + G - 1 candidates per query to
            be exact, so batches are resolved in chunks of ``max_search_k - k + 1`` queries.
        headroom: extra candidates searched per query beyond K (None, the default, means K; at
            least G - 1, e.g. ``MAX_K``, gives the worst-case width that never searches twice,
            K + G - 1). When a query loses more than ``headroom`` of its candidates to earlier
            queries of its chunk, it and the T - 1 later queries of the chunk are searched again
            in one more masked_topk call (K + T - 1 candidates, the chunk's earlier picks masked),
            so the result is the same whatever the headroom; a small one saves search work,
            because such losses are rare in a large bank.
        backend: passed to :func:`~acn_kernels.masked_topk` and
            :func:`~acn_kernels.ops.resolve_neighbours` (None = automatic dispatch; the walk has no
            Triton kernel and uses the automatic choice under "triton").
        device: where the buffers are allocated (default the CPU; ``.to()`` moves them later).
        shard: (start, end): this object stores only rows [start, end) of the bank, for a subclass
            whose searches span every shard (the DistributedCodeBank); None, the default, is the
            whole bank.
        capturable: fixed work per batch, for CUDA graphs and ``torch.compile``: one masked_topk
            call with K + B - 1 candidates (headroom B - 1, so no query is ever searched again)
            and one more for every query's end-of-pass fallback list, for batches of at most
            ``max_search_k - k + 1`` queries (one chunk). On a CUDA bank it then runs without a
            single host synchronisation (see "Checks" below).

    Buffers (moved by ``.to()``, saved by ``state_dict``): ``codes`` [end - start, D] float32, row
    i initialised by :func:`initial_codes` (N(0, 1), counter-based from ``seed``); ``used`` [N]
    bool. The pass index, the fallback count, K and the seed travel in the state_dict's extra
    state.

    Which rows query b may pick (docs/design.md, "The model"): not its own row, not used earlier in
    this pass, not taken by queries 0..b-1 of the batch. Its candidates are the K nearest such rows
    by (distance, row); with n_b of them (n_b <= K) it picks candidate floor(u_b * n_b), u_b the
    uniform of (seed, pass, index[b]). If n_b = 0 (only possible at the very end of a pass) the used
    mask is ignored for that query, its own row still excluded, and :attr:`fallbacks` counts it.
    Within a pass the neighbour map is then (barring a fallback) injective without fixed points.

    Checks: bad arguments raise ValueError/TypeError naming them, and a call that raises leaves
    the bank as it was. On a CPU bank every check is immediate. A CUDA bank checks the values
    (index range, duplicates, finite codes) on the device, without a host read: a bad call then
    writes nothing and takes nothing, and its error is raised with the same message by
    :meth:`raise_deferred_errors` at the next point that reads the bank's state on the host: at
    once by the same call unless it is ``capturable`` (it reads a count per chunk anyway),
    otherwise by the next :meth:`new_pass`, :attr:`fallbacks` or ``state_dict``.
    """

    codes: torch.Tensor
    used: torch.Tensor
    _fallback_count: torch.Tensor
    _deferred: torch.Tensor

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        k: int = 5,
        seed: int = 0,
        *,
        max_search_k: int = MAX_K,
        headroom: int | None = None,
        backend: str | None = None,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] | None = None,
        capturable: bool = False,
    ) -> None:
        super().__init__()
        num_codes, code_dim = check_int(num_codes, "num_codes"), check_int(code_dim, "code_dim")
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2 (a row cannot be its own neighbour), got {num_codes}")
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        k = check_k(k, MAX_K)
        max_search_k = check_int(max_search_k, "max_search_k")
        if not k <= max_search_k <= MAX_K:
            raise ValueError(f"max_search_k must lie in [k={k}, MAX_K={MAX_K}], got {max_search_k}")
        if headroom is not None:
            headroom = check_int(headroom, "headroom")
            if headroom < 0:
                raise ValueError(f"headroom must be >= 0 or None, got {headroom}")
        if shard is None:
            start, end = 0, num_codes
        elif not isinstance(shard, tuple | list) or len(shard) != 2:
            raise TypeError(f"shard must be a (start, end) pair or None, got {type(shard).__name__}")
        else:
            start, end = check_int(shard[0], "shard[0]"), check_int(shard[1], "shard[1]")
        if not 0 <= start <= end <= num_codes:
            raise ValueError(f"shard must be (start, end) with 0 <= start <= end <= num_codes={num_codes}, "
                             f"got {shard}")
        self.num_codes, self.code_dim, self.k, self.seed = num_codes, code_dim, k, check_int(seed, "seed")
        self.max_search_k = max_search_k
        self.headroom = self.k if headroom is None else headroom
        self.backend = backend
        self.start, self.end = start, end
        self.capturable = bool(capturable)
        self.pass_index = 0
        rows = torch.arange(self.start, self.end, device=device)
        self.register_buffer("codes", initial_codes(self.seed, rows, self.code_dim))
        self.register_buffer("used", torch.zeros(num_codes, dtype=torch.bool, device=device))
        # Counted on the device, so that a batch never waits for the host (read by `fallbacks`).
        self.register_buffer("_fallback_count", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        # The first deferred argument error: (bits, index min, index max); zeros when none.
        self.register_buffer("_deferred", torch.zeros(3, dtype=torch.int64, device=device), persistent=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, k: int = 5, seed: int = 0, **options: Any) -> CodeBank:
        """A bank holding existing codes [N, D] (floating point; e.g. an old checkpoint's bare
        ``codes`` tensor or another codebase's code memory), on their device.

        The codes are copied as float32 (the bank owns its rows); the used mask is empty and the
        pass index 0. ``seed`` drives the picks and the eps draws (the initial codes it would
        draw are replaced). ``options`` are the constructor's keywords (``max_search_k``,
        ``headroom``, ``backend``; ``group`` for a sharded bank, which keeps its rows of ``codes``).
        """
        if not isinstance(codes, torch.Tensor) or not codes.is_floating_point() or codes.dim() != 2:
            raise TypeError(f"codes must be a 2-D floating-point tensor [N, D], got "
                            f"{getattr(codes, 'dtype', type(codes))} with shape "
                            f"{tuple(getattr(codes, 'shape', ()))}")
        bank = cls(codes.shape[0], codes.shape[1], k, seed, device=codes.device, **options)
        bank.codes.copy_(codes.detach()[bank.start : bank.end])
        return bank

    # ---------------------------------------------------------------------------------------
    # State

    @property
    def fallbacks(self) -> int:
        """How many queries took the end-of-pass fallback since construction (one host read)."""
        self.raise_deferred_errors()
        return int(self._fallback_count)

    @fallbacks.setter
    def fallbacks(self, value: int) -> None:
        self._fallback_count.fill_(int(value))

    def get_extra_state(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "fallbacks": self.fallbacks, "k": self.k, "seed": self.seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if int(state["k"]) != self.k:
            raise ValueError(f"state_dict has k={state['k']} but this bank has k={self.k}")
        self.pass_index = int(state["pass_index"])
        self.fallbacks = int(state["fallbacks"])
        self.seed = int(state["seed"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A state without the extra state is a bare code tensor (a checkpoint from before the
        # bank had one, or another codebase's {"codes": ...}): entries it lacks (``used``, the
        # pass index, fallback count, K and seed) keep this bank's values instead of failing.
        if prefix + "codes" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict.setdefault(prefix + "used", self.used.clone())
            state_dict[prefix + "_extra_state"] = self.get_extra_state()
        codes = state_dict.get(prefix + "codes")
        if isinstance(codes, torch.Tensor) and codes.is_floating_point() and not bool(torch.isfinite(codes).all()):
            raise ValueError(f"{prefix}codes holds NaN or inf: a bank never stores a non-finite code")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def new_pass(self) -> None:
        """Start the next pass through the data: clear the used mask, advance the pass index
        (after raising any deferred argument error)."""
        self.raise_deferred_errors()
        self.used.zero_()
        self.pass_index += 1

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, k={self.k}, seed={self.seed}, "
                f"pass_index={self.pass_index}, backend={self.backend!r}, capturable={self.capturable}")

    @torch.no_grad()
    def full_codes(self) -> torch.Tensor | None:
        """The whole bank [N, D] (a sharded bank gathers it on rank 0 and returns None elsewhere)."""
        return self.codes

    # ---------------------------------------------------------------------------------------
    # Argument checks

    def _check(self, index: torch.Tensor, codes: torch.Tensor | None, *, finite: bool, values: bool = True) -> None:
        """The arguments' types, shapes and devices; with ``values`` also the index values (one
        host read on GPU), and with ``finite`` that the codes are finite as stored (another)."""
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {_type_name(index)}; use torch.as_tensor(index)")
        if index.dtype != torch.int64:
            raise TypeError(f"index must be an int64 tensor, got {index.dtype}; use index.long()")
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D [B], got shape {tuple(index.shape)}")
        if index.device != self.codes.device:
            raise ValueError(f"index is on {index.device} but the bank is on {self.codes.device}")
        if codes is not None:
            if not isinstance(codes, torch.Tensor):
                raise TypeError(f"codes must be a torch.Tensor, got {_type_name(codes)}; use torch.as_tensor(codes)")
            if not codes.is_floating_point():
                raise TypeError(f"codes must be a floating-point tensor, got {codes.dtype}")
            if codes.dim() != 2 or codes.shape[1] != self.code_dim:
                raise ValueError(
                    f"codes must have shape [B, code_dim={self.code_dim}], got {tuple(codes.shape)}"
                )
            if codes.shape[0] != index.shape[0]:
                raise ValueError(f"codes has {codes.shape[0]} rows but index has {index.shape[0]}")
            if codes.device != self.codes.device:
                raise ValueError(f"codes is on {codes.device} but the bank is on {self.codes.device}")
            if finite:
                # Checked as stored: a float64 code beyond float32's range becomes inf in the bank.
                bad = ~torch.isfinite(codes.detach().to(self.codes.dtype)).all(1)
                if bool(bad.any()):
                    raise ValueError(f"codes must be finite in the bank's dtype {self.codes.dtype}: row "
                                     f"{int(bad.nonzero()[0])} holds NaN or inf (a bank never stores a non-finite "
                                     "code)")
        if values and index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_codes:
                raise ValueError(
                    f"index values must lie in [0, num_codes={self.num_codes}), got min {lo}, max {hi}"
                )
            if torch.unique(index).numel() != index.numel():
                raise ValueError("index holds duplicate rows; each example may appear once per batch")

    def _check_search(self, codes: torch.Tensor, k: int, exclude_index: torch.Tensor | None) -> None:
        # Checked here, not only by masked_topk, because a sharded bank must know before its first
        # collective whether the call can run.
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != self.code_dim:
            raise ValueError(f"codes must have shape [B, code_dim={self.code_dim}], "
                             f"got {tuple(getattr(codes, 'shape', ()))}")
        check_k(k, self.num_codes)
        if exclude_index is not None:
            check_exclude_index(exclude_index, codes.shape[0], self.num_codes, codes.device)

    def _defers_checks(self) -> bool:
        """Whether :meth:`neighbours` checks the values on the device (a CUDA bank) rather than at
        once; a sharded bank overrides it, because its ranks agree on errors before they search."""
        return self.codes.is_cuda

    def _device_checks(self, index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """int64 [3] on the device, no host read: (error bits, index min, index max) of a batch."""
        if index.numel() == 0:
            return torch.zeros(3, dtype=torch.int64, device=index.device)
        lo, hi = torch.aminmax(index)
        s = torch.sort(index).values
        bits = (~torch.isfinite(codes).all()).long() * _NONFINITE \
            + ((lo < 0) | (hi >= self.num_codes)).long() * _RANGE + (s[1:] == s[:-1]).any().long() * _DUPLICATE
        return torch.stack([bits, lo, hi])

    def _value_error(self, bits: int, lo: int, hi: int) -> ValueError:
        """The immediate checks' error for the error bits of :meth:`_device_checks`."""
        if bits & _NONFINITE:
            return ValueError("codes must be finite (a NaN or inf code has no neighbours)")
        if bits & _RANGE:
            return ValueError(f"index values must lie in [0, num_codes={self.num_codes}), got min {lo}, max {hi}")
        return ValueError("index holds duplicate rows; each example may appear once per batch")

    def raise_deferred_errors(self) -> None:
        """Raise (once) the first argument error that a capturable CUDA bank's :meth:`neighbours`
        found on the device since the last call; one host read. Called by :meth:`new_pass`,
        :attr:`fallbacks` and ``state_dict``; a training loop calls it wherever it reads the
        device anyway (:func:`acn_kernels.acn.train.train` does at its logging, checkpoints,
        pass ends and end)."""
        bits, lo, hi = self._deferred.tolist()
        if bits:
            self._deferred.zero_()
            raise self._value_error(bits, lo, hi)

    @staticmethod
    def _error(check: Callable[[], None]) -> Exception | None:
        """The argument error ``check`` raises, if any, returned so that a sharded bank can tell
        its peers before raising it."""
        try:
            check()
        except (TypeError, ValueError) as e:
            return e
        return None

    # ---------------------------------------------------------------------------------------
    # Hooks: the global batch and the stored rows (a sharded bank overrides the first three)

    def _global_batch(
        self, error: Exception | None, index: torch.Tensor, codes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """(the global batch's index [G], its codes [G, D] float32 or None, where this caller's
        part of it lies). One process's batch is the global batch."""
        if error is not None:
            raise error
        return index, None if codes is None else codes.detach().to(self.codes.dtype), slice(0, index.shape[0])

    def _global_queries(
        self, error: Exception | None, codes: torch.Tensor, exclude_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """(the global queries [G, D] float32, their exclude_index [G] or None, this caller's part)."""
        if error is not None:
            raise error
        return codes.detach().to(self.codes.dtype), exclude_index, slice(0, codes.shape[0])

    def _search(
        self, queries: torch.Tensor, k: int, exclude_mask: torch.Tensor | None, exclude_index: torch.Tensor | None
    ) -> MaskedTopK:
        """The k nearest eligible rows of the whole bank (global rows), (distance, row) order."""
        # exclude_index is valid here: checked by search(), or the batch's own rows (checked, or
        # clamped into range on a bank that defers its checks).
        return masked_topk(queries, self.codes, k, exclude_mask=exclude_mask, exclude_index=exclude_index,
                           backend=self.backend, check_index=False)

    def _codes_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored codes [G, D] of global rows [G] (all stored here)."""
        return self.codes[rows]

    def _write(self, index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Store codes [G, D] into those of the global rows ``index`` [G] that this object holds;
        returns what they held before [G, D] (the new codes where another shard holds the row),
        which written back undoes the write."""
        if self.start == 0 and self.end == self.num_codes:
            mine, local = slice(None), index
        else:
            mine = (index >= self.start) & (index < self.end)
            local = index[mine] - self.start
        old = codes.clone()
        old[mine] = self.codes[local]
        self.codes[local] = codes[mine]
        return old

    # ---------------------------------------------------------------------------------------
    # Public operations

    def _warn_overrun(self, picks: int) -> None:
        """Warn (:class:`PassOverrunWarning`) when ``picks`` exceed the unused rows of the pass.

        In a pass that visits each example once, query j finds at most j rows used, so its batch
        never asks for more picks than there are unused rows: this cannot warn at the legitimate
        end-of-pass fallback. One host sync on GPU."""
        left = self.num_codes - int(self.used.sum())
        if picks > left:
            warnings.warn(
                f"CodeBank pass {self.pass_index}: {picks} picks asked but only {left} of {self.num_codes} "
                "rows are unused in this pass; call new_pass() after each pass through the data (picks "
                "beyond a pass ignore the used mask and repeat the previous pass's draws)",
                PassOverrunWarning, stacklevel=3)

    @torch.no_grad()
    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Write fresh codes [B, D] (detached, cast to float32) into rows ``index`` [B] int64.

        The same checks as :meth:`neighbours`: a code that is NaN or inf once cast to the bank's
        dtype (a float64 value beyond float32's range included) raises ValueError, and nothing
        is written. Nothing else changes; :meth:`pick` later resolves neighbours for rows written
        this way."""
        error = self._error(lambda: self._check(index, codes, finite=True))
        g_index, g_codes, _ = self._global_batch(error, index, codes)
        self._write(g_index, g_codes)

    @torch.no_grad()
    def search(
        self, codes: torch.Tensor, k: int | None = None, *, exclude_index: torch.Tensor | None = None
    ) -> MaskedTopK:
        """The k (default min(K, N)) nearest bank rows of each query [B, D], ignoring the used mask.

        Side-effect free: for evaluation and retrieval. ``exclude_index`` [B] int64 (or -1) skips
        one row per query. Returns :class:`~acn_kernels.MaskedTopK`: dists [B, k] float32, the
        **squared** Euclidean distances (take ``.sqrt()`` for distances), and indices [B, k] int64,
        the bank rows, ascending by (distance, row).
        """
        k = min(self.k, self.num_codes) if k is None else k
        error = self._error(lambda: self._check_search(codes, k, exclude_index))
        queries, exclude, mine = self._global_queries(error, codes, exclude_index)
        res = self._search(queries, k, None, exclude)
        return MaskedTopK(res.dists[mine], res.indices[mine])

    @torch.no_grad()
    def neighbours(self, index: torch.Tensor, codes: torch.Tensor) -> Neighbours:
        """Write the batch's fresh codes, then pick one neighbour per query in batch order.

        Args:
            index: [B] int64, distinct rows in [0, N): the batch's examples (at most
                ``max_search_k - k + 1`` of them on a capturable bank).
            codes: [B, D] floating point: their fresh codes (written detached, as float32), finite
                once cast to float32 (else ValueError).

        Returns:
            :class:`Neighbours` (codes [B, D] float32, indices [B] int64). The picked rows are
            marked used. A call that raises leaves the bank as it was (on a CUDA bank a bad call
            may raise later, see "Checks" in the class documentation, and changes nothing either).
            Warns (:class:`PassOverrunWarning`) when the batch asks for more picks than the pass
            has unused rows (``new_pass()`` forgotten; not checked on a CUDA bank, which reads
            nothing on the host). Equivalent to ``update(index, codes)`` then ``pick(index)``.
            Every other row being non-finite (only possible if ``codes`` was written directly: the
            bank's own writes refuse NaN and inf) leaves a query without a candidate: RuntimeError.
        """
        defer = self._defers_checks()

        def check() -> None:
            self._check(index, codes, finite=not defer, values=not defer)
            if self.capturable and index.shape[0] > self.max_search_k - self.k + 1:
                raise ValueError(f"a capturable bank resolves at most max_search_k - k + 1 = "
                                 f"{self.max_search_k - self.k + 1} queries per call, got {index.shape[0]}")

        g_index, g_codes, mine = self._global_batch(self._error(check), index, codes)
        err = None
        if not defer:
            self._warn_overrun(g_index.shape[0])
        if defer:
            err = self._device_checks(g_index, g_codes)
            # A bad batch must not index out of range nor change the bank: its rows are clamped
            # into range and rewritten with what they hold.
            g_index = g_index.clamp(0, self.num_codes - 1)
            g_codes = torch.where(err[0] != 0, self._codes_of(g_index), g_codes)
        old = self._write(g_index, g_codes)
        try:
            rows, used, fallbacks = self._resolve(g_index, g_codes, err)
        except BaseException:
            self._write(g_index, old)
            raise
        self.used.copy_(used)
        self._fallback_count += fallbacks
        if err is not None and self.capturable:
            self._deferred.copy_(torch.where(self._deferred[0] != 0, self._deferred, err))
        return Neighbours(self._codes_of(rows)[mine], rows[mine])

    @torch.no_grad()
    def pick(self, index: torch.Tensor) -> Neighbours:
        """Pick one neighbour per query in batch order for rows already written with :meth:`update`.

        The second half of :meth:`neighbours`, for codebases that write codes in one place and
        pick neighbours in another: the queries are the rows' *stored* codes (a row never
        written is its initial code), resolved under the same rule, draws and used mask, so
        ``update(index, codes); pick(index)`` equals ``neighbours(index, codes)``.

        Args:
            index: [B] int64, distinct rows in [0, N): the batch's examples.

        Returns:
            :class:`Neighbours` (codes [B, D] float32, indices [B] int64); the picked rows are
            marked used. Raises (bank unchanged) if a stored code of ``index`` is not finite; warns
            as :meth:`neighbours` when the pass is overrun.
        """
        error = self._error(lambda: self._check(index, None, finite=False))
        g_index, _, mine = self._global_batch(error, index, None)
        queries = self._codes_of(g_index)
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("the stored codes of index must be finite (update() wrote a NaN or inf code)")
        self._warn_overrun(g_index.shape[0])
        rows, used, fallbacks = self._resolve(g_index, queries)
        self.used.copy_(used)
        self._fallback_count += fallbacks
        return Neighbours(self._codes_of(rows)[mine], rows[mine])

    # ---------------------------------------------------------------------------------------
    # The batch order

    def _candidates(
        self, queries: torch.Tensor, k: int, exclude_mask: torch.Tensor | None, exclude_index: torch.Tensor
    ) -> torch.Tensor:
        """Row indices [G, k] of the k nearest eligible rows, (distance, row) order, -1 padded."""
        return self._search(queries, k, exclude_mask, exclude_index).indices

    @property
    def _walk_backend(self) -> str | None:
        # There is no Triton kernel of the walk: a Triton bank walks on the automatic choice.
        return None if self.backend == "triton" else self.backend

    def _walk(self, queries: torch.Tensor, index: torch.Tensor, u: torch.Tensor, headroom: int,
              used: torch.Tensor) -> ResolvedNeighbours:
        """The K + headroom candidates of each query (``used`` masked, own rows excluded), walked
        in batch order."""
        cand = self._candidates(queries, min(self.k + headroom, self.num_codes), used, index)
        return resolve_neighbours(cand, index, u, self.k, backend=self._walk_backend)

    def _resolve(
        self, index: torch.Tensor, queries: torch.Tensor, err: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """The picks [B] for queries ``index`` with codes ``queries`` [B, D] (already written), the
        new used mask, and the number of fallbacks (an int, or a device scalar on a capturable
        bank); nothing in the bank is modified. ``err``: the batch's :meth:`_device_checks` on a
        bank that defers them; a capturable bank then takes nothing for a bad batch, any other
        raises the error with the first count it reads. A sharded bank runs this identically on
        every rank over the global batch."""
        b, n, k = index.shape[0], self.num_codes, self.k
        used = self.used.clone()
        if b == 0:
            return index.clone(), used, 0
        u = rng.uniform(self.seed, rng.NEIGHBOUR, self.pass_index, index)
        if self.capturable:
            # One chunk with headroom B - 1: no query ever needs a wider search.
            cand = self._candidates(queries, min(k + b - 1, n), used, index)
            fallback = self._candidates(queries, min(k, n - 1), None, index)
            res = resolve_neighbours(cand, index, u, k, fallback=fallback, backend=self._walk_backend)
            taken, fell = res.taken, (res.status == FALLBACK).sum()
            if err is not None:
                ok = err[0] == 0
                taken, fell = torch.where(ok, taken, -1), torch.where(ok, fell, 0)
            _take(used, taken)
            return res.picks, used, fell
        rows = torch.full((b,), -1, dtype=torch.int64, device=index.device)
        status = torch.full((b,), -1, dtype=torch.int64, device=index.device)
        chunk = self.max_search_k - k + 1
        maybe_fallback = False
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            # Query q of the chunk loses at most q-s rows to earlier queries of the chunk, so
            # K + G - 1 candidates per query always suffice; fewer usually do (see headroom).
            res = self._walk(queries[s:e], index[s:e], u[s:e], min(e - s - 1, self.headroom), used)
            counts = torch.stack([(res.status == NEEDS_SEARCH).sum(), (res.status == FALLBACK).sum()])
            read = (counts if err is None or s > 0 else torch.cat([counts, err])).tolist()  # the one host read
            if len(read) > 2 and read[2]:
                raise self._value_error(*read[2:])
            searched, fell = read[:2]
            picks, taken, st = res
            if searched:
                # The walk stopped at query f of the chunk: search it and every later query again,
                # together, with the picks before f masked (K + T - 1 candidates for T queries).
                f = e - s - searched
                _take(used, taken[:f])
                again = self._walk(queries[s + f : e], index[s + f : e], u[s + f : e], searched - 1, used)
                picks, taken, st = torch.cat([picks[:f], again.picks]), again.taken, torch.cat([st[:f], again.status])
            _take(used, taken)
            rows[s:e], status[s:e] = picks, st
            maybe_fallback = maybe_fallback or fell > 0 or searched > 0
        if not maybe_fallback:
            return rows, used, 0
        pending = (status == FALLBACK).nonzero().flatten()
        if pending.numel():
            # Every row but its own is used (at most once per pass): its own row stays excluded,
            # and its pick, already used, cannot change what later queries may take. The walk over
            # empty candidate lists picks from the fallback lists.
            fallback = self._candidates(queries[pending], min(k, n - 1), None, index[pending])
            picks = resolve_neighbours(fallback[:, :0], index[pending], u[pending], k, fallback=fallback,
                                       backend=self._walk_backend).picks
            if bool((picks < 0).any()):  # update/neighbours/load_state_dict never store one: written directly
                q = int(pending[(picks < 0).nonzero()[0]])
                raise RuntimeError(f"query {q} of the batch (row {int(index[q])}) has no candidate: every "
                                   "other row of the bank holds a non-finite code")
            rows[pending] = picks
        return rows, used, pending.numel()


def _take(used: torch.Tensor, taken: torch.Tensor) -> None:
    """Mark the rows ``taken`` [G] int64 (-1: none) in ``used`` [N] bool, without a host read."""
    hit = torch.zeros(used.shape[0] + 1, dtype=torch.bool, device=used.device)
    hit[torch.where(taken >= 0, taken, used.shape[0])] = True
    used |= hit[:-1]


__all__ = ["CodeBank", "Neighbours", "PassOverrunWarning", "initial_codes"]
