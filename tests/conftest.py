"""Shared fixtures: a tiny untrained model directory and an in-process `latentdiff` runner."""

import contextlib
import io

import pytest
import torch

from latentdiff.cli import main as cli
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config

TINY_CLASSES = ("c0", "c1", "c2")


def build_tiny_model(directory, num_train_steps: int = 10):
    """An untrained tiny model (3 classes, T = `num_train_steps`) saved to `directory`; built in well under a second,
    and cheap to sample from, so bad-input tests can also run the commands that succeed."""
    cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={len(TINY_CLASSES)}",
                                                f"diffusion.num_train_steps={num_train_steps}", "sample.steps=2"])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), TINY_CLASSES)
    pipe.save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def run_cli(*args) -> tuple[int, str, str]:
    """`latentdiff ARGS` in-process: (exit code, stdout, stderr). Needs no pytest fixture, so it works inside
    hypothesis tests (capsys is function-scoped and would be shared between examples)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors and --help
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def latentdiff_cli():
    return run_cli


def assert_one_line_error(code: int, err: str, needle: str | None = None):
    """Exit code 2 and exactly one non-empty stderr line `latentdiff: error: ...` (no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("latentdiff: error:"), err
    assert "Traceback" not in err
    if needle is not None:
        assert needle in lines[0], (needle, lines[0])
