#!/usr/bin/env python
"""How the size of the files a session is split into limits the read bandwidth of a folder.

No TensorStore and no store code: the same number of bytes is written once as one file and once as
many files of each size, then read back with the page cache dropped (``posix_fadvise(DONTNEED)``),
into buffers that are reused (no page faults, no allocation), by one thread in order and by
``--threads`` threads. Rounds interleave the single-file read with the many-file reads so that
all see the same machine load. Ratios are to the single-file read of the same round.

The store writes one file per (layer, token block): 4 MiB for Llama-2-7B (bf16, 256-token
blocks), 384 KiB for SmolLM2-135M (fp32). If small files cannot reach the single-file rate even
here, no read path built on that layout can.

    python scripts/bench_file_size.py                        # 2 GiB as 384 KiB, 4, 16, 64 MiB files
    python scripts/bench_file_size.py --total-mib 512 --sizes-kib 384,4096 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20


def drop(path: Path) -> None:
    for p in [path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_file(path: Path, nbytes: int, src: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, src[: min(left, len(src))])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_one(path: Path, buf: bytearray) -> float:
    drop(path)
    mv = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass
    return time.perf_counter() - t


def read_many(folder: Path, n: int, bufs: list[bytearray], threads: int) -> float:
    drop(folder)

    def rd(i: int) -> None:
        fd = os.open(folder / str(i), os.O_RDONLY)
        try:
            os.preadv(fd, [bufs[i % len(bufs)]], 0)
        finally:
            os.close(fd)

    t = time.perf_counter()
    if threads <= 1:
        for i in range(n):
            rd(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rd, range(n)))
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a new folder here; deleted afterwards)")
    ap.add_argument("--total-mib", type=int, default=2048, help="bytes per layout (default 2048 MiB)")
    ap.add_argument("--sizes-kib", default="384,4096,16384,65536", help="file sizes to compare")
    ap.add_argument("--threads", type=int, default=4, help="threads of the parallel many-file read")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    root = Path(args.dir or f".bench_file_size_{os.getpid()}")
    root.mkdir(parents=True, exist_ok=True)
    total = args.total_mib << 20
    src = memoryview(os.urandom(CHUNK))
    big = bytearray(CHUNK)
    results = []
    print(f"# folder {root.resolve()}, {os.cpu_count()} cpus, {total / 2**30:.2f} GiB per layout; GB/s (ratio to one file)")
    try:
        write_file(root / "one", total, src)
        for kib in (int(s) for s in args.sizes_kib.split(",")):
            size = kib << 10
            n = total // size
            folder = root / f"f{kib}"
            folder.mkdir()
            for i in range(n):
                write_file(folder / str(i), size, src[:size] if size <= CHUNK else src)
            bufs = [bytearray(size) for _ in range(max(1, args.threads))]
            rounds = []
            for _ in range(args.repeat):
                one = read_one(root / "one", big)
                seq = read_many(folder, n, bufs, 1)
                par = read_many(folder, n, bufs, args.threads)
                rounds.append({"one": n * size / one / 1e9, "seq": n * size / seq / 1e9, "par": n * size / par / 1e9})
                r = rounds[-1]
                print(f"{kib:>6} KiB x{n:<5} one file {r['one']:.2f} | files, 1 thread {r['seq']:.2f} "
                      f"({r['seq'] / r['one']:.2f}) | files, {args.threads} threads {r['par']:.2f} ({r['par'] / r['one']:.2f})",
                      flush=True)
            med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
            med_ratio = {k: statistics.median(x[k] / x["one"] for x in rounds) for k in ("seq", "par")}
            results.append({"file_kib": kib, "files": n, "median_gbps": med, "median_ratio_to_one_file": med_ratio,
                            "rounds": rounds})
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nfile size   files   1 thread / one file   %d threads / one file   (medians)" % args.threads)
    for r in results:
        m = r["median_ratio_to_one_file"]
        print(f"{r['file_kib']:>6} KiB  {r['files']:>6}   {m['seq']:>19.2f}   {m['par']:>21.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"total_bytes": total, "threads": args.threads, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
