"""Disk tier: the store's keys, folders and manifests, over the session arrays of `chunks`.

Keys under the store's kvstore:
  store.json                  format, layout, model fingerprint and chunk geometry of the whole store
  s/<sid>/kv/                 the session's zarr3 array (`chunks`: chunks of ``disk_chunk_layers`` layers
                              by ``disk_chunk`` tokens)
  s/<sid>/manifest.json       committed state: offset, end, turn, token ids; the last line is the
                              crc32 of the body, so a truncated or damaged manifest is detected.
  quarantine/<name>.<n>/      folders moved out of ``s/`` (bad id, bad manifest, another model's), with
                              a ``reason.txt``
The manifest is written last and durably (`durable.write_durably`). Session ids are validated before
they reach here, so ``s/<sid>/`` never escapes the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil

import tensorstore as ts

from . import manifest as mf
from .chunks import KVArrays
from .durable import fsync_dir, is_enospc, write_durably  # noqa: F401 - is_enospc re-exported
from .manifest import Manifest, ManifestCorrupt  # noqa: F401 - ManifestCorrupt re-exported

#: On-disk format of the whole store (store.json). 3: chunks of ``disk_chunk_layers`` layers by
#: ``disk_chunk`` tokens, both recorded. 2 (read as before): chunks of one layer (a store.json of format 2
#: without ``disk_chunk`` has chunks of one token block). Any other format is handled like another
#: model's store (refused with one line, or wiped / adopted as the options say).
STORE_FORMAT = 3
READ_FORMATS = (2, 3)


class DiskTier(KVArrays):
    """The disk tier: keys, manifests and folders (this class), session arrays (`KVArrays`)."""

    # ---- keys -------------------------------------------------------------------------------
    def list_keys(self) -> list[str]:
        return [k.decode() for k in self.kv.list().result()]

    def read_key(self, key: str) -> bytes | None:
        r = self.kv.read(key).result()
        return bytes(r.value) if r.state == "value" else None

    def write_key(self, key: str, value: bytes):
        """Atomic single-key write (the file driver writes a temp file and renames); a future."""
        return self.kv.write(key, value)

    def write_key_durably(self, key: str, raw: bytes) -> None:
        """A small metadata key (store.json) written atomically, fsynced on a ``file`` kvstore."""
        if self.root is None:
            self.write_key(key, raw).result()
        else:
            write_durably(os.path.join(self.root, key), raw)

    def session_ids(self) -> tuple[set[str], set[str]]:
        """(folders with a manifest, folders with any other key) under ``s/``; names not validated."""
        with_manifest, with_data = set(), set()
        for key in self.list_keys():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "s":
                (with_manifest if parts[2] == "manifest.json" and len(parts) == 3 else with_data).add(parts[1])
        return with_manifest, with_data

    # ---- folders ----------------------------------------------------------------------------
    def quarantine(self, name: str, reason: str) -> None:
        """Move folder ``s/<name>/`` out of the store to ``quarantine/<name>.<n>/`` with a ``reason.txt``
        (on a ``file`` kvstore; elsewhere its keys are deleted): it no longer counts or conflicts."""
        root = self.root
        if root is None:
            self.delete_prefix(f"s/{name}/")
            return
        src = os.path.join(root, "s", name)
        qdir = os.path.join(root, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        n = 0
        while os.path.exists(os.path.join(qdir, f"{name}.{n}")):
            n += 1
        dst = os.path.join(qdir, f"{name}.{n}")
        if os.path.isdir(src):
            os.rename(src, dst)
        else:
            os.makedirs(dst)
            if os.path.lexists(src):
                os.rename(src, os.path.join(dst, "entry"))
        with open(os.path.join(dst, "reason.txt"), "w") as f:
            f.write(reason + "\n")
        fsync_dir(qdir)
        fsync_dir(os.path.join(root, "s"))
        self.forget(name)

    def quarantined(self) -> list[str]:
        root = self.root
        if root is None or not os.path.isdir(os.path.join(root, "quarantine")):
            return []
        return sorted(os.listdir(os.path.join(root, "quarantine")))

    def delete_session(self, sid: str) -> None:
        """Manifest first, then data: a crash in between leaves an orphan, never a dangling manifest."""
        self.faults.check("delete", sid)
        self.kv.delete_range(ts.KvStore.KeyRange(f"s/{sid}/manifest.json", f"s/{sid}/manifest.json\0")).result()
        self.delete_prefix(f"s/{sid}/")
        self.forget(sid)
        if self.root is not None:  # the file driver leaves the empty folders behind
            shutil.rmtree(os.path.join(self.root, "s", sid), ignore_errors=True)

    # ---- manifests --------------------------------------------------------------------------
    def read_manifest(self, sid: str) -> Manifest | None:
        """The validated manifest of ``sid``, None if it has none; `ManifestCorrupt` if damaged or invalid."""
        raw = self.read_key(f"s/{sid}/manifest.json")
        return None if raw is None else mf.decode(raw)

    def write_manifest(self, sid: str, m: Manifest) -> cf.Future:
        """Write the manifest atomically and durably: on a ``file`` kvstore a temp file, fsync, rename, and
        an fsync of the folder (so a power cut cannot lose a turn reported durable); elsewhere one
        kvstore key write. Returns a future."""
        raw = mf.encode(m)
        fut: cf.Future = cf.Future()
        try:
            self.faults.check("manifest", sid)
            if self.root is None:
                return self.write_key(f"s/{sid}/manifest.json", raw)
            folder = os.path.join(self.root, "s", sid)
            made = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            write_durably(os.path.join(folder, "manifest.json"), raw)
            if made:
                fsync_dir(os.path.join(self.root, "s"))
            fut.set_result(None)
        except OSError as e:
            fut.set_exception(e)
        return fut

