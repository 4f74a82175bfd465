"""`latentdiff download emoji`: the emoji images from npm (checksum-verified), or rendered from Debian's font.

First choice: ``npm pack emoji-datasource-google@16.0.0`` into a temporary folder; the tarball's
SHA-256 must equal :data:`EMOJI_TARBALL_SHA256`. Only ``emoji.json``, ``LICENSE`` and
``img/google/64/*.png`` are read from it (as bytes, never extracted by path). Fallback when npm is
absent: render every single-code-point emoji of Debian's ``fonts-noto-color-emoji`` with Pillow,
named by :mod:`unicodedata` (no skin-tone variants, and coarse categories by Unicode block). Either way
the folder is written as a unit (:func:`~latentdiff.utils.files.staged_dir`): ``images/*.png``,
``metadata.jsonl``, ``emoji-64.npz`` (alpha composited onto white) and the licence texts.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.data.emoji import (
    CATEGORIES,
    IMAGES_FILE,
    METADATA_FILE,
    emoji_records,
    is_heldout,
    make_caption,
)
from latentdiff.data.fashion_mnist import cache_dir
from latentdiff.errors import DataError
from latentdiff.utils.files import sha256_file

NPM_PACKAGE = "emoji-datasource-google@16.0.0"

EMOJI_TARBALL_SHA256 = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"

NOTO_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",)  # Debian fonts-noto-color-emoji

_PNG_MEMBER = re.compile(r"^package/img/google/64/([0-9a-f]+(?:-[0-9a-f]+)*\.png)$")

ATTRIBUTION = """\
Emoji images: Noto Emoji by Google, Apache License 2.0
(https://github.com/googlefonts/noto-emoji, LICENSE in that repository).
Source: {source}.
Names, short names, categories and subcategories: {names}.
Prepared by latentdiff: alpha composited onto white, captions built from the names; held-out split
by a hash of each emoji's name.
"""


def composite_on_white(im: Image.Image) -> np.ndarray:
    """An image with any alpha as uint8 H×W×3 RGB over a white background."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def npm_pack(workdir: Path, npm: str, *, progress: bool = True) -> Path:
    """``npm pack`` the package into ``workdir``; the tarball's path after its SHA-256 was checked."""
    if progress:
        print(f"fetching {NPM_PACKAGE} with npm pack (about 74 MB)", file=sys.stderr)
    try:
        run = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True,
                             text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"`npm pack {NPM_PACKAGE}` failed: {e}") from e
    tarballs = sorted(workdir.glob("*.tgz"))
    if run.returncode != 0 or not tarballs:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"`npm pack {NPM_PACKAGE}` failed (exit {run.returncode}): {last}; "
                        "check the network or the npm registry setting")
    actual = sha256_file(tarballs[0])
    if actual != EMOJI_TARBALL_SHA256:
        raise DataError(f"checksum mismatch for {tarballs[0].name}: expected SHA-256 {EMOJI_TARBALL_SHA256}, "
                        f"got {actual}; the download was discarded")
    return tarballs[0]


def read_tarball(tarball: Path) -> tuple[list[dict], dict[str, bytes], str]:
    """emoji.json's entries, the 64 px PNGs by file name, and the package's LICENSE text."""
    pngs, entries, license_text = {}, None, ""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    entries = json.loads(tar.extractfile(member).read())
                elif member.name == "package/LICENSE":
                    license_text = tar.extractfile(member).read().decode("utf-8")
                elif (m := _PNG_MEMBER.match(member.name)) and member.size < (1 << 20):
                    pngs[m.group(1)] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{tarball.name} is damaged ({e}); run `latentdiff download emoji` again") from e
    if not isinstance(entries, list) or not pngs:
        raise DataError(f"{tarball.name} lacks emoji.json or img/google/64/*.png")
    return entries, pngs, license_text


def _records_from_npm(workdir: Path, npm: str, progress: bool) -> tuple[list[dict], dict[str, bytes], str]:
    entries, pngs, license_text = read_tarball(npm_pack(workdir, npm, progress=progress))
    records = [r for r in emoji_records(entries) if r["file_name"].removeprefix("images/") in pngs]
    return records, pngs, "npm package emoji-datasource-google 16.0.0 (MIT)\n\n" + license_text


# Coarse stand-ins for the CLDR groups when only the font is available: (first, last, category, subcategory).
_FONT_BLOCKS = (
    (0x1F600, 0x1F64F, "Smileys & Emotion", "emoticons"),
    (0x1F300, 0x1F5FF, "Objects", "miscellaneous symbols and pictographs"),
    (0x1F680, 0x1F6FF, "Travel & Places", "transport and map symbols"),
    (0x1F900, 0x1F9FF, "People & Body", "supplemental symbols and pictographs"),
    (0x1FA70, 0x1FAFF, "Objects", "symbols and pictographs extended-a"),
    (0x2600, 0x26FF, "Symbols", "miscellaneous symbols"),
    (0x2700, 0x27BF, "Symbols", "dingbats"),
)


def find_noto_font() -> Path | None:
    for path in NOTO_FONT_PATHS:
        if Path(path).is_file():
            return Path(path)
    return None


def _render(font, text: str) -> Image.Image:
    from PIL import ImageDraw

    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    return canvas


def _square_64(im: Image.Image) -> Image.Image:
    box = im.getbbox()
    im = im.crop(box)
    side = max(im.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return square.resize((64, 64), Image.Resampling.LANCZOS)


def _records_from_font(font_path: Path, progress: bool) -> tuple[list[dict], dict[str, bytes], str]:
    from PIL import ImageFont

    if progress:
        print(f"npm not found: rendering the emoji of {font_path} with Pillow", file=sys.stderr)
    try:
        font = ImageFont.truetype(str(font_path), 109)  # the colour bitmaps' only size
    except OSError as e:
        raise DataError(f"cannot open the emoji font {font_path}: {e}") from e
    missing = _render(font, chr(0x10FFFD)).tobytes()  # what an absent glyph looks like
    records, pngs = [], {}
    for first, last, category, sub in _FONT_BLOCKS:
        for cp in range(first, last + 1):
            name = unicodedata.name(chr(cp), "").lower()
            im = _render(font, chr(cp)) if name else None
            if im is None or im.getbbox() is None or im.tobytes() == missing:
                continue
            file = f"{cp:x}.png"
            buf = io.BytesIO()
            _square_64(im).save(buf, "PNG")
            pngs[file] = buf.getvalue()
            records.append({"file_name": f"images/{file}", "text": make_caption(name, [], sub),
                            "name": name, "category": category, "subcategory": sub, "tone": "",
                            "split": "heldout" if is_heldout(name) else "train"})
    if not records:
        raise DataError(f"the font {font_path} rendered no emoji; reinstall fonts-noto-color-emoji")
    return records, pngs, "Debian package fonts-noto-color-emoji (SIL Open Font License 1.1)"


def _write_folder(stage: Path, records: list[dict], pngs: dict[str, bytes], source: str, names: str) -> None:
    (stage / "images").mkdir()
    images = np.empty((len(records), 64, 64, 3), np.uint8)
    for i, record in enumerate(records):
        file = record["file_name"].removeprefix("images/")
        (stage / "images" / file).write_bytes(pngs[file])
        with Image.open(io.BytesIO(pngs[file])) as im:
            if im.size != (64, 64):
                raise DataError(f"emoji image {file} is {im.size[0]}×{im.size[1]}, expected 64×64")
            images[i] = composite_on_white(im)
    with open(stage / IMAGES_FILE, "wb") as f:
        np.savez_compressed(f, images=images)
    (stage / METADATA_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                       encoding="utf-8")
    (stage / "ATTRIBUTION.txt").write_text(ATTRIBUTION.format(source=source, names=names), encoding="utf-8")


def download_emoji(dest: str | os.PathLike | None = None, *, progress: bool = True,
                   method: str = "auto") -> Path:
    """Fetch and prepare the emoji set in ``dest`` (default ``cache_dir()/emoji``); returns the folder.

    ``method``: "npm", "font" or "auto" (npm when on PATH, else the Debian font). A complete folder
    is left as it is.
    """
    from latentdiff.utils.files import staged_dir

    if method not in ("auto", "npm", "font"):
        raise DataError(f"unknown emoji download method {method!r}; expected auto, npm or font")
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / "emoji"
    if (dest / METADATA_FILE).is_file() and (dest / IMAGES_FILE).is_file():
        if progress:
            print(f"the emoji set is already in {dest}", file=sys.stderr)
        return dest
    npm = shutil.which("npm") if method in ("auto", "npm") else None
    font = find_noto_font() if method in ("auto", "font") else None
    if npm is None and font is None:
        raise DataError("cannot get the emoji set: neither npm (for `npm pack "
                        f"{NPM_PACKAGE}`) nor Debian's fonts-noto-color-emoji ({NOTO_FONT_PATHS[0]}) "
                        "is present; install one (e.g. `apt-get install npm` or "
                        "`apt-get install fonts-noto-color-emoji`)")
    with tempfile.TemporaryDirectory(prefix="latentdiff-emoji-") as tmp:
        if npm is not None:
            try:
                records, pngs, license_text = _records_from_npm(Path(tmp), npm, progress)
                source, names = "npm emoji-datasource-google 16.0.0", "emoji.json of that package (MIT)"
            except DataError as e:
                if font is None:
                    raise
                print(f"warning: {e}; falling back to the font", file=sys.stderr)
                npm = None
        if npm is None:
            records, pngs, license_text = _records_from_font(font, progress)
            source, names = f"rendered from {font.name}", "Python's unicodedata (Unicode names)"
        with staged_dir(dest) as stage:
            _write_folder(stage, records, pngs, source, names)
            (stage / "LICENSE-source.txt").write_text(license_text, encoding="utf-8")
            licence = resources.files("latentdiff") / "assets" / "EMOJI_LICENSE.txt"
            (stage / "LICENSE.txt").write_text(licence.read_text(encoding="utf-8"), encoding="utf-8")
            stage.chmod(0o755)
            if (dest / "images").is_dir():  # a partial earlier attempt: its images make way for the new set
                shutil.rmtree(dest / "images")
    if progress:
        print(f"{len(records)} emoji images ({sum(r['split'] == 'heldout' for r in records)} held out) "
              f"in {dest}", file=sys.stderr)
    return dest


__all__ = ["CATEGORIES", "EMOJI_TARBALL_SHA256", "NPM_PACKAGE", "composite_on_white", "download_emoji"]
