"""Where the provenance keys live: the watermark secret and the C2PA signing key + certificate chain.

Per installation: `latentdiff keys init` writes them to the config folder ($LATENTDIFF_CONFIG_DIR, else
$XDG_CONFIG_HOME/latentdiff, else ~/.config/latentdiff). Per deployment: $LATENTDIFF_WATERMARK_KEY (any
string; its SHA-256 is the secret) overrides the watermark file. Without either, a public *development*
watermark key is used and every output says so; the C2PA signer is then a freshly made ephemeral key
whose certificate names itself "UNTRUSTED ephemeral development key".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from latentdiff.errors import ConfigError
from latentdiff.pipeline.watermark import WatermarkKey
from latentdiff.utils.files import atomic_path, write_text_atomic

WATERMARK_FILE = "watermark.key"
SIGNING_KEY_FILE = "signing-key.pem"
CHAIN_FILE = "signing-chain.pem"     # leaf certificate then root certificate (PEM)
ROOT_FILE = "signing-root.pem"       # the root alone: give it to verifiers as a trust anchor
ENV_WATERMARK = "LATENTDIFF_WATERMARK_KEY"
ENV_CONFIG = "LATENTDIFF_CONFIG_DIR"
# Public on purpose: lets an installation without `keys init` mark and detect its own outputs, but anyone can
# forge or test for it, so outputs made with it are labelled.
DEV_SECRET = hashlib.sha256(b"latentdiff public development watermark key (not secret)").digest()
DEV_LABEL = "development (public, not secret: run `latentdiff keys init`)"
EPHEMERAL_NAME = "latentdiff UNTRUSTED ephemeral development key"


def config_dir() -> Path:
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "latentdiff"


def watermark_key() -> WatermarkKey:
    """The deployment's ($LATENTDIFF_WATERMARK_KEY), the installation's, or the public development key."""
    env = os.environ.get(ENV_WATERMARK)
    if env:
        return WatermarkKey(hashlib.sha256(env.encode()).digest(), "deployment ($" + ENV_WATERMARK + ")")
    path = config_dir() / WATERMARK_FILE
    if path.is_file():
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except ValueError:
            raise ConfigError(f"{path} is not a hex watermark key; remove it and run `latentdiff keys init`") from None
        if len(secret) < 16:
            raise ConfigError(f"{path} holds fewer than 16 bytes; run `latentdiff keys init --force`")
        return WatermarkKey(secret, "installation")
    return WatermarkKey(DEV_SECRET, DEV_LABEL)


def candidate_keys() -> list[WatermarkKey]:
    """The keys `verify` tries: this installation's/deployment's, then the public development key."""
    key = watermark_key()
    return [key] if key.secret == DEV_SECRET else [key, WatermarkKey(DEV_SECRET, DEV_LABEL)]


@dataclass(frozen=True)
class SigningIdentity:
    key_pem: bytes
    chain_pem: bytes
    name: str
    ephemeral: bool


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "latentdiff")])


def make_chain(subject: str, days: int = 3650) -> tuple[bytes, bytes, bytes]:
    """A fresh ES256 root CA and a leaf signing certificate for C2PA: (leaf key, leaf+root chain, root), PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name, leaf_name = _name(subject + " root"), _name(subject)
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(root_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    root_pem = root.public_bytes(pem)
    return key_pem, leaf.public_bytes(pem) + root_pem, root_pem


_EPHEMERAL: SigningIdentity | None = None


def signing_identity() -> SigningIdentity:
    """The installation's signing key, or (made once per process) a clearly labelled ephemeral one."""
    global _EPHEMERAL
    d = config_dir()
    if (d / SIGNING_KEY_FILE).is_file() and (d / CHAIN_FILE).is_file():
        return SigningIdentity((d / SIGNING_KEY_FILE).read_bytes(), (d / CHAIN_FILE).read_bytes(),
                               f"latentdiff installation key ({d / CHAIN_FILE})", False)
    if _EPHEMERAL is None:
        key, chain, _ = make_chain(EPHEMERAL_NAME, days=30)
        _EPHEMERAL = SigningIdentity(key, chain, EPHEMERAL_NAME, True)
    return _EPHEMERAL


def init_keys(subject: str = "latentdiff local signer", force: bool = False) -> dict[str, Path]:
    """`latentdiff keys init`: a watermark secret and an ES256 root + leaf chain in the config folder."""
    d = config_dir()
    paths = {"watermark": d / WATERMARK_FILE, "signing key": d / SIGNING_KEY_FILE, "chain": d / CHAIN_FILE,
             "root": d / ROOT_FILE}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"keys already exist ({', '.join(existing)}); --force replaces them, and images "
                          "watermarked with the old key will no longer be detected")
    key_pem, chain_pem, root_pem = make_chain(subject)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (("watermark", secrets.token_hex(32).encode()), ("signing key", key_pem)):
        with atomic_path(paths[name]) as tmp:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
        os.chmod(paths[name], 0o600)
    write_text_atomic(paths["chain"], chain_pem.decode())
    write_text_atomic(paths["root"], root_pem.decode())
    return paths
