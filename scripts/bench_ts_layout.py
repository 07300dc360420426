#!/usr/bin/env python
"""What the disk layout alone costs: TensorStore reading one session-shaped zarr3 array, chunked and
encoded as the store does (one file per (layer, token block), flat keys, crc32c codec) and as a sharded
alternative (one file per layer), beside a raw sequential read of the same bytes from the same folder,
page cache dropped each time.

No store code runs here: the gap between these ratios and ``bench_store.py``'s is the store's own
read path (per-block reads, moves into the host tier).

    python scripts/bench_ts_layout.py --dir runs/tslayout             # SmolLM2 shape, 4K tokens
    python scripts/bench_ts_layout.py --shape 32,2,4096,32,128 --dtype bfloat16   # Llama-2-7B shape
    python scripts/bench_ts_layout.py --breakdown    # + the store's per-byte passes, one at a time

``--breakdown`` adds, serially on the plain layout: one read per (layer, block) into a new array each,
then also each layer's blocks moved into ``pinned_host`` memory in one batched ``device_put`` (the
store's host tier), and the store's way: each layer's chunks decoded straight into one 64-byte aligned
buffer (a ``ts.array`` target) whose blocks ``pinned_host`` then aliases on the CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import tensorstore as ts


def drop(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def spec(root: str, name: str, shape: list[int], dtype: str, block: int, sharded: bool) -> dict:
    chunk = [1, 2, block] + shape[3:]
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]  # as the store
    if sharded:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": chunk, "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
        grid = [1] + shape[1:]
    else:
        codecs, grid = inner, chunk
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(root, name)},
            "metadata": {"shape": shape, "data_type": dtype, "codecs": codecs,
                         "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}}}}


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + n].view(dtype).reshape(shape)


def read_into(a, shape: list[int], block: int, nbytes: int, dtype) -> float:
    """Each layer's chunks decoded into one aligned buffer [nb, 2, B, K, D], then moved to pinned_host
    in one batched ``device_put`` (aliased on the CPU), all layers issued at once; GB/s."""
    import jax

    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    nb = shape[2] // block
    t = time.perf_counter()
    pend = []
    for layer in range(shape[0]):
        buf = aligned_empty((nb, 2, block) + tuple(shape[3:]), dtype)
        pend.append((buf, [ts.array(buf[i], copy=False, write=True).write(a[layer, :, i * block : (i + 1) * block])
                           for i in range(nb)]))
    held = []
    for buf, futs in pend:
        for f in futs:
            f.result()
        held += jax.device_put(list(buf), host, may_alias=True)
    jax.block_until_ready(held)
    return nbytes / (time.perf_counter() - t) / 1e9


def read_blocks(a, shape: list[int], block: int, nbytes: int, copy: bool) -> float:
    """One read per (layer, block), all issued at once, consumed in order; GB/s."""
    host = None
    if copy:
        import jax

        host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    held = []
    t = time.perf_counter()
    futs = [[a[layer, :, b : b + block].read() for b in range(0, shape[2], block)] for layer in range(shape[0])]
    for layer_futs in futs:
        xs = [f.result() for f in layer_futs]
        if copy:
            held += jax.device_put(xs, host, may_alias=True)
    if copy:
        jax.block_until_ready(held)
    return nbytes / (time.perf_counter() - t) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/tslayout", help="scratch folder (deleted afterwards)")
    ap.add_argument("--shape", default="30,2,4096,3,64", help="L,2,T,K,D (default: SmolLM2-135M, 4K tokens)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block", type=int, default=256, help="token block (the store's token_block)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time per-block reads, + the move into pinned_host, and the store's decode-into-buffer path")
    args = ap.parse_args(argv)
    shape = [int(x) for x in args.shape.split(",")]
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    np_dtype = np.dtype(args.dtype) if args.dtype != "bfloat16" else np.dtype("uint16")
    data = np.random.default_rng(0).integers(0, 1 << 15, size=shape).astype(np_dtype)
    ts_dtype = args.dtype if args.dtype != "bfloat16" else "uint16"
    ctx = ts.Context({"file_io_concurrency": {"limit": 16}, "data_copy_concurrency": {"limit": os.cpu_count()}})
    raw = os.path.join(root, "raw.bin")
    rbuf = memoryview(bytearray(64 << 20))
    with open(raw, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    for name, sharded in (("plain", False), ("sharded", True)):
        a = ts.open(spec(root, name, shape, ts_dtype, args.block, sharded), create=True, context=ctx).result()
        a.write(data).result()
    try:
        print(f"shape {shape} {args.dtype}, {data.nbytes / 2**20:.0f} MiB; GB/s (ratio to raw read in the same round)"
              + ("; breakdown ratios are to 'plain' (TensorStore alone) in the same round" if args.breakdown else ""))
        for _ in range(args.repeat):
            drop(raw)
            t = time.perf_counter()
            with open(raw, "rb", buffering=0) as f:  # into one reused buffer: no allocation, no page faults
                while f.readinto(rbuf):
                    pass
            r = data.nbytes / (time.perf_counter() - t) / 1e9
            row = [f"raw {r:.2f}"]
            for name, sharded in (("plain", False), ("sharded", True)):
                drop(os.path.join(root, name))
                a = ts.open(spec(root, name, shape, ts_dtype, args.block, sharded), context=ctx).result()
                t = time.perf_counter()
                x = a.read().result()
                g = data.nbytes / (time.perf_counter() - t) / 1e9
                if not np.array_equal(x, data):
                    raise SystemExit(f"{name}: data read back differs")
                row.append(f"{name} {g:.2f} ({g / r:.2f})")
                if name == "plain":
                    g_plain = g
            if args.breakdown:
                plain = g_plain
                for extra in ("blocks", "blocks+pinned_host", "into+pinned_host"):
                    drop(os.path.join(root, "plain"))
                    a = ts.open(spec(root, "plain", shape, ts_dtype, args.block, False), context=ctx).result()
                    if extra.startswith("into"):
                        g = read_into(a, shape, args.block, data.nbytes, np_dtype)
                    else:
                        g = read_blocks(a, shape, args.block, data.nbytes, copy="pinned" in extra)
                    row.append(f"{extra} {g:.2f} ({g / plain:.2f})")
            print(" | ".join(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
