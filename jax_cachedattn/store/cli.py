"""`cachedattn store ls|verify|gc --store DIR`: inspect and repair a store folder without the model.

The layout (and fingerprint) is read from the store's own ``store.json``. ``ls`` and ``verify`` only
read (no lock: they work while a writer has the store open, and may then show its uncommitted
tails); ``gc`` changes the folder and takes the store's writer lock (`StoreLocked` if a writer is up).
"""

from __future__ import annotations

import argparse
import json
import sys

from .disk import READ_FORMATS, DiskTier
from .errors import FingerprintMismatch, InvalidSessionId
from .layout import KVLayout, StoreConfig, validate_session_id
from .manifest import ManifestCorrupt
from .rootlock import RootLock


def _open(path: str) -> tuple[DiskTier, KVLayout | None, int]:
    cfg0 = StoreConfig(root=path)
    probe = DiskTier(cfg0, KVLayout(1, 1, 1))
    raw = probe.read_key("store.json")
    if raw is None:
        return probe, None, cfg0.token_block
    meta = json.loads(raw)
    if meta.get("format", 1) not in READ_FORMATS:
        raise FingerprintMismatch(
            f"{path} is a store of format {meta.get('format', 1)}; this version reads formats {list(READ_FORMATS)} "
            "(open it with StoreConfig(keep_tokens_on_mismatch=True) to keep its conversations and recompute their KV)")
    layout = KVLayout(**meta["layout"])
    cfg = StoreConfig(root=path, token_block=meta["token_block"])
    disk = DiskTier(cfg, layout)
    disk.chunk = meta.get("disk_chunk", meta["token_block"])  # a store.json without it: one chunk per block
    disk.chunk_layers = meta.get("disk_chunk_layers", 1) if meta["format"] >= 3 else 1  # format 2: one layer
    return disk, layout, meta["token_block"]


def _scan(disk: DiskTier, layout: KVLayout | None, B: int, verify: bool) -> list[dict]:
    with_manifest, with_data = disk.session_ids()
    rows = []
    for sid in sorted(with_manifest | with_data):
        row: dict = {"session": sid}
        try:
            validate_session_id(sid)
        except InvalidSessionId:
            row.update(state="bad_name", tokens=None, turn=None, bytes=0, array_tokens=None)
            rows.append(row)
            continue
        cap = disk.capacity_blocks(sid) if sid in with_data else None
        row["array_tokens"] = None if cap is None else cap * B
        row["bytes"] = 0 if (cap is None or layout is None) else cap * B * layout.bytes_per_token
        if sid not in with_manifest:
            row.update(state="orphan", tokens=None, turn=None)
            rows.append(row)
            continue
        try:
            m = disk.read_manifest(sid)
        except ManifestCorrupt as e:
            row.update(state="bad_manifest", tokens=None, turn=None, error=str(e))
            rows.append(row)
            continue
        row.update(tokens=m.end - m.offset, turn=m.turn, offset=m.offset, fingerprint=m.fingerprint)
        if cap is not None and layout is not None and m.kv_valid:
            front = min(m.offset // B, cap)
            row["bytes"] = (cap - front) * B * layout.bytes_per_token  # blocks before the front are dead
            row["dead_blocks"] = sum(1 for b in disk.stored_blocks(sid) if b < front)
        if layout is not None and (m.fingerprint != layout.fingerprint or m.version != 2 or m.dtype != layout.dtype):
            row["state"] = "foreign"
        elif not m.kv_valid:
            row["state"] = "kv_lost"
        elif cap is None or cap * B < m.end:
            row["state"] = "missing_data"
        else:
            row["state"] = "committed" if cap == -(-m.end // B) else "uncommitted_tail"
        if verify and row["state"] in ("committed", "uncommitted_tail"):
            # Reading a chunk checks its crc32c (TensorStore raises on a missing, short or damaged one).
            f, nb = m.offset // B, -(-m.end // B)
            futs = [(g, b, disk.read_rows(sid, g, b, disk.rows_on_disk(b, m.end)))
                    for g in range(disk.groups) for b in range(f, nb)]
            bad = 0
            for g, b, fu in futs:
                try:
                    fu.result()
                except Exception as e:  # noqa: BLE001 - unreadable chunk
                    layers = disk.group_layers(g)
                    row.setdefault("error", f"layers {layers.start}-{layers.stop - 1} block {b}: {e}")
                    bad += 1
            row["bad_chunks"] = bad
            if bad:
                row["state"] = "bad_checksum"
        rows.append(row)
    return rows


def _print(rows: list[dict], as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print(json.dumps({"sessions": rows, **(extra or {})}, indent=1))
        return
    print(f"{'session':<32} {'tokens':>8} {'turn':>5} {'bytes':>12}  state")
    for r in rows:
        print(f"{r['session']:<32} {str(r.get('tokens')):>8} {str(r.get('turn')):>5} {r['bytes']:>12}  {r['state']}")
    for k, v in (extra or {}).items():
        print(f"{k}: {v}")


def cmd_ls(args) -> int:
    disk, layout, B = _open(args.store)
    _print(_scan(disk, layout, B, verify=False), args.json, {"layout": layout and layout.to_json()})
    return 0


def cmd_verify(args) -> int:
    disk, layout, B = _open(args.store)
    rows = _scan(disk, layout, B, verify=True)
    bad = [r["session"] for r in rows if r["state"] in ("bad_checksum", "bad_manifest", "missing_data")]
    _print(rows, args.json, {"bad": bad, "quarantined": disk.quarantined()})
    return 1 if bad else 0


def cmd_gc(args) -> int:
    import dataclasses

    lock = RootLock(args.store)  # one writer per root: gc is a writer
    try:
        disk, layout, B = _open(args.store)
        rows = _scan(disk, layout, B, verify=not args.no_verify)
        removed, shrunk, quarantined, reclaimed = [], [], [], []
        for r in rows:
            sid, state = r["session"], r["state"]
            if state == "orphan":
                disk.delete_session(sid)
                removed.append(sid)
            elif state in ("bad_manifest", "bad_name", "foreign"):
                disk.quarantine(sid, r.get("error", state))
                quarantined.append(sid)
            elif state in ("bad_checksum", "missing_data"):
                # keep the token ids: rewrite the manifest as kv_lost, then drop the data
                m = disk.read_manifest(sid)
                disk.write_manifest(sid, dataclasses.replace(m, kv_valid=False)).result()
                disk.delete_data(sid)
                removed.append(sid + " (kv)")
            if state in ("committed", "uncommitted_tail") and r.get("dead_blocks"):
                disk.delete_blocks(sid, 0, r["offset"] // B)  # left by a crash before their reclaim
                reclaimed.append(sid)
            if state == "uncommitted_tail":
                m = disk.read_manifest(sid)
                disk.resize(sid, -(-m.end // B))
                shrunk.append(sid)
        _print(rows, args.json, {"removed": removed, "shrunk": shrunk, "quarantined": quarantined,
                                     "reclaimed": reclaimed})
    finally:
        lock.release()
    return 0


def add_store_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``store {ls,verify,gc}`` to an argparse subparsers object; each sets ``func(args) -> int``."""
    p = subparsers.add_parser("store", help="inspect and repair a session KV store folder")
    sub = p.add_subparsers(dest="store_command", required=True)
    for name, fn, text in (
        ("ls", cmd_ls, "list sessions: tokens, turn, bytes, committed state"),
        ("verify", cmd_verify, "check every chunk checksum; exit 1 if any session is damaged"),
        ("gc", cmd_gc, "remove orphans and damaged KV (token ids are kept), shrink uncommitted tails, delete dead chunks before a front"),
    ):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--store", required=True, help="the store folder (a file kvstore root)")
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        if name == "gc":
            sp.add_argument("--no-verify", action="store_true", help="skip checksum verification (faster)")
        sp.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachedattn")
    add_store_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
