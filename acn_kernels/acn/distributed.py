"""A code bank sharded across the ranks of a torch.distributed process group, and what a
data-parallel training run does differently from one process (docs/distributed.md).

Built only on torch.distributed collectives (Gloo on CPUs, NCCL on GPUs):

- :class:`DistributedCodeBank`: a :class:`~acn_kernels.CodeBank` of which rank r stores rows
  [r*N//W, (r+1)*N//W). It shares CodeBank's construction (the same counter-based initial codes),
  its write, batch-order resolution and rollback, and overrides the hooks that gather the global
  batch (indices and fresh codes, rank order then position) and search every shard: each rank
  runs the fused :func:`~acn_kernels.masked_topk` over its shard for every query of the global
  batch, and the per-shard lists are all-gathered and merged by (distance, global row). Every
  rank resolves the same global batch identically, so the picks, the used mask (replicated, N
  bools per rank) and the fallback count are the same on every rank and equal one process's.
- :class:`PassSampler`: global batch t of pass p is slice t of
  :func:`acn_kernels.acn.rng.permutation`, split into contiguous slices by rank.
- :class:`DistributedRuntime`: the :class:`~acn_kernels.acn.train.Runtime` that
  :func:`acn_kernels.acn.train.train` (the one training loop) uses on every rank: DDP over the
  encoder, decoder and prior, this rank's slice of each global batch, agreement on failures and on
  the time budget, sums over the ranks, the whole bank gathered on rank 0 for checkpoints and
  held-out metrics, and rank-0-only writes.
- :func:`process_group`: the process group of a ``torchrun`` launch (``acn-train`` uses it when
  started by torchrun).

Failure handling: every collective step of the bank and of the loop begins with :func:`agree`,
an all-gather of one (failed, payload) pair per rank. A rank whose local work raised joins that
step with its flag set and re-raises its own error; the others raise :class:`PeerFailure` naming
it. No rank is left waiting in a collective that its peers will never enter (the process group's
timeout remains the backstop for errors raised inside a collective sequence).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..ops import MAX_K, MaskedTopK, masked_topk
from . import rng
from .bank import CodeBank
from .models import ACN, VAE
from .train import Runtime

_REPORTED = "_acn_reported_to_peers"


class PeerFailure(RuntimeError):
    """Raised on the healthy ranks when another rank of the group failed."""


class RunMismatch(ValueError):
    """Raised on every rank when the ranks of one run were started with different arguments,
    training data or resumed positions (:meth:`DistributedRuntime.begin`)."""


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def agree(
    error: BaseException | None = None,
    payload: int = 0,
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One collective step in which every rank of ``group`` reports whether its local work failed.

    Returns the ranks' payloads [W] int64 (on the CPU; ``device`` is where the collective runs:
    the CPU for Gloo, this rank's GPU for NCCL). If this rank's ``error`` is set it is re-raised
    (after the peers have been told); if another rank's is, raises :class:`PeerFailure`. An error
    already reported this way (a PeerFailure included) is re-raised without a new collective, so a
    caller may pass every error it catches.
    """
    if error is not None and getattr(error, _REPORTED, False):
        raise error
    rank, world = _world(group)
    mine = torch.tensor([int(error is not None), int(payload)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()
    if error is not None:
        setattr(error, _REPORTED, True)
        raise error
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        peer = PeerFailure(f"rank(s) {failed} of the process group raised an error (see their output); "
                           f"rank {rank} stops too")
        setattr(peer, _REPORTED, True)
        raise peer
    return table[:, 1]


def shard_range(num_codes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, end) that ``rank`` of ``world_size`` stores: contiguous, sizes differ by <= 1."""
    return rank * num_codes // world_size, (rank + 1) * num_codes // world_size


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch [G] (``torch.tensor_split``: sizes
    differ by at most one; in a short batch a rank may get none)."""
    return torch.tensor_split(batch, world_size)[rank]


class DistributedCodeBank(CodeBank):
    """A :class:`~acn_kernels.CodeBank` whose rows are sharded across a process group.

    Same arguments, results and state as CodeBank (plus ``group``, None = the default group),
    with these differences:

    - ``codes`` holds this rank's rows [end - start, D] (:attr:`start`, :attr:`end`, see
      :func:`shard_range`), initialised as the same rows of a CodeBank with this seed; ``used``
      [N] bool is replicated and identical on every rank.
    - :meth:`neighbours`, :meth:`update` and :meth:`search` take and return this rank's part of
      the global batch and are collective: every rank of the group calls them together (a rank
      with no examples passes empty tensors). The global batch is the ranks' parts in rank order.
    - ``state_dict()`` holds the shard; :meth:`full_codes` gathers the whole bank on rank 0, and
      ``load_state_dict`` accepts either the shard or the whole [N, D] bank (it keeps its rows),
      so single-process checkpoints load into a sharded bank and back.
    """

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
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        rank, world = _world(group)
        super().__init__(num_codes, code_dim, k, seed, max_search_k=max_search_k, headroom=headroom,
                         backend=backend, device=device, shard=shard_range(num_codes, rank, world))
        self.group, self.rank, self.world_size = group, rank, world

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows=[{self.start}, {self.end}) of rank {self.rank}/{self.world_size}"

    def agree(self, error: BaseException | None = None, payload: int = 0) -> torch.Tensor:
        """:func:`agree` over this bank's group, on its device."""
        return agree(error, payload, group=self.group, device=self.codes.device)

    # ---------------------------------------------------------------------------------------
    # CodeBank's hooks, made collective

    def _defers_checks(self) -> bool:
        # Every rank must know before the first collective whether a rank's arguments are bad.
        return False

    def _gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``t`` [sizes[r], ...] concatenated in rank order [sum(sizes), ...]."""
        most = max(sizes)
        if most == 0:
            return t.new_empty((0, *t.shape[1:]))
        padded = t.new_zeros((most, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    def _gather(
        self, error: Exception | None, first: torch.Tensor, second: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """Every rank's ``first`` [b, ...] and ``second`` [b, ...] (or None on every rank) in rank
        order, and where this rank's part lies; raises on every rank if any rank's ``error`` is set
        (then ``first`` and ``second`` are not read)."""
        sizes = self.agree(error, 0 if error is not None else first.shape[0]).tolist()
        lo = sum(sizes[: self.rank])
        return (self._gather_rows(first, sizes), None if second is None else self._gather_rows(second, sizes),
                slice(lo, lo + first.shape[0]))

    def _global_batch(
        self, error: Exception | None, index: torch.Tensor, codes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        g_codes = None if codes is None or error is not None else codes.detach().to(self.codes.dtype)
        g_index, g_codes, mine = self._gather(error, index, g_codes)
        # Every rank sees the same global batch, so every rank raises the same error together.
        if torch.unique(g_index).numel() != g_index.numel():
            raise ValueError("the global batch holds duplicate rows: the ranks' index slices overlap")
        return g_index, g_codes, mine

    def _global_queries(
        self, error: Exception | None, codes: torch.Tensor, exclude_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        queries = codes if error is not None else codes.detach().to(self.codes.dtype)
        return self._gather(error, queries, exclude_index)

    def _search(
        self, queries: torch.Tensor, k: int, exclude_mask: torch.Tensor | None, exclude_index: torch.Tensor | None
    ) -> MaskedTopK:
        """The k nearest eligible rows (global indices) among all shards, merged by (distance, row).

        Each rank searches min(k, its rows) and pads to k with (+inf, -1): masked_topk requires
        k <= rows. The ranks' lists, concatenated in rank order, hold ties in row order (shards
        are contiguous and ascending), so a stable sort by distance is the (distance, row) order;
        padding (+inf) sorts after every eligible pair (their distances are finite, at most
        FLT_MAX).
        """
        g = queries.shape[0]
        dists = torch.full((g, k), math.inf, dtype=torch.float32, device=queries.device)
        rows = torch.full((g, k), -1, dtype=torch.int64, device=queries.device)
        kk = min(k, self.end - self.start)
        if kk > 0 and g > 0:
            local_ex = None
            if exclude_index is not None:
                mine = (exclude_index >= self.start) & (exclude_index < self.end)
                local_ex = torch.where(mine, exclude_index - self.start, torch.full_like(exclude_index, -1))
            mask = None if exclude_mask is None else exclude_mask[self.start : self.end]
            res = masked_topk(queries, self.codes, kk, exclude_mask=mask, exclude_index=local_ex,
                              backend=self.backend)
            dists[:, :kk] = res.dists.to(torch.float32)
            rows[:, :kk] = torch.where(res.indices >= 0, res.indices + self.start, res.indices)
        all_d = [torch.empty_like(dists) for _ in range(self.world_size)]
        all_r = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(all_d, dists, group=self.group)
        dist.all_gather(all_r, rows, group=self.group)
        order = torch.sort(torch.cat(all_d, 1), dim=1, stable=True).indices[:, :k]
        return MaskedTopK(torch.cat(all_d, 1).gather(1, order), torch.cat(all_r, 1).gather(1, order))

    def _codes_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Each owner contributes its rows' codes; one all-reduce sums them into every code."""
        picked = self.codes.new_zeros((rows.shape[0], self.code_dim))
        mine = (rows >= self.start) & (rows < self.end)
        picked[mine] = self.codes[rows[mine] - self.start]
        dist.all_reduce(picked, group=self.group)
        return picked

    # ---------------------------------------------------------------------------------------
    # The whole bank

    @torch.no_grad()
    def full_codes(self, dst: int = 0) -> torch.Tensor | None:
        """Collective: the whole bank [N, D] on rank ``dst`` (None on the others)."""
        ranges = [shard_range(self.num_codes, r, self.world_size) for r in range(self.world_size)]
        padded = self.codes.new_zeros((max(e - s for s, e in ranges), self.code_dim))
        padded[: self.end - self.start] = self.codes
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, dst) if self.group else dst,
                    group=self.group)
        if parts is None:
            return None
        return torch.cat([p[: e - s] for p, (s, e) in zip(parts, ranges, strict=True)])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "codes"
        if key in state_dict and state_dict[key].shape[0] == self.num_codes != self.end - self.start:
            state_dict[key] = state_dict[key][self.start : self.end]
        super()._load_from_state_dict(state_dict, prefix, *args)


# ------------------------------------------------------------------------------------------------
# Sampling


class PassSampler:
    """This rank's examples of each global batch of a pass.

    Global batch t of pass p is ``rng.permutation(seed, p, n)[t*B : (t+1)*B]``, split by
    :func:`rank_slice` into ``world_size`` contiguous slices. Every example appears once per pass,
    in one rank's slice, and the global batches do not depend on the number of ranks.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        if n < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need n >= 1, batch_size >= 1, 0 <= rank < world_size; got n={n}, "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size

    def __len__(self) -> int:
        """Batches per pass."""
        return math.ceil(self.n / self.batch_size)

    def local(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch [G] int64."""
        return rank_slice(global_batch, self.rank, self.world_size)

    def batches(self, pass_index: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """This rank's index [b] int64 of each global batch of pass ``pass_index``, in order."""
        order = rng.permutation(self.seed, pass_index, self.n, device)
        for s in range(0, self.n, self.batch_size):
            yield self.local(order[s : s + self.batch_size])


# ------------------------------------------------------------------------------------------------
# Training


def shard_model(model: ACN, group: dist.ProcessGroup | None = None) -> ACN:
    """Replace ``model.bank`` (a CodeBank) by a :class:`DistributedCodeBank` with its settings
    and seed (so the same initial codes) on its device; returns the model."""
    b = model.bank
    model.bank = DistributedCodeBank(b.num_codes, b.code_dim, b.k, b.seed, max_search_k=b.max_search_k,
                                     headroom=b.headroom, backend=b.backend, group=group,
                                     device=b.codes.device)
    return model


class DistributedRuntime(Runtime):
    """The :class:`~acn_kernels.acn.train.Runtime` of a data-parallel run over ``group`` (None:
    the default group), its collectives on ``device`` (the CPU for Gloo, this rank's GPU for NCCL).

    Pass it to :func:`~acn_kernels.acn.train.train` on every rank, with the same arguments, after
    ``model = runtime.prepare(model)``. Global batches of ``config.batch_size`` are split by
    :func:`rank_slice` (as :class:`PassSampler` does); checkpoints and metrics (held-out terms on
    rank 0, over the gathered bank) are written by rank 0 in the single-process format plus
    ``world_size`` (``position`` holds the global order and offset, ``sums`` the global running
    sums), so a single process or another number of ranks can resume them. The ``minutes``
    budget is rank 0's clock.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group = group
        self.rank, self.world_size = _world(group)
        self.device = torch.device(device)
        self._whole: ACN | None = None  # rank 0's single-process view of the sharded model

    def prepare(self, model: ACN | VAE) -> ACN | VAE:
        """An ACN's bank becomes a :class:`DistributedCodeBank` (:func:`shard_model`)."""
        if isinstance(model, ACN) and not isinstance(model.bank, DistributedCodeBank):
            shard_model(model, self.group)
        return model

    def begin(self, fields: Callable[[], dict[str, str]]) -> None:
        """Collective, before any other: every rank's ``fields()`` (name -> short value), hashed to
        one int64 per field and all-gathered; a field that differs from rank 0's raises
        :class:`RunMismatch` on every rank, naming the fields, the ranks and this rank's values.
        Without it, ranks with another lr or batch size train silently wrong, and ranks with
        another K, data or budget abort inside a collective or wait for the timeout."""
        error, values = None, {}
        try:
            values = fields()
        except Exception as e:  # told to the peers first, then raised
            error = e
        counts = agree(error, len(values), group=self.group, device=self.device)
        if len(set(counts.tolist())) > 1:
            raise RunMismatch(f"the ranks compare {counts.tolist()} fields: they run different versions of acn-kernels")
        digests = torch.tensor([int.from_bytes(hashlib.sha256(f"{k}={v}".encode()).digest()[:8], "little",
                                               signed=True) for k, v in values.items()],
                               dtype=torch.int64, device=self.device)
        every = [torch.empty_like(digests) for _ in range(self.world_size)]
        dist.all_gather(every, digests, group=self.group)
        table = torch.stack(every).cpu()
        differ = (table != table[0]).any(0).tolist()
        if any(differ):
            names = [k for k, d in zip(values, differ, strict=True) if d]
            ranks = (table != table[0]).any(1).nonzero().flatten().tolist()
            mine = ", ".join(f"{k}={values[k]}" for k in names)
            raise RunMismatch(f"the ranks were started with different arguments or data: rank 0 and rank(s) "
                              f"{ranks} differ in {', '.join(names)} (on this rank, {self.rank}: {mine}); start "
                              "every rank with the same options, data and checkpoint")

    def wrap(self, model: ACN | VAE) -> nn.Module:
        if isinstance(model, ACN) and not isinstance(model.bank, DistributedCodeBank):
            raise TypeError(f"model.bank must be a DistributedCodeBank (see DistributedRuntime.prepare), "
                            f"got {type(model.bank).__name__}")
        if isinstance(model, ACN):
            # The shard differs between ranks and the used mask is already identical: DDP must not
            # broadcast rank 0's copies (at construction or in forward).
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [f"bank.{name}" for name, _ in model.bank.named_buffers()])
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       process_group=self.group)

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        return rank_slice(batch, self.rank, self.world_size)

    def agree(self, error: BaseException | None, late: bool) -> bool:
        return bool(agree(error, int(late), group=self.group, device=self.device)[0])

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        s = sums.to(self.device, copy=True)  # all_reduce works in place
        dist.all_reduce(s, group=self.group)
        return s.cpu()

    def whole(self, model: ACN | VAE) -> ACN | VAE | None:
        if not isinstance(model, ACN):
            return model if self.writes else None
        bank = model.bank
        full = bank.full_codes()
        if full is None:
            return None
        if self._whole is None or self._whole.encoder is not model.encoder:
            plain = CodeBank(bank.num_codes, bank.code_dim, bank.k, bank.seed, max_search_k=bank.max_search_k,
                             headroom=bank.headroom, backend=bank.backend, device=full.device)
            self._whole = ACN(model.encoder, model.decoder, model.prior, plain)
        self._whole.bank.load_state_dict({**bank.state_dict(), "codes": full})
        return self._whole


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[tuple[DistributedRuntime, str]]:
    """The process group of a ``torchrun`` launch (its environment variables: RANK, WORLD_SIZE,
    MASTER_ADDR, ...), destroyed on exit: yields the runtime and this rank's device.

    Gloo for a CPU ``device``, NCCL for ``"cuda"`` (rank r uses cuda:LOCAL_RANK). The timeout of
    the process group is ``ACN_DIST_TIMEOUT_S`` seconds (default 600). When the body returns,
    every rank waits in one barrier for the others (rank 0's writes included, so they must end
    within the timeout) before the group is destroyed; when it raises, the group is destroyed
    at once (:func:`agree` has already made every rank raise).
    """
    cuda = device.startswith("cuda")
    timeout = datetime.timedelta(seconds=float(os.environ.get("ACN_DIST_TIMEOUT_S", "600")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        yield DistributedRuntime(device=device), device
        # Why the barrier: DistributedDataParallel keeps references to the process group, so
        # destroy_process_group does not stop Gloo's threads, and each rank's interpreter shuts
        # down with them still running. Without the barrier a rank with nothing left to do (rank 1
        # while rank 0 writes the report) shut down and exited while its peer still used the group;
        # under load a CI run died there (SIGABRT, "terminate called without an active
        # exception"). With it the ranks leave together, after every rank's last collective and
        # rank 0's last write.
        dist.barrier(device_ids=[torch.device(device).index] if cuda else None)
    finally:
        dist.destroy_process_group()


__all__ = ["DistributedCodeBank", "DistributedRuntime", "PassSampler", "PeerFailure", "RunMismatch", "agree",
           "process_group", "rank_slice", "shard_model", "shard_range"]
