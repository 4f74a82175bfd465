"""The emoji caption data set: Noto emoji images (64×64 RGB on white) with captions and metadata.

Source: the npm package ``emoji-datasource-google`` 16.0.0 (3,786 images: 1,911 emoji and 1,875
skin-tone variants; images Apache-2.0 by Google, package MIT), fetched by ``latentdiff download
emoji`` (see :mod:`latentdiff.data.emoji_download`). A prepared folder holds ``metadata.jsonl`` (one
JSON object per image, the Hugging Face ``imagefolder`` convention: ``file_name`` and ``text``, plus
the metadata below) and ``emoji-64.npz`` (the images, alpha composited onto white).

Every image has a caption built from its name, skin tone, short names and subcategory, e.g.
``"waving hand: medium skin tone, wave, hand-fingers-open"``, a category (e.g. ``"People & Body"``), a
subcategory and a skin tone (``""`` for none). The held-out split (about 10% of the emoji) is fixed by a
hash of the base emoji's name, so all skin-tone variants of one emoji fall in the same split, and it
never depends on the order or the number of images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from latentdiff.data.fashion_mnist import cache_dir
from latentdiff.data.image_data import ImageData
from latentdiff.errors import DataError

# The CLDR emoji groups in emoji.json's order; a category's index is its class label.
CATEGORIES: tuple[str, ...] = (
    "Smileys & Emotion", "People & Body", "Component", "Animals & Nature", "Food & Drink",
    "Travel & Places", "Activities", "Objects", "Symbols", "Flags",
)  # fmt: skip

# Skin-tone modifiers (Fitzpatrick types 1-2 .. 6) as the Unicode names spell them.
SKIN_TONES: dict[str, str] = {
    "1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone",
}  # fmt: skip

EMOJI_SPLITS = ("train", "heldout", "all")

HELDOUT_PERCENT = 10  # of the base emoji (by name hash), with all their variants

EMOJI_DIR_ENV = "LATENTDIFF_EMOJI_DIR"

METADATA_FILE = "metadata.jsonl"

IMAGES_FILE = "emoji-64.npz"

BUNDLED_EMOJI_NPZ = "emoji_subset.npz"

METADATA_KEYS = ("file_name", "text", "name", "category", "subcategory", "tone", "split")


def is_heldout(base_name: str) -> bool:
    """Whether the emoji called ``base_name`` (lowercase, without skin tone) is in the held-out split.

    The first 8 hex digits of SHA-256("latentdiff-emoji:" + name), modulo 100, below HELDOUT_PERCENT.
    """
    digest = hashlib.sha256(("latentdiff-emoji:" + base_name).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def tone_name(modifiers: str) -> str:
    """``"1F3FD"`` -> ``"medium skin tone"``; ``"1F3FB-1F3FF"`` (two people) -> both, comma-separated."""
    try:
        return ", ".join(SKIN_TONES[m] for m in modifiers.upper().split("-"))
    except KeyError:
        raise DataError(f"unknown skin-tone modifier in {modifiers!r}; expected parts of "
                        f"{', '.join(SKIN_TONES)}") from None


def make_caption(name: str, short_names: list[str], subcategory: str, tone: str = "") -> str:
    """``name[: tone], short names..., subcategory``; short names with underscores spelled as spaces,
    each once, and none that only repeats the name."""
    parts = [f"{name}: {tone}" if tone else name]
    seen = {name}
    for short in short_names:
        words = short.replace("_", " ").strip()
        if words and words not in seen:
            parts.append(words)
            seen.add(words)
    if subcategory and subcategory not in seen:
        parts.append(subcategory)
    return ", ".join(parts)


def _entry_name(entry: dict) -> str:
    name = entry.get("name") or (entry.get("short_names") or [""])[0].replace("_", " ")
    if not name:
        raise DataError(f"emoji.json entry {entry.get('unified')!r} has no name and no short name")
    return name.lower()


def emoji_records(entries: list[dict]) -> list[dict]:
    """One metadata record per Google image of emoji.json's ``entries`` (base emoji, then their variants)."""
    records = []
    for entry in entries:
        if not entry.get("has_img_google", True):
            continue
        name, short = _entry_name(entry), list(entry.get("short_names") or [])
        category, sub = entry.get("category", ""), entry.get("subcategory", "")
        if category not in CATEGORIES:
            raise DataError(f"emoji.json entry {name!r} has unknown category {category!r}")
        split = "heldout" if is_heldout(name) else "train"
        variants = [("", entry["image"])] + [
            (tone_name(mods), v["image"]) for mods, v in sorted((entry.get("skin_variations") or {}).items())
            if v.get("has_img_google", True)]
        for tone, image in variants:
            records.append({"file_name": f"images/{image}", "text": make_caption(name, short, sub, tone),
                            "name": name, "category": category, "subcategory": sub, "tone": tone,
                            "split": split})
    return records


@dataclass
class EmojiData:
    """Emoji images (uint8 N×S×S×3, on white) with one caption and metadata per image."""

    images: np.ndarray
    captions: tuple[str, ...]
    names: tuple[str, ...]
    categories: tuple[str, ...]
    subcategories: tuple[str, ...]
    tones: tuple[str, ...]
    splits: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        n = len(self.images)
        for field in ("captions", "names", "categories", "subcategories", "tones", "splits"):
            if len(getattr(self, field)) != n:
                raise DataError(f"emoji data: {len(getattr(self, field))} {field} for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        """int64 category indices into :data:`CATEGORIES`."""
        return np.array([CATEGORIES.index(c) for c in self.categories], dtype=np.int64)

    def select(self, mask: np.ndarray, source: str | None = None) -> EmojiData:
        idx = np.flatnonzero(mask)
        pick = lambda t: tuple(t[i] for i in idx)  # noqa: E731
        return EmojiData(self.images[idx], pick(self.captions), pick(self.names), pick(self.categories),
                         pick(self.subcategories), pick(self.tones), pick(self.splits),
                         source or self.source)

    def to_image_data(self) -> ImageData:
        return ImageData(self.images, self.labels, len(CATEGORIES), CATEGORIES, self.source,
                         captions=self.captions)


def find_emoji(root: str | os.PathLike | None = None) -> Path | None:
    """The prepared emoji folder: ``root``, else ``$LATENTDIFF_EMOJI_DIR``, else ``cache_dir()/emoji``.

    A folder named explicitly must be complete (else DataError); the default one may be absent (None).
    """
    explicit = root if root is not None else os.environ.get(EMOJI_DIR_ENV) or None
    folder = Path(explicit).expanduser() if explicit else cache_dir() / "emoji"
    if (folder / METADATA_FILE).is_file() and (folder / IMAGES_FILE).is_file():
        return folder
    if explicit:
        raise DataError(f"emoji folder {folder} lacks {METADATA_FILE} or {IMAGES_FILE}; run "
                        f"`latentdiff download emoji --dest {folder}`")
    return None


def read_metadata(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not JSON ({e.msg})") from None
        missing = [k for k in METADATA_KEYS if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path}, line {i}: missing or non-text {', '.join(missing)}")
        records.append(record)
    return records


def _from_arrays(images: np.ndarray, records: list[dict], where: str, source: str) -> EmojiData:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) != len(records):
        raise DataError(f"{where}: expected uint8 N×S×S×3 images for {len(records)} records, got "
                        f"{images.dtype} {images.shape}; run `latentdiff download emoji` again")
    bad = [r["category"] for r in records if r["category"] not in CATEGORIES]
    if bad:
        raise DataError(f"{where}: unknown category {bad[0]!r}")
    col = lambda k: tuple(r[k] for r in records)  # noqa: E731
    return EmojiData(images, col("text"), col("name"), col("category"), col("subcategory"), col("tone"),
                     col("split"), source)


@functools.lru_cache(maxsize=2)
def _load_folder(folder: str) -> EmojiData:
    root = Path(folder)
    records = read_metadata(root / METADATA_FILE)
    try:
        with np.load(root / IMAGES_FILE, allow_pickle=False) as npz:
            images = npz["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{root / IMAGES_FILE} is missing or corrupt ({e}); run "
                        "`latentdiff download emoji` again") from e
    data = _from_arrays(images, records, str(root / IMAGES_FILE), "emoji (emoji-datasource-google 16.0.0)")
    data.images.setflags(write=False)
    return data


@functools.lru_cache(maxsize=1)
def load_bundled_emoji() -> EmojiData:
    """The subset shipped in the package (see scripts/make_emoji_subset.py), loaded once per process."""
    ref = resources.files("latentdiff") / "assets" / BUNDLED_EMOJI_NPZ
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
            images, meta = npz["images"], npz["metadata"]
        records = [json.loads(line) for line in str(meta).splitlines()]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise DataError(f"bundled emoji subset {ref} is missing or corrupt ({e}); reinstall latentdiff") from e
    data = _from_arrays(images, records, str(ref), "bundled emoji subset")
    data.images.setflags(write=False)
    return data


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img, "RGB").resize((size, size), Image.Resampling.BOX
                                                               if size < img.shape[0] else
                                                               Image.Resampling.BICUBIC))
    return out


def load_emoji(split: str = "train", root: str | os.PathLike | None = None, size: int = 64, *,
               bundled: bool | None = None) -> EmojiData:
    """The emoji images of ``split`` ("train", "heldout" or "all") at ``size``×``size``.

    From the prepared folder (:func:`find_emoji`); when there is none and ``root`` is not given, the
    bundled subset. ``bundled=True`` forces the subset, ``False`` requires the full set.
    """
    if split not in EMOJI_SPLITS:
        raise DataError(f"unknown emoji split {split!r}; expected one of {', '.join(EMOJI_SPLITS)}")
    if not isinstance(size, int) or not 4 <= size <= 512:
        raise DataError(f"emoji image size must be an integer in 4..512, got {size!r}")
    folder = None if bundled else find_emoji(root)
    if folder is None and bundled is False:
        raise DataError("the full emoji set is not downloaded; run `latentdiff download emoji`")
    data = load_bundled_emoji() if folder is None else _load_folder(str(folder.resolve()))
    if split != "all":
        data = data.select(np.array([s == split for s in data.splits]), f"{data.source} ({split})")
    else:
        data = data.select(np.ones(len(data), bool))  # a copy: the cached arrays stay read-only
    if data.images.shape[1] != size:
        data.images = _resize(data.images, size)
    return data
