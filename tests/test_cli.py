"""Tests of the command line, ``python -m lora_helpers`` (lora_helpers/__main__.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_helpers.__main__ import build_parser, main, profile_from_args
from lora_helpers.adapters import CONFIG_NAME, WEIGHTS_NAME

REPO = Path(__file__).resolve().parent.parent
# offline, no progress bars; PASSIVE: idle OpenMP threads sleep instead of spinning (a busy machine stays usable)
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
TINY = ["--n-train", "32", "--n-val", "16", "--n-test", "32", "--max-length", "32"]


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lora_helpers", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


def test_train_writes_metrics_and_adapter(tmp_path):
    run = cli(
        "train",
        "--method",
        "lora",
        "--profile",
        "quick",
        *TINY,
        "--out",
        str(tmp_path / "m.json"),
        "--save-adapter",
        str(tmp_path / "adapter"),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    # the CLI contract (issue 10): these keys stay
    assert {"test_accuracy", "confusion", "trainable_percent", "train_steps", "s_per_step"} <= set(m)
    assert {"method", "profile", "backbone", "device", "lr", "head_lr", "val_accuracy", "val_curve"} <= set(m)
    assert m["val_curve"][-1]["step"] == 2 and 0 <= m["val_accuracy"] <= 1
    assert (m["method"], m["profile"], m["lora_layers"], m["train_steps"]) == ("lora", "quick", 12, 2)  # 32 / 16
    assert m["backbone"].startswith("minilm-standin")
    assert 0 <= m["test_accuracy"] <= 1 and m["test_loss"] > 0 and m["train_time_s"] > 0
    assert sum(map(sum, m["confusion"])) == 32
    assert m["test_accuracy"] == pytest.approx((m["confusion"][0][0] + m["confusion"][1][1]) / 32)
    assert 0 < m["trainable_percent"] < 2
    assert m["trainable_params"] == 12 * 8 * (384 + 384) + (384 * 384 + 384) + (384 * 2 + 2)  # LoRA + head
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file() and (tmp_path / "adapter" / CONFIG_NAME).is_file()
    for words in ("test accuracy", "validation", "0.98%", "trainable", "minilm-standin"):
        assert words in run.stdout, run.stdout
    assert not (tmp_path / "runs").exists()  # --out was given


def test_bad_method_fails_with_a_message(tmp_path):
    run = cli("train", "--method", "qlora", "--profile", "quick", cwd=tmp_path)
    assert run.returncode == 2
    assert "invalid choice: 'qlora'" in run.stderr and "lora-all" in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--profile", "huge"], "invalid choice: 'huge'"),
        (["train", "--n-train", "0"], "expected an integer >= 1"),
        (["train", "--lr", "-1"], "expected a positive finite number"),
        (["compare", "--seeds", "0"], "expected an integer >= 1"),
        (["train", "--method", "head", "--save-adapter", "x"], "--save-adapter needs a LoRA method"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_overrides(monkeypatch):
    monkeypatch.setenv("LORA_PROFILE", "quick")
    parser = build_parser()
    profile = profile_from_args(
        parser.parse_args(["train", "--n-train", "all", "--epochs", "2", "--seed", "3"]), parser
    )
    assert (profile.name, profile.n_train, profile.epochs, profile.seed) == ("quick", None, 2, 3)
    assert profile.n_test == 500 and profile.max_length == 64  # not given: the profile's own
    args = parser.parse_args(["train", "--profile", "cpu", "--max-length", "64"])
    assert (args.method, profile_from_args(args, parser).max_length) == ("lora", 64)


# ------------------------------------------------------------------ bad input: one clear line, never a traceback


def _no_work(*args, **kwargs):
    raise AssertionError("work started although the command line was bad")


# {dir}: an existing folder, {file}: an existing file
REFUSED_BEFORE_ANY_WORK = [
    (["train", "--device", "bogus"], "unknown device 'bogus'"),
    (["train", "--device", "cuda:99"], "'cuda:99'"),
    (["compare", "--device", "bogus"], "unknown device 'bogus'"),
    (["train", "--max-length", "1"], "leaves no room for the review"),
    (["train", "--max-length", "2"], "use at least 3"),
    (["train", "--max-length", "ten"], "expected an integer, got 'ten'"),
    (["train", "--n-train", "-2"], "expected an integer >= 1, got -2"),
    (["train", "--out", "{dir}"], "is a folder; a file name is needed"),
    (["train", "--out", "{file}/m.json"], "is a file, not a folder"),
    (["compare", "--out", "{dir}"], "is a folder; a file name is needed"),
    (["train", "--save-adapter", "{file}"], "is a file; a folder is needed"),
    (["train", "--save-adapter", "{file}/adapter"], "is a file, not a folder"),
    (["train", "--method", "head", "--save-adapter", "{dir}"], "--save-adapter needs a LoRA method"),
    (["train", "--profile", "huge"], "invalid choice: 'huge'"),
    (["fit"], "invalid choice: 'fit'"),
]


def run_main(argv, capsys):
    """``main(argv)``: its exit code (returned or raised) and what it printed. Any other exception fails the test."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_error(code, out, err, message):
    assert code not in (0, None), (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err


@pytest.mark.parametrize("argv, message", REFUSED_BEFORE_ANY_WORK)
def test_bad_command_lines_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_PROFILE", "quick")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    for target in (
        "lora_helpers.data.load_imdb",
        "lora_helpers.backbone.load_backbone",
        "lora_helpers.loop.run_experiment",
        "lora_helpers.runner.run",
        "lora_helpers.runner.load_splits",
        "lora_helpers.compare.compare_methods",
    ):
        monkeypatch.setattr(target, _no_work, raising=False)
    argv = [a.format(dir=tmp_path / "adir", file=tmp_path / "afile") for a in argv]
    assert_one_clear_error(*run_main(argv, capsys), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # nothing written
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["train", "--backbone", "/no/such/backbone"], {}, "Unknown backbone '/no/such/backbone'"),
        (["train"], {"LORA_IMDB_DIR": "/no/such/imdb"}, "LORA_IMDB_DIR='/no/such/imdb' is not an existing folder"),
        (["train", "--n-train", "100000"], {}, "reviews, but the train split has"),
    ],
)
def test_bad_input_found_while_loading_is_one_error_line(argv, env, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_PROFILE", "quick")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    for target in ("lora_helpers.loop.train", "lora_helpers.runner.run"):  # loading may run, training must not
        monkeypatch.setattr(target, _no_work, raising=False)
    assert_one_clear_error(*run_main(argv[:1] + TINY + argv[1:], capsys), message)


def test_the_real_command_prints_no_traceback_for_bad_input(tmp_path):
    (tmp_path / "adir").mkdir()
    run = cli("train", "--out", str(tmp_path / "adir"), cwd=tmp_path)  # one subprocess: each costs an import of torch
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is a folder; a file name is needed" in errors[0], run.stderr


def test_estimate_counts_the_compare_it_describes(capsys):
    # the sweep adds len(grid) - 1 runs per method
    from lora_helpers.methods import method_spec

    assert main(["estimate", "--profile", "gpu", "--methods", "lora", "full", "--seeds", "3", "--sweep"]) == 0
    out = capsys.readouterr().out
    runs = sum(len(method_spec(m).sweep) + 2 for m in ("lora", "full"))
    assert f"{runs} training runs" in out and "NVIDIA T4" in out and "DistilBERT (768 wide)" in out
    assert main(["estimate", "--profile", "gpu", "--notebook", "04"]) == 0
    assert "This notebook trains 15 runs" in capsys.readouterr().out  # 4 methods x 3 seeds + the 3-seed control
