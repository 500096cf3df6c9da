"""The `dinowatch` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dinowatch import __version__, models
from dinowatch.config import (
    CONFIG_ENV,
    ConfigError,
    ImagingSettings,
    Settings,
    WatchSettings,
    config_path,
    load_settings,
    settings_warnings,
)
from dinowatch.embedder import EMBED_ERRORS, DinoEmbedder
from dinowatch.errors import readable
from dinowatch.imaging import ImagingOptions
from dinowatch.match import Matcher, gallery_watch
from dinowatch.mqtt import search_fields
from dinowatch.store import Store
from dinowatch.watch import is_gone

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78

log = logging.getLogger("dinowatch")


def _fail(message: object) -> int:
    print(f"dinowatch: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _settings(args: argparse.Namespace) -> Settings:
    """Load the config named by -c (else $DINOWATCH_CONFIG, else /etc/dinowatch/config.yaml)."""
    settings = load_settings(config_path(args.config))
    if settings.mqtt is not None:
        settings.mqtt.password()  # an unreadable password file is a config error, found now
    return settings


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        settings = _settings(args)
    except ConfigError as err:
        print(f"{path}: {len(err.errors)} error(s)", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in settings_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from dinowatch.daemon import Daemon

    _configure_logging(settings.logging.level if not args.verbose else "DEBUG")
    for warning in settings_warnings(settings):
        log.warning("%s", warning)
    try:
        return Daemon(settings, config_path(args.config)).run()
    except EMBED_ERRORS as err:
        log.error("%s", err)
        return EXIT_FAILURE


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from dinowatch.daemon import build_messages
    from dinowatch.pipeline import DELETED, RECORDED, UNCHANGED, Pipeline
    from dinowatch.watch import scan

    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        return _fail(f"not a folder: {', '.join(missing)}")
    opened = _open_stages(settings)
    if isinstance(opened, int):
        return opened
    embedder, store, matcher = opened
    pipeline = Pipeline(embedder, store, build_messages(settings, embedder), matcher=matcher,
                        normalize=settings.model.normalize,
                        on_paused=_report_pause)
    pipeline.start()
    files = 0
    for folder in args.dirs:
        watch = WatchSettings(path=folder.absolute(), source=args.source)
        for path in scan(watch):
            pipeline.submit(path, watch.source_name)
            files += 1
    with tqdm(total=files, unit="img", disable=None, file=sys.stderr) as progress:
        while pipeline.queued and not pipeline.stalled:  # stalled: the device is down
            progress.n = max(0, files - pipeline.queued)
            progress.refresh()
            time.sleep(0.2)
        progress.n = files
    if pipeline.stalled:
        _fail(f"inference waits for its backend: {pipeline.backend_error}; the files that "
              "failed are tried again by the daemon's next scan or the next `index`")
    pipeline.stop()
    outbox = store.outbox_depth()
    store.close()
    done = pipeline.outcomes
    failed = pipeline.still_failed  # per file, its last attempt (retries after a device
    #                                 failure that then succeeded do not count)
    print(f"{files} files: {done[RECORDED]} recorded, {done[UNCHANGED]} already in the store, "
          f"{failed} failed, {done[DELETED]} deleted meanwhile; {outbox} messages in "
          "the outbox for the daemon")
    return EXIT_FAILURE if failed else EXIT_OK


def _report_pause(error: Exception | None) -> None:
    if error is not None:
        _fail(f"{error}; waiting until the database takes writes again")


STALE_REPORTS = 2  # the daemon's stats older than this many intervals: it is not running


def _pid_alive(pid: int) -> bool:
    """Does process `pid` exist (and is it not a zombie)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user (the service's)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _daemon_state(stats: dict[str, object], *, disk_full: bool) -> dict[str, object]:
    """Is the daemon running? Decided from the age of its last stats (written every
    STATS_INTERVAL_SECONDS) and, when they name it, whether its process still exists.
    `running` is None when the stats carry no time (written by an older dinowatch)."""
    from dinowatch.daemon import STATS_INTERVAL_SECONDS

    pid, stamp = stats.get("pid"), stats.get("ts")
    alive = _pid_alive(pid) if isinstance(pid, int) and pid > 0 else None
    try:
        age = (round(time.time() - datetime.fromisoformat(stamp).timestamp(), 1)
               if isinstance(stamp, str) else None)
    except ValueError:  # not a time: as good as none
        age = None
    running: bool | None = False
    if stats and age is None:
        running = None
    elif age is not None and alive is not False:
        # A full disk stops the reports (they are written to the database), not the daemon.
        running = age <= STALE_REPORTS * STATS_INTERVAL_SECONDS or (disk_full and bool(alive))
    return {"running": running, "pid": pid, "pid_alive": alive, "last_report": stamp,
            "last_report_age_seconds": age}


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _daemon_line(state: dict[str, object], connected: object, mqtt: bool) -> str:
    from dinowatch.daemon import STATS_INTERVAL_SECONDS

    age, pid = state["last_report_age_seconds"], state["pid"]
    if state["running"] is None:
        return "unknown (its last report carries no time: written by an older dinowatch)"
    if not isinstance(age, float):
        return "not running (no report yet: has it started?)"
    if state["running"]:
        broker = ("connected to the broker" if connected else "not connected to the broker"
                  ) if mqtt else "no broker configured"
        since = (f"last report {_ago(age)} ago" if age <= STALE_REPORTS * STATS_INTERVAL_SECONDS
                 else f"no report for {_ago(age)}: the disk is full")
        return f"running ({since}), pid {pid}, {broker}"
    note = (f"; process {pid} still exists but has stopped reporting"
            if state["pid_alive"] else "")
    return f"not running (last report at {state['last_report']}, {_ago(age)} ago{note})"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from dinowatch.daemon import open_store
    from dinowatch.store import RESUME_FREE_BYTES

    if (missing := _no_database(settings)) is not None:
        return missing
    store = open_store(settings)
    daemon_stats = json.loads(store.meta("stats") or "{}")
    free = shutil.disk_usage(settings.data_dir).free
    state = _daemon_state(daemon_stats, disk_full=free < RESUME_FREE_BYTES)
    daemon = daemon_stats | state
    if state["running"] is False and "connected" in daemon:
        daemon["connected"] = False  # the last stats said so of a daemon that has gone
    last_match = next(iter(store.matches(limit=1)), None)
    report = {"images": store.counts(), "outbox": store.outbox_depth(),
              "labels": store.label_counts(),
              "last_match": None if last_match is None else {
                  "kind": last_match.kind, "label": last_match.label,
                  "score": last_match.score, "path": readable(last_match.path),
                  "reference": readable(last_match.reference_path), "ts": last_match.ts},
              "dead_letters": store.dead_letter_count(),
              "queue": daemon_stats.get("queue"), "daemon": daemon,
              # The daemon cannot record a full disk in the database that is on it: look.
              "disk": {"free_bytes": free, "full": free < RESUME_FREE_BYTES},
              "last_errors": [error | {"path": readable(error["path"])}
                              for error in store.last_errors()]}
    store.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    images = report["images"]
    topics = f"{settings.mqtt.topic_prefix}/{settings.device_id}/…" if settings.mqtt else \
        "no MQTT"
    print(f"daemon: {_daemon_line(state, daemon.get('connected'), settings.mqtt is not None)}")
    model = daemon.get("model")
    if isinstance(model, dict):
        print(f"model: {model.get('name')} (sha256 {str(model.get('sha256'))[:12]}…"
              + (", pinned)" if model.get("pinned") else ", not the registry's pinned file)")
              + (" STAND-IN: random weights, its vectors mean nothing" if model.get("stand_in")
                 else ""))
        fidelity = model.get("fidelity")
        if isinstance(fidelity, dict):
            print(f"model fidelity: cosine to its fp32 base on {fidelity.get('images')} images: "
                  f"mean {fidelity.get('mean')}, min {fidelity.get('min')}")
    if "backend" in daemon:
        print(f"backend: {daemon['backend']}"
              + (f" (FALLBACK: {daemon['backend_fallback']})" if "backend_fallback" in daemon
                 else "")
              + (f" (WAITING: {daemon['backend_error']})" if "backend_error" in daemon else ""))
    print(f"device: {settings.device_id} ({topics})")
    print(f"images: {images['done']} embedded, {images['failed']} failed, "
          f"{images['deleted']} deleted")
    labels = report["labels"]
    print(f"gallery: {len(labels)} labels, {sum(labels.values())} references"
          + (f" ({', '.join(f'{k} {v}' for k, v in labels.items())})" if labels else ""))
    if last_match is not None:
        print(f"last match: {last_match.ts} {readable(last_match.path)}: {last_match.kind} "
              f"{last_match.label or readable(last_match.reference_path)} "
              f"(score {last_match.score})")
    print(f"outbox: {report['outbox']} messages waiting for the broker")
    print(f"dead letters: {report['dead_letters']} messages parked (dinowatch outbox list)")
    if report["disk"]["full"]:
        print(f"DISK FULL: {settings.data_dir} has {free:,} bytes free; intake is paused "
              "until there is room again")
    print(f"queue: {report['queue'] if report['queue'] is not None else 'unknown'} "
          "(as of the daemon's last stats)")
    for error in report["last_errors"]:
        print(f"error: {error['updated_at']} {error['path']}: {error['error']}")
    return EXIT_OK


def _with_settings(command: Callable[[argparse.Namespace, Any], int], *, optional: bool = False
                   ) -> Callable[[argparse.Namespace], int]:
    """Load the config first; a config error is exit 78 with every error listed.

    `optional`: the command also works without one (it then gets None), so a config is
    read only when -c or $DINOWATCH_CONFIG names it.
    """

    def run(args: argparse.Namespace) -> int:
        if optional and args.config is None and not os.environ.get(CONFIG_ENV):
            return command(args, None)
        try:
            # these commands never connect: the MQTT password file need not be readable
            settings = load_settings(config_path(args.config)) if optional else _settings(args)
        except ConfigError as err:
            for line in err.errors:
                print(f"dinowatch: {line}", file=sys.stderr)
            return EXIT_CONFIG
        return command(args, settings)

    return run


def _configure_logging(level: str) -> None:
    # Under systemd, journald stamps time and unit itself; elsewhere a timestamp helps.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, format=f"{stamp}%(levelname)s %(name)s: %(message)s",
                        force=True)


def _config_embedder(settings: Settings, model: Path | None, name: str | None) -> DinoEmbedder:
    """The daemon's model: model.path/name (`model` and `name` override them), data_dir's
    model cache, backend and imaging options."""
    from dinowatch.daemon import open_embedder

    chosen = settings.model.model_copy(update={"path": model or settings.model.path,
                                               "name": name or settings.model.name})
    return open_embedder(settings.model_copy(update={"model": chosen}))


def cmd_embed(args: argparse.Namespace, settings: Settings | None) -> int:
    normalize = not args.raw
    try:
        if settings is not None:
            normalize = normalize and settings.model.normalize
            embedder = _config_embedder(settings, args.model, args.model_name)
        else:  # the library's defaults, as the seed had them
            embedder = DinoEmbedder(args.model,
                                    model_name=args.model_name or models.DEFAULT_MODEL)
    except EMBED_ERRORS as err:
        return _fail(err)
    vectors, failed = [], 0
    with embedder:
        for path in args.images:
            try:
                vector = embedder.embed(path, normalize=normalize)
            except EMBED_ERRORS as err:
                failed += 1
                _fail(err)
                continue
            if args.format == "json":
                print(json.dumps({"path": str(path), "vector": vector.tolist()}), flush=True)
            vectors.append(vector)
    if args.format == "npy":
        np.save(sys.stdout.buffer, np.stack(vectors) if vectors else
                np.empty((0, embedder.dim), np.float32))
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_model(args: argparse.Namespace, settings: Settings | None) -> int:
    cache_dir = args.dir or models.model_dir(settings.data_dir if settings else None)
    try:
        entry = models.get_entry(args.name or models.DEFAULT_MODEL)
        if args.action == "quantize":
            return _quantize(args, settings, entry, cache_dir)
        if args.action == "fetch":
            print(models.fetch(entry, cache_dir, progress=sys.stderr.isatty()))
            return EXIT_OK
        details = models.info(entry, cache_dir)
    except EMBED_ERRORS as err:
        return _fail(err)
    if args.action == "info":
        for key, value in details.items():
            print(f"{key}: {value}")
        return EXIT_OK
    if details["verified"]:
        print(f"{details['path']}: OK")
        return EXIT_OK
    if not details["present"]:
        return _fail(f"{details['path']} is missing")
    if details["verified"] is None:
        return _fail(f"{entry.name} is not pinned to a sha256; nothing to verify against")
    return _fail(f"{details['path']} failed verification")


def _quantize(args: argparse.Namespace, settings: Settings | None, entry: models.ModelEntry,
              cache_dir: Path) -> int:
    """`model quantize [NAME]`: NAME is a base model (its INT8 entry is made) or the INT8
    entry itself. The fp32 source: --model, else model.path, else the registry's file."""
    from dinowatch.quantize import quantize

    made = entry if entry.base else next(
        (e for e in models.REGISTRY.values() if e.base == entry.name), None)
    if made is None or made.base is None:
        return _fail(f"no INT8 entry is made from {entry.name!r}; quantizable: "
                     + ", ".join(sorted(e.base for e in models.REGISTRY.values() if e.base)))
    folders = [WatchSettings(path=folder) for folder in args.images] if args.images else \
        list(settings.watch) if settings else []
    if not folders:  # said before looking for the model: finding it may mean a download
        return _fail("model quantize measures the new model on your own images: give "
                     "--images DIR, or -c CONFIG to use the watched folders")
    source = _fp32_model(args.model, settings, made.base, cache_dir)
    try:
        images = _images(folders, args.sample)
    except OSError as err:
        return _fail(err)
    print(f"quantizing {source} to {made.name}; fidelity on up to {len(images)} images …",
          file=sys.stderr)
    card = quantize(Path(source), made, cache_dir, images, _daemon_imaging(settings),
                    settings.backend if settings else None)
    target = cache_dir / made.filename
    print(f"{made.name}: {target} ({card.size / 1e6:.1f} MB, from "
          f"{Path(source).stat().st_size / 1e6:.1f} MB)")
    print(f"fidelity to {card.base} on {card.fidelity.images} images: mean cosine "
          f"{card.fidelity.mean:.5f}, min {card.fidelity.min:.5f}")
    print(f"to use it: model: {{name: {made.name}}} in the config (without model.path)"
          + ("" if args.dir is None and settings else
             f", with ${models.MODEL_DIR_ENV}={cache_dir} or data_dir/models holding it"))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, settings: Settings | None) -> int:
    """`bench`: images/s, latency and the CPU floor for the configured backend and model."""
    from dinowatch import bench
    from dinowatch.testing import synthetic_photo

    try:
        images = _images([WatchSettings(path=args.images)], args.count) if args.images else []
        embedder = _command_embedder(settings, args.model)
    except OSError as err:
        return _fail(err)
    except EMBED_ERRORS as err:
        return _fail(err)
    with embedder, tempfile.TemporaryDirectory(prefix="dinowatch-bench-") as scratch:
        if not args.images:  # camera-like 12 MP JPEGs with sensor noise
            print(f"making {args.count} 12 MP JPEGs to measure with …", file=sys.stderr)
            images = [Path(scratch) / f"bench-{i:03d}.jpg" for i in range(args.count)]
            for i, path in enumerate(images):
                synthetic_photo(4032, 3024, seed=i).save(path, quality=90)
        try:
            result = bench.run(embedder, images)
        except (ValueError, *EMBED_ERRORS) as err:
            return _fail(err)
    if args.json:
        print(json.dumps(result.as_dict()))
        return EXIT_OK
    stages = ", ".join(f"{stage} {ms:.0f}" for stage, ms in result.cpu_ms_per_image.items())
    gmacs = ", ".join(f"{macs:.2f} G {kind}" for kind, macs in result.floor.gmacs.items())
    probe = ", ".join(f"{kind} {rate:.1f} GMAC/s"
                      for kind, rate in result.floor.gmacs_per_core_second.items())
    threads = "" if result.threads is None else f"{result.threads} threads, "
    fallback = f" (FALLBACK: {result.backend_fallback})" if result.backend_fallback else ""
    print(f"model: {result.model} on {result.backend}{fallback}, {threads}"
          f"{result.decode_workers} decode workers, {result.cores} cores")
    print(f"throughput: {result.images_per_s:.2f} images/s over {result.images} images")
    print(f"latency, one image on an idle pipeline (decode + inference): p50 "
          f"{result.latency_ms_p50:.0f} ms, p95 {result.latency_ms_p95:.0f} ms")
    print(f"CPU per image, ms: {stages}")
    if result.floor.gmacs:
        print(f"floor: {gmacs} multiply-accumulates per image; probe, one core: {probe}; "
              f"{result.floor_images_per_s:.2f} images/s on {result.cores} cores")
    else:
        print(f"floor: {result.floor_images_per_s:.2f} images/s on {result.cores} cores for the "
              f"host stages alone (the model runs on the {result.backend})")
    print(f"ratio to the floor: {result.ratio_to_floor:.2f}")
    return EXIT_OK


def cmd_backends(args: argparse.Namespace, settings: Settings | None) -> int:
    """`backends compare`: the configured backend and model against a reference (ONNX
    Runtime on the fp32 model), on the user's images: fidelity and speed side by side."""
    from dinowatch import bench

    try:
        images = _images([WatchSettings(path=args.images)], args.count)
    except OSError as err:
        return _fail(err)
    if not images:
        return _fail(f"no images in {args.images}")
    cache_dir = models.model_dir(settings.data_dir if settings else None)
    try:
        with _command_embedder(settings, args.model) as compared:
            if compared.fallback:  # it would compare the CPU with itself
                return _fail(f"the configured backend did not start, so there is nothing to "
                             f"compare with the CPU: {compared.fallback}")
            reference_path = _fp32_model(args.reference_model, settings, models.DEFAULT_MODEL,
                                         cache_dir)
            with DinoEmbedder(reference_path, imaging=compared.imaging) as reference:
                result = bench.compare(reference, compared, images)
                rows = [(label, embedder.identity.name, embedder.backend.type_key, ms)
                        for label, embedder, ms in (("reference", reference,
                                                     result.inference_ms[0]),
                                                    ("compared", compared,
                                                     result.inference_ms[1]))]
    except (ValueError, *EMBED_ERRORS) as err:
        return _fail(err)
    fidelity = result.fidelity
    if args.json:
        print(json.dumps({"images": fidelity.images, "cosine_mean": fidelity.mean,
                          "cosine_min": fidelity.min, **{
                              label: {"model": name, "backend": backend,
                                      "inference_ms_per_image": ms}
                              for label, name, backend, ms in rows}}))
        return EXIT_OK
    print(f"{'':10} {'model':40} {'backend':8} inference ms/image")
    for label, name, backend, ms in rows:
        print(f"{label:10} {name:40} {backend:8} {ms:.1f}")
    print(f"cosine of the compared vectors to the reference's, {fidelity.images} images: "
          f"mean {fidelity.mean:.6f}, min {fidelity.min:.6f}")
    return EXIT_OK


def _command_embedder(settings: Settings | None, model: Path | None) -> DinoEmbedder:
    """The configured backend and model (`model` overrides the file), else ONNX Runtime on
    `model` or the registry's, both with the daemon's imaging options."""
    return _config_embedder(settings, model, None) if settings else \
        DinoEmbedder(model, imaging=_daemon_imaging(None))


def _fp32_model(explicit: Path | None, settings: Settings | None, name: str,
                cache_dir: Path) -> Path:
    """The fp32 model a made model is measured against: `explicit`, else model.path, else
    the registry's verified `name` in `cache_dir`. Raises what models.resolve raises."""
    return explicit or (settings.model.path if settings else None) or \
        models.resolve(name, cache_dir=cache_dir)


def _images(folders: list[WatchSettings], count: int) -> list[Path]:
    """Up to `count` of the image files the watcher would report in `folders`, spread evenly
    over them. Raises OSError naming a folder that cannot be listed."""
    from dinowatch.bench import sample
    from dinowatch.watch import scan

    found: list[Path] = []
    for folder in folders:
        try:
            found += scan(folder)
        except OSError as err:
            raise OSError(f"cannot list {folder.path}: {err.strerror or err}") from err
    return sample(found, count)


def _daemon_imaging(settings: Settings | None) -> ImagingOptions:
    """The config's imaging options, else the daemon's defaults (the library's are the seed's)."""
    return (settings.imaging if settings else ImagingSettings()).options()


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    """`outbox list|retry|drop`: messages parked after the broker refused them."""
    from dinowatch.daemon import open_store
    from dinowatch.store import StoreError

    every = getattr(args, "all", False)
    seqs: list[int] = getattr(args, "seqs", [])
    if args.action != "list" and bool(seqs) == every:
        print(f"dinowatch outbox {args.action}: name the messages (SEQ…) or give --all",
              file=sys.stderr)
        return EXIT_USAGE
    if (missing := _no_database(settings)) is not None:
        return missing
    store = open_store(settings)
    try:
        if args.action == "list":
            _print_dead_letters([
                {"seq": d.seq, "topic": d.topic, "size": len(d.payload), "qos": d.qos,
                 "retain": d.retain, "attempts": d.attempts, "error": d.error,
                 "created_at": d.created_at, "parked_at": d.parked_at}
                for d in store.dead_letters()], as_json=args.json)
        elif args.action == "retry":
            moved = store.retry_dead_letters(None if every else seqs)
            for old, new in moved:
                print(f"{old} -> {new}")
            print(f"{len(moved)} messages back in the outbox (new seq shown); a running "
                  "daemon sends them within seconds", file=sys.stderr)
        else:
            dropped = store.drop_dead_letters(None if every else seqs)
            print(f"dropped {len(dropped)} messages"
                  + (f": {', '.join(map(str, dropped))}" if dropped else ""))
    except StoreError as err:  # NotParked names the seqs; a locked database
        return _fail(f"{err}; nothing changed")
    finally:
        store.close()
    return EXIT_OK


def _no_database(settings: Settings) -> int | None:
    """The exit code, said on stderr, when there is no database yet; else None."""
    from dinowatch.daemon import DATABASE_NAME

    if (settings.data_dir / DATABASE_NAME).exists():
        return None
    return _fail(f"no database in {settings.data_dir} yet: has dinowatch run?")


def _open_recorded(settings: Settings) -> tuple[DinoEmbedder, Store, Matcher] | int:
    """What `_open_stages` opens, from a database that must exist already."""

    if (missing := _no_database(settings)) is not None:
        return missing
    return _open_stages(settings)


def _open_stages(settings: Settings) -> tuple[DinoEmbedder, Store, Matcher] | int:
    """The model, the store and its match index, or an exit code (said on stderr)."""
    from dinowatch.daemon import open_embedder, open_matcher, open_store

    try:
        embedder = open_embedder(settings)
    except EMBED_ERRORS as err:
        return _fail(err)
    store = open_store(settings)
    return embedder, store, open_matcher(settings, store, embedder)


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    """`search IMAGE`: the nearest stored images and gallery references."""
    opened = _open_recorded(settings)
    if isinstance(opened, int):
        return opened
    embedder, store, matcher = opened
    try:
        vector = embedder.embed(args.image, normalize=settings.model.normalize)
    except EMBED_ERRORS as err:
        return _fail(err)
    finally:
        store.close()
        embedder.close()
    hits = matcher.search(vector, args.k)
    if args.json:
        print(json.dumps([search_fields(hit) for hit in hits], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not hits:
        print("nothing stored to compare with yet", file=sys.stderr)
    for hit in hits:
        print(f"{hit.score:.4f}  {hit.reference.label or '-':<16}  "
              f"{readable(hit.reference.path)}")
    return EXIT_OK


def cmd_gallery(args: argparse.Namespace, settings: Settings) -> int:
    """`gallery add|list|remove|rematch`: the labelled references."""
    gallery = settings.gallery_dir
    if args.action == "add":
        return _gallery_add(gallery, args.label, args.images, settings)
    if args.action == "remove":
        return _gallery_remove(gallery, args.label)
    opened = _open_recorded(settings)
    if isinstance(opened, int):
        return opened
    embedder, store, matcher = opened
    try:
        if args.action == "list":
            return _gallery_list(gallery, store, matcher, as_json=args.json)
        return _gallery_rematch(settings, embedder, store, matcher)
    finally:
        store.close()
        embedder.close()


def _gallery_add(gallery: Path, label: str, images: list[Path], settings: Settings) -> int:
    from dinowatch.match import GalleryError, add_reference

    options = settings.imaging.options()
    failed = 0
    for image in images:
        try:
            target = add_reference(gallery, label, image.read_bytes(), image.name, options)
        except GalleryError as err:
            return _fail(err)
        except (OSError, *EMBED_ERRORS) as err:
            failed += 1
            _fail(f"{readable(image)}: not added: {readable(str(err))}")
            continue
        print(f"{readable(image)} -> {readable(target)}")
    if failed < len(images):
        added = len(images) - failed
        print(f"{added} reference{'s' if added > 1 else ''} for {label!r} in "
              f"{readable(gallery / label)}; a running daemon embeds "
              f"{'them' if added > 1 else 'it'} within seconds", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _gallery_remove(gallery: Path, label: str) -> int:
    from dinowatch.match import GalleryError, check_label

    try:
        folder = gallery / check_label(label)
    except GalleryError as err:
        return _fail(err)
    if not folder.is_dir():
        return _fail(f"no label {label!r} (no folder {readable(folder)})")
    files = sum(1 for path in folder.rglob("*") if path.is_file())
    try:
        if folder.is_symlink():
            folder.unlink()  # the link, never what it points to
        else:
            shutil.rmtree(folder)
    except OSError as err:
        return _fail(f"{readable(folder)}: cannot remove: {err.strerror or err}")
    print(f"removed label {label!r} ({files} files); a running daemon withdraws it within "
          "seconds, else it does at its next start", file=sys.stderr)
    return EXIT_OK


def _gallery_list(gallery: Path, store: Store, matcher: Matcher, *, as_json: bool) -> int:
    from dinowatch.watch import matches

    embedded = matcher.labels()
    folders = sorted(p.name for p in gallery.iterdir() if p.is_dir()) if gallery.is_dir() else []
    watch = gallery_watch(gallery)  # the files the daemon takes as references (not label.yaml)
    rows = [{"label": label, "references": embedded.get(label, 0),
             "files": sum(1 for p in (gallery / label).rglob("*") if p.is_file()
                          and matches(p, watch)),
             "threshold": _first_set(matcher.label_threshold(label),
                                     matcher.settings.threshold)}
            for label in sorted(set(folders) | set(embedded))]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no labels yet: dinowatch gallery add LABEL IMAGE… (gallery: {gallery})")
    for row in rows:
        print(f"{row['label']}: {_count_of(row['references'], 'reference')} embedded, "
              f"{_count_of(row['files'], 'file')}, threshold {row['threshold']}")
    return EXIT_OK


def _count_of(number: object, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _first_set(value: float | None, default: float) -> float:
    return default if value is None else value


def _gallery_rematch(settings: Settings, embedder: DinoEmbedder, store: Store,
                     matcher: Matcher) -> int:
    """Match every stored image against today's gallery; only events not recorded before
    are recorded and published."""
    from dinowatch.daemon import build_messages

    messages = build_messages(settings, embedder)
    known = {(m.path, m.sha256, m.label) for m in store.matches() if m.kind == "gallery"}
    for reference in list(matcher.gallery):  # removed while the daemon was stopped
        if is_gone(reference):
            matcher.update(reference, None, None)
    found = 0
    for record in store.images("done"):
        vector = matcher.history.vector(record.path)
        if vector is None or record.sha256 is None or is_gone(record.path):
            continue
        events = [event for event in matcher.gallery_matches(record.path, record.sha256, vector)
                  if (event.path, event.sha256, event.label) not in known]
        if events:
            store.add_matches(events, messages.match(record, events, live=False)
                              if messages else [])
            found += len(events)
    print(f"{found} new match events"
          + (" in the outbox; a running daemon publishes them" if messages and found else ""))
    return EXIT_OK


def _print_dead_letters(rows: list[dict[str, object]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no parked messages")
        return
    columns = ("seq", "topic", "size", "attempts", "parked_at", "error")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns[:-1]) + "  ERROR")
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns[:-1])
              + f"  {row['error']}")


def _add_outbox_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                       config_help: str) -> None:
    outbox = commands.add_parser(
        "outbox", help="list, retry or drop messages parked after the broker refused them",
        description="Messages the broker refused (negative PUBACK), that ended the connection "
                    "on every attempt, or that are larger than it accepts are parked after "
                    "their retries; act on them here (see README, Reliability).")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="seq, topic, size, attempts, last error",
                                 description="The parked messages, oldest first.")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = actions.add_parser("retry", help="move them back to the outbox",
                               description="Move parked messages back to the end of the "
                                           "outbox, in the order of their original seq, with "
                                           "a fresh retry budget.")
    drop = actions.add_parser("drop", help="delete them", description="Delete parked messages.")
    for sub in (retry, drop):
        sub.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="as `list` shows")
        sub.add_argument("--all", action="store_true", help="every parked message")
    for sub in (listing, retry, drop):
        sub.add_argument("-c", "--config", type=Path, help=config_help)
        sub.set_defaults(handler=_with_settings(cmd_outbox))


def _count(text: str) -> int:
    """argparse type: a whole number of at least 1 (else a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinowatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dinowatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = "config file (default $DINOWATCH_CONFIG, else /etc/dinowatch/config.yaml)"
    run = commands.add_parser("run", help="the daemon (systemd's ExecStart)",
                              description="Watch, embed, record and publish until stopped.")
    check = commands.add_parser("check-config", help="validate the config: exit 0, or 78",
                                description="Validate the configuration; list every error.")
    index = commands.add_parser("index", help="backfill folders into the store",
                                description="Embed every image below DIR into the store and "
                                            "the outbox, with a progress bar.")
    index.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    index.add_argument("--source", help="source name in payloads (default: folder name)")
    status = commands.add_parser("status", help="counts, queue, outbox, last errors",
                                 description="What the store and the daemon report.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check_config)
    for sub, handler in ((run, cmd_run), (index, cmd_index), (status, cmd_status)):
        sub.set_defaults(handler=_with_settings(handler))
    for sub in (run, check, index, status):
        sub.add_argument("-c", "--config", type=Path, help=config_help)

    embed = commands.add_parser("embed", help="embed image files, print one JSON line each",
                                description="Embed image files with the seed's preprocessing.")
    embed.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    embed.add_argument("-c", "--config", type=Path,
                       help="use this config's model, model cache and imaging options "
                            "(default $DINOWATCH_CONFIG if set, else the library defaults)")
    embed.add_argument("--model", type=Path,
                       help="ONNX file (default: model.path, else the verified registry model)")
    embed.add_argument("--model-name", choices=sorted(models.REGISTRY),
                       help="registry entry (sets the expected width; default model.name, "
                            f"else {models.DEFAULT_MODEL})")
    embed.add_argument("--raw", action="store_true", help="do not L2-normalize")
    embed.add_argument("--format", choices=["json", "npy"], default="json",
                       help="json: {path, vector} per line; npy: one (N, D) array on stdout")
    embed.set_defaults(handler=_with_settings(cmd_embed, optional=True))

    model = commands.add_parser("model", help="fetch, describe, verify or quantize a model",
                                description="Model provisioning (see README, Models).")
    model.add_argument("action", choices=["fetch", "info", "verify", "quantize"])
    model.add_argument("name", nargs="?", metavar="NAME",
                       help=f"registry entry (default {models.DEFAULT_MODEL})")
    model.add_argument("--dir", type=Path, help="model cache (default $DINOWATCH_MODEL_DIR, "
                       "else data_dir/models with -c, else $XDG_CACHE_HOME/dinowatch/models)")
    model.add_argument("-c", "--config", type=Path,
                       help="use this config's data_dir, model.path, watched folders, backend "
                            f"and imaging options (default ${CONFIG_ENV} if set)")
    model.add_argument("--model", type=Path, help="quantize: the fp32 ONNX file to start from "
                       "(default model.path, else the verified registry model)")
    model.add_argument("--images", type=Path, action="append", metavar="DIR",
                       help="quantize: measure the fidelity on images in DIR (repeatable; "
                            "default: the watched folders)")
    model.add_argument("--sample", type=_count, default=32,
                       help="quantize: how many images (default 32)")
    model.set_defaults(handler=_with_settings(cmd_model, optional=True))

    bench = commands.add_parser("bench", help="images/s, latency and CPU floor on this device",
                                description="Measure the configured backend and model here.")
    bench.add_argument("-c", "--config", type=Path,
                       help=f"use this config's model, backend and imaging (default ${CONFIG_ENV}"
                            " if set)")
    bench.add_argument("--model", type=Path, help="ONNX file (default: the config's model)")
    bench.add_argument("--images", type=Path, metavar="DIR",
                       help="measure with images in DIR (default: generated 12 MP JPEGs)")
    bench.add_argument("--count", type=_count, default=24, help="how many images (default 24)")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(handler=_with_settings(cmd_bench, optional=True))

    backends = commands.add_parser(
        "backends", help="compare two backends or models: fidelity and speed",
        description="Embed your images with the configured backend and model and with a "
                    "reference (ONNX Runtime on the fp32 model); print the cosine of their "
                    "vectors and each one's inference time.")
    backends.add_argument("action", choices=["compare"])
    backends.add_argument("--images", type=Path, metavar="DIR", required=True,
                          help="your own pictures (recursively)")
    backends.add_argument("-c", "--config", type=Path,
                          help=f"the backend and model to check (default ${CONFIG_ENV} if set)")
    backends.add_argument("--model", type=Path,
                          help="ONNX file to check (default: the config's model)")
    backends.add_argument("--reference-model", type=Path,
                          help="the fp32 reference (default model.path, else the registry's "
                               f"{models.DEFAULT_MODEL})")
    backends.add_argument("--count", type=_count, default=32,
                          help="how many of the images, spread over the folder (default 32)")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.set_defaults(handler=_with_settings(cmd_backends, optional=True))
    _add_outbox_parser(commands, config_help)

    search = commands.add_parser("search", help="nearest stored images and gallery labels",
                                 description="Embed IMAGE and print the nearest stored images "
                                             "and gallery references: score, label, path.")
    search.add_argument("image", type=Path, metavar="IMAGE")
    search.add_argument("-k", type=_count, default=10, help="how many (default 10)")
    search.add_argument("--json", action="store_true", help="machine-readable output")
    search.add_argument("-c", "--config", type=Path, help=config_help)
    search.set_defaults(handler=_with_settings(cmd_search))
    _add_gallery_parser(commands, config_help)
    return parser


def _add_gallery_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        config_help: str) -> None:
    gallery = commands.add_parser(
        "gallery", help="add, list or remove labelled reference images",
        description="The gallery is <gallery_dir>/<label>/<image>, watched by the daemon.")
    actions = gallery.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="copy images into a label's folder",
                             description="Copy images into <gallery_dir>/LABEL/ (checked to "
                                         "decode first); the daemon embeds them.")
    add.add_argument("label", metavar="LABEL")
    add.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    listing = actions.add_parser("list", help="labels, references, thresholds",
                                 description="Each label with its references and threshold.")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = actions.add_parser("remove", help="delete a label's folder",
                                description="Delete <gallery_dir>/LABEL; the daemon withdraws "
                                            "its references.")
    remove.add_argument("label", metavar="LABEL")
    rematch = actions.add_parser("rematch", help="match stored images against the gallery",
                                 description="Match every stored image against the gallery as "
                                             "it is now; new match events are recorded and "
                                             "published.")
    for sub in (add, listing, remove, rematch):
        sub.add_argument("-c", "--config", type=Path, help=config_help)
        sub.set_defaults(handler=_with_settings(cmd_gallery))


# A reader that went away (`dinowatch status | head -1`): what a tool killed by SIGPIPE
# reports in the shell (128 + 13), so `set -o pipefail` scripts see the usual value.
EXIT_CLOSED_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
            _configure_logging("DEBUG" if args.verbose else "WARNING")
            handler: Callable[[argparse.Namespace], int] = args.handler
            return handler(args)
        finally:
            sys.stdout.flush()  # so a closed pipe shows here, not at exit as a traceback
    except BrokenPipeError:
        # Stop writing, quietly. Anything still buffered goes to /dev/null, so the flush at
        # interpreter exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLOSED_PIPE


if __name__ == "__main__":
    sys.exit(main())
