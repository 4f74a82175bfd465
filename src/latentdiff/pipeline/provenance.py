"""Provenance of every output file: the generation record, the invisible watermark and a C2PA signature.

An output declares itself three independent ways: PNG text chunks (the record; any re-save strips them),
a C2PA manifest signed with the installation's key (``c2pa.created``, digital source type
trainedAlgorithmicMedia, the model's name and SHA-256, the SampleRequest; stripped by a re-save, and
"invalid" after any change of a byte), and the watermark in the pixels themselves (``watermark.py``),
which survives re-saving. :func:`write_output` is the one writer for finished PNG/GIF outputs (CLI and
HTTP API); :func:`read_c2pa` is its reader for ``latentdiff verify``.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from latentdiff.errors import DataError
from latentdiff.pipeline.decoder_mark import MARK_BITS, has_marknet, marknet_id
from latentdiff.pipeline.keys import signing_identity
from latentdiff.pipeline.watermark import WatermarkKey
from latentdiff.utils.files import atomic_path
from latentdiff.utils.images import to_pil

RECORD_KEY = "latentdiff"  # the PNG text chunk / C2PA assertion data holding the record
ASSERTION = "org.latentdiff.generation"
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {".png": "image/png", ".gif": "image/gif"}
NO_C2PA = "absent: the `provenance` extra (c2pa-python) is not installed; pip install 'latentdiff[provenance]'"


def c2pa_available() -> bool:
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def model_sha256(model) -> str | None:
    """SHA-256 over the model directory's weight files (name and bytes, sorted), cached on the model."""
    cached = getattr(model, "_provenance_sha256", None)
    if cached is not None or getattr(model, "directory", None) is None:
        return cached
    h = hashlib.sha256()
    for f in sorted(Path(model.directory).glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    model._provenance_sha256 = h.hexdigest()
    return model._provenance_sha256


def watermark_record(model, key: WatermarkKey | None, noise_mark: bool = True, note: str | None = None) -> dict:
    """The record's "watermark" entry. `scheme`: the noise mark ("gaussian-shading-zT"), or None where the operation
    added no keyed noise (`note` says why); `decoder_mark` and `decoder_mark_nets` (a hash of the nets' file): the
    decoder layer, where nets ship for the model's image size and the model decodes with it. Without a key:
    disabled (--no-watermark), or as `note` says."""
    c, h, _ = model.image_shape
    decoder = key is not None and hasattr(model, "initial_noise") and has_marknet(h, c)
    if key is None or not (noise_mark or decoder):
        return {"scheme": None, "disabled": note is None, **({"note": note} if note else {})}
    return {"scheme": "gaussian-shading-zT" if noise_mark else None,
            **({"decoder_mark": f"marknet-{MARK_BITS}bit", "decoder_mark_nets": marknet_id(h, c)} if decoder else {}),
            "key": key.label, "key_id": key.fingerprint, **({"note": note} if note and not noise_mark else {})}


def generation_record(model, model_name: str, request: dict, watermark: WatermarkKey | None,
                      sign: bool = True, watermark_note: str | None = None, noise_mark: bool = True, **extra) -> dict:
    """The provenance record of one output: model (name, SHA-256), request, watermark, signing intent.
    `watermark`: the key the output was made with; `noise_mark`: False where the operation added no keyed noise
    (inpainting, frames between images), which `watermark_note` explains (see :func:`watermark_record`)."""
    from latentdiff import __version__

    wm = watermark_record(model, watermark, noise_mark, watermark_note)
    # flat: the request's fields sit beside the provenance keys (the record format since issue 8)
    return {**request, "software": f"latentdiff {__version__}", "synthetic": True,
            "model": {"name": str(model_name), "sha256": model_sha256(model),
                      "image_shape": list(model.image_shape)},
            "watermark": wm,
            "c2pa": ("signed" if c2pa_available() else NO_C2PA) if sign else "disabled (--no-sign)", **extra}


PROVENANCE_KEYS = ("software", "synthetic", "model", "watermark", "c2pa", "grid", "watermark_note")


def request_fields(record: dict) -> dict:
    """The generation settings of a record (everything but the provenance keys)."""
    return {k: v for k, v in record.items() if k not in PROVENANCE_KEYS}


def _png_bytes(img: np.ndarray, record: dict, scale: int = 1) -> bytes:
    pil = to_pil(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", record.get("software", "latentdiff"))
    info.add_text(RECORD_KEY, json.dumps(record))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _gif_bytes(frames: np.ndarray, record: dict, duration_ms: int, scale: int = 1) -> bytes:
    pils = [to_pil(f) for f in frames]
    if scale > 1:
        pils = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pils]
    buf = io.BytesIO()
    pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=duration_ms, loop=0,
                 comment=json.dumps(record).encode())
    return buf.getvalue()


def _manifest(record: dict, title: str) -> dict:
    return {"claim_generator_info": [{"name": "latentdiff", "version": record["software"].split()[-1]}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": SOURCE_TYPE,
                    "softwareAgent": {"name": record["software"]},
                    "parameters": {"model": record["model"], "request": json.dumps(request_fields(record))}}]}},
                # as JSON text: the manifest's CBOR would turn small-int lists (labels) into byte strings
                {"label": ASSERTION, "data": {"record_json": json.dumps(record)}}]}


def sign_bytes(data: bytes, mime: str, record: dict, title: str) -> bytes:
    """`data` with an embedded C2PA manifest signed offline (no timestamp authority, no thumbnail)."""
    import c2pa

    ident = signing_identity()
    ctx = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=ident.chain_pem,
                                                       private_key=ident.key_pem, ta_url=None))
    out = io.BytesIO()
    with c2pa.Builder(json.dumps(_manifest(record, title)), context=ctx) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def write_output(path: str | Path, images: np.ndarray, record: dict, *, sign: bool = True, scale: int = 1,
                 duration_ms: int = 100) -> Path:
    """Write one finished output atomically: a PNG (`images` H×W×C) or a GIF (`images` frames F×H×W×C),
    with the record in its metadata and, when `sign` and the extra is installed, a C2PA manifest. The
    watermark is already in the pixels (generation with a key)."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise DataError(f"output {path} must end in .png or .gif")
    data = _png_bytes(images, record, scale) if mime == "image/png" else _gif_bytes(images, record, duration_ms,
                                                                                      scale)
    if sign and c2pa_available():
        data = sign_bytes(data, mime, record, path.name)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def read_record(path: str | Path) -> dict | None:
    """The record in the PNG text chunk / GIF comment, or None (stripped, or not a latentdiff output)."""
    with Image.open(path) as im:
        text = im.info.get(RECORD_KEY) or im.info.get("comment")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        rec = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def read_c2pa(path: str | Path) -> dict:
    """{"status": valid|invalid|absent|unavailable, "signer", "trusted", "record", "failures"} for one file."""
    data = Path(path).read_bytes()
    if not c2pa_available():
        return {"status": "unavailable", "detail": NO_C2PA}
    import c2pa

    mime = MIME.get(Path(path).suffix.lower()) or ("image/png" if data[:4] == b"\x89PNG" else "image/jpeg")
    try:
        reader = c2pa.Reader(mime, io.BytesIO(data))
    except c2pa.C2paError as e:
        # a c2pa box whose own structure is damaged is tampering; no manifest at all is "absent"
        if (b"caBX" in data) if mime == "image/png" else (b"jumb" in data):  # the C2PA chunk / JUMBF box
            return {"status": "invalid", "detail": f"manifest unreadable: {e}"}
        return {"status": "absent"}
    manifest = reader.get_active_manifest() or {}
    state = (reader.get_validation_state() or "").lower()
    results = (reader.get_validation_results() or {}).get("activeManifest", {})
    failures = [f.get("code") for f in results.get("failure", [])]
    hard = [c for c in failures if c != "signingCredential.untrusted"]
    data = next((a.get("data") for a in manifest.get("assertions", []) if a.get("label") == ASSERTION), None)
    try:
        record = json.loads(data["record_json"]) if isinstance(data, dict) and "record_json" in data else None
    except (TypeError, json.JSONDecodeError):
        record = None
    sig = manifest.get("signature_info", {})
    return {"status": "invalid" if (hard or state == "invalid") else "valid",
            "trusted": state == "trusted", "signer": sig.get("common_name"), "issuer": sig.get("issuer"),
            "failures": failures, "record": record}
