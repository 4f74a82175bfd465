"""The layers of docs/architecture.md point one way: an import-linter `layers` contract (pyproject.toml)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "latentdiff"
LINT = shutil.which("lint-imports")
MAX_MODULE_LINES = 450    # "about 400" (DESIGN.md): split a module when it passes this
MAX_FUNCTION_LINES = 80   # "about 60": split a function when it passes this

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_holds():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package in which diffusion/ imports the CLI is refused."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "latentdiff", ignore=shutil.ignore_patterns("pretrained", "assets",
                                                                                            "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schedule = tmp_path / "src" / "latentdiff" / "diffusion" / "schedule.py"
    schedule.write_text(schedule.read_text() + "\nfrom latentdiff.cli import main as _upward  # noqa: E402\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "latentdiff.diffusion.schedule -> latentdiff.cli.main" in out.stdout, out.stdout


def _sizes():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        yield path, len(text.splitlines()), ast.parse(text)


def test_modules_and_functions_stay_small():
    """DESIGN.md: split a module when it passes about 400 lines, a function when it passes about 60."""
    big_modules = [f"{p.relative_to(PACKAGE)} ({n} lines)" for p, n, _ in _sizes() if n > MAX_MODULE_LINES]
    long_functions = [f"{p.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for p, _, tree in _sizes() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not big_modules and not long_functions, big_modules + long_functions


def test_help_does_not_import_torch():
    code = ("import sys\nfrom latentdiff.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_the_public_api_is_lazy_and_complete():
    code = ("import sys, latentdiff\nassert 'torch' not in sys.modules\n"
            "from latentdiff import LatentDiffusion, SampleRequest, Cond, sample, classifier_free, ddim\n"
            "assert all(getattr(latentdiff, n) is not None for n in latentdiff.__all__)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "ok", out.stderr
