"""Safe loading: models, checkpoints, weights, configs and sample files load without running code, and crafted
inputs from an untrusted source are refused with one clear line before anything is built or written.

The malicious payloads are real: each test first shows that an unsafe loader (pickle, yaml.unsafe_load) *does*
run them, creating a marker folder, and then that latentdiff never does.
"""

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_one_line_error, run_cli
from PIL import Image

from latentdiff.errors import ConfigError, ModelError
from latentdiff.evaluation.features import _read_weights
from latentdiff.pipeline import LatentDiffusion, pretrained_dir
from latentdiff.pipeline.config import MAX_PARAMETERS, Config, config_from_dict, load_config
from latentdiff.training import checkpoints as ckpt
from latentdiff.utils import state as ld_state

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "latentdiff"


class Payload:
    """Unpickling this calls os.mkdir(marker): the classic pickle code-execution gadget, made harmless."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a crafted file executed code"


def evil_torch_file(path: Path, marker: Path) -> Path:
    """A torch.save file whose loading with weights_only=False runs the payload (checked, then undone)."""
    plain = path.with_name(path.name + ".tmp")  # torch.load reads *.safetensors files with safetensors
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, plain)
    torch.load(plain, weights_only=False)  # proves the payload is live
    assert marker.is_dir()
    marker.rmdir()
    return plain.replace(path)


def evil_pickle_bytes(marker: Path) -> bytes:
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)  # proves the payload is live
    assert marker.is_dir()
    marker.rmdir()
    return data


def yaml_payload(marker: Path) -> str:
    text = f"!!python/object/apply:os.mkdir [{json.dumps(str(marker))}]"
    yaml.unsafe_load(text)  # proves the payload is live
    assert marker.is_dir()
    marker.rmdir()
    return text


def samples_npz(path: Path, n: int = 4) -> Path:
    np.savez(path, images=np.zeros((n, 28, 28), np.uint8))
    return path


# ----------------------------------------------------------------------------- no unsafe loader in the source


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, isinstance(f, ast.Name), {k.arg: k.value for k in node.keywords}


def test_source_has_no_unsafe_loader():
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False; no pickle, eval, exec or
    unsafe YAML anywhere in the package. Adding one makes this test fail."""
    seen = {"torch.load": 0, "np.load": 0}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"} & set(names), path
        for owner, name, bare, kw in _calls(tree):
            where = f"{path.name}: {owner}.{name}"
            if (owner, name) == ("torch", "load"):
                seen["torch.load"] += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if (owner, name) == ("np", "load"):
                seen["np.load"] += 1
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            if owner == "yaml":
                assert name in ("safe_load", "safe_dump", "YAMLError"), where
            assert not (bare and name in ("eval", "exec", "compile", "__import__")), where
            assert (owner, name) != ("jit", "load"), where
    assert seen["torch.load"] >= 1 and seen["np.load"] >= 2, seen  # the audit found the loaders it checks


# ----------------------------------------------------------------------------- malicious pickles


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_inception_weights_pickle_never_runs(tmp_path, marker, suffix):
    weights = evil_torch_file(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(ModelError, match="cannot read inception weights"):
        _read_weights(weights)
    code, _, err = run_cli("eval", "--samples", samples_npz(tmp_path / "s.npz"), "--reference", "bundled",
                           "--extractor", "inception", "--inception-weights", weights)
    assert_one_line_error(code, err, "cannot read inception weights")


def test_pickle_renamed_to_safetensors_is_refused(tmp_path, marker):
    for target in (tmp_path / "evil.safetensors", tmp_path / "w.safetensors"):
        if target.name == "evil.safetensors":
            evil_torch_file(target, marker)
        else:
            target.write_bytes(evil_pickle_bytes(marker))
        with pytest.raises(ModelError, match="not a valid safetensors file"):
            ld_state.load_state(target)
        with pytest.raises(ModelError, match="not a valid safetensors file"):
            _read_weights(target)


@pytest.mark.parametrize("name", ["denoiser.safetensors", "autoencoder.safetensors", "config.json"])
def test_model_dir_file_replaced_by_pickle(tmp_path, tiny_model_dir, marker, name):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    evil_torch_file(model / name, marker)
    code, _, err = run_cli("sample", "--model", model, "--n", 1, "--out", tmp_path / "o.png", "--no-progress")
    assert_one_line_error(code, err, "not valid JSON" if name == "config.json" else "not a valid safetensors file")
    assert not (tmp_path / "o.png").exists()


def test_checkpoint_pickle_is_skipped_on_resume(tmp_path, marker):
    d = tmp_path / "checkpoints"
    d.mkdir()
    ld_state.save_state(ckpt.checkpoint_path(d, "denoiser", 3), {"model.w": torch.ones(2)}, {"step": 3})
    evil_torch_file(ckpt.checkpoint_path(d, "denoiser", 6), marker)  # the newest one is a pickle
    warnings = []
    tensors, meta, path = ckpt.load_latest(d, "denoiser", warn=warnings.append)
    assert meta == {"step": 3} and path.name == "denoiser-00000003.safetensors"
    assert len(warnings) == 1 and "not a valid safetensors file" in warnings[0]


def test_samples_with_pickled_objects_never_run(tmp_path, marker):
    obj = np.empty(2, dtype=object)
    obj[0] = Payload(marker)
    obj[1] = Payload(marker)
    np.savez(tmp_path / "objects.npz", images=obj)
    np.savez(tmp_path / "labels.npz", images=np.zeros((4, 28, 28), np.uint8), labels=obj)
    with open(tmp_path / "pickle.npz", "wb") as f:
        f.write(evil_pickle_bytes(marker))
    np.save(tmp_path / "single.npy", obj, allow_pickle=True)
    cases = [("objects.npz", "holds Python objects"), ("labels.npz", "holds Python objects"),
             ("pickle.npz", "cannot read samples file"), ("single.npy", "cannot read samples file")]
    for name, needle in cases:
        code, _, err = run_cli("eval", "--samples", tmp_path / name, "--reference", "bundled")
        assert_one_line_error(code, err, needle)


def test_image_that_is_a_pickle(tmp_path, tiny_model_dir, marker):
    (tmp_path / "x.png").write_bytes(evil_pickle_bytes(marker))
    code, _, err = run_cli("edit", tmp_path / "x.png", "--model", tiny_model_dir, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "cannot read image")
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- YAML


def test_yaml_tags_never_run(tmp_path, marker):
    payload = yaml_payload(marker)
    for text in (payload, f"training:\n  lr: {payload}\n", f"preset: {payload}\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(tmp_path / "c.yaml")
    code, _, err = run_cli("train", "--preset", "tiny", "--set", f"training.lr={payload}",
                           "--run-dir", tmp_path / "run")
    assert_one_line_error(code, err, "is not valid YAML")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,needle", [
    ("- 1\n- 2\n", "mapping at the top level"),
    ("just a string\n", "mapping at the top level"),
    ("42\n", "mapping at the top level"),
    ("preset: [tiny]\n", "unknown preset"),
    ("preset: {a: 1}\n", "unknown preset"),
    ("unet: 5\n", "unet must be a mapping"),
    ("unet:\n  base_channels: [1, 2]\n", "must be an integer"),
    ("unet:\n  channel_mults: {a: 1}\n", "must be a list"),
    ("training:\n  lr: .nan\n", "must be finite"),
    ("unet:\n  evil: 1\n", "unknown config key 'unet.evil'"),
    ("1: 2\n", "unknown config key"),
    ("data:\n  source: \"a\\0b\"\n", "NUL character"),
    ("[[[[[[[[[[[[[[[[[[[[[[[[", "not valid YAML"),
    ("a: &a [*a]\n", "unknown config key"),
])
def test_crafted_yaml_files(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(info.value)


def test_binary_config_file(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    code, _, err = run_cli("train", "--config", tmp_path / "c.yaml", "--run-dir", tmp_path / "run")
    assert_one_line_error(code, err, "not valid YAML")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- sizes and names before building


def _never_build(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network was built from a config that should have been refused")
    monkeypatch.setattr(LatentDiffusion, "build", classmethod(refuse))


@pytest.mark.parametrize("overrides,needle", [
    (["unet.base_channels=1000000"], "base_channels in 8…1024"),
    (["autoencoder.base_channels=1000000"], "base_channels in 8…1024"),
    (["unet.num_res_blocks=100000"], "num_res_blocks in 1…8"),
    (["unet.channel_mults=[1,2,3,4,5,6,7,8,9,10]"], "channel_mults must be a list of 1…6"),
    (["unet.channel_mults=[1,1000000]"], "channel_mults must be a list of 1…6"),
    (["unet.num_classes=10000000000"], "num_classes in 0…100000"),
    (["unet.head_dim=0"], "head_dim must be in 1…1024"),
    (["unet.in_channels=64", "autoencoder.latent_channels=64", "autoencoder.latent_channels=100"], "latent_channels"),
    (["unet.in_channels=3"], "must equal autoencoder.latent_channels"),
    (["unet.base_channels=1024", "unet.channel_mults=[16,16,16,16,16,16]", "unet.num_res_blocks=8"],
     "billion parameters"),
    (["training.batch_size=100000000"], "batch_size must be <= 65536"),
    (["training.seed=-1"], "seed must be in"),
    (["sample.sampler=../../evil"], "sample.sampler must be one of"),
    (["sample.steps=1000"], "sample.steps must be in 1…diffusion.num_train_steps (100)"),
    (["sample.guidance=-1"], "sample.guidance must be"),
    (["device=cuda:abc"], "device must be"),
    (["diffusion.schedule=../../x"], "diffusion.schedule must be one of"),
])
def test_huge_or_unknown_config_values_are_refused_before_building(monkeypatch, overrides, needle):
    _never_build(monkeypatch)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(preset="tiny", overrides=overrides)


def test_parameter_count_is_exact():
    """The size check counts parameters on the meta device; it must agree with the real networks."""
    for classes in (0, 7):
        cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={classes}", "autoencoder.attention=true"])
        pipe = LatentDiffusion.build(cfg, (28, 28))
        real = sum(p.numel() for m in (pipe.autoencoder, pipe.denoiser) for p in m.parameters())
        assert cfg.parameter_count() == real
    assert Config().validate().parameter_count() < MAX_PARAMETERS


def test_attention_heads_always_divide_the_width():
    """Widths that are not a multiple of head_dim used to crash in the first forward pass."""
    cfg = load_config(preset="tiny", overrides=["unet.base_channels=50", "unet.head_dim=16",
                                                "autoencoder.base_channels=50", "autoencoder.attention=true"])
    pipe = LatentDiffusion.build(cfg, (28, 28))
    z = torch.randn(1, *pipe.autoencoder.latent_shape)
    assert pipe.denoiser.net(z, torch.tensor([3])).shape == z.shape
    assert pipe.autoencoder.from_latent(z).shape == (1, 1, 28, 28)


# ----------------------------------------------------------------------------- crafted model directories


def _model_with_meta(tmp_path, tiny_model_dir, mutate) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    meta = json.loads((model / "config.json").read_text())
    meta = mutate(meta)
    (model / "config.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return model


def _set(path: str, value):
    def mutate(meta):
        *keys, last = path.split(".")
        d = meta
        for k in keys:
            d = d[k]
        d[last] = value
        return meta
    return mutate


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: [m], "expected a JSON object"),
    (lambda m: "not json {", "not valid JSON"),
    (lambda m: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (_set("format_version", "1"), "format_version must be a non-negative integer"),
    (_set("format_version", 99), "written by a newer latentdiff (format 99)"),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "has no 'config' entry"),
    (_set("config", "x"), "config must be a mapping"),
    (_set("config.unet.base_channels", 10**6), "base_channels in 8…1024"),
    (_set("config.unet.base_channels", 1e400), "must be an integer"),
    (_set("config.unet.base_channels", "sixteen"), "must be an integer"),
    (_set("config.unet.evil", 1), "unknown config key 'unet.evil'"),
    (_set("config.diffusion.schedule", "../../../x"), "diffusion.schedule must be one of"),
    (_set("config.sample.sampler", "os.system"), "sample.sampler must be one of"),
    (_set("config.diffusion.num_train_steps", 10**12), "num_train_steps must be in"),
    (_set("image_size", [10**9, 28]), "image_size must be [height, width]"),
    (_set("image_size", [28]), "image_size must be [height, width]"),
    (_set("image_size", "28x28"), "image_size must be [height, width]"),
    (_set("image_size", [True, 28]), "image_size must be [height, width]"),
    (_set("image_size", [0, 28]), "image_size must be [height, width]"),
    (_set("class_names", "c0c1c2"), "class_names must be a list of 3"),
    (_set("class_names", ["a", "b"]), "class_names must be a list of 3"),
    (_set("class_names", ["a", "b", 3]), "class_names must be a list of 3"),
    (_set("class_names", ["a", "b", "\x1b[2J"]), "class_names must be a list of 3"),
    (_set("class_names", ["a", "b", "x" * 1000]), "class_names must be a list of 3"),
])
def test_crafted_model_metadata(monkeypatch, tmp_path, tiny_model_dir, mutate, needle):
    model = _model_with_meta(tmp_path, tiny_model_dir, mutate)
    _never_build(monkeypatch)
    with pytest.raises(ModelError, match=re.escape(needle)) as info:
        LatentDiffusion.load(model)
    assert "\n" not in str(info.value)


def test_oversized_config_json(tmp_path, tiny_model_dir):
    model = _model_with_meta(tmp_path, tiny_model_dir, lambda m: {**m, "padding": "x" * (2 << 20)})
    code, _, err = run_cli("info", "--model", model)
    assert_one_line_error(code, err, "is larger than")


def test_crafted_weights(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    good = {name: ld_state.load_state(model / f"{name}.safetensors") for name in ("autoencoder", "denoiser")}

    def write(name, tensors, meta=None):
        ld_state.save_state(model / f"{name}.safetensors", tensors, good[name][1] if meta is None else meta)

    def expect(needle):
        code, _, err = run_cli("info", "--model", model)
        assert_one_line_error(code, err, needle)

    tensors = dict(good["denoiser"][0])
    key = next(iter(tensors))
    write("denoiser", {**tensors, key: torch.full_like(tensors[key], float("nan"))})
    expect("holds NaN or infinite weights")
    write("denoiser", {**tensors, key: torch.zeros(3, 3)})
    expect("does not match config.json")
    write("denoiser", {**tensors, "evil": torch.zeros(1)})
    expect("does not match config.json")
    write("denoiser", tensors)
    ae = dict(good["autoencoder"][0])
    write("autoencoder", {**ae, "latent_scale": torch.zeros_like(ae["latent_scale"])})
    expect("latent scale <= 0")
    raw = (model / "autoencoder.safetensors").read_bytes()
    (model / "autoencoder.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    expect("not a valid safetensors file")
    write("autoencoder", ae, meta=[1])  # a header whose metadata is not an object
    with pytest.raises(ModelError, match="unreadable metadata header"):
        ld_state.load_state(model / "autoencoder.safetensors")
    write("autoencoder", ae)
    assert run_cli("info", "--model", model)[0] == 0  # intact again


@pytest.mark.parametrize("name", ["../../x", "..", ".", "", "../pretrained/fashion-mnist", "fashion-mnist/..",
                                  "fashion-mnist/../fashion-mnist", "/etc", "~", "fashion-mnist/config.json",
                                  "FASHION-MNIST", "fashion-mnist\x00"])
def test_pretrained_names_cannot_leave_the_package(name):
    with pytest.raises(ModelError, match="no pretrained model named"):
        pretrained_dir(name)
    with pytest.raises(ModelError, match="no pretrained model named"):
        LatentDiffusion.load(f"pretrained:{name}")
    assert pretrained_dir("fashion-mnist").name == "fashion-mnist"


# ----------------------------------------------------------------------------- a model dir cannot write outside


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_untrusted_model_dir_with_symlinks_writes_only_the_output(tmp_path, tiny_model_dir):
    """Symlinks in a model directory may point anywhere; reading through them is harmless (only JSON and
    safetensors are parsed) and no command writes into a model directory or follows its links to write."""
    outside = tmp_path / "outside"
    (outside / "store").mkdir(parents=True)
    (outside / "victim.txt").write_text("do not touch")
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "autoencoder.safetensors", "denoiser.safetensors"):
        shutil.copy(tiny_model_dir / name, outside / "store" / name)
        (model / name).symlink_to(outside / "store" / name)
    for name in ("model_card.md", "samples.png", "edited.png", "interpolation.png"):
        (model / name).symlink_to(outside / "victim.txt")
    for name in ("samples", "checkpoints", "individual"):
        (model / name).symlink_to(outside, target_is_directory=True)
    img = tmp_path / "in.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(img)
    before_outside, before_model = _snapshot(outside), _snapshot(model)
    out = tmp_path / "out"
    m = ["--model", model, "--steps", 1]
    for args in (["sample", "--n", 2, "--out", out / "s.png", "--no-progress", "--save-individual", out / "ind"],
                 ["sample", "--n", 2, "--out", out / "s.npz", "--no-progress"],
                 ["edit", img, "--out", out / "e.png"], ["inpaint", img, "--rect", "1,1,9,9", "--out", out / "i.png"],
                 ["interpolate", "seed:1", "seed:2", "--frames", 2, "--out", out / "t.png"]):
        code, _, err = run_cli(*args, *m)
        assert code == 0, err
    code, _, err = run_cli("info", "--model", model)
    assert code == 0, err
    assert _snapshot(outside) == before_outside and _snapshot(model) == before_model
    assert sorted(p.name for p in out.iterdir()) == ["e.png", "i.png", "ind", "s.npz", "s.png", "t.gif", "t.png"]


def test_output_symlink_is_replaced_not_followed(tmp_path, tiny_model_dir):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "s.png"
    link.symlink_to(victim)
    code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 1, "--steps", 1, "--out", link,
                           "--no-progress")
    assert code == 0, err
    assert victim.read_bytes() == b"precious" and not link.is_symlink() and Image.open(link).size[0] > 0


def test_model_file_linked_to_a_device_is_refused(tmp_path, tiny_model_dir):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "denoiser.safetensors").unlink()
    (model / "denoiser.safetensors").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ModelError, match="missing file"):
        LatentDiffusion.load(model)
    (model / "config.json").unlink()
    (model / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match="config.json is missing"):
        LatentDiffusion.load(model)


def test_saved_model_round_trips_through_the_checks(tmp_path):
    """The checks accept what latentdiff itself writes, including an unconditional model."""
    for classes in (0, 3):
        cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={classes}"])
        d = tmp_path / f"m{classes}"
        LatentDiffusion.build(cfg, (28, 20), tuple(f"k{i}" for i in range(classes))).save(d)
        pipe = LatentDiffusion.load(d)
        assert pipe.image_shape == (1, 28, 20) and len(pipe.class_names) == classes
        assert config_from_dict(pipe.cfg.to_dict()).to_dict() == cfg.to_dict()
    assert LatentDiffusion.load("pretrained:fashion-mnist").num_classes == 10


# ----------------------------------------------------------------------------- a few checks in a real process


def test_subprocess_errors_are_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    weights = evil_torch_file(tmp_path / "evil.pth", marker)
    samples = samples_npz(tmp_path / "s.npz")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cases = [(["sample", "--model", "pretrained:../pretrained/fashion-mnist", "--out", tmp_path / "o.png"],
              "no pretrained model named"),
             (["eval", "--samples", samples, "--reference", "bundled", "--extractor", "inception",
               "--inception-weights", weights], "cannot read inception weights")]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert not marker.exists() and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("meta, needle", [
    ({"autoencoder": {"base_channels": "lots"}, "image_size": [28, 28]}, "base_channels"),
    ({"autoencoder": {"no_such_field": 1}, "image_size": [28, 28]}, "no_such_field"),
    ({"autoencoder": "not a mapping", "image_size": [28, 28]}, "mapping"),
    ({"autoencoder": {}, "image_size": [10**9, 28]}, "image_size"),
    ({"autoencoder": {}, "image_size": "28"}, "image_size"),
    ({"autoencoder": {}, "image_size": [28, 28]}, "does not match the autoencoder settings in its header: 102 tensor"),  # valid header, but no weights in the file
])
def test_crafted_run_dir_autoencoder_is_refused_cleanly(tmp_path, meta, needle):
    """`latentdiff train` reads RUN_DIR/autoencoder.safetensors: its header is checked like a model's config."""
    import torch

    from latentdiff.errors import ModelError
    from latentdiff.training.autoencoder import load_trained_autoencoder
    from latentdiff.utils.state import save_state

    save_state(tmp_path / "autoencoder.safetensors", {"junk": torch.zeros(3)}, meta)
    with pytest.raises(ModelError, match=needle):
        load_trained_autoencoder(tmp_path, "cpu")
