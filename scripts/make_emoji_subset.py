"""Build src/latentdiff/assets/emoji_subset.npz from a prepared emoji folder (`latentdiff download emoji`).

The subset: every image whose file name's SHA-256 is 0 modulo 8 (about 1 in 8, both splits, with
skin-tone variants), at 64×64 on white, with its metadata.jsonl lines. Usage:
    python scripts/make_emoji_subset.py [EMOJI_DIR]
"""

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from latentdiff.data.emoji import BUNDLED_EMOJI_NPZ, find_emoji, read_metadata


def main() -> None:
    folder = find_emoji(sys.argv[1] if len(sys.argv) > 1 else None)
    if folder is None:
        sys.exit("no emoji folder: run `latentdiff download emoji` first")
    records = read_metadata(folder / "metadata.jsonl")
    with np.load(folder / "emoji-64.npz") as npz:
        images = npz["images"]
    keep = [i for i, r in enumerate(records)
            if int(hashlib.sha256(r["file_name"].encode()).hexdigest()[:8], 16) % 8 == 0]
    meta = "\n".join(json.dumps(records[i], ensure_ascii=False) for i in keep)
    out = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "assets" / BUNDLED_EMOJI_NPZ
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images[keep], metadata=np.array(meta))
    out.write_bytes(buf.getvalue())
    heldout = sum(records[i]["split"] == "heldout" for i in keep)
    print(f"{out.name}: {len(keep)} images ({heldout} held out), {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
