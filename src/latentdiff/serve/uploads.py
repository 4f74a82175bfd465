"""Uploaded images and masks (base64 strings in JSON, or multipart file bytes) -> arrays in the model's shape.

Uploads are untrusted: the byte size is bounded, and each file goes through ``latentdiff.data``'s decoder,
which reads the header first and refuses declared sizes beyond the limits (image bombs) before any pixel
is decoded; the server's own pixel limit is lower still.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

import numpy as np

from latentdiff.errors import DataError
from latentdiff.serve.schema import ApiError

MAX_UPLOAD_BYTES = 4 << 20        # one image or mask file
MAX_UPLOAD_PIXELS = 2048 * 2048   # declared width × height of one upload


def _bytes(value, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value  # a data: URL from a browser
        if len(text) > MAX_UPLOAD_BYTES * 4 // 3 + 8:
            raise ApiError(413, f"the {what} is larger than {MAX_UPLOAD_BYTES} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"the {what} is not valid base64") from None
    else:
        raise ApiError(422, f"the {what} must be a base64 string (or a multipart file)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the {what} is larger than {MAX_UPLOAD_BYTES} bytes")
    if not data:
        raise ApiError(422, f"the {what} is empty")
    return data


def _open(data: bytes, what: str):
    """Decode through latentdiff.data (header checks first); the file name in its messages is the field's."""
    from latentdiff.data import open_image
    from latentdiff.data.folders import read_header

    with tempfile.TemporaryDirectory(prefix="latentdiff-upload-") as tmp:
        path = Path(tmp) / what
        path.write_bytes(data)
        try:
            header = read_header(path)
            if header.width * header.height > MAX_UPLOAD_PIXELS:
                raise ApiError(413, f"the {what} declares {header.width}×{header.height} pixels; the server takes "
                                    f"at most {MAX_UPLOAD_PIXELS} pixels per upload")
            im = open_image(path)
            im.load()
        except DataError as e:
            raise ApiError(422, str(e).replace(str(path), f"'{what}'")) from None
    return im


def decode(what: str, value, pipe, size: tuple[int, int] | None = None):
    """An upload -> for "image": (uint8 1×H×W×C at the model's size, the upload's (width, height));
    for "mask": bool H×W at the model's size (white, >= 128, = regenerate; `size` = the image's size)."""
    from PIL import Image

    from latentdiff.data import as_mode

    c, h, w = pipe.image_shape
    im = _open(_bytes(value, what), what)
    if what == "mask":
        im = as_mode(im, 1)
        if size is not None and im.size != tuple(size):
            raise ApiError(422, f"the mask is {im.size[0]}×{im.size[1]} but the image {size[0]}×{size[1]}")
        mask = np.asarray(im) >= 128
        if mask.shape != (h, w):  # any coverage counts, so that resizing never shrinks the hole
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BOX)) > 0
        return mask
    im = as_mode(im, c)
    upload_size = im.size
    if im.size != (w, h):
        if im.size[0] * h != im.size[1] * w:
            raise ApiError(422, f"the {what} is {im.size[0]}×{im.size[1]} but the model works on {w}×{h} images; "
                                f"crop it to the aspect ratio {w}:{h} first")
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8).reshape(1, h, w, c), upload_size
