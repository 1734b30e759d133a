"""Ed25519 signatures over a bundle's manifest.json (the `cryptography` library).

The manifest lists the sha256 of every file of the bundle and a digest of itself, so a signature over its
bytes covers the whole bundle: a bundle swapped whole (model, hashes and digest recomputed) fails
`verify --key`. Ed25519 signatures are deterministic, so two clean signed runs stay byte-identical.

Keys are PEM files: a PKCS#8 private key (`package --sign-key`; when it is encrypted, the password comes
from NPU_PIPELINE_SIGN_KEY_PASSWORD) and its SubjectPublicKeyInfo public key (`verify --key`). Make a
pair with `npu-pipeline keygen DIR` or OpenSSL:

    openssl genpkey -algorithm ed25519 -out signing.pem
    openssl pkey -in signing.pem -pubout -out signing.pub.pem
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from ..errors import PipelineError

__all__ = ["SIGNATURE_FILE", "PASSWORD_ENV", "load_private_key", "load_public_key", "key_id", "sign", "verify",
           "generate_key_pair"]

SIGNATURE_FILE = "manifest.sig"
PASSWORD_ENV = "NPU_PIPELINE_SIGN_KEY_PASSWORD"
_MAX_KEY_BYTES = 64 << 10  # a PEM key is a few hundred bytes


def _read_pem(path: Path, option: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{option} {path}: no such key file")
    if path.stat().st_size > _MAX_KEY_BYTES:
        raise PipelineError(f"{option} {path}: {path.stat().st_size:,} bytes is not a PEM key file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise PipelineError(f"{option} {path}: cannot read it ({err.strerror or err})") from None


def load_private_key(path: Path):
    """The Ed25519 private key of a PEM file (`--sign-key`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_pem(path, "--sign-key")
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = load_pem_private_key(data, password=password.encode() if password else None)
    except TypeError as err:  # encrypted without a password, or a password for an unencrypted key
        raise PipelineError(f"--sign-key {path}: {err} (the password comes from {PASSWORD_ENV})") from None
    except ValueError:
        raise PipelineError(
            f"--sign-key {path}: not a PEM private key, or a wrong password (make one with 'npu-pipeline keygen')"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PipelineError(f"--sign-key {path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    return key


def load_public_key(path: Path):
    """The Ed25519 public key of a PEM file (`verify --key`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_pem(path, "--key")
    try:
        key = load_pem_public_key(data)
    except ValueError:
        hint = " (this is the private key: pass its public half)" if b"PRIVATE KEY" in data else ""
        raise PipelineError(f"--key {path}: not a PEM public key{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PipelineError(f"--key {path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(data: bytes, private_key) -> str:
    """The signature file's text: base64 of the 64-byte Ed25519 signature, one line."""
    return base64.b64encode(private_key.sign(data)).decode("ascii") + "\n"


def verify(data: bytes, signature_text: str, public_key) -> bool:
    """Whether `signature_text` (as `sign` writes it) is `public_key`'s signature of `data`."""
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
        public_key.verify(signature, data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one readable by its owner only); its key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding, NoEncryption, PrivateFormat, PublicFormat,
    )

    for path in (private_path, public_path):
        if Path(path).exists():
            raise PipelineError(f"{path} already exists; keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    try:
        Path(private_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
        Path(public_path).write_bytes(public_pem)
    except OSError as err:
        raise PipelineError(f"keygen: cannot write {err.filename or private_path} ({err.strerror or err})") from None
    return key_id(key.public_key())
