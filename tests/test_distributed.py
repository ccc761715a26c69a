"""The sharded code bank and data-parallel training (acn_kernels.acn.distributed) on 1, 2 and 3
Gloo processes on the CPU, against one process.

Each test starts its ranks as subprocesses running this file (``python test_distributed.py
SCENARIO RANK WORLD FOLDER``) with a file:// rendezvous, one thread each, a 60 s process-group
timeout and a hard wall-clock limit, so nothing can hang the suite. The ranks save their results
to FOLDER; the test compares them with single-process runs here.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys

import pytest
import torch

from acn_kernels import CodeBank, masked_topk
from acn_kernels.acn.bank import initial_codes
from acn_kernels.acn.distributed import PassSampler, shard_range

HARD_LIMIT_S = 120
# (N, D, K, global batch): shards smaller than K at 3 ranks (N=8), and a bank whose pass ends
# mid-batch with the fallback.
BANK_CASES = [(8, 3, 5, 3), (35, 4, 3, 8)]
TRAIN = {"n": 17, "batch": 8, "steps": 7}  # 3 batches per pass; in the last one (1 example) rank 1 has none


def launch(scenario: str, world: int, folder, *extra: str) -> list[subprocess.CompletedProcess]:
    """Run ``world`` ranks of ``scenario``; every rank's CompletedProcess (killed at HARD_LIMIT_S)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(r), str(world), str(folder), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=HARD_LIMIT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def assert_ok(done: list[subprocess.CompletedProcess]) -> None:
    for r, d in enumerate(done):
        assert d.returncode == 0, f"rank {r} failed:\n{d.stderr[-4000:]}"


# ------------------------------------------------------------------------------------------------
# Single-process oracles


def one_process_bank(n: int, d: int, k: int, seed: int = 3) -> CodeBank:
    return CodeBank(n, d, k, seed)  # the same initial codes as every sharded bank of this seed


def global_batches(n: int, b: int, passes: int, seed: int = 3):
    """(pass, global batch) pairs of ``passes`` passes, as PassSampler makes them at one rank."""
    sampler = PassSampler(n, b, seed, 0, 1)
    for p in range(passes):
        for g in sampler.batches(p):
            yield p, g


def batch_codes(index: torch.Tensor, d: int, pass_index: int) -> torch.Tensor:
    """Deterministic fresh codes of a batch (any rank computes the same rows)."""
    gen = torch.Generator().manual_seed(1000 + pass_index)
    table = torch.randn(10_000, d, generator=gen)
    return table[index] * 0.5


# ------------------------------------------------------------------------------------------------
# Tests


def test_pass_sampler_partitions_each_pass():
    n, b = 23, 8
    for world in (1, 2, 3):
        parts = [list(PassSampler(n, b, 5, r, world).batches(2)) for r in range(world)]
        one = list(PassSampler(n, b, 5, 0, 1).batches(2))
        for t, g in enumerate(one):  # rank slices concatenate to the one-process batch
            assert torch.equal(torch.cat([parts[r][t] for r in range(world)]), g)
        assert sorted(torch.cat(one).tolist()) == list(range(n))
    assert [x.numel() for x in (PassSampler(9, 4, 0, r, 3).local(torch.arange(2)) for r in range(3))] == [1, 1, 0]
    with pytest.raises(ValueError, match="rank"):
        PassSampler(9, 4, 0, 3, 3)


def test_shard_range_covers_the_bank():
    for n, w in [(2, 3), (10, 3), (7, 2)]:
        ranges = [shard_range(n, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("world", [2, 3])
def test_search_and_neighbours_match_one_process(tmp_path, world):
    assert_ok(launch("bank", world, tmp_path))
    for case, (n, d, k, b) in enumerate(BANK_CASES):
        # Side-effect-free search of the whole bank: the concatenated rank results.
        res = [torch.load(tmp_path / f"bank{case}_rank{r}.pt") for r in range(world)]
        codes = initial_codes(3, torch.arange(n), d)
        q = torch.randn(11, d, generator=torch.Generator().manual_seed(case))
        ex = torch.arange(11) % n
        for kk in sorted({1, k, n - 1}):
            want = masked_topk(q, codes, kk, exclude_index=ex, backend="torch")
            dists = torch.cat([r["search"][kk][0] for r in res])
            rows = torch.cat([r["search"][kk][1] for r in res])
            assert torch.equal(rows, want.indices), (kk, rows, want.indices)
            torch.testing.assert_close(dists, want.dists, rtol=1e-5, atol=1e-5)
        # Two passes of neighbours over the same global batches as one CodeBank, then an update.
        bank = one_process_bank(n, d, k)
        got = [r["neighbours"] for r in res]
        for step, (p, g) in enumerate(global_batches(n, b, 2)):
            if p != bank.pass_index:
                bank.new_pass()
            nb = bank.neighbours(g, batch_codes(g, d, p))
            rows = torch.cat([got[r][step][0] for r in range(world)])
            picked = torch.cat([got[r][step][1] for r in range(world)])
            assert torch.equal(rows, nb.rows), (case, step)
            assert torch.equal(picked, nb.codes)
            for r in range(world):
                assert torch.equal(got[r][step][2], bank.used)  # the replicated used mask
        assert all(res[r]["fallbacks"] == bank.fallbacks for r in range(world))
        bank.update(torch.arange(n - 5, n), batch_codes(torch.arange(n - 5, n), d, 9))
        assert torch.equal(torch.cat([res[r]["codes"] for r in range(world)]), bank.codes)
        assert torch.equal(res[0]["full_codes"], bank.codes)
    assert bank.fallbacks >= 1  # the last case ends passes with every other row used


def tiny_data(n: int):
    from acn_kernels.acn.data import ImageData

    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(n + 6, 1, 28, 28, generator=gen) < 0.3).float()
    return ImageData(x[:n], None, x[n:], None)


def tiny_config(out_steps: int):
    from acn_kernels.acn.config import TrainConfig

    return TrainConfig(batch_size=TRAIN["batch"], minutes=None, steps=out_steps, checkpoint_every=4, seed=3,
                       code_dim=4, k=3, components=2)


def one_process_training(steps: int):
    from acn_kernels.acn import train

    data, config = tiny_data(TRAIN["n"]), tiny_config(steps)
    model = config.build(TRAIN["n"], data.image_shape)
    history = train.train(model, data, config, None, progress=False)
    return model, history


def adam_drift_bound(lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """How far apart two Adam runs can leave one weight after ``steps`` steps, whatever their
    gradients: each step moves it by lr |m_hat| / sqrt(v_hat), and by Cauchy-Schwarz over the
    moving averages |m_hat| / sqrt(v_hat) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_k<t (b1^2 / b2)^k)
    * sqrt(1 - b2^t) / (1 - b1^t) (1.0 at t = 1, 1.02 at t = 7 for the default betas).

    The 2-rank run sums its gradients in another order than one process. Where a weight's
    gradient is large against that rounding the two runs agree to float32 rounding; where it is
    at the rounding level (a weight the data barely touches) Adam normalises the noise to a step
    of up to ~lr, of either sign, in each run: such a weight can legitimately end up to this bound
    apart. Seen with lr = 1e-3 after 7 steps, of 1.9M weights: at most 8.5e-5 apart, 30 beyond
    1e-6, with the CPU mixture kernel's FMA contraction off; 2.7e-4 and 84 with it on (issue 16).
    A fixed atol of 1e-4 was thus a guess about the kernels' rounding, not about training."""
    b1, b2 = betas
    step = max((1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))
               * math.sqrt(1 - b2**t) / (1 - b1**t) for t in range(1, steps + 1))
    return 2 * lr * steps * step


def assert_same_training(tmp_path, model, history, world: int) -> None:
    from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint

    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    want = model.state_dict()
    assert ckpt["model"].keys() == want.keys()
    params = dict(model.named_parameters())
    steps, lr = ckpt["position"]["step"], tiny_config(TRAIN["steps"]).lr
    moved = []  # |difference| of every parameter element
    for key, value in want.items():
        if key in params:
            got = ckpt["model"][key]
            torch.testing.assert_close(got, value, rtol=1e-5, atol=adam_drift_bound(lr, steps), msg=key)
            moved.append((got - value).abs().flatten())
        elif isinstance(value, torch.Tensor) and value.is_floating_point():  # the bank's codes
            torch.testing.assert_close(ckpt["model"][key], value, rtol=1e-4, atol=1e-4, msg=key)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(ckpt["model"][key], value), key
        else:  # the bank's extra state: pass index, fallbacks, K, seed
            assert ckpt["model"][key] == value, key
    # The bound above only catches gross errors; the bulk is where a wrong gradient shows (a
    # missing or doubled rank's share, or another lr, moves nearly every weight by ~lr per step).
    # A weight whose gradient stands well above its rounding (relative 1e-4 at most, summed
    # over a batch in float32) moves by that fraction of Adam's ~lr steps: all but 0.1% of the
    # weights must agree that closely.
    moved, tight = torch.cat(moved), 1e-4 * lr * steps
    assert (moved > tight).float().mean().item() < 1e-3, f"{int((moved > tight).sum())} of {moved.numel()} moved"
    assert ckpt["position"]["step"] == TRAIN["steps"] and ckpt["world_size"] == world
    assert len(ckpt["history"]) == len(history) == 2
    for mine, theirs in zip(ckpt["history"], history, strict=True):
        for key in ("train_loss", "train_kl", "train_recon", "test_loss", "fallbacks"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key


def test_training_on_two_ranks_matches_one_process(tmp_path):
    assert_ok(launch("train", 2, tmp_path, str(TRAIN["steps"])))
    model, history = one_process_training(TRAIN["steps"])
    assert_same_training(tmp_path, model, history, 2)


def test_resume_on_two_ranks(tmp_path):
    assert_ok(launch("train", 2, tmp_path, "4"))
    assert_ok(launch("train", 2, tmp_path, str(TRAIN["steps"]), "resume"))
    model, history = one_process_training(TRAIN["steps"])
    assert_same_training(tmp_path, model, history, 2)


def test_torchrun_command_writes_a_single_process_checkpoint(tmp_path):
    from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint
    from acn_kernels.acn.config import TrainConfig

    data = tiny_data(TRAIN["n"])
    torch.save({"train_x": data.train_x, "test_x": data.test_x}, tmp_path / "data.pt")
    # --epochs 0 means no limit, as for acn-train in one process (it once meant zero steps here).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "acn_kernels.acn.cli", "--data", str(tmp_path / "data.pt"), "--steps", "3", "--epochs", "0",
           "--batch-size", "8", "--code-dim", "4", "--no-progress", "--no-report", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACN_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HARD_LIMIT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    ckpt = load_checkpoint(str(tmp_path / "run" / CHECKPOINT))
    assert ckpt["world_size"] == 2 and ckpt["position"]["step"] == 3
    model = TrainConfig(**ckpt["config"]).build(TRAIN["n"], data.image_shape)
    model.load_state_dict(ckpt["model"])  # the whole bank, loadable by one process
    assert model.bank.codes.shape == (TRAIN["n"], 4)


@pytest.mark.parametrize("where", ["bank", "search", "train"])
def test_a_failing_rank_stops_every_rank(tmp_path, where):
    """Rank 1 raises: in the bank's own argument checks (duplicate rows in neighbours, an
    exclude_index out of range in search), or in its encoder in the middle of the training loop's
    second step; every rank exits with an error, none hangs."""
    done = launch("fail", 3, tmp_path, where)
    assert [d.returncode != 0 for d in done] == [True, True, True]
    assert "ValueError" in done[1].stderr  # the failing rank's own error
    for r in (0, 2):
        assert "PeerFailure: rank(s) [1]" in done[r].stderr, done[r].stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Issue 9: one loop, one bank. A one-rank distributed run is a single process's run.


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank Gloo process group in this process (a FileStore rendezvous)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def runtimes():
    from acn_kernels.acn.distributed import DistributedRuntime
    from acn_kernels.acn.train import Runtime

    return {"one process": Runtime(), "one rank": DistributedRuntime()}


def train_tiny(runtime, out, steps: int, model: str = "acn", resume=None, rng_seed: int | None = None):
    """Train the tiny model; ``rng_seed`` reseeds torch's global RNG between building and training."""
    from acn_kernels.acn.train import train

    data, config = tiny_data(TRAIN["n"]), tiny_config(steps)
    config.model = model
    net = runtime.prepare(config.build(TRAIN["n"], data.image_shape))
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    return train(net, data, config, str(out), resume=resume, progress=False, runtime=runtime)


def assert_close_tree(a, b, path: str = "") -> None:
    """Same structure and keys; float tensors and floats within float32 tolerance; the rest equal."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key not in ("elapsed", "elapsed_s"):  # wall clock
                assert_close_tree(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_tree(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=path)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5), path
    else:
        assert a == b, path


@pytest.mark.parametrize("model", ["acn", "vae"])
def test_one_rank_equals_one_process(tmp_path, one_rank, model, monkeypatch):
    """Same checkpoint (weights, bank, optimiser, position, RNG state, history, every key), and
    the same plots during the run (metrics.png after each pass with PLOT_SECONDS = 0)."""
    from acn_kernels.acn import train as loop
    from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint

    plots = []
    monkeypatch.setattr(loop, "PLOT_SECONDS", 0.0)
    monkeypatch.setattr(loop, "plot_history", lambda history, path: plots.append(len(history)))
    ckpts, passes = [], []
    for name, runtime in runtimes().items():
        plots.clear()
        history = train_tiny(runtime, tmp_path / name, TRAIN["steps"], model)
        passes.append(list(plots))
        ckpts.append(load_checkpoint(str(tmp_path / name / CHECKPOINT)))
        assert len(history) == 2 and "test_loss" in history[-1], name
    assert passes == [[1, 2], [1, 2]]  # one plot per pass, none repeated at the end
    assert ckpts[0]["world_size"] == ckpts[1]["world_size"] == 1
    assert_close_tree(ckpts[0], ckpts[1])


@pytest.mark.parametrize("name", ["one process", "one rank"])
def test_resume_restores_the_rng_state(tmp_path, one_rank, name):
    from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint

    train_tiny(runtimes()[name], tmp_path, 4)
    ckpt = load_checkpoint(str(tmp_path / CHECKPOINT))
    train_tiny(runtimes()[name], tmp_path, TRAIN["steps"], resume=ckpt, rng_seed=12345)  # another state
    # Training draws only counter-based numbers, so the state is the checkpoint's, restored.
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])
    assert load_checkpoint(str(tmp_path / CHECKPOINT))["position"]["step"] == TRAIN["steps"]


# ------------------------------------------------------------------------------------------------
# Issue 16: ranks started with different arguments or data fail at once, every one of them

# case: (rank 1's config changes, whether rank 1's training images differ, rank 1's resume dict)
MISMATCH_CASES = {
    "lr and batch size": ({"lr": 2e-3, "batch_size": 4}, False, None),  # once: silently wrong, exit 0
    "k": ({"k": 2}, False, None),                                      # once: SIGABRT inside Gloo
    "steps and interval": ({"steps": 6, "checkpoint_every": 2}, False, None),  # once: the timeout
    "data": ({}, True, None),                                          # one pixel of one image
    "resumed": ({}, False, {"position": {"pass_index": 0, "offset": 8, "step": 1}}),
}
MISMATCH_FIELDS = {"lr and batch size": "batch_size, lr", "k": "k", "steps and interval": "steps, checkpoint_every",
                   "data": "training data", "resumed": "resumed position"}


def test_ranks_with_different_arguments_fail_together(tmp_path):
    import json

    done = launch("mismatch", 2, tmp_path)
    assert_ok(done)  # each case raised RunMismatch on both ranks (and nothing hung or aborted)
    for r in range(2):
        messages = json.loads((tmp_path / f"mismatch_rank{r}.json").read_text())
        assert messages.keys() == MISMATCH_CASES.keys(), r
        for case, fields in MISMATCH_FIELDS.items():
            assert f"rank 0 and rank(s) [1] differ in {fields} (on this rank, {r}:" in messages[case], messages[case]
    theirs = json.loads((tmp_path / "mismatch_rank1.json").read_text())
    assert "batch_size=4, lr=0.002" in theirs["lr and batch size"]
    assert not os.path.exists(tmp_path / "checkpoint.pt")  # no rank trained a step


def test_command_ranks_with_different_options_exit_with_one_line(tmp_path):
    """Two acn-train processes of one run (the environment torchrun sets), rank 1 with another
    --lr: both exit with status 2 and one line naming lr."""
    import socket

    data = tiny_data(TRAIN["n"])
    torch.save({"train_x": data.train_x, "test_x": data.test_x}, tmp_path / "data.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "acn_kernels.acn.cli", "--data", str(tmp_path / "data.pt"), "--steps", "2",
           "--batch-size", "8", "--code-dim", "4", "--no-progress", "--no-report", "--out", str(tmp_path / "run")]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACN_DIST_TIMEOUT_S": "60", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        procs.append(subprocess.Popen([*cmd, *(["--lr", "0.002"] if rank else [])], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        errs = [p.communicate(timeout=HARD_LIMIT_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, err) in enumerate(zip(procs, errs, strict=True)):
        assert p.returncode == 2, err[-3000:]
        assert err.startswith("acn-train: error: the ranks were started with different arguments or data: rank 0 "
                              "and rank(s) [1] differ in lr") and err.count("\n") == 1, err[-3000:]
        assert ("lr=0.002" if rank else "lr=0.001") in err


# ------------------------------------------------------------------------------------------------
# The ranks


def _rank_main(scenario: str, rank: int, world: int, folder: str, extra: list[str]) -> None:
    import torch.distributed as dist

    from acn_kernels.acn.distributed import DistributedCodeBank, DistributedRuntime
    from acn_kernels.acn.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{scenario}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if scenario == "bank":
            for case, (n, d, k, b) in enumerate(BANK_CASES):
                bank = DistributedCodeBank(n, d, k, seed=3)
                q = torch.randn(11, d, generator=torch.Generator().manual_seed(case))
                ex = torch.arange(11) % n
                mine = torch.tensor_split(torch.arange(11), world)[rank]
                search = {}
                for kk in sorted({1, k, n - 1}):
                    res = bank.search(q[mine], kk, exclude_index=ex[mine])
                    search[kk] = (res.dists, res.indices)
                neighbours = []
                for p, g in global_batches(n, b, 2):
                    if p != bank.pass_index:
                        bank.new_pass()
                    idx = torch.tensor_split(g, world)[rank]
                    nb = bank.neighbours(idx, batch_codes(idx, d, p))
                    neighbours.append((nb.rows, nb.codes, bank.used.clone()))
                g = torch.arange(n - 5, n)  # a plain write of the last five rows
                idx = torch.tensor_split(g, world)[rank]
                bank.update(idx, batch_codes(idx, d, 9))
                torch.save({"search": search, "neighbours": neighbours, "codes": bank.codes,
                            "fallbacks": bank.fallbacks, "full_codes": bank.full_codes()},
                           f"{folder}/bank{case}_rank{rank}.pt")
        elif scenario == "pick":
            _pick_rank(rank, world, folder)
        elif scenario == "train":
            from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint

            steps = int(extra[0])
            data, config = tiny_data(TRAIN["n"]), tiny_config(steps)
            runtime = DistributedRuntime()
            model = runtime.prepare(config.build(TRAIN["n"], data.image_shape))
            resume = load_checkpoint(f"{folder}/{CHECKPOINT}") if extra[1:] == ["resume"] else None
            train(model, data, config, folder, resume=resume, progress=False, runtime=runtime)
        elif scenario == "mismatch":
            import json

            from acn_kernels.acn.distributed import RunMismatch

            messages = {}
            for case, (options, data_edit, resume) in MISMATCH_CASES.items():
                data, config = tiny_data(TRAIN["n"]), tiny_config(4)
                if rank == 1:
                    for name, value in options.items():
                        setattr(config, name, value)
                    if data_edit:
                        data.train_x[3, 0, 5, 5] = 1 - data.train_x[3, 0, 5, 5]
                runtime = DistributedRuntime()
                model = runtime.prepare(config.build(TRAIN["n"], data.image_shape))
                try:
                    train(model, data, config, folder, resume=resume if rank == 1 else None, progress=False,
                          runtime=runtime)
                except RunMismatch as e:
                    messages[case] = str(e)
            with open(f"{folder}/mismatch_rank{rank}.json", "w") as f:
                json.dump(messages, f)
        elif scenario == "fail" and extra[0] == "train":
            data, config = tiny_data(TRAIN["n"]), tiny_config(4)
            runtime = DistributedRuntime()
            model = runtime.prepare(config.build(TRAIN["n"], data.image_shape))
            if rank == 1:
                encode, calls = model.encoder.forward, []

                def failing(x: torch.Tensor) -> torch.Tensor:
                    calls.append(1)
                    if len(calls) == 2:
                        raise ValueError("encoder failed on rank 1")
                    return encode(x)

                model.encoder.forward = failing
            train(model, data, config, None, progress=False, runtime=runtime)
        elif scenario == "fail":
            bank = DistributedCodeBank(12, 2, 2)
            idx = torch.tensor_split(torch.arange(6), world)[rank]
            codes = torch.zeros(idx.numel(), 2)
            bank.neighbours(idx, codes)  # one good step first
            if rank == 1 and extra[0] == "bank":
                idx = torch.tensor([0, 0])  # duplicate rows: the bank's own check raises
            elif rank == 1 and extra[0] == "search":
                bank.search(codes, exclude_index=torch.full((idx.numel(),), 12))  # out of range
            bank.neighbours(idx, codes)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Issue 13: write and pick apart, from_codes and bare-code states on a sharded bank

PICK_CASE = (19, 3, 3, 6)  # N, D, K, global batch


def _pick_rank(rank: int, world: int, folder: str) -> None:
    from acn_kernels.acn.distributed import DistributedCodeBank

    n, d, k, b = PICK_CASE
    start = batch_codes(torch.arange(n), d, 7)
    bank = DistributedCodeBank.from_codes(start, k, seed=3)
    picks = []
    for p, g in global_batches(n, b, 2):
        if p != bank.pass_index:
            bank.new_pass()
        idx = torch.tensor_split(g, world)[rank]
        bank.update(idx, batch_codes(idx, d, p))
        nb = bank.pick(idx)
        picks.append((nb.indices, nb.codes))
    loaded = DistributedCodeBank(n, d, k, seed=3)
    loaded.load_state_dict({"codes": start})  # a bare whole-bank tensor: this rank keeps its rows
    torch.save({"picks": picks, "used": bank.used, "fallbacks": bank.fallbacks, "loaded": loaded.codes,
                "rows": (bank.start, bank.end)}, f"{folder}/pick_rank{rank}.pt")


def test_update_then_pick_on_a_sharded_bank_matches_one_process(tmp_path):
    world = 2
    assert_ok(launch("pick", world, tmp_path))
    res = [torch.load(tmp_path / f"pick_rank{r}.pt") for r in range(world)]
    n, d, k, b = PICK_CASE
    start = batch_codes(torch.arange(n), d, 7)
    bank = CodeBank.from_codes(start, k, seed=3)
    for step, (p, g) in enumerate(global_batches(n, b, 2)):
        if p != bank.pass_index:
            bank.new_pass()
        nb = bank.neighbours(g, batch_codes(g, d, p))
        assert torch.equal(torch.cat([r["picks"][step][0] for r in res]), nb.indices), step
        assert torch.equal(torch.cat([r["picks"][step][1] for r in res]), nb.codes), step
    for r in res:
        assert torch.equal(r["used"], bank.used) and r["fallbacks"] == bank.fallbacks
        lo, hi = r["rows"]
        assert torch.equal(r["loaded"], start[lo:hi])


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
