"""Opening a store folder: its format, adoption of another model's store, recovery of every session.

Order of an open: ``store.json`` decides the mode (same store; another model/layout/format: refuse,
wipe, or adopt keeping token ids); every folder under ``s/`` is checked alone; ``store.json`` is
written last and only when it changes, so a crash in the middle of an adoption leaves a store that the
same options open again. One bad folder never stops the store from opening: a folder whose name is not
a valid session id, or whose manifest is damaged or breaks the schema, or was made by another model
in a store that is not being adopted, is moved to ``quarantine/`` (counted in ``stats.quarantined``);
an array without a manifest (a first turn that never committed) is deleted; an array shorter than its
manifest, or whose ``zarr.json`` does not match the layout, marks the session's KV lost (token ids kept);
chunk files before a manifest's front (a crash between the manifest of a truncation and the deletion
that follows it) are deleted.
"""

from __future__ import annotations

import json

from .core import Core, ceil_div
from .disk import READ_FORMATS, STORE_FORMAT
from .errors import FingerprintMismatch, InvalidSessionId, KVLost
from .layout import validate_session_id
from .manifest import MANIFEST_VERSION, Manifest, ManifestCorrupt
from .memory import Memory
from .session import Session


def store_meta(core: Core, fmt: int = STORE_FORMAT) -> bytes:
    """The store.json of this store: format 3 records the chunk geometry; format 2 (an older store,
    opened as it is) has chunks of one layer."""
    want = {"format": fmt, "layout": core.layout.to_json(), "token_block": core.B, "disk_chunk": core.disk.chunk}
    if fmt >= 3:
        want["disk_chunk_layers"] = core.disk.chunk_layers
    return json.dumps(want, sort_keys=True).encode()


def _geometry(core: Core, meta) -> tuple[int, int, int] | None:
    """(format, tokens, layers) per chunk that a stored store.json records, None if it is unreadable or
    of a format this version does not read. Format 2: one layer per chunk; without ``disk_chunk``
    (written before disk chunks existed) one chunk per token block."""
    if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
        return None
    fmt = meta["format"]
    c = meta.get("disk_chunk", meta.get("token_block"))
    g = meta.get("disk_chunk_layers") if fmt >= 3 else 1
    for v, whole in ((c, core.B), (g, core.L)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= whole or whole % v:
            return None
    return fmt, c, g


def open_mode(core: Core) -> tuple[str, bytes | None, int]:
    """("same" | "new" | "adopt" | "wipe", the stored store.json, the format to keep). Sets the disk chunk
    geometry: the config's, else the store's own, else the default for a new store."""
    if core.cfg.disk_chunk_layers is not None and core.L % core.cfg.disk_chunk_layers:
        raise ValueError(f"StoreConfig.disk_chunk_layers must divide the layer count ({core.L}), got "
                         f"{core.cfg.disk_chunk_layers}")
    have = core.disk.read_key("store.json")
    core.disk.chunk, core.disk.chunk_layers = core.cfg.new_disk_geometry(core.layout)
    if have is None:
        return "new", None, STORE_FORMAT
    fmt = STORE_FORMAT
    try:
        meta = json.loads(have)
        geo = _geometry(core, meta)
        if geo is not None:
            fmt, c, g = geo
            if core.cfg.disk_chunk is None:
                core.disk.chunk = c
            if core.cfg.disk_chunk_layers is None:
                core.disk.chunk_layers = g
            meta.setdefault("disk_chunk", c)
        same = geo is not None and meta == json.loads(store_meta(core, fmt))
    except (ValueError, TypeError, AttributeError):
        same = False
    if same:
        return "same", have, fmt
    core.disk.chunk, core.disk.chunk_layers = core.cfg.new_disk_geometry(core.layout)  # a store made anew
    if core.cfg.keep_tokens_on_mismatch:
        return "adopt", have, STORE_FORMAT
    if core.cfg.wipe_on_mismatch:
        return "wipe", have, STORE_FORMAT
    raise FingerprintMismatch(
        f"the store holds KV of another model, layout, chunk geometry or store format (this version reads "
        f"formats {list(READ_FORMATS)}): {have.decode(errors='replace')!r} != {store_meta(core).decode()!r} "
        "(set StoreConfig.wipe_on_mismatch=True to delete it, or keep_tokens_on_mismatch=True to keep the "
        "conversations and recompute their KV)")


def _lose(core: Core, s: Session, m: Manifest) -> None:
    """Keep the token ids of ``s``, drop its KV: manifest first (kv_valid False), then the data."""
    s.restore(Manifest(core.layout.fingerprint, 0, len(m.token_ids), m.turn, m.token_ids, False, core.B,
                       core.layout.dtype, MANIFEST_VERSION))
    s.durable = s.manifest(core.layout, core.B)
    core.disk.write_manifest(s.sid, s.durable).result()
    core.disk.delete_data(s.sid)


def _reclaim_front(core: Core, s: Session, front: int) -> int:
    """Delete the chunk files before block ``front`` (the manifest's front) that a crash between a
    manifest and its reclaim left behind; returns the first block the disk budget counts."""
    if front <= 0:
        return 0
    try:
        dead = [b for b in core.disk.stored_blocks(s.sid) if b < front]
        if dead:
            core.disk.delete_blocks(s.sid, min(dead), front)
            core.stats.add("bytes_reclaimed", core.disk_bytes(front - min(dead)), tier="disk")
    except Exception:  # noqa: BLE001 - counted as still there; the next open tries again
        core.stats.add("reclaim_failures")
        return 0
    return front


def recover(core: Core, mem: Memory, adopting: bool) -> None:
    disk, stats = core.disk, core.stats
    with_manifest, with_data = disk.session_ids()
    for name in sorted(with_manifest | with_data):
        try:
            validate_session_id(name)
        except InvalidSessionId:
            disk.quarantine(name, "not a valid session id")
            stats.add("quarantined")
            continue
        if name not in with_manifest:  # a first turn that never committed
            disk.delete_prefix(f"s/{name}/")
            stats.add("recoveries")
            continue
        try:
            m = disk.read_manifest(name)
        except ManifestCorrupt as e:
            disk.quarantine(name, str(e))
            stats.add("checksum_failures")
            stats.add("quarantined")
            continue
        foreign = (m.fingerprint != core.layout.fingerprint or m.dtype != core.layout.dtype
                   or m.token_block != core.B or m.version != MANIFEST_VERSION)
        if foreign and not adopting:
            disk.quarantine(name, f"made by model {m.fingerprint!r} (dtype {m.dtype}, token block {m.token_block}, "
                                  f"manifest version {m.version}) in a store of {core.layout.fingerprint!r}")
            stats.add("quarantined")
            continue
        s = core.new_session(name)
        s.restore(m)
        s.durable = m
        if foreign or adopting:  # another model's KV is never served; the conversation is kept
            if m.kv_valid or foreign:
                stats.add("checksum_failures")
            _lose(core, s, m)
            core.policy.touch(name, "disk")
            continue
        if m.kv_valid:
            need = ceil_div(m.end, core.B)
            try:
                cap = disk.array(name).shape[2] // core.B
            except Exception:  # noqa: BLE001 - no array, unreadable or mismatched zarr.json
                cap = None
            if cap is None or cap < need:
                stats.add("checksum_failures")
                _lose(core, s, m)
            else:
                s.disk_cap = s.disk_blocks = cap
                s.disk_lo = _reclaim_front(core, s, m.offset // core.B)
                s.held["disk"].absorb(core.take("disk", core.disk_bytes(cap - s.disk_lo)))
                if cap > need:  # the uncommitted tail of a turn that did not commit
                    stats.add("recoveries")
        core.policy.touch(name, "disk")


def verify_all(core: Core, mem: Memory, promoter, reserve) -> None:
    """Read every committed chunk once (its crc32c checked), holding one layer group's bytes of host budget."""
    for sid in sorted(core.sessions):
        s = core.sessions[sid]
        if not s.kv_valid:
            continue
        f, nb = mem.span(s)
        if nb <= f:
            continue
        with reserve("host", core.disk.chunk_layers * (nb - f) * core.block_bytes, s):
            try:
                promoter.read_verified(s, f, nb, keep=False, end=s.end)
            except KVLost:
                pass


def open_store(core: Core, mem: Memory, promoter, reserve) -> None:
    mode, have, fmt = open_mode(core)
    if mode == "wipe":
        core.disk.delete_prefix("s/")
    recover(core, mem, adopting=mode == "adopt")
    want = store_meta(core, fmt)
    if have != want:  # written last (an adoption interrupted before this point runs again) and only when changed
        core.disk.write_key_durably("store.json", want)
    if core.cfg.verify_on_open:
        verify_all(core, mem, promoter, reserve)
