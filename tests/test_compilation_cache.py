"""The persistent compilation cache stays writable when it holds entries without access-time files."""

import json
import os
import subprocess
import sys

SCRIPT = r'''
import json, sys, warnings
from pathlib import Path
import jax, jax.numpy as jnp
from jax_cachedattn.runtime import enable_compilation_cache
folder = Path(sys.argv[1]) / "xla"
folder.mkdir(parents=True)
(folder / "jit_old-0123456789abcdef-cache").write_bytes(b"an entry written without a size limit")
if sys.argv[2] == "jax-alone":   # what jax does with the same settings but without cachedattn's repair
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)
else:
    assert enable_compilation_cache() == str(folder)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7)).block_until_ready()
print(json.dumps({"warnings": [str(w.message).splitlines()[0] for w in caught
                               if "persistent compilation cache" in str(w.message)],
                  "entries": sorted(p.name.rsplit("-", 1)[1] for p in folder.glob("jit_*"))}))
'''


def _run(tmp_path, mode):
    env = {**os.environ, "CACHEDATTN_CACHE": str(tmp_path / mode), "JAX_PLATFORMS": "cpu"}
    env.pop("CACHEDATTN_NO_XLA_CACHE", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / mode), mode], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entries_without_access_time_are_stamped_so_writes_keep_working(tmp_path):
    broken = _run(tmp_path, "jax-alone")
    assert broken["warnings"] and "Error writing persistent compilation cache entry" in broken["warnings"][0]
    fixed = _run(tmp_path, "cachedattn")
    assert fixed["warnings"] == []
    # The old entry got a stamp, and the new programs were written, each with its own.
    assert fixed["entries"].count("cache") >= 2 and fixed["entries"].count("atime") == fixed["entries"].count("cache")
    old_stamp = tmp_path / "cachedattn" / "xla" / "jit_old-0123456789abcdef-atime"
    assert int.from_bytes(old_stamp.read_bytes(), "little") == 0  # evicted first
