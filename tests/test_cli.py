"""End to end through the `latentdiff` command on the tiny preset, plus bad-input handling."""

import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image

from latentdiff.cli import main as cli
from latentdiff.cli.options import PRESET_NAMES, Bounded, Command
from latentdiff.pipeline.presets import PRESETS
from latentdiff.utils.state import load_state

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run("train-autoencoder", "--preset", "tiny", "--run-dir", run_dir, "--no-progress")
    run("train", "--preset", "tiny", "--run-dir", run_dir, "--no-progress", "--set", "training.sample_every=2")
    return run_dir


def test_train_then_sample_npz_and_png(model_dir, tmp_path):
    assert (model_dir / "config.json").is_file() and (model_dir / "samples.png").is_file()
    periodic = sorted(p.name for p in (model_dir / "samples").iterdir())
    assert periodic == ["step-00000002.png", "step-00000004.png"]  # the final grid is samples.png
    out = run("sample", "--model", model_dir, "--n", 5, "--steps", 3, "--sampler", "ddpm", "--seed", 1,
              "--out", tmp_path / "s.npz", "--no-progress")
    assert "wrote 5 images" in out.stdout
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (5, 28, 28) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 3, 4]
    run("sample", "--model", model_dir, "--n", 4, "--steps", 2, "--class", 3, "--guidance", 2,
        "--out", tmp_path / "g.png", "--save-individual", tmp_path / "ind", "--no-progress")
    grid = Image.open(tmp_path / "g.png")
    assert grid.mode == "L" and "latentdiff" in grid.text
    assert sorted(p.name for p in (tmp_path / "ind").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    # same seed, same images
    run("sample", "--model", model_dir, "--n", 5, "--steps", 3, "--sampler", "ddpm", "--seed", 1,
        "--out", tmp_path / "s2.npz", "--no-progress")
    assert np.array_equal(np.load(tmp_path / "s2.npz")["images"], data["images"])


def test_resume_continues_to_identical_weights(model_dir, tmp_path):
    """Drop the last checkpoint, resume from the one before: the same final weights, bit for bit."""
    ckpts = sorted((model_dir / "checkpoints").glob("denoiser-*.safetensors"))
    assert [p.name for p in ckpts] == ["denoiser-00000003.safetensors", "denoiser-00000006.safetensors"]
    final, _ = load_state(ckpts[-1])
    ckpts[-1].unlink()
    out = run("train", "--preset", "tiny", "--run-dir", model_dir, "--resume", "--no-progress")
    assert "resumed denoiser from denoiser-00000003" in out.stdout
    again, meta = load_state(ckpts[-1])
    assert meta["step"] == 6
    for key in final:
        assert np.array_equal(final[key].numpy(), again[key].numpy()), key


def test_image_folder_rgb_end_to_end(tmp_path):
    """A folder of RGB images of mixed sizes, resized by --image-size, class labels from subfolders."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            size = (20 + i, 18 + 2 * i)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    run_dir = tmp_path / "run"
    common = ["--preset", "tiny", "--run-dir", run_dir, "--data", tmp_path / "imgs", "--image-size", 16,
              "--no-progress", "--set", "data.limit=null"]
    run("train-autoencoder", *common)
    run("train", *common)
    run("sample", "--model", run_dir, "--n", 3, "--steps", 2, "--out", tmp_path / "rgb.npz", "--no-progress")
    data = np.load(tmp_path / "rgb.npz")
    assert data["images"].shape == (3, 16, 16, 3) and data["labels"].tolist() == [0, 1, 0]
    (tmp_path / "imgs" / "dogs" / "bad.png").write_text("not an image")
    proc = run("train-autoencoder", *common, check=False)
    assert proc.returncode == 2 and "bad.png" in proc.stderr and "Traceback" not in proc.stderr


def test_info(model_dir):
    out = run("info", "--model", model_dir)
    assert '"latent_shape": [\n    2,\n    7,\n    7\n  ]' in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["sample", "--model", "nope-dir"], "model directory not found"),
    (["sample", "--model", "x", "--steps", "-3"], "--steps: must be a positive integer"),
    (["sample", "--model", "x", "--sampler", "euler-x"], "invalid choice"),
    (["sample", "--model", "x", "--n", "0"], "--n: must be a positive integer"),
    (["sample", "--model", "x", "--guidance", "nan"], "--guidance"),
    (["sample", "--model", "pretrained:nope"], "no pretrained model named 'nope'"),
    (["train", "--preset", "tiny", "--set", "training.lr=-1"], "training.lr must be in (0, 1)"),
    (["train", "--preset", "tiny", "--set", "unet.bogus=1"], "unknown config key 'unet.bogus'"),
    (["train", "--config", "missing.yaml"], "config file not found"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(args, needle):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_bad_input_on_a_real_model(model_dir, tmp_path):
    for args, needle in [
        (["--class", "10"], "class must be between 0 and 9"),
        (["--steps", "5000"], "steps must be an integer between 1 and 100"),
        (["--out", tmp_path / "x.jpg"], "must end in .png or .npz"),
    ]:
        proc = run("sample", "--model", model_dir, "--n", 2, *args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # data of another size than the trained autoencoder
    proc = run("train", "--preset", "tiny", "--run-dir", model_dir, "--image-size", 32, check=False)
    assert proc.returncode == 2 and "does not match the trained autoencoder" in proc.stderr, proc.stderr
    # training stage 2 without stage 1
    proc = run("train", "--preset", "tiny", "--run-dir", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "train the autoencoder first" in proc.stderr


def test_help_explains_every_option():
    out = run("sample", "--help").stdout
    for option in ("--model", "--n", "--steps", "--sampler", "--seed", "--out", "--save-individual", "--class",
                   "--guidance"):
        assert option in out
    assert "demo" in run("--help").stdout


# --- the click command line: lazy commands, complete help, one-line errors, typed config flags ----------------------


def test_top_level_help_lists_every_command_without_importing_them():
    code = ("import sys; from latentdiff.cli import main as cli; assert cli.main(['--help']) == 0; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('latentdiff.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    *help_lines, modules = proc.stdout.strip().splitlines()
    assert modules == "['latentdiff.cli.main', 'latentdiff.cli.options']"  # no torch, no command module
    text = "".join("".join(help_lines).split())  # click wraps long lines, also after hyphens
    for name, (_, one_line_help) in cli.COMMANDS.items():
        assert "".join(f"{name} {one_line_help}".split()) in text, name


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_documents_every_parameter(name, capsys):
    command = cli.cli.get_command(None, name)
    if isinstance(command, click.Group):  # `export onnx|diffusers`: each subcommand documents its own
        assert command.help and cli.main([name, "--help"]) == 0
        capsys.readouterr()
        commands = [([name, sub], c) for sub, c in command.commands.items()]
    else:
        commands = [([name], command)]
    for words, command in commands:
        assert isinstance(command, Command) and command.name == words[-1] and command.help
        for param in command.params:
            assert param.help, (words, param.name)
        assert cli.main([*words, "--help"]) == 0
        out = capsys.readouterr().out
        for param in command.params:
            shown = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
            assert shown in out, (words, shown)


def test_presets_offered_are_the_presets():
    assert set(PRESET_NAMES) == set(PRESETS)


def test_version_and_no_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"latentdiff {__import__('latentdiff').__version__}"
    assert cli.main([]) == 2
    assert "Commands:" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["sample"], "missing option --model"),
    (["sample", "--model", "m", "--n", "abc"], "argument --n: expected an integer, got 'abc'"),
    (["sample", "--model", "m", "--eta", "1.5"], "argument --eta: must be between 0 and 1, got 1.5"),
    (["sample", "--model", "m", "--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["sample", "--model", "m", "--n"], "--n"),
    (["sample", "--model", "m", "--bogus"], "--bogus"),
    (["sample", "--model", "m", "--sampler", "\x1b[31mred\n"], "invalid choice: '\\x1b[31mred\\n'"),
    (["train", "--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from auto, cpu, cuda)"),
    (["download", "mnist"], "argument DATASET: invalid choice: 'mnist'"),
    (["interpolate", "seed:1"], "missing argument B"),
    (["--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line(args, needle):
    code, out, err = run_cli(*args)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_library_and_os_errors_are_one_line_and_interrupts_130(monkeypatch):
    from latentdiff.pipeline import LatentDiffusion

    def denied(*args, **kwargs):
        raise PermissionError("permission denied:\nline two")

    monkeypatch.setattr(LatentDiffusion, "load", denied)
    code, _, err = run_cli("info", "--model", "m")
    assert_one_line_error(code, err, "permission denied:\\nline two")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LatentDiffusion, "load", interrupted)
    assert run_cli("info", "--model", "m")[::2] == (130, "latentdiff: interrupted\n")


def test_bounded_values():
    unit = Bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]")
    assert unit.parse("1") == 1.0 and unit.parse(" 0.25 ") == 0.25 and unit.parse(0.5) == 0.5
    for bad in ("0", "-0.0", "1.0000001", "nan", "inf", "1e400", "x", ""):
        with pytest.raises(ValueError):
            unit.parse(bad)
    count = Bounded(int, 1, 10, requirement="must be in 1..10")
    assert count.parse("10") == 10 and count.parse("+3") == 3 and count.parse("1_0") == 10
    for bad in ("0", "11", "2.0", "1e1", str(2**64), "9" * 400):  # 400 digits: beyond float, no OverflowError
        with pytest.raises(ValueError):
            count.parse(bad)
    assert Bounded(int, 1, requirement="positive").parse("9" * 400) == int("9" * 400)


@pytest.fixture
def captured_config(monkeypatch):
    """Run a training command up to the training function and return the config it was given."""
    from latentdiff.training import autoencoder, diffusion

    seen = {}
    monkeypatch.setattr(autoencoder, "train_autoencoder", lambda cfg, *a, **k: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(diffusion, "train_diffusion", lambda cfg, *a, **k: seen.setdefault("cfg", cfg))
    return seen


def test_typed_flags_set_config_fields_as_given(captured_config, tmp_path):
    code, _, err = run_cli("train-autoencoder", "--preset", "tiny", "--data", "yes", "--data-dir", "0123",
                           "--image-size", 16, "--steps", 3, "--batch-size", 4, "--device", "cpu",
                           "--set", "data.limit=null", "--set", "data.source=bundled", "--run-dir", tmp_path)
    assert code == 0, err
    cfg = captured_config["cfg"]
    # the flags come after --set, and their text is never read as YAML (0123 is not octal 83, yes is not True)
    assert (cfg.data.source, cfg.data.data_dir, cfg.data.image_size, cfg.data.limit) == ("yes", "0123", 16, None)
    assert (cfg.autoencoder_training.steps, cfg.autoencoder_training.batch_size, cfg.device) == (3, 4, "cpu")
    captured_config.clear()
    code, _, err = run_cli("train", "--preset", "tiny", "--steps", 5, "--data-dir", "none", "--run-dir", tmp_path)
    assert code == 0, err
    cfg = captured_config["cfg"]
    assert (cfg.training.steps, cfg.autoencoder_training.steps, cfg.data.data_dir) == (5, 4, "none")


def test_data_flags_name_the_folder_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train-autoencoder", "--preset", "tiny", "--data", "fashion-mnist", "--data-dir", "0123",
                           "--run-dir", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, "0123")
    code, _, err = run_cli("train-autoencoder", "--preset", "tiny", "--data", "yes", "--run-dir", tmp_path / "run",
                           "--no-progress")
    assert_one_line_error(code, err, "'yes'")


def test_load_config_fields_are_typed_and_checked():
    from latentdiff.errors import ConfigError
    from latentdiff.pipeline.config import load_config

    cfg = load_config(preset="tiny", overrides=["data.data_dir=0123"], fields={"data.source": "null"})
    assert cfg.data.data_dir == "83"  # --set reads YAML (1.1), where 0123 is the octal number 83
    assert cfg.data.source == "null"  # a field's str is taken as it is
    for fields, needle in (({"data.nope": 1}, "unknown config key 'data.nope'"),
                           ({"nope.x": 1}, "unknown config key 'nope.x'"),
                           ({"data.image_size": "big"}, "data.image_size must be an integer"),
                           ({"data.image_size": 4}, "data.image_size must be between 8 and 1024")):
        with pytest.raises(ConfigError, match=needle):
            load_config(preset="tiny", fields=fields)
