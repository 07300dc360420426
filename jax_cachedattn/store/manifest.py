"""The on-disk schema of a session's committed state, validated field by field.

``s/<sid>/manifest.json`` is a JSON body followed by a last line ``#crc32=<hex>`` of the body, so a
truncated or damaged file is detected. A body that parses but breaks the schema (a missing field, a
negative offset, a token id out of range, a token count that does not match ``end - offset``...)
raises `ManifestCorrupt` naming the field: recovery quarantines that one session, never the store.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np

from .errors import StoreError

MANIFEST_VERSION = 2
#: Version 1 manifests (format-1 stores) are read only to keep the token ids while adopting.
ADOPTABLE_VERSIONS = (1, 2)
TOKEN_ID_MAX = 2**31 - 1  # token ids are stored as int32
_DTYPES = ("float32", "bfloat16", "float16")


class ManifestCorrupt(StoreError):
    """A manifest that cannot be parsed, fails its own checksum, or breaks the schema."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A session's committed state: tokens ``[offset, end)`` of its history, ``turn`` turns."""

    fingerprint: str
    offset: int
    end: int
    turn: int
    token_ids: tuple[int, ...]
    kv_valid: bool
    token_block: int
    dtype: str
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["token_ids"] = list(self.token_ids)
        return d

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.token_ids, np.int32)


def encode(m: Manifest) -> bytes:
    text = json.dumps(m.to_json(), sort_keys=True, separators=(",", ":"))
    return (text + "\n#crc32=%08x\n" % zlib.crc32(text.encode())).encode()


def _int(body: dict, name: str, lo: int = 0) -> int:
    v = body.get(name)
    if type(v) is not int or v < lo:
        raise ManifestCorrupt(f"field {name!r} must be an int >= {lo}, got {v!r}")
    return v


def validate(body) -> Manifest:
    """A `Manifest` from a parsed body, or `ManifestCorrupt` naming the first bad field."""
    if not isinstance(body, dict):
        raise ManifestCorrupt(f"the manifest body is a {type(body).__name__}, not an object")
    version = body.get("version")
    if version not in ADOPTABLE_VERSIONS:
        raise ManifestCorrupt(f"unknown manifest version {version!r}")
    fp = body.get("fingerprint")
    if not isinstance(fp, str):
        raise ManifestCorrupt(f"field 'fingerprint' must be a string, got {fp!r}")
    offset, end, turn = _int(body, "offset"), _int(body, "end"), _int(body, "turn")
    if end < offset:
        raise ManifestCorrupt(f"end {end} < offset {offset}")
    ids = body.get("token_ids")
    if not isinstance(ids, list) or any(type(t) is not int or not 0 <= t <= TOKEN_ID_MAX for t in ids):
        bad = ids if not isinstance(ids, list) else next(t for t in ids if type(t) is not int or not 0 <= t <= TOKEN_ID_MAX)
        raise ManifestCorrupt(f"field 'token_ids' must be a list of ints in [0, 2**31), found {bad!r}")
    if len(ids) != end - offset:
        raise ManifestCorrupt(f"{len(ids)} token ids for end - offset = {end - offset} tokens")
    kv_valid = body.get("kv_valid")
    if type(kv_valid) is not bool:
        raise ManifestCorrupt(f"field 'kv_valid' must be a bool, got {kv_valid!r}")
    tb = body.get("token_block", 1) if version == 1 else _int(body, "token_block", 1)
    dtype = body.get("dtype", "float32") if version == 1 else body.get("dtype")
    if dtype not in _DTYPES:
        raise ManifestCorrupt(f"field 'dtype' must be one of {_DTYPES}, got {dtype!r}")
    return Manifest(fp, offset, end, turn, tuple(ids), kv_valid, tb, dtype, version)


def decode(raw: bytes) -> Manifest:
    try:
        text, tail = raw.decode().rstrip("\n").rsplit("\n", 1)
        if not tail.startswith("#crc32=") or int(tail[7:], 16) != zlib.crc32(text.encode()):
            raise ValueError("crc mismatch")
        body = json.loads(text)
    except ManifestCorrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any damage is the same error
        raise ManifestCorrupt(f"damaged manifest: {e}") from e
    return validate(body)
