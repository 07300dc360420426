#!/usr/bin/env python
"""Throughput of the tiered KV store's disk tier against the raw bandwidth of the same folder.

For each (model shape, token count) it measures, in one run and on one folder:

* raw write: one file of the session's size written with large ``os.write`` calls + ``fsync``;
* raw read: that file dropped from the page cache (``posix_fadvise(DONTNEED)`` after the fsync) and
  read back with large ``readinto`` calls;
* dd (optional): ``dd oflag=direct conv=fsync`` / ``dd iflag=direct`` of the same size (O_DIRECT,
  no page cache at all), when dd and O_DIRECT work on the folder;
* store host->disk: from the first ``save_layer`` of all layers of one turn (the whole session in
  one turn) through ``commit_turn(...).result()`` and ``flush()``, i.e. until the data and the
  manifest are durable;
* store disk->host: after ``flush()``, ``evict(sid, "host")`` and ``posix_fadvise(DONTNEED)`` on
  every file of the session folder, the time of ``prefetch(sid).result()`` (read + crc check + copy
  into the host tier).

Each measurement is repeated ``--repeat`` times (default 3), raw/dd/store interleaved round by round
so that all see the same machine load, and the median is reported, in GB/s (1e9 bytes/s), with the
ratio store/raw per direction and the median 1-minute load average ("load") during the rounds.

Example:  .venv/bin/python scripts/bench_store.py --out results.json
          .venv/bin/python scripts/bench_store.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

MODELS = {
    # name: (layers, kv_heads, head_dim, dtype)
    "SmolLM2-135M": (30, 3, 64, "float32"),
    "Llama-2-7B": (32, 32, 128, "bfloat16"),
}
CHUNK = 64 << 20  # raw I/O request size


# ------------------------------------------------------------------------------------------ helpers
def drop_cache(path: str) -> None:
    """Drop a file's clean pages from the page cache (needs the data to be written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree(folder: str) -> int:
    n = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            drop_cache(os.path.join(dirpath, f))
            n += 1
    return n


def raw_write(path: str, nbytes: int, buf: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            k = os.write(fd, buf[: min(left, len(buf))])
            left -= k
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads, TensorStore's included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raw_read(path: str, buf: bytearray) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of reading ``path`` cold into ``buf``."""
    drop_cache(path)
    mv = memoryview(buf)
    t0, c0 = time.perf_counter(), cpu_seconds()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass
    return time.perf_counter() - t0, cpu_seconds() - c0


def dd_run(args: list[str]) -> float | None:
    """Run dd; return the bytes/s it reports (parsed from 'N bytes ... copied, S s'), None on failure."""
    try:
        p = subprocess.run(["dd", *args], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^(\d+) bytes.*copied, ([\d.]+) s", p.stderr, re.M)
    if p.returncode != 0 or not m:
        return None
    return int(m.group(1)) / float(m.group(2))


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------ measurements
def raw_once(folder: str, nbytes: int, wbuf: memoryview, rbuf: bytearray, use_dd: bool) -> dict:
    """One raw write + read (and dd write + read) of ``nbytes`` in ``folder``; bytes/s."""
    path = os.path.join(folder, "raw.bin")
    write_s = raw_write(path, nbytes, wbuf)
    read_s, read_cpu = raw_read(path, rbuf)
    out = {"write": nbytes / write_s, "read": nbytes / read_s, "read_cpu": read_cpu / nbytes * 1e9}
    os.unlink(path)
    if use_dd:
        bs = CHUNK if nbytes % CHUNK == 0 else 1 << 20
        cnt = nbytes // bs
        out["dd_write"] = dd_run(["if=/dev/zero", f"of={path}", f"bs={bs}", f"count={cnt}", "oflag=direct", "conv=fsync"])
        out["dd_read"] = dd_run([f"if={path}", "of=/dev/null", f"bs={bs}", "iflag=direct"]) if out["dd_write"] else None
        if os.path.exists(path):
            os.unlink(path)
    return out


def make_layer(model: str, tokens: int):
    """One layer [2, tokens, K, D] of random finite values (random bits would include NaNs, whose
    payloads XLA need not keep bit-exact), as a numpy array and a jax array; the benchmark saves it
    as every layer (the store copies what it is given, so reuse changes nothing)."""
    import jax

    from jax_cachedattn.store.layout import np_dtype

    L, K, D, dt = MODELS[model]
    x = np.random.default_rng(1).standard_normal((2, tokens, K, D), np.float32).astype(np_dtype(dt))
    return x, jax.device_put(x)


def store_once(folder: str, model: str, tokens: int, layer_np, layer, cfg_kw: dict, check: bool) -> dict:
    """One host->disk and one disk->host of a whole session through `TieredStore`; bytes/s."""
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    L, K, D, dt = MODELS[model]
    layout = KVLayout(L, K, D, dt, fingerprint=f"bench-{model}")
    nbytes = tokens * layout.bytes_per_token
    B = cfg_kw.get("token_block", StoreConfig.token_block)
    alloc = L * -(-tokens // B) * B * layout.bytes_per_token_layer
    ids = np.arange(tokens, dtype=np.int32)
    root = os.path.join(folder, "store")
    cfg = StoreConfig(root=root, host_bytes=alloc + (64 << 20), **cfg_kw)
    store = TieredStore(cfg, layout)
    geometry = (store.disk.chunk, store.disk.chunk_layers)
    sid = "s0"
    try:
        t0 = time.perf_counter()
        for li in range(L):
            store.save_layer(sid, li, layer, 0)
        store.commit_turn(sid, ids).result()
        store.flush()
        w = nbytes / (time.perf_counter() - t0)
        kvdir = os.path.join(root, "s", sid, "kv")
        files = sum(1 for n in os.listdir(kvdir) if n.startswith("c."))
        store.evict(sid, "host")
        assert store.lookup(sid).tier == "disk"
        drop_tree(os.path.join(root, "s", sid))
        t0, c0 = time.perf_counter(), cpu_seconds()
        store.layer_blocks(sid, 0)  # starts the promotion; returns once layer 0 is in the host tier
        first = time.perf_counter() - t0
        store.prefetch(sid).result()  # the same promotion, to its end
        r = nbytes / (time.perf_counter() - t0)
        r_cpu = (cpu_seconds() - c0) / nbytes * 1e9
        assert store.lookup(sid).tier == "host"
        if check:
            for li in (0, L - 1):
                got = np.asarray(store.load_layer(sid, li))
                assert got.tobytes() == layer_np.tobytes(), f"layer {li} differs after the round trip"
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"write": w, "read": r, "read_cpu": r_cpu, "files": files, "first_layer_s": first,
            "chunk": geometry[0], "chunk_layers": geometry[1]}


def bench_case(folder: str, model: str, tokens: int, repeat: int, cfg_kw: dict, use_dd: bool, check: bool) -> dict:
    """``repeat`` rounds of (raw, dd, store) interleaved, so that all see the same machine load."""
    L, K, D, dt = MODELS[model]
    nbytes = tokens * L * 2 * K * D * (2 if dt == "bfloat16" else 4)
    wbuf = memoryview(np.random.default_rng(0).integers(0, 256, min(CHUNK, nbytes), np.uint8).tobytes())
    rbuf = bytearray(min(CHUNK, nbytes))
    layer_np, layer = make_layer(model, tokens)
    runs = []
    for rep in range(repeat):
        raw = raw_once(folder, nbytes, wbuf, rbuf, use_dd)
        st = store_once(folder, model, tokens, layer_np, layer, cfg_kw, check and rep == 0)
        runs.append({**{f"raw_{k}": v for k, v in raw.items()}, **{f"store_{k}": v for k, v in st.items()},
                     "loadavg": os.getloadavg()[0]})
    med = {k: median([r[k] for r in runs if r.get(k) is not None]) for k in runs[0]}
    return {"bytes": nbytes, "median": med, "runs": runs}


# ------------------------------------------------------------------------------------------ main
def machine_info(folder: str) -> dict:
    try:
        df = subprocess.run(["df", "-T", folder], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        fstype = df.split()[1]
    except Exception:  # noqa: BLE001
        df, fstype = "?", "?"
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    import jax
    import tensorstore  # noqa: F401

    return {
        "cpus": os.cpu_count(), "mem": mem, "fstype": fstype, "df": df, "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__,
    }


def decode_amplification(folder: str, model: str, hist: int, n: int, every: int, cfg_kw: dict) -> dict:
    """Disk bytes the store writes while a turn decodes ``n`` tokens after a ``hist``-token history,
    saved ``every`` tokens (as the engine does), committed at the end; over the KV bytes produced."""
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    L, K, D, dt = MODELS[model]
    lay = KVLayout(L, K, D, dt, fingerprint="bench-decode")
    root = tempfile.mkdtemp(prefix="decode_", dir=folder)
    store = TieredStore(StoreConfig(root=root, host_bytes=8 << 30, **cfg_kw), lay)
    geometry = (store.disk.chunk, store.disk.chunk_layers)
    try:
        x = np.zeros((2, hist + n, K, D), lay.np_dtype)
        for layer in range(L):
            store.save_layer("d", layer, x[:, :hist], 0)
        store.commit_turn("d", np.arange(hist)).result()
        w0 = store.stats.bytes_written["disk"]
        for lo in range(hist, hist + n, every):
            hi = min(hist + n, lo + every)
            for layer in range(L):
                store.save_layer("d", layer, x[:, lo:hi], lo)
        store.commit_turn("d", np.arange(hist + n)).result()
        written = store.stats.bytes_written["disk"] - w0
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    produced = n * lay.bytes_per_token
    return {"model": model, "history": hist, "decoded": n, "save_every": every, "disk_chunk": geometry[0],
            "disk_chunk_layers": geometry[1],
            "bytes_written": written,
            "kv_bytes_produced": produced, "write_amplification": written / produced}


def conversation_amplification(folder: str, model: str, turns: int, seed: int, every: int, cfg_kw: dict) -> dict:
    """Disk bytes written / KV bytes produced over a multi-turn chat as the engine saves it: per turn a
    prompt (chat template + user message) saved in one `save_layer` per layer, then a reply decoded and
    saved every ``every`` tokens, then `commit_turn`. Lengths drawn (seeded) from lognormals with the
    ShareGPT means (user message ~80 tokens + ~12 of template, reply ~340)."""
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    L, K, D, dt = MODELS[model]
    lay = KVLayout(L, K, D, dt, fingerprint="bench-chat")
    rng = np.random.default_rng(seed)
    users = 12 + np.maximum(1, rng.lognormal(np.log(80) - 0.5, 1.0, turns).astype(int))
    replies = np.maximum(1, rng.lognormal(np.log(340) - 0.32, 0.8, turns).astype(int))
    total = int(users.sum() + replies.sum())
    root = tempfile.mkdtemp(prefix="chat_", dir=folder)
    store = TieredStore(StoreConfig(root=root, host_bytes=8 << 30, **cfg_kw), lay)
    geometry = (store.disk.chunk, store.disk.chunk_layers)
    try:
        x = np.random.default_rng(seed).standard_normal((2, total, K, D), np.float32).astype(lay.np_dtype)
        n = 0
        for u, r in zip(users, replies):
            for layer in range(L):
                store.save_layer("c", layer, x[:, n : n + u], n)
            n += int(u)
            for lo in range(n, n + r, every):
                hi = min(n + r, lo + every)
                for layer in range(L):
                    store.save_layer("c", layer, x[:, lo:hi], lo)
            n += int(r)
            store.commit_turn("c", np.arange(n)).result()
        store.flush()
        written = store.stats.bytes_written["disk"]
        kvdir = os.path.join(root, "s", "c", "kv")
        files = sum(1 for f in os.listdir(kvdir) if f.startswith("c."))
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    produced = total * lay.bytes_per_token
    return {"model": model, "turns": turns, "seed": seed, "tokens": total, "mean_user": float(users.mean()),
            "mean_reply": float(replies.mean()), "save_every": every, "disk_chunk": geometry[0],
            "disk_chunk_layers": geometry[1],
            "bytes_written": written, "kv_bytes_produced": produced, "write_amplification": written / produced,
            "files": files}


def drop_bytes(folder: str, model: str, hist: int, start: int, stop: int, cfg_kw: dict) -> dict:
    """Disk bytes `drop_range(start, stop)` writes on a committed ``hist``-token session, over the KV
    bytes it keeps, and the disk bytes the session then counts (blocks before the new front stay)."""
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    L, K, D, dt = MODELS[model]
    lay = KVLayout(L, K, D, dt, fingerprint="bench-drop")
    root = tempfile.mkdtemp(prefix="drop_", dir=folder)
    store = TieredStore(StoreConfig(root=root, host_bytes=8 << 30, **cfg_kw), lay)
    try:
        x = np.zeros((2, hist, K, D), lay.np_dtype)
        for layer in range(L):
            store.save_layer("d", layer, x, 0)
        store.commit_turn("d", np.arange(hist)).result()
        store.flush()
        w0, d0 = store.stats.bytes_written["disk"], store.usage()["disk"]
        store.drop_range("d", start, stop).result()
        written = store.stats.bytes_written["disk"] - w0
        d1 = store.usage()["disk"]
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    kept = (hist - (stop - start)) * lay.bytes_per_token
    return {"model": model, "history": hist, "start": start, "stop": stop, "bytes_written": written,
            "kv_bytes_kept": kept, "written_per_kept_byte": written / kept if kept else None,
            "disk_bytes_before": d0, "disk_bytes_after": d1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default=None, help="write the results (table rows, command, machine) as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="skip the largest case (Llama-2-7B at 8K tokens, 4 GiB)")
    ap.add_argument("--dir", default=None,
                    help="folder to test (default: a temporary folder under the current directory, i.e. on its "
                         "filesystem); everything the benchmark writes there is deleted at the end")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per measurement; the median is reported (default 3)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated model shapes among {list(MODELS)}")
    ap.add_argument("--tokens", default="1024,4096,8192", help="comma-separated session lengths in tokens")
    ap.add_argument("--no-dd", action="store_true", help="do not run dd with oflag=direct/iflag=direct")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exact round-trip check of two layers")
    ap.add_argument("--token-block", type=int, default=None, help="StoreConfig.token_block (default: the store's)")
    ap.add_argument("--io-concurrency", type=int, default=None, help="StoreConfig.io_concurrency (default: the store's)")
    ap.add_argument("--copy-concurrency", type=int, default=None, help="StoreConfig.copy_concurrency (default: the store's)")
    ap.add_argument("--decode", default=None, metavar="HIST,N,EVERY",
                    help="instead: decode write amplification (disk bytes written / KV bytes produced) of a turn that "
                         "decodes N tokens after HIST, saved every EVERY tokens, e.g. 1000,2048,16")
    ap.add_argument("--disk-chunk", type=int, default=None, help="StoreConfig.disk_chunk (default: the store's)")
    ap.add_argument("--disk-chunk-layers", type=int, default=None,
                    help="StoreConfig.disk_chunk_layers: layers per disk chunk (default: the store's)")
    ap.add_argument("--conversation", default=None, metavar="TURNS,SEED,EVERY",
                    help="instead: write amplification of a TURNS-turn chat (ShareGPT-like lengths, seeded), decode "
                         "saved every EVERY tokens, e.g. 12,0,16")
    ap.add_argument("--drop", default=None, metavar="HIST,START,STOP",
                    help="instead: disk bytes written by drop_range(START, STOP) on a HIST-token session, e.g. "
                         "4000,4,2052 (4 attention-sink tokens kept); STOP may be HIST (a tail drop)")
    args = ap.parse_args(argv)
    kw = {k: v for k, v in (("token_block", args.token_block), ("disk_chunk", args.disk_chunk),
                            ("disk_chunk_layers", args.disk_chunk_layers)) if v is not None}
    probe = None
    if args.conversation:
        turns, seed, every = (int(v) for v in args.conversation.split(","))
        probe = lambda folder, model: conversation_amplification(folder, model, turns, seed, every, kw)  # noqa: E731
    elif args.drop:
        hist, start, stop = (int(v) for v in args.drop.split(","))
        probe = lambda folder, model: drop_bytes(folder, model, hist, start, stop, kw)  # noqa: E731
    if probe is not None:  # one JSON line per model, from a scratch folder
        folder = tempfile.mkdtemp(prefix=".bench_store_", dir=args.dir or os.getcwd())
        try:
            for model in args.models.split(","):
                print(json.dumps(probe(folder, model)), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return 0
    if args.decode:
        hist, n, every = (int(v) for v in args.decode.split(","))
        folder = tempfile.mkdtemp(prefix=".bench_store_", dir=args.dir or os.getcwd())
        try:
            for model in args.models.split(","):
                r = decode_amplification(folder, model, hist, n, every, kw)
                print(json.dumps(r), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return 0

    cfg_kw = {k: v for k, v in (("token_block", args.token_block), ("io_concurrency", args.io_concurrency),
                                 ("copy_concurrency", args.copy_concurrency), ("disk_chunk", args.disk_chunk),
                                 ("disk_chunk_layers", args.disk_chunk_layers))
              if v is not None}
    base = args.dir or os.getcwd()
    os.makedirs(base, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".bench_store_", dir=base)
    command = " ".join(["python", "scripts/bench_store.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    try:
        info = machine_info(folder)
        print(f"# folder {folder} ({info['fstype']}), {info['cpus']} cpus, {info['mem']} RAM", flush=True)
        for model in args.models.split(","):
            L, K, D, dt = MODELS[model]
            itemsize = 2 if dt == "bfloat16" else 4
            for tokens in (int(t) for t in args.tokens.split(",")):
                nbytes = tokens * L * 2 * K * D * itemsize
                if args.quick and nbytes >= 4 << 30:
                    continue
                res = bench_case(folder, model, tokens, args.repeat, cfg_kw, not args.no_dd, not args.no_check)
                m = res["median"]
                g = lambda k: None if m.get(k) is None else m[k] / 1e9  # noqa: E731
                row = {
                    "model": model, "tokens": tokens, "bytes": nbytes,
                    "raw_write_GBps": g("raw_write"), "raw_read_GBps": g("raw_read"),
                    "dd_write_GBps": g("raw_dd_write"), "dd_read_GBps": g("raw_dd_read"),
                    "store_write_GBps": g("store_write"), "store_read_GBps": g("store_read"),
                    "raw_read_cpu_s_per_GB": m["raw_read_cpu"], "store_read_cpu_s_per_GB": m["store_read_cpu"],
                    "loadavg": m["loadavg"], "files": m["store_files"], "runs": res["runs"],
                    "first_layer_ms": m["store_first_layer_s"] * 1e3,
                    "disk_chunk": m["store_chunk"], "disk_chunk_layers": m["store_chunk_layers"],
                }
                row["write_ratio"] = row["store_write_GBps"] / row["raw_write_GBps"]
                row["read_ratio"] = row["store_read_GBps"] / row["raw_read_GBps"]
                rows.append(row)
                print(f"{model} {tokens}: raw w/r {row['raw_write_GBps']:.2f}/{row['raw_read_GBps']:.2f} "
                      f"dd w/r {fmt(row['dd_write_GBps'])}/{fmt(row['dd_read_GBps'])} "
                      f"store w/r {row['store_write_GBps']:.2f}/{row['store_read_GBps']:.2f} GB/s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    cols = ["model", "tokens", "MiB", "chunk", "raw write", "store h→d", "ratio", "raw read", "store d→h", "ratio",
            "dd write", "dd read", "CPU s/GB raw read", "CPU s/GB d→h", "layer 0 ms", "files", "load"]
    table = [[r["model"], str(r["tokens"]), f"{r['bytes'] / (1 << 20):.0f}",
              f"{int(r['disk_chunk_layers'])}x{int(r['disk_chunk'])}", fmt(r["raw_write_GBps"]),
              fmt(r["store_write_GBps"]), fmt(r["write_ratio"]), fmt(r["raw_read_GBps"]),
              fmt(r["store_read_GBps"]), fmt(r["read_ratio"]), fmt(r["dd_write_GBps"]), fmt(r["dd_read_GBps"]),
              fmt(r["raw_read_cpu_s_per_GB"]), fmt(r["store_read_cpu_s_per_GB"]), fmt(r["first_layer_ms"], ".0f"),
              str(int(r["files"])),
              fmt(r["loadavg"], ".1f")]
             for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"KV store vs raw, GB/s (median of {args.repeat}); {info['fstype']}, {info['cpus']} cpus")
        for c in cols:
            t.add_column(c, justify="left" if c == "model" else "right")
        for row in table:
            t.add_row(*row)
        Console(width=160).print(t)
    except ImportError:
        print(" | ".join(cols))
        for row in table:
            print(" | ".join(row))
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "machine": info, "config": cfg_kw, "repeat": args.repeat,
                       "rows": rows, "markdown": md}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
