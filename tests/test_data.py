"""Tests for latentdiff.data: bundled subset, IDX files, finding/downloading, image folders."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from latentdiff.data import (
    CLASS_NAMES,
    FASHION_MNIST_MD5,
    ImageData,
    cache_dir,
    download_fashion_mnist,
    find_fashion_mnist,
    load_dataset,
    load_image_folder,
    read_idx,
)
from latentdiff.data import fashion_mnist as data
from latentdiff.errors import DataError
from latentdiff.utils.images import to_tensor, to_uint8

SYSTEM_DIR = data.SYSTEM_FASHION_MNIST_DIR
HAVE_SYSTEM = all((SYSTEM_DIR / name).is_file() for name in FASHION_MNIST_MD5)
needs_system = pytest.mark.skipif(not HAVE_SYSTEM, reason="dataset-fashion-mnist not installed")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test may see the user's cache, data dir or proxy settings."""
    for var in ("LATENTDIFF_CACHE", "LATENTDIFF_FASHION_MNIST_DIR", "XDG_CACHE_HOME", "http_proxy",
                "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (1-D labels or 3-D images) as an IDX file."""
    magic = 0x00000800 | array.ndim
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return struct.pack(">I", magic) + dims + array.tobytes()


def write_fake_fashion_mnist(directory: Path, n: int = 3, size: int = 4) -> dict[str, bytes]:
    """Write four tiny gzip IDX files named like Fashion-MNIST's; returns name -> file bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    contents = {}
    for images_name, labels_name in data.FASHION_MNIST_SPLITS.values():
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, array in ((images_name, images), (labels_name, labels)):
            contents[name] = gzip.compress(idx_bytes(array), mtime=0)
            (directory / name).write_bytes(contents[name])
    return contents


# ----------------------------------------------------------------------------- bundled + tensors


def test_class_names():
    assert CLASS_NAMES == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.mark.parametrize("split, n", [("train", 10_000), ("test", 2_000)])
def test_bundled_shapes_and_labels(split, n):
    d = load_dataset("bundled", split)
    assert isinstance(d, ImageData)
    assert d.images.shape == (n, 28, 28, 1) and d.images.dtype == np.uint8
    assert len(d) == n and d.image_size == (28, 28) and d.channels == 1
    assert d.labels.shape == (n,) and d.labels.dtype == np.int64
    assert set(np.unique(d.labels)) == set(range(10))  # every class present, nothing out of range
    assert d.num_classes == 10 and d.class_names == CLASS_NAMES
    assert split in d.source
    assert 60 < d.images.mean() < 90  # Fashion-MNIST's mean pixel is ~73: not blank, not noise


def test_bundled_is_deterministic_and_callers_cannot_corrupt_the_cache():
    a = load_dataset("bundled", "test")
    a.images[:] = 0
    a.labels[:] = 0
    b = load_dataset("bundled", "test")
    assert b.images.any() and b.labels.any()
    assert np.array_equal(b.images, load_dataset("bundled", "test").images)
    # the first training label of Fashion-MNIST is an ankle boot, the first test one too
    assert load_dataset("bundled", "train").labels[0] == 9 and b.labels[0] == 9


def test_bundled_limit_resize_channels():
    d = load_dataset("bundled", "train", limit=5, image_size=32, channels=3)
    assert d.images.shape == (5, 32, 32, 3)
    assert np.array_equal(d.images[..., 0], d.images[..., 2])  # gray replicated into RGB
    assert np.array_equal(d.labels, load_dataset("bundled", "train").labels[:5])
    same = load_dataset("bundled", "train", limit=5, image_size=28)
    assert np.array_equal(same.images, load_dataset("bundled", "train").images[:5])  # no-op resize


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="bundled.*fashion-mnist"):
        load_dataset("cifar-10")
    with pytest.raises(DataError, match="train.*test"):
        load_dataset("bundled", "validation")
    with pytest.raises(DataError, match="channels"):
        load_dataset("bundled", channels=2)


def test_to_tensor_to_uint8_round_trip_is_exact():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    images[..., 1] = images[..., 1][:, ::-1]
    x = to_tensor(images)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(to_uint8(x), images)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0]).reshape(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255, 255]  # 127.5 rounds half to even
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    for name, array in (("img", images), ("lab", labels)):
        raw = idx_bytes(array)
        path = tmp_path / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(raw) if compress else raw)
        out = read_idx(path)
        assert out.dtype == np.uint8 and np.array_equal(out, array)


def test_read_idx_truncated_gzip(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    blob = gzip.compress(idx_bytes(images))
    path = tmp_path / "cut-images.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut-images.gz.*truncated"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-magic.idx"
    path.write_bytes(struct.pack(">IIII", 0x00000D03, 1, 2, 2) + bytes(16))  # float data
    with pytest.raises(DataError, match="bad-magic.idx.*magic number 0x00000d03"):
        read_idx(path)


@pytest.mark.parametrize("delta, word", [(-1, "truncated"), (3, "trailing")])
def test_read_idx_wrong_length(tmp_path, delta, word):
    raw = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    path = tmp_path / "wrong-length.gz"
    path.write_bytes(gzip.compress(raw[:delta] if delta < 0 else raw + bytes(delta)))
    with pytest.raises(DataError, match=f"wrong-length.gz.*{word}"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


# ----------------------------------------------------------------------------- find + cache_dir


def test_cache_dir_precedence(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "home" / ".cache" / "latentdiff"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "latentdiff"
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_find_data_dir(tmp_path):
    write_fake_fashion_mnist(tmp_path / "fm")
    assert find_fashion_mnist(tmp_path / "fm") == tmp_path / "fm"
    d = load_dataset("fashion-mnist", "test", data_dir=str(tmp_path / "fm"))
    assert d.images.shape == (3, 4, 4, 1) and d.labels.dtype == np.int64


def test_find_accepts_uncompressed_files(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    for name in FASHION_MNIST_MD5:
        raw = gzip.decompress((tmp_path / name).read_bytes())
        (tmp_path / name.removesuffix(".gz")).write_bytes(raw)
        (tmp_path / name).unlink()
    assert find_fashion_mnist(tmp_path) == tmp_path
    assert len(load_dataset("fashion-mnist", "train", data_dir=tmp_path)) == 3


def test_find_data_dir_missing_file_does_not_fall_back(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist")  # a complete copy elsewhere
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz") as err:
        find_fashion_mnist(tmp_path / "fm")
    assert "train-images" not in str(err.value)


def test_find_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-such-system-dir")
    write_fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    assert find_fashion_mnist() == tmp_path / "cache" / "fashion-mnist"
    write_fake_fashion_mnist(tmp_path / "env")
    monkeypatch.setenv("LATENTDIFF_FASHION_MNIST_DIR", str(tmp_path / "env"))
    assert find_fashion_mnist() == tmp_path / "env"
    (tmp_path / "env" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="LATENTDIFF_FASHION_MNIST_DIR.*missing train-images"):
        find_fashion_mnist()


def test_find_prefers_system_dir_over_cache(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "system")
    write_fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system")
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    assert find_fashion_mnist() == tmp_path / "system"


def test_find_nothing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-such-system-dir")
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    for hint in ("apt-get install dataset-fashion-mnist", "latentdiff download fashion-mnist",
                 "--data-dir", "no-such-system-dir", "empty-cache"):
        assert hint in msg


# ----------------------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server thread serving tmp_path/www; yields (root, base_url, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}/files", requests
    server.shutdown()
    server.server_close()
    thread.join()


def serve_fake(root: Path, monkeypatch) -> dict[str, bytes]:
    contents = write_fake_fashion_mnist(root / "files")
    for name, blob in contents.items():
        monkeypatch.setitem(FASHION_MNIST_MD5, name, hashlib.md5(blob).hexdigest())
    return contents


def test_download_verifies_and_skips_present_files(http_server, tmp_path, monkeypatch):
    root, url, requests = http_server
    contents = serve_fake(root, monkeypatch)
    dest = tmp_path / "dest"
    assert download_fashion_mnist(dest, base_url=url, progress=False) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(contents)  # no temporary files left
    for name, blob in contents.items():
        assert (dest / name).read_bytes() == blob
    assert len(requests) == 4
    download_fashion_mnist(dest, base_url=url, progress=False)
    assert len(requests) == 4  # all present with the right checksum: nothing fetched
    (dest / "t10k-images-idx3-ubyte.gz").write_bytes(b"stale")
    download_fashion_mnist(dest, base_url=url, progress=False)
    assert requests[4:] == ["/files/t10k-images-idx3-ubyte.gz"]
    assert len(load_dataset("fashion-mnist", "test", data_dir=dest)) == 3


def test_download_default_dest_is_found(http_server, tmp_path, monkeypatch):
    root, url, _ = http_server
    serve_fake(root, monkeypatch)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-such-system-dir")
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    assert download_fashion_mnist(base_url=url, progress=False) == find_fashion_mnist()


def test_download_checksum_mismatch_leaves_nothing(http_server, tmp_path, monkeypatch):
    root, url, _ = http_server
    serve_fake(root, monkeypatch)
    monkeypatch.setitem(FASHION_MNIST_MD5, "train-images-idx3-ubyte.gz", "0" * 32)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as err:
        download_fashion_mnist(dest, base_url=url, progress=False)
    actual = hashlib.md5((root / "files" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    msg = str(err.value)
    assert "checksum mismatch" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "0" * 32 in msg and actual in msg
    assert list(dest.iterdir()) == []  # train-images is fetched first: no partial or bad file kept


def test_download_404_names_url(http_server, tmp_path, monkeypatch):
    root, url, _ = http_server
    serve_fake(root, monkeypatch)
    (root / "files" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=f"{url}/train-labels-idx1-ubyte.gz: HTTP 404"):
        download_fashion_mnist(tmp_path / "dest", base_url=url, progress=False)
    assert not any(p.name.endswith(".part") for p in (tmp_path / "dest").iterdir())


def test_download_connection_refused_names_url(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(DataError, match=f"{url}train-images-idx3-ubyte.gz"):
        download_fashion_mnist(tmp_path / "dest", base_url=url, progress=False, timeout=5)


# ----------------------------------------------------------------------------- real Fashion-MNIST

# Debian's dataset-fashion-mnist ships the official files with the gzip header rewritten: FNAME
# dropped and MTIME changed (so e.g. the file is 24 bytes shorter). The compressed data is
# byte-identical: restoring the official header below (MTIME as in Zalando's release, XFL 0,
# OS 3 = Unix) reproduces the official MD5 exactly.
OFFICIAL_GZIP_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}


@needs_system
def test_system_files_are_the_official_release():
    for name, expected in FASHION_MNIST_MD5.items():
        blob = (SYSTEM_DIR / name).read_bytes()
        if hashlib.md5(blob).hexdigest() != expected:
            assert blob[:4] == b"\x1f\x8b\x08\x00", f"{name}: unexpected gzip header"
            official_header = (b"\x1f\x8b\x08\x08" + struct.pack("<I", OFFICIAL_GZIP_MTIME[name])
                               + b"\x00\x03" + name.removesuffix(".gz").encode() + b"\x00")
            blob = official_header + blob[10:]
        assert hashlib.md5(blob).hexdigest() == expected, name


@needs_system
def test_load_system_fashion_mnist():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60_000, 28, 28, 1) and test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # the bundled subset is exactly the first 10k / 2k images of the real files
    for split, full in (("train", train), ("test", test)):
        bundled = load_dataset("bundled", split)
        assert np.array_equal(bundled.images, full.images[: len(bundled)])
        assert np.array_equal(bundled.labels, full.labels[: len(bundled)])


# ----------------------------------------------------------------------------- image folders


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def gray(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def rgb(color: tuple[int, int, int], h: int = 8, w: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()


def test_folder_class_subfolders_give_labels(tmp_path):
    save(tmp_path / "dogs" / "b.png", gray(30))
    save(tmp_path / "cats" / "c.png", gray(20))
    save(tmp_path / "cats" / "a.png", gray(10))
    d = load_image_folder(tmp_path, image_size=None, channels=None)
    assert d.class_names == ("cats", "dogs") and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 1] and d.labels.dtype == np.int64
    assert d.images[:, 0, 0, 0].tolist() == [10, 20, 30]  # sorted: cats/a, cats/c, dogs/b
    assert d.images.shape == (3, 8, 8, 1)
    limited = load_dataset(str(tmp_path), limit=2)
    assert limited.class_names == ("cats", "dogs") and limited.labels.tolist() == [0, 0]


def test_folder_unlabeled_when_not_all_in_subfolders(tmp_path):
    save(tmp_path / "top.png", gray(1))
    save(tmp_path / "sub" / "x.PNG", gray(2))  # suffix matching is case-insensitive
    save(tmp_path / ".hidden" / "y.png", gray(3))  # hidden folders are skipped
    (tmp_path / "._top.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    d = load_dataset(str(tmp_path))
    assert d.labels is None and d.num_classes == 0 and d.class_names == ()
    assert d.images[:, 0, 0, 0].tolist() == [2, 1]  # "sub/x.PNG" < "top.png" by path parts


@pytest.mark.parametrize("tall", [False, True])
def test_folder_resize_and_centre_crop(tmp_path, tall):
    # 40×20: red quarter | green half | blue quarter -> the centre square is all green
    parts = [rgb((255, 0, 0), 20, 10), rgb((0, 255, 0), 20, 20), rgb((0, 0, 255), 20, 10)]
    img = np.concatenate(parts, axis=1)
    save(tmp_path / "wide.png", img.transpose(1, 0, 2).copy() if tall else img)
    d = load_image_folder(tmp_path, image_size=10, channels=None)
    assert d.images.shape == (1, 10, 10, 3)
    mean = d.images.reshape(-1, 3).mean(axis=0)
    assert mean[1] > 200 and mean[0] < 40 and mean[2] < 40  # an off-centre crop would be ~50% red


def test_folder_grayscale_vs_rgb(tmp_path):
    save(tmp_path / "a.png", gray(100))
    assert load_image_folder(tmp_path, image_size=None, channels=None).channels == 1
    save(tmp_path / "b.jpg", rgb((200, 40, 10)))
    d = load_image_folder(tmp_path, image_size=None, channels=None)
    assert d.images.shape == (2, 8, 8, 3)
    assert (d.images[0] == 100).all()  # gray replicated
    assert np.allclose(d.images[1].reshape(-1, 3).mean(0), (200, 40, 10), atol=6)  # JPEG is lossy
    forced = load_image_folder(tmp_path, image_size=None, channels=1)
    assert forced.images.shape == (2, 8, 8, 1)
    assert abs(int(forced.images[1, 4, 4, 0]) - round(0.299 * 200 + 0.587 * 40 + 0.114 * 10)) <= 6


def test_folder_16bit_png_is_rescaled(tmp_path):
    save(tmp_path / "deep.png", np.full((4, 4), 257 * 100, dtype=np.uint16))
    d = load_dataset(str(tmp_path))
    assert d.channels == 1 and (d.images == 100).all()


@pytest.mark.parametrize("pil_allows_truncated", [False, True])
def test_folder_truncated_png_names_file(tmp_path, monkeypatch, pil_allows_truncated):
    # another library may have set Pillow's global flag; a truncated PNG must still be refused
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_allows_truncated)
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blob = save(tmp_path / "ok.png", noise).read_bytes()
    (tmp_path / "broken.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, image_size=None, channels=None)


def test_folder_text_file_named_png_names_file(tmp_path):
    save(tmp_path / "ok.png", gray(5))
    (tmp_path / "readme.png").write_text("this is not an image")
    with pytest.raises(DataError, match="readme.png"):
        load_dataset(str(tmp_path))


def test_folder_mixed_sizes_need_image_size(tmp_path):
    save(tmp_path / "small.png", gray(5, 8, 8))
    save(tmp_path / "big.png", gray(5, 16, 12))
    with pytest.raises(DataError, match="big.png.*small.png.*--image-size"):
        load_image_folder(tmp_path, image_size=None, channels=None)
    assert load_image_folder(tmp_path, image_size=6, channels=None).images.shape == (2, 6, 6, 1)


def test_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty.*no .png"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(str(tmp_path / "missing"))


def test_folder_train_test_subfolders(tmp_path):
    save(tmp_path / "train" / "shoe" / "a.png", gray(1))
    save(tmp_path / "train" / "bag" / "b.png", gray(2))
    save(tmp_path / "test" / "bag" / "c.png", gray(3))
    train = load_dataset(str(tmp_path), "train")
    test = load_dataset(str(tmp_path), "test")
    assert len(train) == 2 and train.class_names == ("bag", "shoe")
    assert test.images[0, 0, 0, 0] == 3 and "test" in test.source
    with pytest.raises(DataError, match="train.*test"):
        load_dataset(str(tmp_path), "val")


# ----------------------------------------------------------------------------- memory limits (docs/reliability.md)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR declaring width×height gray pixels, and no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_folder_large_image_refused_from_its_header(tmp_path):
    # 8192×8192 passes the decoder limit but would be trained at full size; the file holds no pixels, so
    # reaching the decoder would give a truncation error instead of this message
    save(tmp_path / "ok.png", gray(5))
    png_header_only(tmp_path / "huge.png", 8192, 8192)
    with pytest.raises(DataError, match=r"huge.png is 8192×8192 pixels.*1024×1024.*--image-size"):
        load_dataset(str(tmp_path))


def test_folder_extreme_aspect_ratio_refused_before_resizing(tmp_path):
    png_header_only(tmp_path / "strip.png", 1, 67_108_864)  # 1×(64 Mi): would resize to 28 × 1.9e9 before
    with pytest.raises(DataError, match=r"strip.png is 1×67108864 pixels, an aspect ratio beyond .* 16:1"):
        load_dataset(str(tmp_path), image_size=28)


def test_decompression_bomb_header_gets_our_limit(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(DataError, match=r"bomb.png declares 900000000 pixels; .* at most 67108864 pixels") as err:
        load_image_folder(tmp_path, image_size=28)
    assert "decompression bomb" not in str(err.value) and "DOS" not in str(err.value)


def test_folder_total_size_is_checked_before_decoding(tmp_path, monkeypatch):
    from latentdiff.data import limits

    for i in range(3):
        png_header_only(tmp_path / f"{i}.png", 8, 8)  # undecodable: the size check must come first
    monkeypatch.setattr(limits, "MAX_LOADED_BYTES", 100)
    with pytest.raises(DataError, match=r"3 images of 8×8×1 .* \(192 bytes\) in memory, beyond latentdiff's limit"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"\(3 images\).*\(192 bytes\) in memory, beyond"):
        load_image_folder(tmp_path)


def test_requested_size_is_checked_before_resizing():
    with pytest.raises(DataError, match="--image-size 2048 is beyond latentdiff's limit of 1024×1024"):
        load_dataset("bundled", image_size=2048)
    # 10000 × 1024² bytes = 9.8 GiB: refused at once, before the first image is resized
    with pytest.raises(DataError, match=r"bundled Fashion-MNIST subset \(train\): 10000 images of 1024×1024×1"):
        load_dataset("bundled", image_size=1024)


@pytest.mark.parametrize("fraction", [0.002, 0.012, 0.5, 0.99])
def test_truncated_png_is_called_truncated(tmp_path, fraction):
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blob = save(tmp_path / "src" / "ok.png", noise).read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: max(9, int(len(blob) * fraction))])
    with pytest.raises(DataError, match="cut.png.*truncated or corrupt") as err:
        load_image_folder(tmp_path, image_size=None, channels=None)
    assert "not a PNG" not in str(err.value)


def test_crop_then_resize_keeps_the_centre_of_a_long_image(tmp_path):
    # 16:1, the widest allowed: white around the centre square (columns 120..135 of 256, plus the bicubic
    # filter's reach at 4× down), black elsewhere; resizing the whole strip first would mix in the black
    img = np.zeros((16, 256), np.uint8)
    img[:, 104:152] = 255
    save(tmp_path / "long.png", img)
    d = load_image_folder(tmp_path, image_size=4)
    assert d.images.shape == (1, 4, 4, 1) and (d.images == 255).all()


def test_idx_declaring_an_absurd_size_is_refused_unread(tmp_path):
    path = tmp_path / "absurd.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x00000803, 1 << 20, 1 << 10, 1 << 10)))  # 1 TiB
    with pytest.raises(DataError, match=r"absurd.gz: IDX dimensions .* declare 1099511627776 bytes.*beyond"):
        read_idx(path)


def test_idx_gzip_bomb_is_not_inflated(tmp_path):
    import tracemalloc

    # declares 2 labels, then 64 MiB of zeros that compress to ~64 KB
    path = tmp_path / "bomb-labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 0x00000801, 2) + bytes(2 + (64 << 20)), compresslevel=9))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb-labels.gz.*trailing bytes \(longer than its header declares\)"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # reading it whole would take 64 MiB
