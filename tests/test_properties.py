"""Bad input at every boundary, property-based: CLI options, config values and files, model metadata, images,
masks and sample files. Whatever hypothesis draws, latentdiff either does its job or prints one line
`latentdiff: error: ...` and exits with code 2: never a traceback, never a partial output file.

Commands that succeed run on a tiny untrained model with T = 10, so each example costs milliseconds; option
values are checked against a missing model, so validation must happen before anything is loaded.
"""

import io
import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, run_cli
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentdiff.errors import ConfigError, DataError, ModelError
from latentdiff.evaluation.evaluate import load_samples
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import Config, load_config

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Command-line arguments can hold any character but NUL (the OS passes C strings).
argv_text = st.text(st.characters(blacklist_characters="\x00"), max_size=12)
numbers = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.floats(-5, 5).map(lambda v: f"{v:.3g}"),
    st.integers(-3, 20).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-0", "1e400", "0x10", "1_000", " 7 ", "", "3.0", "1,2", "٣", "+4"]),
)
option_values = st.one_of(numbers, argv_text)


def _no_leftovers(directory: Path):
    """No output and no temporary file of an atomic write was left behind."""
    assert not directory.exists() or not any(directory.iterdir()), sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- numeric options


def _as(cast, text):
    try:
        return cast(text)
    except ValueError:
        return None


def _int_in(lo, hi=None):
    return lambda t: (v := _as(int, t)) is not None and v >= lo and (hi is None or v <= hi)


def _float_in(lo, hi, open_low=False):
    return lambda t: ((v := _as(float, t)) is not None and math.isfinite(v) and (v > lo if open_low else v >= lo)
                      and (hi is None or v <= hi))


def _weights_ok(t):
    vals = [_as(float, v) for v in t.split(",")]
    return all(v is not None and math.isfinite(v) and v > 0 for v in vals)


def _rect_ok(t):
    vals = [_as(int, v) for v in t.split(",")]
    return len(vals) == 4 and None not in vals and 0 <= vals[0] < vals[2] and 0 <= vals[1] < vals[3]


# (command prefix, option, is the value valid?)
OPTIONS = [
    (["sample"], "--n", _int_in(1, 1_000_000)),
    (["sample"], "--steps", _int_in(1)),
    (["sample"], "--guidance", _float_in(0, None)),
    (["sample"], "--eta", _float_in(0, 1)),
    (["sample"], "--seed", _int_in(0, 2**63 - 1)),
    (["sample"], "--batch-size", _int_in(1)),
    (["sample"], "--class", _int_in(0)),
    (["edit", "x.png"], "--strength", _float_in(0, 1, open_low=True)),
    (["edit", "x.png"], "--seed", _int_in(0, 2**63 - 1)),
    (["interpolate", "seed:1", "seed:2"], "--frames", _int_in(2, 1000)),
    (["interpolate", "seed:1", "seed:2"], "--scale", _int_in(1, 16)),
    (["combine", "a.png", "b.png"], "--weights", _weights_ok),
    (["inpaint", "x.png"], "--rect", _rect_ok),
    (["repair", "x.png"], "--resample", _int_in(0, 100)),
    (["eval", "--model"], "--k", _int_in(1)),
    (["eval", "--model"], "--n", _int_in(1, 1_000_000)),
]


@pytest.mark.parametrize("prefix,option,valid", OPTIONS, ids=[f"{p[0]}{o}" for p, o, _ in OPTIONS])
@FAST
@given(value=option_values)
def test_numeric_options(tmp_path, prefix, option, valid, value):
    missing = tmp_path / "no-model"
    out = tmp_path / "out"
    args = [*prefix[:1], *(["--model", missing] if prefix[1:] == ["--model"] else prefix[1:])]
    if prefix[0] != "eval":
        args += ["--model", missing, "--out", out / "o.png"]
    code, _, err = run_cli(*args, f"{option}={value}")  # OPTION=VALUE: a VALUE such as -5 is not an option
    assert_one_line_error(code, err)
    if valid(value):  # accepted: a later check fails (at the latest, the missing model)
        assert f"argument {option}" not in err
    else:
        assert f"argument {option}" in err
    _no_leftovers(out)


@SLOW
@given(value=option_values, steps=st.integers(-2, 14))
@example(value=str(2**63), steps=1)  # beyond int64: NumPy makes it uint64, which torch cannot convert
def test_sample_options_on_a_real_model(tmp_path, tiny_model_dir, value, steps):
    """On a loadable model, the class must exist and the steps fit the schedule (T = 10); else one line, no file."""
    out = tmp_path / "o.npz"
    code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 2, f"--steps={steps}", f"--class={value}",
                           "--out", out, "--no-progress")
    k = _as(int, value)
    if k is not None and 0 <= k < 3 and 1 <= steps <= 10:
        assert code == 0, err
        assert np.load(out)["labels"].tolist() == [k, k]
        out.unlink()
    else:
        assert_one_line_error(code, err)
    assert not out.exists()


@FAST
@given(a=st.one_of(argv_text, numbers.map(lambda v: f"seed:{v}")), b=st.sampled_from(["seed:0", "seed:x"]))
def test_interpolate_endpoints(tmp_path, tiny_model_dir, a, b):
    assume(not a.startswith("-"))  # an option (e.g. --help), not an endpoint
    out = tmp_path / "t.png"
    code, _, err = run_cli("interpolate", a, b, "--model", tiny_model_dir, "--frames", 2, "--steps", 1, "--out", out)
    seed_ok = a.startswith("seed:") and _int_in(0, 2**63 - 1)(a[5:])
    if seed_ok and b == "seed:0":
        assert code == 0, err
        out.unlink()
        out.with_suffix(".gif").unlink()
    else:
        assert_one_line_error(code, err)
    assert not out.exists() and not out.with_suffix(".gif").exists()


@FAST
@given(out=argv_text)
def test_output_names(tmp_path, tiny_model_dir, out):
    """Any --out text: a PNG is written where asked (inside the working folder), or one line and nothing."""
    assume(out not in (".", "..") and "/" not in out)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    target = work / out
    code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 1, "--steps", 1, "--out", target,
                           "--no-progress")
    if Path(out).suffix.lower() in (".png", ".npz") and not target.is_dir():
        assert code == 0, err
        assert sorted(p.name for p in work.iterdir()) == [out]
    else:
        assert_one_line_error(code, err, "--out")
    shutil.rmtree(work)


def test_output_that_cannot_be_written(tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    for out, needle in ((tmp_path / "file" / "o.png", "is not a folder"), (tmp_path / "folder.png", "is a folder")):
        code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 1, "--out", out, "--no-progress")
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 1, "--out", tmp_path / "o.png",
                           "--save-individual", tmp_path / "file", "--no-progress")
    assert_one_line_error(code, err, "--save-individual")
    code, _, err = run_cli("sample", "--model", tiny_model_dir, "--n", 20_000, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "at most 10000 images")
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- configs


def _keys(obj, prefix=""):
    for name, value in obj.to_dict().items() if isinstance(obj, Config) else obj.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


KEYS = sorted(_keys(Config()))
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 2000), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=True, allow_infinity=True), argv_text)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS + ["x", "unet", "training"]), inner,
                                                 max_size=3)), max_leaves=8)


def _load_or_config_error(**kw):
    try:
        return load_config(**kw)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return None


@FAST
@given(key=st.one_of(st.sampled_from(KEYS), argv_text), value=st.one_of(option_values, yaml_values.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip())))
def test_set_overrides(key, value):
    cfg = _load_or_config_error(preset="tiny", overrides=[f"{key}={value}"])
    if cfg is not None:
        assert cfg.validate() is cfg  # whatever was accepted is valid


@FAST
@given(doc=st.dictionaries(st.sampled_from(["data", "unet", "autoencoder", "training", "diffusion", "sample",
                                             "device", "conditional", "preset", "x"]), yaml_values, max_size=4))
def test_yaml_config_files(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    _load_or_config_error(path=path)


@FAST
@given(data=st.binary(max_size=200))
def test_yaml_config_bytes(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    _load_or_config_error(path=path)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    yield path


# Small numbers only: a mutated config that stays valid is built for real, so it must stay small.
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(-2, 2),
                                     st.sampled_from([1e300, -1e300]), argv_text),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(argv_text, inner, max_size=2)), max_leaves=5)


@SLOW
@given(data=st.data())
def test_model_metadata_mutations(tmp_path_factory, tiny_model_dir, data):
    meta = json.loads((tiny_model_dir / "config.json").read_text())
    paths = [p for p in _leaves(meta) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = data.draw(json_values)
        paths = [p for p in _leaves(meta) if p]
    model = tmp_path_factory.mktemp("mutated")
    for name in ("autoencoder.safetensors", "denoiser.safetensors"):
        (model / name).symlink_to(tiny_model_dir / name)
    (model / "config.json").write_text(json.dumps(meta))
    try:
        pipe = LatentDiffusion.load(model)
    except ModelError as e:
        assert "\n" not in str(e)
    else:
        assert pipe.image_shape[0] in (1, 3)


# ----------------------------------------------------------------------------- images and masks


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w×h 8-bit gray pixels but holds no pixel data (a decompression-bomb shape)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))


# The modes each format can store (a few are converted on saving, e.g. GIF quantizes RGB to P).
MODES = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
         "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"],
         "JPEG": ["L", "RGB", "CMYK"], "BMP": ["1", "L", "P", "RGB"], "GIF": ["L", "P", "RGB"],
         "WEBP": ["RGB", "RGBA"]}


@st.composite
def image_files(draw):
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    if draw(st.booleans()):
        h = w  # square images are the model's aspect ratio: these must succeed
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I", "F"):  # 16/32-bit gray and float gray
        im = Image.fromarray(np.asarray(im.convert("L")).astype({"I;16": np.uint16, "I": np.int32,
                                                                 "F": np.float32}[mode]) * 200)
    else:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue(), (w, h)


@SLOW
@given(image=image_files())
def test_image_modes_formats_and_sizes(tmp_path, tiny_model_dir, image):
    data, (w, h) = image
    src, out = tmp_path / "in.img", tmp_path / "out" / "e.png"
    src.write_bytes(data)
    code, _, err = run_cli("edit", src, "--model", tiny_model_dir, "--steps", 2, "--out", out)
    if w == h:
        assert code == 0, err
        assert Image.open(out).size == (28, 28)
        out.unlink()
    else:
        assert_one_line_error(code, err, "aspect ratio differs")
    _no_leftovers(out.parent)


@st.composite
def broken_image_files(draw):
    kind = draw(st.sampled_from(["truncated", "bytes", "empty", "header", "zero", "text"]))
    if kind == "truncated":
        buf = io.BytesIO()
        Image.new(draw(st.sampled_from(["L", "RGB"])), (28, 28), 7).save(buf, "PNG")
        full = buf.getvalue()
        return full[:draw(st.integers(0, len(full) - 13))]  # cut before the image data ends
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "empty":
        return b""
    if kind == "header":  # huge declared sizes: refused from the header, never decoded
        w = draw(st.integers(8193, 2**31 - 1))
        return png_header_only(w, draw(st.integers(max(1, 2**26 // w + 1), 2**31 - 1)))
    if kind == "zero":
        return png_header_only(*draw(st.sampled_from([(0, 28), (28, 0), (0, 0)])))
    return draw(st.text(max_size=100)).encode()


@SLOW
@given(data=broken_image_files(), command=st.sampled_from(["edit", "repair", "inpaint-mask", "combine"]))
def test_broken_image_files(tmp_path, tiny_model_dir, data, command):
    bad, good, out = tmp_path / "bad.png", tmp_path / "good.png", tmp_path / "out" / "o.png"
    bad.write_bytes(data)
    Image.new("L", (28, 28), 100).save(good)
    args = {"edit": ["edit", bad], "repair": ["repair", bad], "combine": ["combine", good, bad],
            "inpaint-mask": ["inpaint", good, "--mask", bad]}[command]
    code, _, err = run_cli(*args, "--model", tiny_model_dir, "--steps", 1, "--out", out)
    assert_one_line_error(code, err, "image")
    _no_leftovers(out.parent)


@SLOW
@given(w=st.integers(20, 36), h=st.integers(20, 36), kind=st.sampled_from(["zero", "one", "random", "binary"]),
       mode=st.sampled_from(["L", "RGB", "1"]), seed=st.integers(0, 1000))
def test_inpaint_masks(tmp_path, tiny_model_dir, w, h, kind, mode, seed):
    rng = np.random.default_rng(seed)
    values = {"zero": np.zeros((h, w), np.uint8), "one": np.full((h, w), 255, np.uint8),
              "random": rng.integers(0, 256, (h, w), dtype=np.uint8),
              "binary": (rng.random((h, w)) < 0.1).astype(np.uint8) * 255}[kind]
    image, mask, out = tmp_path / "i.png", tmp_path / "m.png", tmp_path / "out" / "o.png"
    Image.new("L", (28, 28), 90).save(image)
    Image.fromarray(values, "L").convert(mode).save(mask)
    code, _, err = run_cli("inpaint", image, "--mask", mask, "--model", tiny_model_dir, "--steps", 1, "--out", out)
    if (w, h) != (28, 28):
        assert_one_line_error(code, err, "must be the same size")
    elif not (np.asarray(Image.open(mask).convert("L")) >= 128).any():
        assert_one_line_error(code, err, "the mask is empty")
    else:
        assert code == 0, err
        result = np.asarray(Image.open(out))
        keep = np.asarray(Image.open(mask).convert("L")) < 128
        assert np.array_equal(result[keep], np.full((28, 28), 90, np.uint8)[keep])  # outside the mask: unchanged
        out.unlink()
    _no_leftovers(out.parent)


# ----------------------------------------------------------------------------- sample files


DTYPES = ["uint8", "int16", "int64", "float16", "float32", "float64", "bool", "complex64", "U2"]


@st.composite
def sample_arrays(draw):
    ndim = draw(st.integers(0, 5))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 28, 32])) for _ in range(ndim)]
    if ndim >= 3 and draw(st.booleans()):
        shape[1:3] = [28, 28]
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arr = (rng.random(shape) * draw(st.sampled_from([1.0, 255.0, 2.0]))).astype(dtype)
    if arr.size and np.issubdtype(arr.dtype, np.floating) and draw(st.booleans()):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return arr


@FAST
@given(images=sample_arrays(), labels=st.one_of(st.none(), sample_arrays()),
       extra=st.sampled_from(["none", "n", "member"]))
def test_sample_files(tmp_path, images, labels, extra):
    path = tmp_path / "s.npz"
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    if extra == "member":
        arrays = {"pictures": images}
    np.savez(path, **arrays)
    try:
        got, got_labels = load_samples(path)
    except DataError as e:
        assert "\n" not in str(e)
    else:  # what loads is a valid image batch with one label per image
        assert got.ndim in (3, 4) and len(got) > 0 and got.dtype in (np.uint8, np.float16, np.float32, np.float64)
        assert got_labels is None or got_labels.shape == (len(got),)
    n_args = ["--n", "2"] if extra == "n" else []
    code, _, err = run_cli("eval", "--samples", path, "--reference", "bundled", *n_args)
    assert_one_line_error(code, err)  # fewer than the 129 images FD needs, at best


@FAST
@given(data=st.one_of(st.binary(max_size=300), st.just(b""), st.just(b"PK\x03\x04" + b"\x00" * 40)))
def test_sample_files_garbage(tmp_path, data):
    path = tmp_path / "s.npz"
    path.write_bytes(data)
    code, _, err = run_cli("eval", "--samples", path, "--reference", "bundled")
    assert_one_line_error(code, err)
