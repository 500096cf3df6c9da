#!/usr/bin/env python3
"""Match index benchmark (issue 8): search speed, start-up load time and memory.

    python3 benchmarks/index_bench.py [--n 100000] [--dim 384] [--repeat 50]
                                      [--load-repeat 5] [--db FILE]

Measured on this machine, medians over the runs:
  - top-10 search over N random unit vectors in a `VectorIndex` (aim: <= 10 ms at 100k);
  - `Matcher.match` for one new image against N-1% history images and 1% gallery
    references in 10 labels (what the pipeline does per image, besides inference);
  - `Matcher.load` of the N vectors from a real SQLite store (aim: <= 2 s at 100k), each in
    a fresh process as at the daemon's start-up, and how much of it is
    `Store.recorded_vectors` (the SQLite read, timed in processes of its own);
  - the peak and the retained RSS increase of that load;
  - the first `add` after the load (the matrix is full: it doubles).
The store is written once through `Store.record` (one transaction per image, as the daemon
does) into a temporary folder, or into `--db FILE`, which later runs reuse; its build time is
printed apart. Loads read a database the page cache holds (just written): a cold start from
an SD card adds the disk's read time.

Prints a table and one JSON line (`{"benchmark": "index", ...}`) for scripts to collect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinowatch.config import MatchingSettings
from dinowatch.index import VectorIndex
from dinowatch.match import Matcher
from dinowatch.store import ImageRecord, Store

MODEL = "bench-model"
LABELS = 10
CHUNK = 10_000


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def gallery_count(n: int) -> int:
    return max(LABELS, n // 100)


def image_path(i: int, n: int, gallery: Path) -> str:
    """The first 1% are gallery references in LABELS labels, the rest camera images."""
    if i < gallery_count(n):
        return f"{gallery}/label{i % LABELS}/ref{i:06d}.jpg"
    return f"/bench/cam/{i // 1000:03d}/{i:06d}.jpg"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def p95_ms(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(0.95 * len(samples)))] * 1e3


# ---- search -----------------------------------------------------------------------------------

def bench_search(n: int, dim: int, repeat: int, rng: np.random.Generator) -> dict:
    index: VectorIndex[str] = VectorIndex(dim)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        index.add_many([f"/bench/{i:06d}.jpg" for i in range(start, start + count)],
                       unit_vectors(rng, count, dim))
    queries = unit_vectors(rng, repeat + 3, dim)
    for query in queries[:3]:  # warm-up: caches, BLAS threads
        index.search(query, 10)
    samples = []
    for query in queries[3:]:
        started = time.perf_counter()
        index.search(query, 10)
        samples.append(time.perf_counter() - started)
    return {"search_top10_ms_median": median_ms(samples), "search_top10_ms_p95": p95_ms(samples)}


# ---- the store, load, match -------------------------------------------------------------------

def build_store(db: Path, n: int, dim: int, gallery: Path, rng: np.random.Generator) -> float:
    """Write N images through Store.record; returns the seconds it took."""
    store = Store(db)
    started = time.perf_counter()
    try:
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            vectors = unit_vectors(rng, count, dim)
            for offset in range(count):
                i = start + offset
                record = ImageRecord(path=image_path(i, n, gallery), source="bench",
                                     size=100_000 + i, mtime_ns=i, status="done",
                                     sha256=f"{i:064x}", width=640, height=480, model=MODEL,
                                     label=f"label{i % LABELS}" if i < gallery_count(n)
                                     else None)
                store.record(record, vectors[offset], [])
            print(f"  built {start + count:,}/{n:,} rows "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        store.close()
    return time.perf_counter() - started


def stored_rows(db: Path) -> int:
    if not db.exists():
        return 0
    store = Store(db)
    try:
        return store.counts()["done"]
    finally:
        store.close()


def new_matcher(gallery: Path, dim: int) -> Matcher:
    return Matcher(MatchingSettings(gallery_dir=gallery), gallery, dim=dim)


def bench_load(db: Path, gallery: Path, dim: int, repeat: int) -> dict:
    """Each load in a fresh process, as at the daemon's start-up (a second load in the same
    process is faster: its memory is already mapped), alternating with processes that time
    `Store.recorded_vectors` alone."""
    loads = [child(db, gallery, dim, "load") for _ in range(repeat)]
    reads = [child(db, gallery, dim, "read") for _ in range(repeat)]
    return {"loaded": loads[0]["loaded"],
            "load_s_median": statistics.median(run["load_s"] for run in loads),
            "load_s_max": max(run["load_s"] for run in loads),
            "recorded_vectors_s_median": statistics.median(run["read_s"] for run in reads),
            "rss_peak_increase_mb": statistics.median(run["rss_peak_mb"] for run in loads),
            "rss_retained_increase_mb": statistics.median(run["rss_retained_mb"]
                                                          for run in loads),
            "rss_peak_exact": all(run["rss_peak_exact"] for run in loads)}


def bench_match(db: Path, gallery: Path, dim: int, repeat: int,
                rng: np.random.Generator) -> dict:
    store = Store(db)
    try:
        matcher = new_matcher(gallery, dim)
        matcher.load(store, MODEL)
    finally:
        store.close()
    queries = unit_vectors(rng, repeat + 3, dim)
    samples = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        matcher.match(f"/bench/new/{i}.jpg", "0" * 64, query)
        if i >= 3:
            samples.append(time.perf_counter() - started)
    started = time.perf_counter()
    matcher.update("/bench/new/first.jpg", "f" * 64, queries[0])  # the matrix is full
    grow = time.perf_counter() - started
    return {"match_ms_median": median_ms(samples), "match_ms_p95": p95_ms(samples),
            "first_add_after_load_ms": grow * 1e3}


# ---- start-up, in a child process -------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(db: Path, gallery: Path, dim: int, what: str) -> None:
    """One load (or one `recorded_vectors`) in this fresh process; prints a JSON line."""
    store = Store(db)
    try:
        if what == "read":
            started = time.perf_counter()
            store.recorded_vectors(MODEL)
            print(json.dumps({"read_s": time.perf_counter() - started}))
            return
        matcher = new_matcher(gallery, dim)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        before, peak_before = _status_kib("VmRSS"), _status_kib("VmHWM")
        started = time.perf_counter()
        loaded = matcher.load(store, MODEL)
        elapsed = time.perf_counter() - started
        after, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
        # Without the reset, an earlier peak above `before` could hide part of the load's.
        print(json.dumps({"loaded": loaded, "load_s": elapsed,
                          "rss_peak_mb": (peak - before) / 1024,
                          "rss_retained_mb": (after - before) / 1024,
                          "rss_peak_exact": peak_before <= before}))
    finally:
        store.close()


def child(db: Path, gallery: Path, dim: int, what: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", what, "--db", str(db),
                             "--gallery", str(gallery), "--dim", str(dim)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- main -------------------------------------------------------------------------------------

def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, " \
           f"numpy {np.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=384, help="dimension (default 384)")
    parser.add_argument("--repeat", type=int, default=50,
                        help="searches and matches timed (default 50)")
    parser.add_argument("--load-repeat", type=int, default=5,
                        help="loads timed (default 5)")
    parser.add_argument("--db", type=Path, default=None,
                        help="database to build once and reuse (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["load", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--gallery", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.db, args.gallery, args.dim, args.child)
        return

    rng = np.random.default_rng(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="dinowatch-bench-"))
    db = args.db or scratch / "dinowatch.db"
    gallery = Path("/bench/gallery")  # references are never read: only their paths count
    try:
        print(f"dinowatch index benchmark: N={args.n:,} dim={args.dim} on {machine()}",
              file=sys.stderr)
        results: dict = {"benchmark": "index", "n": args.n, "dim": args.dim,
                         "repeat": args.repeat, "machine": machine()}
        results |= bench_search(args.n, args.dim, args.repeat, rng)

        present = stored_rows(db)
        if present == args.n:
            build = None
            print(f"  reusing {db} ({present:,} rows)", file=sys.stderr)
        elif present:
            raise SystemExit(f"{db} holds {present:,} images, not {args.n:,}: "
                             "remove it or pass another --db")
        else:
            build = build_store(db, args.n, args.dim, gallery, rng)
        results["store_build_s"] = build
        results["db_mb"] = db.stat().st_size / 2**20

        results |= bench_load(db, gallery, args.dim, args.load_repeat)
        results |= bench_match(db, gallery, args.dim, args.repeat, rng)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, args)


def report(r: dict, args: argparse.Namespace) -> None:
    n = f"{args.n:,}"
    gallery = gallery_count(args.n)
    rows = [
        (f"top-10 search, VectorIndex of {n}", f"{r['search_top10_ms_median']:.2f} ms",
         f"{r['search_top10_ms_p95']:.2f} ms", "<= 10 ms", args.repeat),
        (f"Matcher.match ({args.n - gallery:,} history, {gallery:,} refs)",
         f"{r['match_ms_median']:.2f} ms", f"{r['match_ms_p95']:.2f} ms", "", args.repeat),
        (f"Matcher.load of {n} from SQLite", f"{r['load_s_median']:.2f} s",
         f"max {r['load_s_max']:.2f} s", "<= 2 s", args.load_repeat),
        ("  of which Store.recorded_vectors", f"{r['recorded_vectors_s_median']:.2f} s", "",
         "", args.load_repeat),
        ("peak RSS increase during the load", f"{r['rss_peak_increase_mb']:.0f} MB", "", "",
         args.load_repeat),
        ("RSS retained after the load", f"{r['rss_retained_increase_mb']:.0f} MB", "", "",
         args.load_repeat),
        ("first add after the load (growth)", f"{r['first_add_after_load_ms']:.0f} ms", "",
         "", 1),
        (f"store build, {n} x Store.record", "reused" if r["store_build_s"] is None
         else f"{r['store_build_s']:.0f} s", f"{r['db_mb']:.0f} MB file", "", 1),
    ]
    print(f"{'measure':<44} {'median':>10} {'':>14} {'aim':>9} {'runs':>5}")
    for name, value, extra, aim, runs in rows:
        print(f"{name:<44} {value:>10} {extra:>14} {aim:>9} {runs:>5}")
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value
                      for key, value in r.items()}))


if __name__ == "__main__":
    main()
