"""Peak memory, idle CPU and start-up time of dinowatch (issue 9, second part).

Every figure comes from fresh child processes, run round-robin so that other load on the
machine hits all alternatives alike; medians are reported. Subcommands:

    levers   ONNX Runtime session options and allocator settings, one fresh process each:
             RSS after the session, peak RSS over inference, inference ms at batch 1 and 4
    speed    the same session options in ONE process, timed run by run in turn
    backends dinowatch's OnnxBackend from each --src (e.g. before/after a patch)
    stages   RSS breakdown: imports, + ORT session, + match index of N vectors, + decode of
             12 MP JPEGs (draft) and 12 MP PNGs on two decode threads
    startup  session creation: ORT_ENABLE_ALL from the .onnx vs a saved optimized graph
             loaded with optimizations off/basic (and the ORT format); outputs compared
    daemon   the real `dinowatch run`: time to READY=1, VmHWM after embedding camera-like
             JPEGs with N stored vectors, idle CPU over a quiet minute
    threads  Pipeline throughput for intra-op threads x decode workers, per-stage CPU

    python3 memory_startup.py levers  --model full.onnx
    python3 memory_startup.py speed   --model full.onnx --runs 15
    python3 memory_startup.py backends --model full.onnx --src BEFORE/src --src AFTER/src
    python3 memory_startup.py stages  --model full.onnx --images JPEG_DIR
    python3 memory_startup.py startup --model full.onnx
    python3 memory_startup.py daemon  --model full.onnx --images JPEG_DIR [--src A --src B]
                                      [--env NAME MALLOC_ARENA_MAX=2]
    python3 memory_startup.py threads --model full.onnx --images JPEG_DIR

Images: `python3 benchmarks/seed_pipeline.py --make-images DIR --count 20`. Model:
`python3 -m dinowatch.testing --out full.onnx --variant full`. Each subcommand prints a table
and one JSON line (`{"benchmark": ...}`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_WORK = Path(tempfile.gettempdir()) / "dinowatch-memory"

# -- /proc helpers ---------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MiB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_hwm() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """utime + stime per thread, in seconds, keyed `tid` (`main` for the main thread;
    Python threads all share the process's name, and tids rise in creation order)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else task.name
        out[name] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def malloc_trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this script's hidden `_child` subcommand in a fresh interpreter; its last stdout
    line is a JSON object."""
    done = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- ONNX Runtime session variants -----------------------------------------------------------

# name -> (session options, environment). Options: arena, mem_pattern, prepack,
# init_device_alloc, from_bytes, level (all|basic|none), trim (malloc_trim after warm-up).
LEVERS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "baseline (dinowatch today)": ({}, {}),
    "enable_cpu_mem_arena=False": ({"arena": False}, {}),
    "enable_mem_pattern=False": ({"mem_pattern": False}, {}),
    "session.disable_prepacking=1": ({"prepack": False}, {}),
    "use_device_allocator_for_initializers=1": ({"init_device_alloc": True}, {}),
    "model from bytes": ({"from_bytes": True}, {}),
    "external-data weights (mmap)": ({"external": True}, {}),
    "external-data + arena off": ({"external": True, "arena": False}, {}),
    "MALLOC_ARENA_MAX=2": ({}, {"MALLOC_ARENA_MAX": "2"}),
    "malloc_trim after warm-up": ({"trim": True}, {}),
    "env arena, kSameAsRequested": ({"env_arena": True}, {}),
    "A: arena off + ARENA_MAX=2 + trim": (
        {"arena": False, "trim": True}, {"MALLOC_ARENA_MAX": "2"}),
    "B: A + mem_pattern off": (
        {"arena": False, "mem_pattern": False, "trim": True}, {"MALLOC_ARENA_MAX": "2"}),
    "C: A + no prepacking": (
        {"arena": False, "prepack": False, "trim": True}, {"MALLOC_ARENA_MAX": "2"}),
}


def make_session(model: Path, spec: dict[str, Any], threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[spec.get("level", "all")]
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = spec.get("arena", True)
    options.enable_mem_pattern = spec.get("mem_pattern", True)
    if not spec.get("prepack", True):
        options.add_session_config_entry("session.disable_prepacking", "1")
    if spec.get("init_device_alloc"):
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if spec.get("env_arena"):  # a shared CPU arena that grows by what is asked, no more
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        options.add_session_config_entry("session.use_env_allocators", "1")
    if spec.get("save_to"):
        options.optimized_model_filepath = spec["save_to"]
    source: str | bytes = model.read_bytes() if spec.get("from_bytes") else str(model)
    session = ort.InferenceSession(source, sess_options=options,
                                   providers=["CPUExecutionProvider"])
    del source
    return session


def time_inference(session: Any, batches: dict[int, Any], runs: int) -> dict[int, list[float]]:
    """ms per run for each batch size, interleaved run by run."""
    name = session.get_inputs()[0].name
    times: dict[int, list[float]] = {size: [] for size in batches}
    for _ in range(runs):
        for size, batch in batches.items():
            started = time.perf_counter()
            session.run(None, {name: batch})
            times[size].append((time.perf_counter() - started) * 1000)
    return times


def child_session(model: Path, spec: dict[str, Any], runs: int) -> dict[str, Any]:
    """One variant in this (fresh) process: RSS after the daemon's imports, after the
    session, peak over warm-up and timed runs."""
    import numpy as np

    import dinowatch.daemon  # noqa: F401  (the daemon's import footprint)

    imports = proc_status()
    import onnxruntime  # noqa: F401  (dinowatch imports it only when the backend opens)

    with_ort = proc_status()
    if spec.get("external"):
        model = external_copy(model, model.parent)
    started = time.perf_counter()
    session = make_session(model, spec)
    load_s = time.perf_counter() - started
    after_session = proc_status()
    rng = np.random.default_rng(0)
    batches = {size: rng.standard_normal((size, 3, 224, 224), dtype=np.float32)
               for size in (1, 4)}
    time_inference(session, batches, 1)  # warm-up: both shapes
    if spec.get("trim"):
        malloc_trim()
    times = time_inference(session, batches, runs)
    end = proc_status()
    return {"imports_rss": imports["VmRSS"], "ort_rss": with_ort["VmRSS"],
            "session_rss": after_session["VmRSS"],
            "session_hwm": after_session["VmHWM"], "peak_hwm": end["VmHWM"],
            "end_rss": end["VmRSS"], "end_anon": end["RssAnon"], "end_file": end["RssFile"],
            "load_s": load_s, "b1": times[1], "b4": times[4]}


def cmd_levers(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in LEVERS}
    for _ in range(args.rounds):
        for name, (spec, env) in LEVERS.items():
            results[name].append(child(["_child", "session", "--model", str(args.model),
                                        "--spec", json.dumps(spec), "--runs", str(args.runs)],
                                       env))
    rows = []
    print(f"{'variant':46} {'session':>8} {'load pk':>7} {'peak':>7} {'end':>7} "
          f"{'b1 ms':>7} {'b4 ms':>7}")
    for name, runs in results.items():
        row = {"variant": name,
               "imports_rss": median([r["imports_rss"] for r in runs]),
               "ort_rss": median([r["ort_rss"] for r in runs]),
               "session_rss": median([r["session_rss"] for r in runs]),
               "session_hwm": median([r["session_hwm"] for r in runs]),
               "peak_hwm": median([r["peak_hwm"] for r in runs]),
               "end_rss": median([r["end_rss"] for r in runs]),
               "b1_ms": median([t for r in runs for t in r["b1"]]),
               "b4_ms": median([t for r in runs for t in r["b4"]]),
               "load_s": round(statistics.median(r["load_s"] for r in runs), 2)}
        rows.append(row)
        print(f"{name:46} {row['session_rss']:8.1f} {row['session_hwm']:7.1f} "
              f"{row['peak_hwm']:7.1f} "
              f"{row['end_rss']:7.1f} {row['b1_ms']:7.1f} {row['b4_ms']:7.1f}")
    print(f"(MiB; dinowatch.daemon imports {rows[0]['imports_rss']}, + import onnxruntime "
          f"{rows[0]['ort_rss']}; session = RSS after InferenceSession(), load pk = its "
          f"VmHWM, peak = VmHWM after b1+b4 runs, end = RSS then; {args.rounds} rounds x "
          f"{args.runs} runs, medians)")
    return {"benchmark": "memory_levers", "rows": rows}


def external_copy(model: Path, folder: Path) -> Path:
    """The model re-saved with its weights in a side file (ONNX external data): ORT maps
    such weights instead of copying them into its heap."""
    import onnx

    target = folder / f"{model.stem}.ext.onnx"
    if not target.exists():
        onnx.save_model(onnx.load(str(model)), str(target), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{target.name}.data",
                        size_threshold=1024)
    return target


def cmd_speed(args: argparse.Namespace) -> dict[str, Any]:
    """All session variants in ONE process, timed run by run in turn: the fairest speed
    comparison when other work shares the CPU (memory is what `levers` measures)."""
    import numpy as np

    external = external_copy(args.model, args.work)
    variants: dict[str, tuple[Path, dict[str, Any]]] = {
        "baseline (dinowatch today)": (args.model, {}),
        "enable_cpu_mem_arena=False": (args.model, {"arena": False}),
        "enable_mem_pattern=False": (args.model, {"mem_pattern": False}),
        "session.disable_prepacking=1": (args.model, {"prepack": False}),
        "use_device_allocator_for_initializers=1": (args.model, {"init_device_alloc": True}),
        "external-data weights (mmap)": (external, {}),
        "external-data + arena off": (external, {"arena": False}),
    }
    sessions = {name: make_session(path, spec) for name, (path, spec) in variants.items()}
    rng = np.random.default_rng(0)
    batches = {size: rng.standard_normal((size, 3, 224, 224), dtype=np.float32)
               for size in (1, 4)}
    reference = None
    diffs: dict[str, float] = {}
    for name, session in sessions.items():  # warm-up, and the outputs compared
        out = session.run(None, {session.get_inputs()[0].name: batches[4]})[0]
        time_inference(session, batches, 1)
        reference = out if reference is None else reference
        diffs[name] = float(np.abs(out - reference).max())
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 4: []} for name in sessions}
    for _ in range(args.runs):
        for name, session in sessions.items():
            for size, ms in time_inference(session, batches, 1).items():
                times[name][size] += ms
    rows = []
    print(f"{'variant':42} {'b1 ms':>7} {'b4 ms':>7} {'max|diff|':>10}")
    for name in sessions:
        row = {"variant": name, "b1_ms": median(times[name][1]), "b4_ms": median(times[name][4]),
               "max_abs_diff": diffs[name]}
        rows.append(row)
        print(f"{name:42} {row['b1_ms']:7.1f} {row['b4_ms']:7.1f} {diffs[name]:10.2e}")
    print(f"(one process, {args.runs} runs each, interleaved run by run; medians)")
    return {"benchmark": "session_speed", "rows": rows}


def child_backend(model: Path, runs: int) -> dict[str, Any]:
    """dinowatch's own OnnxBackend (from whatever `dinowatch` is importable): RSS after
    opening, peak, and ms per batch of 1 and 4, interleaved run by run."""
    import numpy as np

    import dinowatch.daemon  # noqa: F401
    from dinowatch.backends.onnx import OnnxBackend

    backend = OnnxBackend(model)
    opened = proc_status()
    rng = np.random.default_rng(0)
    batches = {size: rng.standard_normal((size, 3, 224, 224), dtype=np.float32)
               for size in (1, 4)}
    for batch in batches.values():
        backend.infer(batch)
    times: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(runs):
        for size, batch in batches.items():
            started = time.perf_counter()
            backend.infer(batch)
            times[size].append((time.perf_counter() - started) * 1000)
    end = proc_status()
    return {"open_rss": opened["VmRSS"], "peak_hwm": end["VmHWM"], "end_rss": end["VmRSS"],
            "b1": times[1], "b4": times[4]}


def cmd_backends(args: argparse.Namespace) -> dict[str, Any]:
    """The backend of each --src, in fresh processes, round-robin."""
    sources = args.src or []
    results: dict[str, list[dict[str, Any]]] = {str(src): [] for src in sources}
    for _ in range(args.rounds):
        for src in sources:
            results[str(src)].append(child(["_child", "backend", "--model", str(args.model),
                                            "--runs", str(args.runs)],
                                           {"PYTHONPATH": str(src)}))
    rows = []
    print(f"{'src':36} {'open':>7} {'peak':>7} {'end':>7} {'b1 ms':>7} {'b4 ms':>7}")
    for src, runs in results.items():
        row = {"src": src, "open_rss": median([r["open_rss"] for r in runs]),
               "peak_hwm": median([r["peak_hwm"] for r in runs]),
               "end_rss": median([r["end_rss"] for r in runs]),
               "b1_ms": median([t for r in runs for t in r["b1"]]),
               "b4_ms": median([t for r in runs for t in r["b4"]])}
        rows.append(row)
        print(f"{src:36} {row['open_rss']:7.1f} {row['peak_hwm']:7.1f} {row['end_rss']:7.1f} "
              f"{row['b1_ms']:7.1f} {row['b4_ms']:7.1f}")
    print(f"(MiB, ms; {args.rounds} rounds x {args.runs} runs, medians)")
    return {"benchmark": "backend_speed", "rows": rows}


# -- RSS breakdown by stage ------------------------------------------------------------------


def seed_store(db: Path, model_sha: str, count: int, root: Path, dim: int = 384) -> None:
    """`count` recorded images of `model_sha` under `root` (files that need not exist),
    written through dinowatch's own Store API, one transaction each as the daemon does."""
    import hashlib

    import numpy as np

    from dinowatch.store import ImageRecord, Store

    rng = np.random.default_rng(1)
    store = Store(db)
    try:
        for row in range(count):
            vector = rng.standard_normal(dim).astype(np.float32)
            vector /= np.linalg.norm(vector)
            sha = hashlib.sha256(f"seed-{row}".encode()).hexdigest()
            store.record(ImageRecord(path=str(root / f"img-{row:06d}.jpg"), source="archive",
                                     size=1, mtime_ns=1, status="done", sha256=sha,
                                     width=4000, height=3000, model=model_sha), vector, [])
    finally:
        store.close()


def seeded_db(work: Path, model: Path, count: int) -> Path:
    """A store with `count` vectors of `model`, built once and reused."""
    from dinowatch.models import sha256_file

    sha = sha256_file(model)
    db = work / f"seed-{count}-{sha[:12]}.db"
    if not db.exists():
        started = time.monotonic()
        tmp = db.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        seed_store(tmp / "dinowatch.db", sha, count, work / "archive")
        (tmp / "dinowatch.db").rename(db)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"seeded {count} vectors in {time.monotonic() - started:.0f} s: {db}",
              file=sys.stderr)
    return db


def decode_all(embedder: Any, files: list[Path], workers: int) -> None:
    """Read and prepare `files` on `workers` threads, as the pipeline's decoders do."""
    import io

    pending = list(files)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                path = pending.pop()
            embedder.prepare(io.BytesIO(path.read_bytes()), name=str(path))

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def child_stages(model: Path, db: Path, images: list[Path], pngs: list[Path],
                 backend: dict[str, Any]) -> dict[str, Any]:
    import dinowatch.daemon  # noqa: F401
    from dinowatch.backends.onnx import OnnxBackendConfig
    from dinowatch.config import ImagingSettings, MatchingSettings
    from dinowatch.embedder import DinoEmbedder
    from dinowatch.imaging import ImagingOptions
    from dinowatch.match import Matcher
    from dinowatch.store import Store

    stages: list[tuple[str, dict[str, float]]] = [("python + imports", proc_status())]
    embedder = DinoEmbedder(model, backend=OnnxBackendConfig(**backend),
                            imaging=ImagingOptions(**ImagingSettings().model_dump()))
    embedder.warm_up()
    stages.append(("+ ORT session (warm)", proc_status()))
    store = Store(db)
    matcher = Matcher(MatchingSettings(), db.parent / "gallery", dim=embedder.dim)
    count = matcher.load(store, embedder.model_sha256)
    stages.append((f"+ match index ({count} vectors)", proc_status()))
    reset_hwm()
    decode_all(embedder, images, 2)
    stages.append((f"+ decode {len(images)} JPEG draft, 2 threads", proc_status()))
    reset_hwm()
    decode_all(embedder, pngs, 2)
    stages.append((f"+ decode {len(pngs)} PNG 12 MP, 2 threads", proc_status()))
    store.close()
    return {"stages": stages}


def make_pngs(images: list[Path], folder: Path, count: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in images[:count]:
        target = folder / f"{source.stem}.png"
        if not target.exists():
            Image.open(source).save(target, compress_level=1)
        out.append(target)
    return out


def cmd_stages(args: argparse.Namespace) -> dict[str, Any]:
    db = seeded_db(args.work, args.model, args.vectors)
    images = sorted(args.images.glob("*.jpg"))
    pngs = make_pngs(images, args.work / "png", 4)
    result = child(["_child", "stages", "--model", str(args.model), "--db", str(db),
                    "--images", str(args.images), "--pngs", str(pngs[0].parent),
                    "--spec", json.dumps({})])
    print(f"{'stage':40} {'VmRSS':>7} {'VmHWM':>7} {'anon':>7} {'file':>6}")
    previous = 0.0
    rows = []
    for name, status in result["stages"]:
        print(f"{name:40} {status['VmRSS']:7.1f} {status['VmHWM']:7.1f} "
              f"{status['RssAnon']:7.1f} {status['RssFile']:6.1f}  "
              f"(+{status['VmRSS'] - previous:.1f})")
        previous = status["VmRSS"]
        rows.append({"stage": name, **status})
    print("(MiB; VmHWM of the decode rows is the peak over that stage alone)")
    return {"benchmark": "memory_stages", "rows": rows}


# -- start-up: optimized graph saved once ----------------------------------------------------


def child_startup(model: Path, spec: dict[str, Any], runs: int, out: Path | None
                  ) -> dict[str, Any]:
    import numpy as np

    started = time.perf_counter()
    session = make_session(model, spec)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    batches = {size: rng.standard_normal((size, 3, 224, 224), dtype=np.float32)
               for size in (1, 4)}
    name = session.get_inputs()[0].name
    first = time.perf_counter()
    session.run(None, {name: batches[1]})
    first_s = time.perf_counter() - first
    if out is not None:
        np.save(out, session.run(None, {name: batches[4]})[0])
    times = time_inference(session, batches, runs) if runs else {1: [], 4: []}
    return {"load_s": load_s, "first_run_s": first_s, "b1": times[1], "b4": times[4],
            "peak_hwm": proc_status()["VmHWM"]}


def cmd_startup(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    args.work.mkdir(parents=True, exist_ok=True)
    optimized = args.work / f"{args.model.stem}.opt.onnx"
    ort_model = args.work / f"{args.model.stem}.ort"
    child(["_child", "startup", "--model", str(args.model), "--runs", "0",
           "--spec", json.dumps({"save_to": str(optimized)})])
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                    "--optimization_style", "Fixed", "--output_dir", str(args.work),
                    str(args.model)], check=False, capture_output=True)
    ort_candidates = sorted(args.work.glob(f"{args.model.stem}*.ort"))
    if ort_candidates:
        ort_model = ort_candidates[0]
    variants: dict[str, tuple[Path, dict[str, Any]]] = {
        "onnx, ORT_ENABLE_ALL (today)": (args.model, {"level": "all"}),
        "optimized file, ORT_DISABLE_ALL": (optimized, {"level": "none"}),
        "optimized file, ORT_ENABLE_BASIC": (optimized, {"level": "basic"}),
    }
    if ort_model.exists():
        variants["ORT format, ORT_DISABLE_ALL"] = (ort_model, {"level": "none"})
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    outputs = {name: args.work / f"out-{index}.npy" for index, name in enumerate(variants)}
    for round_ in range(args.rounds):
        for name, (path, spec) in variants.items():
            results[name].append(child(
                ["_child", "startup", "--model", str(path), "--spec", json.dumps(spec),
                 "--runs", str(args.runs if round_ < 2 else 0),
                 "--out", str(outputs[name])]))
    reference = np.load(outputs[next(iter(variants))])
    rows = []
    print(f"{'variant':36} {'load s':>7} {'1st run s':>9} {'b1 ms':>7} {'b4 ms':>7} "
          f"{'peak':>7} {'max|diff|':>10}")
    for name, runs in results.items():
        diff = float(np.abs(np.load(outputs[name]) - reference).max())
        row = {"variant": name, "file_mb": round(variants[name][0].stat().st_size / 2**20, 1),
               "load_s": round(statistics.median(r["load_s"] for r in runs), 3),
               "first_run_s": round(statistics.median(r["first_run_s"] for r in runs), 3),
               "b1_ms": median([t for r in runs for t in r["b1"]]),
               "b4_ms": median([t for r in runs for t in r["b4"]]),
               "peak_hwm": median([r["peak_hwm"] for r in runs]), "max_abs_diff": diff}
        rows.append(row)
        print(f"{name:36} {row['load_s']:7.3f} {row['first_run_s']:9.3f} {row['b1_ms']:7.1f} "
              f"{row['b4_ms']:7.1f} {row['peak_hwm']:7.1f} {diff:10.2e}")
    print(f"(session creation alone, median of {args.rounds} fresh processes)")
    return {"benchmark": "startup_session", "rows": rows}


# -- the real daemon -------------------------------------------------------------------------


@contextmanager
def mosquitto(work: Path) -> Iterator[int | None]:
    """A private broker on a free port (None when mosquitto is not installed)."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                           if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield port
    finally:
        broker.terminate()
        broker.wait(5)


class Daemon:
    """`dinowatch run -c CONFIG` with a notify socket; `src` picks the dinowatch sources."""

    def __init__(self, home: Path, config: Path, src: Path | None, env: dict[str, str]) -> None:
        self.home, self.config = home, config
        self.notify = home / "notify.sock"
        self.notify.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify))
        environ = {**os.environ, **env, "NOTIFY_SOCKET": str(self.notify),
                   "PYTHONUNBUFFERED": "1"}
        if src is not None:
            environ["PYTHONPATH"] = str(src)
        self.log = (home / "daemon.log").open("ab")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "dinowatch.cli", "run", "-c",
                                         str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, env=environ)

    def wait_ready(self, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {(self.home / 'daemon.log').read_text()}")
            self.sock.settimeout(0.5)
            try:
                if "READY=1" in self.sock.recv(4096).decode().splitlines():
                    return time.perf_counter() - self.started
            except TimeoutError:
                continue
        raise RuntimeError("no READY=1")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()
        self.log.close()


def done_count(db: Path, source: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return con.execute("SELECT count(*) FROM images WHERE source = ? AND status = 'done'",
                           (source,)).fetchone()[0]


def daemon_run(args: argparse.Namespace, label: str, src: Path | None, env: dict[str, str],
               seed_db: Path, port: int | None, idle_seconds: float, run: int
               ) -> dict[str, Any]:
    """Fresh data_dir with the seeded store; READY time; drop the JPEGs; peak; idle CPU."""
    import yaml

    home = args.work / "daemon" / f"{label.replace(' ', '_')}-{run}"
    shutil.rmtree(home, ignore_errors=True)
    (home / "data").mkdir(parents=True)
    inbox = home / "inbox"
    inbox.mkdir()
    shutil.copy(seed_db, home / "data" / "dinowatch.db")
    config = {"data_dir": str(home / "data"), "device_id": "memtest",
              "model": {"path": str(args.model)},
              "watch": [{"path": str(inbox), "source": "inbox"}],  # default settle: 2 s
              "mqtt": {"host": "127.0.0.1", "port": port or 9}, "logging": {"level": "INFO"}}
    if args.threads:
        config["backend"] = {"threads": args.threads}
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    daemon = Daemon(home, home / "config.yaml", src, env)
    try:
        ready_s = daemon.wait_ready()
        ready = proc_status(daemon.process.pid)
        images = sorted(args.images.glob("*.jpg"))
        started = time.monotonic()
        for image in images:  # written elsewhere, then renamed in: whole files arrive
            shutil.copy(image, home / f".{image.name}")
            (home / f".{image.name}").rename(inbox / image.name)
        db = home / "data" / "dinowatch.db"
        while done_count(db, "inbox") < len(images):
            if time.monotonic() - started > 600:
                raise RuntimeError("images not embedded within 600 s")
            time.sleep(0.2)
        embed_s = time.monotonic() - started
        time.sleep(3)  # outbox drained, match index updated
        after = proc_status(daemon.process.pid)
        idle_pct, by_thread = None, {}
        if idle_seconds:
            time.sleep(5)
            pid = daemon.process.pid
            cpu0, threads0, t0 = cpu_seconds(pid), thread_cpu(pid), time.monotonic()
            time.sleep(idle_seconds)
            elapsed = time.monotonic() - t0
            idle_pct = 100 * (cpu_seconds(pid) - cpu0) / elapsed
            by_thread = {name: round(100 * (cpu - threads0.get(name, 0.0)) / elapsed, 3)
                         for name, cpu in thread_cpu(pid).items()
                         if cpu - threads0.get(name, 0.0) > 0}
        return {"ready_s": ready_s, "ready_rss": ready["VmRSS"], "ready_hwm": ready["VmHWM"],
                "hwm": after["VmHWM"], "rss": after["VmRSS"], "embed_s": embed_s,
                "idle_cpu_pct": idle_pct, "idle_by_thread": by_thread}
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


def cmd_daemon(args: argparse.Namespace) -> dict[str, Any]:
    seed_db = seeded_db(args.work, args.model, args.vectors)
    variants: dict[str, tuple[Path | None, dict[str, str]]] = {}
    for index, src in enumerate(args.src or [None]):
        variants[f"src{index}" if args.src else "installed"] = (src, {})
    for name, value in (args.env or []):  # the last --src, with one more variable
        variants[name] = (list(variants.values())[-1][0], dict([value.split("=", 1)]))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with mosquitto(args.work) as port:
        for run in range(args.rounds):
            for name, (src, env) in variants.items():
                results[name].append(daemon_run(args, name, src, env, seed_db, port,
                                                args.idle if run == 0 else 0, run))
    rows = []
    print(f"{'variant':14} {'READY s':>8} {'RSS@READY':>10} {'VmHWM':>7} {'RSS end':>8} "
          f"{'embed s':>8} {'idle CPU %':>10}")
    for name, runs in results.items():
        idle = [r["idle_cpu_pct"] for r in runs if r["idle_cpu_pct"] is not None]
        row = {"variant": name, "src": str(variants[name][0]), "env": variants[name][1],
               "ready_s": round(statistics.median(r["ready_s"] for r in runs), 2),
               "ready_rss": median([r["ready_rss"] for r in runs]),
               "hwm": median([r["hwm"] for r in runs]), "hwm_all": [r["hwm"] for r in runs],
               "rss": median([r["rss"] for r in runs]),
               "embed_s": round(statistics.median(r["embed_s"] for r in runs), 2),
               "idle_cpu_pct": round(idle[0], 3) if idle else None,
               "idle_by_thread": next((r["idle_by_thread"] for r in runs
                                       if r["idle_by_thread"]), {})}
        rows.append(row)
        print(f"{name:14} {row['ready_s']:8.2f} {row['ready_rss']:10.1f} {row['hwm']:7.1f} "
              f"{row['rss']:8.1f} {row['embed_s']:8.2f} {row['idle_cpu_pct']!s:>10}")
    for row in rows:
        print(f"  {row['variant']}: src={row['src']} env={row['env']}")
        if row["idle_by_thread"]:
            print(f"    idle CPU % by thread: {row['idle_by_thread']}")
    print(f"({args.vectors} stored vectors, {len(list(args.images.glob('*.jpg')))} JPEGs, "
          f"{args.rounds} rounds, medians; idle over {args.idle:.0f} s in round 1)")
    return {"benchmark": "daemon_memory", "rows": rows}


# -- threads x decode workers ----------------------------------------------------------------


def child_threads(model: Path, images: list[Path], combos: list[tuple[int, int]], rounds: int,
                  work: Path) -> dict[str, Any]:
    import io

    import numpy as np

    from dinowatch.backends.onnx import OnnxBackendConfig
    from dinowatch.config import ImagingSettings
    from dinowatch.embedder import DinoEmbedder
    from dinowatch.imaging import ImagingOptions
    from dinowatch.pipeline import Pipeline
    from dinowatch.store import Store

    imaging = ImagingOptions(**ImagingSettings().model_dump())
    embedders = {threads: DinoEmbedder(model, backend=OnnxBackendConfig(threads=threads),
                                       imaging=imaging)
                 for threads in sorted({t for t, _ in combos})}
    for embedder in embedders.values():
        embedder.warm_up()
    rates: dict[str, list[float]] = {f"{t}x{d}": [] for t, d in combos}
    for round_ in range(rounds):
        for threads, decoders in combos:
            home = work / f"pipe-{round_}-{threads}-{decoders}"
            shutil.rmtree(home, ignore_errors=True)
            store = Store(home / "dinowatch.db")
            pipeline = Pipeline(embedders[threads], store, decode_workers=decoders)
            pipeline.start()
            started = time.perf_counter()
            for image in images:
                pipeline.submit(image, "bench")
            while pipeline.queued:
                time.sleep(0.01)
            rates[f"{threads}x{decoders}"].append(len(images) / (time.perf_counter() - started))
            pipeline.stop()
            store.close()
            shutil.rmtree(home, ignore_errors=True)
    # per-stage CPU seconds, one thread each, measured with thread_time
    embedder = embedders[min(embedders)]
    decode_cpu = []
    for image in images:
        data = image.read_bytes()
        t0 = time.thread_time()
        embedder.prepare(io.BytesIO(data))
        decode_cpu.append((time.thread_time() - t0) * 1000)
    tensors = [embedder.prepare(image).tensor for image in images[:4]]
    infer: dict[str, float] = {}
    for threads, emb in embedders.items():
        walls, cpus = [], []
        for _ in range(5):
            c0, w0 = time.process_time(), time.perf_counter()
            emb.infer(tensors)
            cpus.append((time.process_time() - c0) * 1000 / 4)
            walls.append((time.perf_counter() - w0) * 1000 / 4)
        infer[f"threads={threads} wall ms/img"] = float(np.median(walls))
        infer[f"threads={threads} cpu ms/img"] = float(np.median(cpus))
    return {"rates": rates, "decode_cpu_ms": float(np.median(decode_cpu)), "infer": infer}


def cmd_threads(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    result = child(["_child", "threads", "--model", str(args.model), "--images",
                    str(args.images), "--rounds", str(args.rounds), "--work", str(args.work)])
    print(f"{'threads x decoders':20} {'images/s':>9} (median of {args.rounds}, interleaved)")
    for combo, rates in result["rates"].items():
        print(f"{combo:20} {statistics.median(rates):9.2f}   {[round(r, 2) for r in rates]}")
    print(f"decode+preprocess CPU: {result['decode_cpu_ms']:.0f} ms/image (one thread)")
    for key, value in result["infer"].items():
        print(f"inference {key}: {value:.0f}")
    return {"benchmark": "threads_decoders", **result}


# -- command line ----------------------------------------------------------------------------


def run_child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--spec", default="{}")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--pngs", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    if args.kind == "session":
        result = child_session(args.model, spec, args.runs)
    elif args.kind == "backend":
        result = child_backend(args.model, args.runs)
    elif args.kind == "stages":
        result = child_stages(args.model, args.db, sorted(args.images.glob("*.jpg")),
                              sorted(args.pngs.glob("*.png")), spec)
    elif args.kind == "startup":
        result = child_startup(args.model, spec, args.runs, args.out)
    elif args.kind == "threads":
        result = child_threads(args.model, sorted(args.images.glob("*.jpg")),
                               [(1, 1), (1, 2), (2, 1), (2, 2)], args.rounds, args.work)
    else:
        raise SystemExit(f"unknown child {args.kind}")
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        run_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["levers", "speed", "backends", "stages", "startup",
                                                "daemon", "threads"])
    parser.add_argument("--model", type=Path, required=True, help="the fp32 ONNX model")
    parser.add_argument("--images", type=Path, help="folder of camera-like JPEGs")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--runs", type=int, default=10, help="timed inferences per process")
    parser.add_argument("--vectors", type=int, default=10_000, help="stored vectors")
    parser.add_argument("--idle", type=float, default=60.0, help="daemon: idle seconds")
    parser.add_argument("--threads", type=int, help="daemon: backend.threads")
    parser.add_argument("--src", type=Path, action="append",
                        help="daemon, backends: a dinowatch src folder (PYTHONPATH); "
                        "repeatable")
    parser.add_argument("--env", nargs=2, action="append", metavar=("NAME", "VAR=VALUE"),
                        help="daemon: an extra variant: the last --src with this variable")
    parser.add_argument("--keep", action="store_true", help="daemon: keep its folders")
    args = parser.parse_args()
    args.model = args.model.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command in ("stages", "daemon", "threads") and not args.images:
        parser.error(f"{args.command} needs --images")
    commands: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "levers": cmd_levers, "stages": cmd_stages, "startup": cmd_startup,
        "daemon": cmd_daemon, "threads": cmd_threads, "speed": cmd_speed,
        "backends": cmd_backends}
    print(json.dumps(commands[args.command](args)))


if __name__ == "__main__":
    main()
