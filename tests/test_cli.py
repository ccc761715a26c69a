"""The command lines (acn-train, acn-eval): every option value checked with a one-line error
naming the flag (exit status 2), in one process and under torchrun; tracebacks only for bugs.

In-process calls of ``cli.train_main`` / ``cli.eval_main`` on tiny data (a .pt file), a few
steps each."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from acn_kernels.acn import cli, compare
from acn_kernels.acn.checkpoint import CHECKPOINT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def digits(tmp_path) -> str:
    """A .pt file of 40 training and 10 held-out random 8x8 binary images with two classes."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(50, 8, 8, generator=gen) < 0.3).float()
    y = torch.arange(50) % 2
    path = str(tmp_path / "digits.pt")
    torch.save({"train_x": x[:40], "train_y": y[:40], "test_x": x[40:], "test_y": y[40:]}, path)
    return path


def small(digits: str, out: str, *extra: str) -> list[str]:
    return ["--data", digits, "--out", out, "--batch-size", "16", "--code-dim", "4", "--no-progress",
            *extra]


def usage_error(capsys, main, argv: list[str]) -> str:
    """The one line ``main(argv)`` prints before exiting with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------
# Issue 16: option values


BAD_VALUES = [
    (["--batch-size", "-5", "--epochs", "1"], "argument --batch-size: must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--batch-size", "1.5"], "argument --batch-size: expected an integer, got '1.5'"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be an integer >= 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--k", "0"], r"argument --k: must be an integer in \[1, 1024\], got 0"),
    (["--k", "1025"], r"argument --k: must be an integer in \[1, 1024\]"),
    (["--code-dim", "0"], "argument --code-dim: must be an integer >= 1"),
    (["--components", "0"], "argument --components: must be an integer >= 1"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--minutes", "-1"], "argument --minutes: must be a finite number >= 0"),
    (["--minutes", "inf"], "argument --minutes: must be a finite number >= 0"),
    (["--epochs", "-2"], "argument --epochs: must be an integer >= 0"),
    (["--steps", "-2"], "argument --steps: must be an integer >= 0"),
    (["--seed", "-1"], "argument --seed: must be an integer in"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "meta"], "argument --device: expected cpu, cuda or cuda:N"),
    (["--epochs", "0", "--minutes", "0"], "give a budget: --minutes, --epochs or --steps"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_option_values_are_one_line_errors(capsys, tmp_path, digits, argv, message):
    import re

    err = usage_error(capsys, cli.train_main, [*small(digits, str(tmp_path / "run")), *argv])
    assert err.startswith("acn-train: error: ") and re.search(message, err), err
    assert not os.path.exists(tmp_path / "run")  # refused before anything is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(capsys, tmp_path, digits):
    err = usage_error(capsys, cli.train_main, [*small(digits, str(tmp_path / "run")), "--device", "cuda"])
    assert "argument --device: cuda: no CUDA GPU is available" in err


def test_data_errors_name_the_flag(capsys, tmp_path, digits):
    run = str(tmp_path / "run")
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "missing.pt"), run), "--steps", "2"])
    assert "argument --data:" in err and "missing.pt: no such file or folder" in err
    (tmp_path / "empty.pt").write_bytes(b"")
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "empty.pt"), run), "--steps", "2"])
    assert "argument --data:" in err and "empty.pt: not a readable .pt file (EOFError)" in err
    (tmp_path / "junk.pt").write_bytes(b"junk" * 20)
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "junk.pt"), run), "--steps", "2"])
    assert "junk.pt: not a readable .pt file" in err
    torch.save({"images": torch.zeros(3)}, tmp_path / "keys.pt")
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "keys.pt"), run), "--steps", "2"])
    assert "expected a dict with a 'train_x' tensor" in err


def test_model_that_does_not_fit_the_data(capsys, tmp_path, digits):
    torch.save({"train_x": torch.zeros(20, 6, 6)}, tmp_path / "six.pt")
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "six.pt"), str(tmp_path / "run")),
                                               "--encoder", "conv", "--steps", "2"])
    assert "the model options do not fit the data" in err and "divisible by 4, got 6x6" in err


def test_errors_come_before_the_process_group(capsys, tmp_path, digits, monkeypatch):
    """Under torchrun (WORLD_SIZE set) every rank checks the command line before it joins the
    group, so a bad value ends each rank at once, with the same line, instead of in a collective."""
    import acn_kernels.acn.cli as module

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(module, "process_group", lambda *a: pytest.fail("joined the process group"))
    err = usage_error(capsys, cli.train_main, [*small(digits, str(tmp_path / "run")), "--batch-size", "0"])
    assert "argument --batch-size" in err
    err = usage_error(capsys, cli.train_main, [*small(str(tmp_path / "nope.pt"), str(tmp_path / "run")),
                                               "--steps", "2"])
    assert "argument --data" in err


def test_eval_option_errors(capsys, tmp_path, digits):
    run = str(tmp_path / "run")
    assert cli.train_main([*small(digits, run), "--steps", "2", "--no-report"]) == 0
    err = usage_error(capsys, cli.eval_main, [run, "--threads", "0"])
    assert err.startswith("acn-eval: error: argument --threads")
    err = usage_error(capsys, cli.eval_main, [run, "--daydream-steps", "-1"])
    assert "argument --daydream-steps" in err
    err = usage_error(capsys, cli.eval_main, [str(tmp_path / "nothing"), "--out", str(tmp_path / "ev")])
    assert "nothing/checkpoint.pt" in err or "nothing: no such checkpoint" in err
    assert os.path.isfile(os.path.join(run, CHECKPOINT))


def test_steps_zero_means_no_limit(tmp_path, digits):
    from acn_kernels.acn.checkpoint import load_checkpoint

    run = str(tmp_path / "run")
    assert cli.train_main([*small(digits, run), "--steps", "0", "--epochs", "1", "--minutes", "0",
                           "--no-report"]) == 0
    ckpt = load_checkpoint(os.path.join(run, CHECKPOINT))
    assert ckpt["position"]["step"] == 3 and ckpt["config"]["steps"] is None  # one pass of ceil(40 / 16)


def test_resume_on_a_data_file_that_grew(capsys, tmp_path, digits):
    """A VAE has no bank to notice: the position check does, in one line, and nothing spins."""
    run = str(tmp_path / "run")
    assert cli.train_main([*small(digits, run), "--model", "vae", "--steps", "2", "--no-report"]) == 0
    blob = torch.load(digits)
    blob["train_x"] = torch.cat([blob["train_x"], blob["train_x"][:5]])
    blob["train_y"] = torch.cat([blob["train_y"], blob["train_y"][:5]])
    torch.save(blob, digits)
    err = usage_error(capsys, cli.train_main, ["--resume", os.path.join(run, CHECKPOINT), "--epochs", "1",
                                               "--no-progress"])
    assert "argument --resume:" in err and "covers 40 examples but the training data has 45" in err


def test_damaged_checkpoints_are_one_line_errors(capsys, tmp_path, digits):
    run = str(tmp_path / "run")
    assert cli.train_main([*small(digits, run), "--steps", "2", "--no-report"]) == 0
    path = os.path.join(run, CHECKPOINT)
    blob = open(path, "rb").read()
    (tmp_path / "empty.pt").write_bytes(b"")
    err = usage_error(capsys, cli.train_main, ["--resume", str(tmp_path / "empty.pt"), "--steps", "3"])
    assert "argument --resume:" in err and "empty.pt: not a readable checkpoint (EOFError)" in err
    codes = torch.load(path, weights_only=True)["model"]["bank.codes"]
    at = blob.find(codes[:2].numpy().tobytes())
    open(path, "wb").write(blob[:at] + bytes([blob[at] ^ 0x80]) + blob[at + 1:])
    err = usage_error(capsys, cli.train_main, ["--resume", path, "--steps", "3"])
    assert "the content does not match its digest" in err
    err = usage_error(capsys, cli.eval_main, [run, "--out", str(tmp_path / "ev")])
    assert err.startswith("acn-eval: error: argument runs:") and "does not match its digest" in err
    err = usage_error(capsys, cli.train_main, ["--resume", str(tmp_path / "missing.pt"), "--steps", "3"])
    assert "missing.pt: no such checkpoint" in err


# ------------------------------------------------------------------------------------------------
# Issue 16: one file mode for every output; stray temporary files of killed writes removed


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_output_has_the_mode_open_gives(tmp_path, digits, umask):
    """0666 minus the umask, for the checkpoint and metrics.json as for the images (mkstemp's
    0600 once set them apart)."""
    old = os.umask(umask)
    try:
        run, ev = str(tmp_path / "run"), str(tmp_path / "ev")
        assert cli.train_main([*small(digits, run), "--steps", "3"]) == 0  # one pass: metrics.png
        assert cli.eval_main([run, "--out", ev, "--daydream-steps", "1", "--no-baselines"]) == 0
    finally:
        os.umask(old)
    files = [os.path.join(d, f) for d in (run, ev, os.path.join(ev, "run")) for f in os.listdir(d)
             if os.path.isfile(os.path.join(d, f))]
    names = {os.path.basename(f) for f in files}
    assert {CHECKPOINT, "metrics.json", "metrics.png", "reconstructions.png", "daydreams.png", "neighbours.png",
            "eval.json", "eval.md"} <= names
    assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: oct(0o666 & ~umask) for f in files}


def test_stale_temporaries_are_removed_at_the_start_of_a_run(tmp_path, digits):
    import subprocess
    import sys

    from acn_kernels.acn.checkpoint import TMP_PREFIX

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited: its writes can never finish
    run = tmp_path / "run"
    run.mkdir()
    stale = [f"{TMP_PREFIX}{dead}-0a1b2c3d-checkpoint.pt", f"{TMP_PREFIX}{dead}-ffff0000-metrics.json"]
    kept = [f"{TMP_PREFIX}{os.getpid()}-12345678-checkpoint.pt",  # a live process: a write in progress
            ".tmp-mine", "notes.txt"]
    for name in stale + kept:
        (run / name).write_bytes(b"half a file")
    assert cli.train_main([*small(digits, str(run)), "--steps", "2", "--no-report"]) == 0
    left = set(os.listdir(run))
    assert not left & set(stale) and set(kept) <= left
    assert not [n for n in left if n.startswith(TMP_PREFIX) and n not in kept]  # none of this run's


# ------------------------------------------------------------------------------------------------
# Issue 16: --resume FILE continues in the checkpoint's folder; model options must agree with it


def test_resume_file_continues_in_its_own_folder(tmp_path, digits, monkeypatch):
    """A VAE checkpoint resumed without --out once wrote into runs/acn-default, next to an
    unrelated run."""
    from acn_kernels.acn.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    vae = str(tmp_path / "my-vae")
    assert cli.train_main([*small(digits, vae), "--model", "vae", "--steps", "2", "--no-report"]) == 0
    assert cli.train_main(["--resume", os.path.join(vae, CHECKPOINT), "--steps", "4", "--no-progress",
                           "--no-report"]) == 0
    assert load_checkpoint(os.path.join(vae, CHECKPOINT))["position"]["step"] == 4
    assert not os.path.exists(tmp_path / "runs")
    monkeypatch.chdir(vae)  # a bare file name: the current folder
    assert cli.train_main(["--resume", CHECKPOINT, "--steps", "5", "--no-progress", "--no-report"]) == 0
    assert load_checkpoint(CHECKPOINT)["position"]["step"] == 5


def test_conflicting_model_options_with_resume(capsys, tmp_path, digits, monkeypatch):
    from acn_kernels.acn.checkpoint import load_checkpoint

    vae = str(tmp_path / "my-vae")
    assert cli.train_main([*small(digits, vae), "--model", "vae", "--steps", "2", "--no-report"]) == 0
    ckpt = os.path.join(vae, CHECKPOINT)
    err = usage_error(capsys, cli.train_main, ["--resume", ckpt, "--model", "acn", "--steps", "3"])
    assert "argument --resume:" in err and "--model acn (the checkpoint has vae)" in err
    err = usage_error(capsys, cli.train_main, ["--resume", ckpt, "--code-dim", "8", "--lr", "0.01", "--steps", "3"])
    assert "--code-dim 8 (the checkpoint has 4); --lr 0.01 (the checkpoint has 0.001)" in err
    assert load_checkpoint(ckpt)["position"]["step"] == 2  # nothing ran
    # Options that agree with the checkpoint (a data path spelt another way too) and budget options are fine.
    monkeypatch.chdir(os.path.dirname(digits))
    assert cli.train_main(["--resume", ckpt, "--model", "vae", "--code-dim", "4", "--batch-size", "16",
                           "--data", os.path.basename(digits), "--steps", "3", "--checkpoint-every", "1",
                           "--minutes", "5", "--no-progress", "--no-report"]) == 0
    assert load_checkpoint(ckpt)["position"]["step"] == 3


# ------------------------------------------------------------------------------------------------
# Issue 16: strict JSON everywhere; an empty held-out set and single-class labels end in nulls


def strict_json(path: str):
    """json.load refusing NaN and Infinity, which are not JSON."""
    import json

    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    from acn_kernels.acn.checkpoint import write_json

    path = str(tmp_path / "m.json")
    write_json(path, {"loss": float("nan"), "terms": [1.5, float("inf"), (float("-inf"), 2)], "n": 3})
    assert strict_json(path) == {"loss": None, "terms": [1.5, None, [None, 2]], "n": 3}


def test_empty_held_out_set(tmp_path, digits):
    blob = torch.load(digits)
    blob["test_x"], blob["test_y"] = blob["test_x"][:0], blob["test_y"][:0]
    torch.save(blob, digits)
    run, ev = str(tmp_path / "run"), str(tmp_path / "ev")
    assert cli.train_main([*small(digits, run), "--steps", "3"]) == 0  # one pass, then the report
    metrics = strict_json(os.path.join(run, "metrics.json"))
    assert len(metrics["history"]) == 1 and "test_loss" not in metrics["history"][0]
    assert metrics["final"]["heldout"] is None
    assert metrics["final"]["representation"] == {"linear_probe": None, "knn": None,
                                                  "reason": "no held-out examples to score"}
    assert cli.eval_main([run, "--out", ev]) == 0
    results = strict_json(os.path.join(ev, "eval.json"))
    assert all(r["representation"]["linear_probe"] is None for r in results.values())
    assert "| - | - | - | - | - |" in open(os.path.join(ev, "eval.md")).read()


def test_single_class_labels(tmp_path, digits):
    blob = torch.load(digits)
    blob["train_y"], blob["test_y"] = torch.zeros_like(blob["train_y"]), torch.zeros_like(blob["test_y"])
    torch.save(blob, digits)
    run, ev = str(tmp_path / "run"), str(tmp_path / "ev")
    assert cli.train_main([*small(digits, run), "--steps", "2"]) == 0
    final = strict_json(os.path.join(run, "metrics.json"))["final"]
    assert final["heldout"]["test_loss"] > 0
    rep = final["representation"]
    assert rep["linear_probe"] is None and rep["knn"] is None and "single class ([0])" in rep["reason"]
    assert cli.eval_main([run, "--out", ev, "--daydream-steps", "1"]) == 0
    results = strict_json(os.path.join(ev, "eval.json"))
    assert all("single class" in results[name]["representation"]["reason"] for name in ("pixels", "pca16"))


# ------------------------------------------------------------------------------------------------
# Issue 12: --capturable


def test_capturable_flag(capsys, tmp_path, digits, monkeypatch):
    """--capturable trains (its checkpoint's config says so, a resume without it turns it off: a
    run option, like --device); a batch too large for one search, or a torchrun launch, is a
    one-line error naming the flag."""
    from acn_kernels.acn.checkpoint import load_checkpoint
    from acn_kernels.ops import MAX_K

    run = str(tmp_path / "run")
    assert cli.train_main([*small(digits, run), "--steps", "2", "--capturable", "--no-report"]) == 0
    assert load_checkpoint(os.path.join(run, CHECKPOINT))["config"]["capturable"] is True
    assert cli.train_main(["--resume", os.path.join(run, CHECKPOINT), "--steps", "3", "--no-progress",
                           "--no-report"]) == 0
    assert load_checkpoint(os.path.join(run, CHECKPOINT))["config"]["capturable"] is False
    err = usage_error(capsys, cli.train_main, [*small(digits, str(tmp_path / "big")), "--capturable",
                                               "--batch-size", str(MAX_K), "--k", "5"])
    assert f"argument --capturable: TrainConfig.capturable resolves a batch in one search of K + B - 1 " \
           f"candidates, so batch_size must be <= MAX_K - k + 1 = {MAX_K - 4}, got {MAX_K}" in err
    assert cli.train_main([*small(digits, str(tmp_path / "vae")), "--model", "vae", "--capturable",
                           "--batch-size", str(MAX_K), "--steps", "1", "--no-report"]) == 0
    import acn_kernels.acn.cli as module

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(module, "process_group", lambda *a: pytest.fail("joined the process group"))
    err = usage_error(capsys, cli.train_main, [*small(digits, str(tmp_path / "ddp")), "--capturable"])
    assert "argument --capturable: a data-parallel run's sharded bank has no capturable mode" in err


# ---------------------------------------------------------------------------------------------
# Issue 15: acn-compare, seeds per model -> mean and standard deviation


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> tuple[str, str, dict[str, list[str]]]:
    """Tiny runs (6 steps: two passes of 40 images) of two models, two seeds each, on 8x8 digits:
    (data, folder, {model: [run folders]})."""
    root = tmp_path_factory.mktemp("seeded")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(50, 8, 8, generator=gen) < 0.3).float()
    y = torch.arange(50) % 2
    data = str(root / "digits.pt")
    torch.save({"train_x": x[:40], "train_y": y[:40], "test_x": x[40:], "test_y": y[40:]}, data)
    runs: dict[str, list[str]] = {}
    for model in ("acn", "vae"):
        for seed in (0, 1):
            out = str(root / f"{model}-s{seed}")
            argv = [*small(data, out), "--model", model, "--seed", str(seed), "--steps", "6", "--no-report"]
            assert cli.train_main(argv) == 0
            runs.setdefault(model, []).append(out)
    return data, str(root), runs


def test_compare_mean_and_std_over_seeds(tmp_path, seeded_runs, capsys):
    """Every number of every model is the mean and sample std of the per-run numbers, which are
    acn-eval's own for each run; the references and the curves come along."""
    _, root, runs = seeded_runs
    out, ev = str(tmp_path / "cmp"), str(tmp_path / "ev")
    open(os.path.join(root, "vae-s0.log"), "w").close()  # beside the runs: the pattern skips it
    argv = ["--runs", f"acn={','.join(runs['acn'])}", f"vae={os.path.join(root, 'vae-s*')}", "--out", out,
            "--no-grids"]
    assert cli.compare_main(argv) == 0
    result = strict_json(os.path.join(out, "eval.json"))
    assert set(result["models"]) == {"acn", "vae"} and set(result["references"]) == {"pixels", "pca16"}
    assert cli.eval_main([*runs["acn"], "--out", ev, "--no-grids", "--no-baselines"]) == 0
    single = list(strict_json(os.path.join(ev, "eval.json")).values())
    for model in ("acn", "vae"):
        agg, per_run = result["models"][model], result["runs"][model]
        assert [r["name"] for r in agg["runs"]] == [f"{model}-s0", f"{model}-s1"]
        assert [r["passes"] for r in agg["runs"]] == [2, 2] and [r["seed"] for r in per_run] == [0, 1]
        for section, keys in (("heldout", compare.HELDOUT_KEYS), ("representation", compare.REPRESENTATION_KEYS)):
            for key in keys:
                values = [r[section][key] for r in per_run]
                s = agg[section][key]
                assert s["n"] == 2 and s["values"] == values
                assert s["mean"] == pytest.approx(np.mean(values))
                assert s["std"] == pytest.approx(np.std(values, ddof=1))
        if model == "acn":  # the per-run numbers are acn-eval's
            assert [r["heldout"] for r in per_run] == [r["heldout"] for r in single]
    assert result["runs"]["acn"][0]["heldout"] != result["runs"]["acn"][1]["heldout"]  # seeds differ
    md = open(os.path.join(out, "eval.md")).read()
    assert "| acn | 2 (2/6, 2/6) |" in md and " ± " in md and "| pixels (reference) |" in md
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    assert "n=1" not in capsys.readouterr().err


def test_compare_one_run_says_std_is_undefined(tmp_path, seeded_runs, capsys):
    _, _, runs = seeded_runs
    out = str(tmp_path / "cmp")
    assert cli.compare_main(["--runs", f"acn={runs['acn'][0]}", "--out", out, "--no-grids", "--no-baselines"]) == 0
    assert "acn: one run, so no standard deviation (n=1)" in capsys.readouterr().err
    s = strict_json(os.path.join(out, "eval.json"))["models"]["acn"]["heldout"]["test_loss"]
    assert s["n"] == 1 and s["std"] is None and "undefined (n=1)" in s["note"]
    assert "(n=1, no std)" in open(os.path.join(out, "eval.md")).read()


def test_compare_bad_input_one_line_naming_the_argument(tmp_path, seeded_runs, capsys):
    data, root, runs = seeded_runs
    empty = tmp_path / "empty"
    empty.mkdir()
    other = str(tmp_path / "other")
    assert cli.train_main([*small(data, other), "--code-dim", "3", "--steps", "3", "--no-report"]) == 0
    acn = ",".join(runs["acn"])
    cases = [
        ([], "the following arguments are required: --runs"),
        (["--runs", "acn"], "argument --runs: expected MODEL=RUN[,RUN...], got 'acn'"),
        (["--runs", "acn="], "argument --runs: expected MODEL=RUN[,RUN...], got 'acn='"),
        (["--runs", f"acn={tmp_path / 'missing'}"], "argument --runs: acn: "),
        (["--runs", f"acn={root}/nothing-*"], "matches no run"),
        (["--runs", f"acn={root}/*.log"], "matches no run"),
        (["--runs", f"acn={empty}"], f"argument --runs: {empty / CHECKPOINT}: no such checkpoint"),
        (["--runs", f"acn={acn}", f"acn={runs['vae'][0]}"], "argument --runs: a model label is given twice"),
        (["--runs", f"acn={acn}", f"b={runs['acn'][1]}"], "is the same run as one of acn"),
        (["--runs", f"acn={runs['acn'][0]},{other}"], "differs from the first run of acn in more than the seed: "
                                                      "code_dim 3 (first run: 4)"),
        (["--runs", f"acn={acn}", "--threads", "0"], "argument --threads"),
    ]
    for argv, message in cases:
        err = usage_error(capsys, cli.compare_main, [*argv, "--out", str(tmp_path / "cmp"), "--no-grids"])
        assert err.startswith("acn-compare: error: ") and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "cmp" / "eval.json")
