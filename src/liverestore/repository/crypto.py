"""Client-side encryption of a repository: what anyone with read access to the bucket sees is
sealed bytes and ids that reveal nothing about content.

A random master key (an AES-256-GCM data key and a BLAKE3 id key) is made at ``init --encrypt``
and stored wrapped: scrypt turns the passphrase into a key-encryption key, which seals the master
key in ``key.json``. Changing the passphrase rewraps that one object; no data is re-encrypted.

Every object is ``nonce (12) || AES-GCM(plaintext)`` with the object's name as associated data,
so a sealed chunk moved under another name fails authentication like a flipped byte does. Chunk
ids are the keyed BLAKE3 of the plaintext: dedup still works inside the repository, and an id
cannot be checked against a guessed block.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from liverestore.errors import IntegrityError, LiverestoreError

NONCE = 12
TAG = 16
KEY_DOC_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # about 0.1 s and 32 MiB per unlock
_WRAP_AAD = b"liverestore master key v1"


class WrongKey(LiverestoreError):
    """The passphrase does not unlock the repository's master key."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


@dataclass(frozen=True)
class MasterKey:
    data_key: bytes  # AES-256-GCM
    id_key: bytes  # BLAKE3 keyed mode

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(32), os.urandom(32))

    def object_id(self, data: bytes | memoryview) -> str:
        return str(blake3.blake3(data, key=self.id_key).hexdigest())

    def seal(self, plaintext: bytes, name: str) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + AESGCM(self.data_key).encrypt(nonce, plaintext, name.encode())

    def open(self, blob: bytes, name: str) -> bytes:
        if len(blob) < NONCE + TAG:
            raise IntegrityError(f"{name} is corrupt (shorter than its authentication tag)")
        try:
            return AESGCM(self.data_key).decrypt(blob[:NONCE], blob[NONCE:], name.encode())
        except InvalidTag:
            raise IntegrityError(f"{name} failed authentication: it was altered (or belongs elsewhere)") from None

    def wrap(self, passphrase: str) -> bytes:
        """``key.json``: this key sealed under a key derived from ``passphrase``."""
        salt = os.urandom(16)
        kek = _kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        nonce = os.urandom(NONCE)
        sealed = AESGCM(kek).encrypt(nonce, self.data_key + self.id_key, _WRAP_AAD)
        doc = {"version": KEY_DOC_VERSION, "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
               "salt": _b64(salt), "cipher": "aes-256-gcm", "wrapped": _b64(nonce + sealed)}  # fmt: skip
        return json.dumps(doc, indent=2).encode()

    @classmethod
    def unwrap(cls, key_doc: bytes, passphrase: str, where: str) -> MasterKey:
        try:
            doc: dict[str, Any] = json.loads(key_doc)
            salt, wrapped = base64.b64decode(doc["salt"]), base64.b64decode(doc["wrapped"])
            kek = _kek(passphrase, salt, int(doc["n"]), int(doc["r"]), int(doc["p"]))
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"the key of {where} (key.json) is unreadable: {e}") from None
        try:
            raw = AESGCM(kek).decrypt(wrapped[:NONCE], wrapped[NONCE:], _WRAP_AAD)
        except InvalidTag:
            raise WrongKey(f"wrong passphrase for the encrypted repository {where}") from None
        return cls(raw[:32], raw[32:64])
