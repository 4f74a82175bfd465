"""The emoji caption data set: captions, the fixed held-out split, the bundled subset, the download."""

import hashlib
import io
import json
import os
import stat
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, run_cli
from latentdiff.data import load_dataset
from latentdiff.data import emoji as emoji_mod
from latentdiff.data import emoji_download as dl
from latentdiff.data.emoji import (
    CATEGORIES,
    emoji_records,
    is_heldout,
    load_emoji,
    make_caption,
    tone_name,
)
from latentdiff.errors import DataError


def test_caption_from_name_tone_short_names_and_subcategory():
    assert make_caption("waving hand", ["wave"], "hand-fingers-open", "medium skin tone") == \
        "waving hand: medium skin tone, wave, hand-fingers-open"
    # underscores become spaces; a short name equal to the name is not repeated
    assert make_caption("grinning face with big eyes", ["smiley", "grinning_face_with_big_eyes"],
                        "face-smiling") == "grinning face with big eyes, smiley, face-smiling"
    assert tone_name("1F3FB-1F3FF") == "light skin tone, dark skin tone"
    assert tone_name("1f3fd") == "medium skin tone"
    with pytest.raises(DataError, match="skin-tone"):
        tone_name("1F600")


def _entry(name, image, short, category="People & Body", sub="hand-fingers-open", tones=()):
    entry = {"name": name.upper(), "short_names": short, "category": category, "subcategory": sub,
             "image": image, "has_img_google": True}
    if tones:
        entry["skin_variations"] = {t: {"image": image.replace(".png", f"-{t.lower()}.png"),
                                        "has_img_google": True} for t in tones}
    return entry


def test_records_keep_variants_with_their_emoji_and_in_one_split():
    entries = [_entry("waving hand sign", "1f44b.png", ["wave"], tones=("1F3FD", "1F3FB")),
               _entry("cat face", "1f431.png", ["cat"], "Animals & Nature", "animal-mammal")]
    records = emoji_records(entries)
    assert [r["file_name"] for r in records] == ["images/1f44b.png", "images/1f44b-1f3fb.png",
                                                  "images/1f44b-1f3fd.png", "images/1f431.png"]
    assert records[1]["text"] == "waving hand sign: light skin tone, wave, hand-fingers-open"
    assert [r["tone"] for r in records] == ["", "light skin tone", "medium skin tone", ""]
    assert len({r["split"] for r in records[:3]}) == 1  # the variants share the base emoji's split
    assert records[3]["category"] == "Animals & Nature" and records[3]["subcategory"] == "animal-mammal"
    with pytest.raises(DataError, match="unknown category"):
        emoji_records([_entry("x", "x.png", [], category="Nope")])


def test_heldout_split_is_a_fixed_tenth_by_name_hash():
    names = [f"emoji number {i}" for i in range(5000)]
    frac = np.mean([is_heldout(n) for n in names])
    assert 0.08 < frac < 0.12
    # the rule itself, so a change of salt, digits or threshold is caught
    for n in names[:200]:
        digest = hashlib.sha256(("latentdiff-emoji:" + n).encode()).hexdigest()
        assert is_heldout(n) == (int(digest[:8], 16) % 100 < 10)


def test_bundled_subset_splits_are_disjoint_by_emoji_and_on_white():
    train, held = load_emoji("train", bundled=True), load_emoji("heldout", bundled=True)
    assert len(train) > 300 and len(held) > 20
    assert not set(train.names) & set(held.names)
    assert all(is_heldout(n) for n in held.names) and not any(is_heldout(n) for n in train.names)
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (64, 64, 3)
    corners = train.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).mean() > 0.95  # transparent corners were composited onto white
    assert any(t for t in train.tones) and all(c in CATEGORIES for c in train.categories)
    assert load_emoji("heldout", size=32, bundled=True).images.shape == (len(held), 32, 32, 3)
    small = load_emoji("train", bundled=True)
    small.images[0, 0, 0] = 0  # a copy: the cached subset is untouched
    assert load_emoji("train", bundled=True).images[0, 0, 0].tolist() == [255, 255, 255]


def test_registry_serves_emoji_with_captions_and_category_labels(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))  # no downloaded set: the bundled subset
    monkeypatch.delenv("LATENTDIFF_EMOJI_DIR", raising=False)
    data = load_dataset("emoji", "test", image_size=32, limit=10)
    held = load_emoji("heldout", bundled=True)
    assert data.images.shape == (10, 32, 32, 3) and data.captions == held.captions[:10]
    assert [CATEGORIES[i] for i in data.labels] == list(held.categories[:10])
    assert data.class_names == CATEGORIES
    gray = load_dataset("emoji", "train", channels=1, limit=3)
    assert gray.images.shape == (3, 64, 64, 1)
    with pytest.raises(DataError, match="heldout"):
        load_dataset("bundled", "heldout")


def _png(rgba) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.array(rgba, np.uint8), "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _fake_npm(tmp_path, monkeypatch):
    """An `npm` on PATH that packs a two-emoji package (a transparent pixel included)."""
    entries = [_entry("waving hand sign", "1f44b.png", ["wave"], tones=("1F3FD",)),
               _entry("cat face", "1f431.png", ["cat"], "Animals & Nature", "animal-mammal")]
    pixel = np.zeros((64, 64, 4), np.uint8)
    pixel[..., 0] = 200
    pixel[..., 3] = 255
    pixel[0, 0] = (0, 0, 0, 0)  # fully transparent: must become white
    files = {"package/emoji.json": json.dumps(entries).encode(), "package/LICENSE": b"MIT text",
             "package/img/google/64/1f44b.png": _png(pixel), "package/img/google/64/1f44b-1f3fd.png": _png(pixel),
             "package/img/google/64/1f431.png": _png(pixel), "package/../evil.png": _png(pixel)}
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\ncp {tgz} ./emoji-datasource-google-16.0.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return hashlib.sha256(tgz.read_bytes()).hexdigest()


def test_download_via_npm_checks_the_checksum_then_prepares_the_folder(tmp_path, monkeypatch):
    sha = _fake_npm(tmp_path, monkeypatch)
    monkeypatch.setattr(dl, "NOTO_FONT_PATHS", (str(tmp_path / "none.ttf"),))  # no font to fall back on
    dest = tmp_path / "emoji"
    code, _, err = run_cli("download", "emoji", "--dest", dest, "--no-progress")
    assert_one_line_error(code, err, "checksum mismatch")
    assert not dest.exists()  # nothing half-written
    monkeypatch.setattr(dl, "EMOJI_TARBALL_SHA256", sha)
    code, out, err = run_cli("download", "emoji", "--dest", dest, "--no-progress")
    assert code == 0, err
    data = load_emoji("all", root=dest)
    assert data.captions == ("waving hand sign, wave, hand-fingers-open",
                             "waving hand sign: medium skin tone, wave, hand-fingers-open", "cat face, cat, animal-mammal")
    assert data.images[0, 0, 0].tolist() == [255, 255, 255] and data.images[0, 1, 1].tolist() == [200, 0, 0]
    assert sorted(p.name for p in (dest / "images").iterdir()) == ["1f431.png", "1f44b-1f3fd.png", "1f44b.png"]
    assert "Apache License" in (dest / "LICENSE.txt").read_text()
    assert not (tmp_path / "evil.png").exists()


def test_download_without_npm_or_font_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.shutil, "which", lambda name: None)
    monkeypatch.setattr(dl, "NOTO_FONT_PATHS", (str(tmp_path / "none.ttf"),))
    code, _, err = run_cli("download", "emoji", "--dest", tmp_path / "e", "--no-progress")
    assert_one_line_error(code, err, "neither npm")
    with pytest.raises(DataError, match="latentdiff download emoji"):
        load_emoji(root=tmp_path / "e")


@pytest.mark.skipif(dl.find_noto_font() is None, reason="Debian fonts-noto-color-emoji not installed")
@pytest.mark.parametrize("npm", ["absent", "failing"])
def test_font_fallback_renders_named_emoji(tmp_path, monkeypatch, npm):
    if npm == "absent":
        monkeypatch.setattr(dl.shutil, "which", lambda name: None)
    else:  # an npm that cannot reach the registry: the font takes over
        _fake_npm(tmp_path, monkeypatch)
    monkeypatch.setattr(dl, "_FONT_BLOCKS", ((0x1F600, 0x1F60F, "Smileys & Emotion", "emoticons"),))
    dest = dl.download_emoji(tmp_path / "e", progress=False)
    data = load_emoji("all", root=dest)
    assert len(data) == 16 and data.names[0] == "grinning face"
    assert data.captions[0] == "grinning face, emoticons"
    # yellow faces in the middle (all but the purple "smiling face with horns"), white around them
    mid = data.images[:, 24:40, 24:40].reshape(len(data), -1, 3).mean(1)
    yellow = (mid[:, 0] > 150) & (mid[:, 1] > 120) & (mid[:, 2] < 120)
    assert yellow.sum() == 15 and not yellow[data.names.index("smiling face with horns")]
    assert (data.images[:, 0, 0] == 255).all()


def test_emoji_arguments_are_checked():
    with pytest.raises(DataError, match="split"):
        load_emoji("test")
    with pytest.raises(DataError, match="size"):
        load_emoji(size=2)
    with pytest.raises(DataError, match="method"):
        dl.download_emoji(method="ftp")
    assert emoji_mod.EMOJI_SPLITS == ("train", "heldout", "all")
