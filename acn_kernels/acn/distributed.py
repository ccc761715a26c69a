"""A code bank sharded across the ranks of a torch.distributed process group, and data-parallel training.

Built only on torch.distributed collectives (Gloo on CPUs, NCCL on GPUs); see docs/distributed.md.

- :class:`DistributedCodeBank`: rank r stores rows [r*N//W, (r+1)*N//W) of the N x D bank. A
  batch all-gathers the global batch (indices and fresh codes, rank order then position), every
  rank writes the rows it owns, searches its shard for every query of the global batch with the
  fused :func:`~acn_kernels.masked_topk` and the per-shard lists are all-gathered and merged by
  (distance, global row). The batch-order resolution is :class:`~acn_kernels.CodeBank`'s own,
  run identically on every rank over the global batch, so the picks, the used mask (replicated,
  N bools per rank) and the fallback count are the same on every rank and equal one process's.
- :class:`PassSampler`: global batch t of pass p is slice t of :func:`acn_kernels.acn.rng.permutation`,
  split into contiguous slices by rank.
- :func:`train_distributed` and the command ``torchrun --nproc-per-node W -m acn_kernels.acn.distributed``:
  DistributedDataParallel over the encoder, decoder and prior, the sharded bank, checkpoints
  holding the whole bank (gathered on rank 0, the single-process format).

Failure handling: every collective step of the bank begins with :meth:`DistributedCodeBank.agree`,
an all-gather of one (failed, payload) pair per rank. A rank whose local work raised joins that
step with its flag set and re-raises its own error; the others raise :class:`PeerFailure` naming
it. No rank is left waiting in a collective that its peers will never enter (the process group's
timeout remains the backstop for errors raised inside a collective sequence).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..ops import MAX_K, MaskedTopK, masked_topk
from . import rng
from .bank import CodeBank, Neighbours
from .models import ACN

_REPORTED = "_acn_reported_to_peers"


class PeerFailure(RuntimeError):
    """Raised on the healthy ranks when another rank of the group failed."""


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(num_codes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, end) that ``rank`` of ``world_size`` stores: contiguous, sizes differ by <= 1."""
    return rank * num_codes // world_size, (rank + 1) * num_codes // world_size


def initial_codes(seed: int, rows: torch.Tensor, code_dim: int) -> torch.Tensor:
    """float32 [len(rows), code_dim]: the N(0, 1) initial codes of bank rows ``rows`` (int64).

    Counter-based (:data:`acn_kernels.acn.rng.BANK_INIT`): row i's code depends only on (seed, i), so
    each rank draws its own shard, whatever the number of ranks. (A single-process
    :class:`~acn_kernels.CodeBank` draws torch.randn instead; copy these into it to compare.)
    """
    return rng.normal(seed, rng.BANK_INIT, 0, rows, code_dim, torch.float32)


class DistributedCodeBank(CodeBank):
    """A :class:`~acn_kernels.CodeBank` whose rows are sharded across a process group.

    Same arguments, results and state as CodeBank (plus ``group``, None = the default group),
    with these differences:

    - ``codes`` holds this rank's rows [end - start, D] (:attr:`start`, :attr:`end`, see
      :func:`shard_range`), initialised by :func:`initial_codes`; ``used`` [N] bool is replicated
      and identical on every rank.
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
        nn.Module.__init__(self)  # CodeBank.__init__ would allocate the whole bank
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2 (a row cannot be its own neighbour), got {num_codes}")
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must lie in [1, MAX_K={MAX_K}], got {k}")
        if not k <= max_search_k <= MAX_K:
            raise ValueError(f"max_search_k must lie in [k={k}, MAX_K={MAX_K}], got {max_search_k}")
        if headroom is not None and headroom < 0:
            raise ValueError(f"headroom must be >= 0 or None, got {headroom}")
        self.num_codes, self.code_dim, self.k, self.seed = int(num_codes), int(code_dim), int(k), int(seed)
        self.max_search_k = int(max_search_k)
        self.headroom = self.k if headroom is None else int(headroom)
        self.backend = backend
        self.pass_index = 0
        self.fallbacks = 0
        self.group = group
        self.rank, self.world_size = _world(group)
        self.start, self.end = shard_range(self.num_codes, self.rank, self.world_size)
        rows = torch.arange(self.start, self.end, device=device)
        self.register_buffer("codes", initial_codes(self.seed, rows, self.code_dim))
        self.register_buffer("used", torch.zeros(num_codes, dtype=torch.bool, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows=[{self.start}, {self.end}) of rank {self.rank}/{self.world_size}"

    # ---------------------------------------------------------------------------------------
    # Collectives

    def agree(self, error: BaseException | None = None, payload: int = 0) -> torch.Tensor:
        """One collective step in which every rank reports whether its local work failed.

        Returns the ranks' payloads [W] int64 (on the CPU). If this rank's ``error`` is set it
        is re-raised (after the peers have been told); if another rank's is, raises
        :class:`PeerFailure`. An error already reported this way is re-raised without a new
        collective, so a caller may pass every error it catches.
        """
        if error is not None and getattr(error, _REPORTED, False):
            raise error
        mine = torch.tensor([int(error is not None), int(payload)], dtype=torch.int64, device=self.codes.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.group)
        table = torch.stack(every).cpu()
        if error is not None:
            setattr(error, _REPORTED, True)
            raise error
        failed = table[:, 0].nonzero().flatten().tolist()
        if failed:
            raise PeerFailure(f"rank(s) {failed} of the process group raised an error (see their output); "
                              f"rank {self.rank} stops too")
        return table[:, 1]

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

    def _global_batch(
        self, index: torch.Tensor, codes: torch.Tensor | None, error: BaseException | None
    ) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """(sizes per rank, global index [G], global codes [G, D] float32 or None)."""
        sizes = self.agree(error, index.numel() if error is None else 0).tolist()
        g_index = self._gather_rows(index, sizes)
        g_codes = None if codes is None else self._gather_rows(codes.detach().to(self.codes.dtype), sizes)
        return sizes, g_index, g_codes

    def _search_shard(
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

    def _candidates(
        self, queries: torch.Tensor, k: int, exclude_mask: torch.Tensor | None, exclude_index: torch.Tensor
    ) -> torch.Tensor:
        """CodeBank's hook, made collective: rows [G, k] over every shard, -1 padded."""
        return self._search_shard(queries, k, exclude_mask, exclude_index).indices

    def _owned(self, g_index: torch.Tensor) -> torch.Tensor:
        return (g_index >= self.start) & (g_index < self.end)

    # ---------------------------------------------------------------------------------------
    # Public operations (collective)

    def _local_errors(self, index: torch.Tensor, codes: torch.Tensor | None, finite: bool) -> BaseException | None:
        try:
            self._check(index, codes)
            if finite and codes is not None and not bool(torch.isfinite(codes).all()):
                raise ValueError("codes must be finite (a NaN or inf code has no neighbours)")
        except (TypeError, ValueError) as e:
            return e
        return None

    def _check_global(self, g_index: torch.Tensor) -> None:
        # Every rank sees the same global batch, so every rank raises the same error together.
        if torch.unique(g_index).numel() != g_index.numel():
            raise ValueError("the global batch holds duplicate rows: the ranks' index slices overlap")

    @torch.no_grad()
    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Collective: write every rank's fresh codes into the rows their owners store."""
        sizes, g_index, g_codes = self._global_batch(index, codes, self._local_errors(index, codes, False))
        self._check_global(g_index)
        own = self._owned(g_index)
        self.codes[g_index[own] - self.start] = g_codes[own]

    @torch.no_grad()
    def search(
        self, codes: torch.Tensor, k: int | None = None, *, exclude_index: torch.Tensor | None = None
    ) -> MaskedTopK:
        """Collective: the k (default min(K, N)) nearest rows of the whole bank for this rank's
        queries [B, D] (used mask ignored); rows are global. See :meth:`CodeBank.search`."""
        error = None
        k = min(self.k, self.num_codes) if k is None else k
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != self.code_dim:
            error = ValueError(f"codes must have shape [B, code_dim={self.code_dim}], "
                               f"got {tuple(getattr(codes, 'shape', ()))}")
        elif not 1 <= k <= min(self.num_codes, MAX_K):
            error = ValueError(f"k must lie in [1, min(N={self.num_codes}, MAX_K={MAX_K})], got {k}")
        elif exclude_index is not None and (exclude_index.shape != codes.shape[:1]
                                            or exclude_index.dtype != torch.int64):
            error = ValueError(f"exclude_index must be int64 [B={codes.shape[0]}], got {exclude_index.dtype} "
                               f"{tuple(exclude_index.shape)}")
        elif exclude_index is not None and exclude_index.numel() and not (
                -1 <= int(exclude_index.min()) and int(exclude_index.max()) < self.num_codes):
            error = ValueError(f"exclude_index values must lie in [-1, num_codes={self.num_codes})")
        sizes = self.agree(error, codes.shape[0] if error is None else 0).tolist()
        queries = self._gather_rows(codes.detach().to(self.codes.dtype), sizes)
        ex = None
        if exclude_index is not None:
            ex = self._gather_rows(exclude_index, sizes)
        res = self._search_shard(queries, k, None, ex)
        lo = sum(sizes[: self.rank])
        return MaskedTopK(res.dists[lo : lo + codes.shape[0]], res.indices[lo : lo + codes.shape[0]])

    @torch.no_grad()
    def neighbours(self, index: torch.Tensor, codes: torch.Tensor) -> Neighbours:
        """Collective: write the global batch's codes, then pick one neighbour per query of the
        global batch in batch order (ranks in order, then position), exactly as one
        :class:`CodeBank` would for the concatenated batch.

        Args: this rank's index [B] int64 and codes [B, D] (B may be 0).
        Returns: :class:`Neighbours` for this rank's queries (codes [B, D] float32, rows [B]
        global). A call that raises leaves every rank's shard as it was.
        """
        error = self._local_errors(index, codes, True)
        sizes, g_index, g_codes = self._global_batch(index, codes, error)
        self._check_global(g_index)
        own = self._owned(g_index)
        local_rows = g_index[own] - self.start
        old = self.codes[local_rows].clone()
        self.codes[local_rows] = g_codes[own]
        try:
            rows, used, fallbacks = self._resolve(g_index, g_codes)
        except BaseException:
            self.codes[local_rows] = old
            raise
        self.used.copy_(used)
        self.fallbacks += fallbacks
        # Each owner contributes its picked rows' codes; the sum is every picked code.
        picked = torch.zeros_like(g_codes)
        mine = self._owned(rows)
        picked[mine] = self.codes[rows[mine] - self.start]
        dist.all_reduce(picked, group=self.group)
        lo = sum(sizes[: self.rank])
        return Neighbours(picked[lo : lo + index.numel()], rows[lo : lo + index.numel()])

    @torch.no_grad()
    def full_codes(self, dst: int = 0) -> torch.Tensor | None:
        """Collective: the whole bank [N, D] on rank ``dst`` (None on the others)."""
        most = max(e - s for s, e in (shard_range(self.num_codes, r, self.world_size)
                                      for r in range(self.world_size)))
        padded = self.codes.new_zeros((most, self.code_dim))
        padded[: self.end - self.start] = self.codes
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, dst) if self.group else dst,
                    group=self.group)
        if parts is None:
            return None
        return torch.cat([p[: e - s] for p, (s, e) in
                          zip(parts, (shard_range(self.num_codes, r, self.world_size)
                                      for r in range(self.world_size)), strict=True)])

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
    ``torch.tensor_split`` into ``world_size`` contiguous slices (sizes differ by at most one;
    in a short last batch a rank may get none). Every example appears once per pass, in one
    rank's slice, and the global batches do not depend on the number of ranks.
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
        return torch.tensor_split(global_batch, self.world_size)[self.rank]

    def batches(self, pass_index: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """This rank's index [b] int64 of each global batch of pass ``pass_index``, in order."""
        order = rng.permutation(self.seed, pass_index, self.n, device)
        for s in range(0, self.n, self.batch_size):
            yield self.local(order[s : s + self.batch_size])


# ------------------------------------------------------------------------------------------------
# Training


def shard_model(model: ACN, group: dist.ProcessGroup | None = None) -> ACN:
    """Replace ``model.bank`` (a CodeBank) by a :class:`DistributedCodeBank` with its settings,
    its rows initialised by :func:`initial_codes`; returns the model."""
    b = model.bank
    model.bank = DistributedCodeBank(b.num_codes, b.code_dim, b.k, b.seed, max_search_k=b.max_search_k,
                                     headroom=b.headroom, backend=b.backend, group=group,
                                     device=b.codes.device)
    return model


def full_state_dict(model: ACN) -> dict[str, torch.Tensor] | None:
    """Collective: the model's state_dict with the whole bank on rank 0 (None elsewhere), in
    the single-process format (a plain :class:`~acn_kernels.ACN` loads it)."""
    return _with_codes(model, model.bank.full_codes())


def _with_codes(model: ACN, full: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """model.state_dict() with the gathered bank ``full`` (None: on ranks other than 0)."""
    if full is None:
        return None
    state = model.state_dict()
    state["bank.codes"] = full
    return state


def _plain_model(model: ACN, codes: torch.Tensor) -> ACN:
    """A single-process ACN sharing ``model``'s networks, over a CodeBank holding ``codes``."""
    b = model.bank
    bank = CodeBank(b.num_codes, b.code_dim, b.k, b.seed, max_search_k=b.max_search_k, headroom=b.headroom,
                    backend=b.backend).to(codes.device)
    bank.codes.copy_(codes)
    bank.used.copy_(b.used)
    bank.pass_index, bank.fallbacks = b.pass_index, b.fallbacks
    return ACN(model.encoder, model.decoder, model.prior, bank)


def train_distributed(
    model: ACN,
    data: Any,
    config: Any,
    out_dir: str | None = None,
    *,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Data-parallel :func:`acn_kernels.acn.train.train`: call it on every rank, same arguments.

    ``model`` is an ACN whose bank is a :class:`DistributedCodeBank` (see :func:`shard_model`),
    on ``config.device``; its networks are wrapped in DistributedDataParallel. Global batches of
    ``config.batch_size`` come from :class:`PassSampler`; each rank's loss is its local sum
    divided by the global batch size, times the number of ranks, so DDP's averaged gradients are
    those of the global batch's mean loss (one process's). Checkpoints and metrics (held-out
    terms on rank 0, over the gathered bank) are written by rank 0 in the single-process format
    (``position`` holds the global order and offset, ``sums`` the global running sums), so
    :func:`acn_kernels.acn.train.load_checkpoint` reads them and ``resume`` continues them. The
    ``minutes`` budget is rank 0's clock. Returns the per-pass metrics (the held-out ones on
    rank 0 only).
    """
    from tqdm.auto import tqdm

    from .checkpoint import CHECKPOINT, FORMAT_VERSION, atomic_save, atomic_write_text
    from .evaluate import heldout_terms
    from .train import _Position, plot_history

    bank = model.bank
    if not isinstance(bank, DistributedCodeBank):
        raise TypeError(f"model.bank must be a DistributedCodeBank (see shard_model), got {type(bank).__name__}")
    rank, world = bank.rank, bank.world_size
    device = torch.device(config.device)
    x = data.train_x.to(device)
    n = x.shape[0]
    sampler = PassSampler(n, config.batch_size, config.seed, rank, world)
    # The shard differs between ranks and the used mask is already identical: DDP must not
    # broadcast rank 0's copies (at construction or in forward).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [f"bank.{name}" for name, _ in bank.named_buffers()])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=bank.group)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    if resume is None:
        pos = _Position(model.pass_index, rng.permutation(config.seed, model.pass_index, n, device))
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        p = resume["position"]
        # Rank 0 carries the checkpoint's global sums; the others start their share at zero.
        sums = p["sums"].clone() if rank == 0 else torch.zeros(4, dtype=torch.float64)
        pos = _Position(p["pass_index"], p["order"].to(device), p["offset"], p["step"], sums, p["elapsed"])
        history = list(resume["history"])
    if out_dir is not None and rank == 0:
        os.makedirs(out_dir, exist_ok=True)

    def global_sums() -> torch.Tensor:
        s = pos.sums.to(device, copy=True)  # all_reduce works in place
        dist.all_reduce(s, group=bank.group)
        return s.cpu()

    def save(full: torch.Tensor | None = None, gathered: bool = False) -> None:
        """Collective; ``gathered``: ``full`` already holds bank.full_codes() (None off rank 0)."""
        if not gathered:
            full = bank.full_codes()
        sums = global_sums()
        if rank == 0 and out_dir is not None:
            state = _with_codes(model, full)
            atomic_save({
                "format_version": FORMAT_VERSION,
                "config": dataclasses.asdict(config),
                "model": state,
                "optimizer": opt.state_dict(),
                "position": {"pass_index": pos.pass_index, "order": pos.order.cpu(), "offset": pos.offset,
                             "step": pos.step, "sums": sums, "elapsed": pos.elapsed},
                "rng": {"seed": config.seed, "torch": torch.get_rng_state()},
                "history": history,
                "world_size": world,
            }, os.path.join(out_dir, CHECKPOINT))

    start, elapsed0 = time.monotonic(), pos.elapsed

    def out_of_steps() -> bool:
        return ((config.epochs is not None and len(history) >= config.epochs)
                or (config.steps is not None and pos.step >= config.steps))

    total = config.steps
    if config.epochs is not None:
        total = min(total or 1 << 62, config.epochs * len(sampler))
    bar = tqdm(total=total, initial=pos.step, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    saved_at = pos.step
    model.train()
    time_up = False
    while not (time_up or out_of_steps()):
        g_idx = pos.order[pos.offset : pos.offset + config.batch_size]
        idx = sampler.local(g_idx)
        error, loss = None, None
        try:
            terms = ddp(x[idx], idx)
            loss = terms.loss.sum() * (world / g_idx.numel())
        except PeerFailure:
            raise
        except Exception as e:  # told to the peers by agree() below, then re-raised
            error = e
        pos.elapsed = elapsed0 + time.monotonic() - start
        late = config.minutes is not None and pos.elapsed - elapsed0 >= 60 * config.minutes
        time_up = bool(bank.agree(error, int(late))[0])  # rank 0's clock decides for every rank
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        pos.offset += g_idx.numel()
        pos.step += 1
        pos.sums += torch.stack([torch.tensor(float(idx.numel())), terms.loss.detach().sum().cpu(),
                                 terms.kl.detach().sum().cpu(), terms.recon.detach().sum().cpu()]).double()
        bar.update(1)
        if pos.offset == n:  # end of the pass
            sums = global_sums()
            loss_, kl, recon = (sums[1:] / sums[0]).tolist()
            full = bank.full_codes()
            row: dict[str, float] = {"epoch": len(history) + 1, "step": pos.step, "train_loss": loss_,
                                     "train_kl": kl, "train_recon": recon}
            if rank == 0:
                row.update(heldout_terms(_plain_model(model, full), data.test_x, device=device))
                bar.set_postfix(epoch=row["epoch"], loss=f"{loss_:.2f}", kl=f"{kl:.2f}", recon=f"{recon:.2f}")
            row["fallbacks"] = bank.fallbacks
            row["elapsed_s"] = elapsed0 + time.monotonic() - start
            history.append(row)
            model.new_pass()
            pos.pass_index = model.pass_index
            pos.order = rng.permutation(config.seed, pos.pass_index, n, device)
            pos.offset, pos.sums = 0, torch.zeros(4, dtype=torch.float64)
            if out_dir is not None and rank == 0:
                atomic_write_text(json.dumps({"history": history}, indent=1), os.path.join(out_dir, "metrics.json"))
            save(full, gathered=True)
            saved_at = pos.step
        elif config.checkpoint_every and pos.step % config.checkpoint_every == 0:
            save()
            saved_at = pos.step
    bar.close()
    if saved_at != pos.step:
        save()
    if out_dir is not None and rank == 0 and history:
        plot_history(history, os.path.join(out_dir, "metrics.png"))
    return history


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node W -m acn_kernels.acn.distributed [acn-train options]``.

    Gloo for ``--device cpu``, NCCL for ``--device cuda`` (rank r uses cuda:LOCAL_RANK). Rank 0
    writes the checkpoint, metrics and, at the end, the report of ``acn-train`` (over the
    gathered bank). The process group's timeout is ``ACN_DIST_TIMEOUT_S`` seconds (default 600).
    """
    from .checkpoint import CHECKPOINT, atomic_write_text, load_checkpoint
    from .cli import parser
    from .config import TrainConfig
    from .data import load
    from .evaluate import write_report

    p = parser()
    p.prog = "torchrun ... -m acn_kernels.acn.distributed"
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    timeout = datetime.timedelta(seconds=float(os.environ.get("ACN_DIST_TIMEOUT_S", "600")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        rank = dist.get_rank()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else args.device
        if cuda:
            torch.cuda.set_device(device)
        out = args.out or os.path.join("runs", f"{args.model}-distributed")
        resume = None
        if args.resume is not None:
            resume = load_checkpoint(os.path.join(out, CHECKPOINT) if args.resume == "auto" else args.resume)
            config = TrainConfig(**resume["config"])
        else:
            config = TrainConfig(model=args.model, encoder=args.encoder, decoder=args.decoder, data=args.data,
                                 code_dim=args.code_dim, k=args.k, components=args.components,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        if config.model != "acn":
            raise SystemExit("acn_kernels.acn.distributed trains ACNs only (--model acn)")
        config.epochs, config.steps = args.epochs, args.steps
        config.minutes = args.minutes if args.minutes and args.minutes > 0 else None
        config.checkpoint_every, config.device = args.checkpoint_every, device
        if config.epochs is None and config.steps is None and config.minutes is None:
            print("acn_kernels.acn.distributed: give a budget (--minutes, --epochs or --steps)", file=sys.stderr)
            return 2
        data = load(config.data)
        model = shard_model(config.build(data.train_x.shape[0], data.image_shape).to(device))
        history = train_distributed(model, data, config, out, resume=resume, progress=not args.no_progress)
        full = model.bank.full_codes()
        if rank == 0:
            summary = write_report(_plain_model(model, full), data, out, seed=config.seed,
                                   grids=not args.no_report, device=device)
            atomic_write_text(json.dumps({"history": history, "final": summary}, indent=1),
                              os.path.join(out, "metrics.json"))
            print(f"acn_kernels.acn.distributed: {dist.get_world_size()} ranks; held out: "
                  f"{summary['heldout']['test_loss']:.2f} nats/image -> {out}")
    finally:
        dist.destroy_process_group()
    return 0


__all__ = ["DistributedCodeBank", "PassSampler", "PeerFailure", "full_state_dict", "initial_codes", "main",
           "shard_model", "shard_range", "train_distributed"]

if __name__ == "__main__":
    sys.exit(main())
