"""The HeadHunter run directory: the one module that writes and reads its format.

A run directory holds:

- ``settings.json``: ``{"format": "headpag-hunt", "version": 2, "model_class": str, "heads_per_layer": [int, ...],
  "layer_names": [str, ...], "pipeline_class", "components", "prompts", "seeds", "k", "rounds", "candidates",
  "init", "scale", "u", "mode", "guidance_scale", "num_inference_steps", "pipeline_kwargs", "execution",
  "strategy", "objective", "encode"}``: everything that determines a record (:func:`settings_record`).
  ``components`` names every component of the pipeline: for a model its class, dtype and weights fingerprint
  (:func:`module_fingerprint`), for the scheduler its class and config, for others (tokenizers) the class. A rerun
  whose settings differ in anything is refused, naming what differs (batch size, world size and the device are not
  settings: they change float rounding only). A directory of format version 1 (which did not record the weights,
  dtype or pipeline arguments) is refused for resuming; :mod:`headpag.search.atlas` still draws it;
- ``records-rank{R}.jsonl``: one JSON line per finished candidate evaluation, ``{"round": 1, "selected": [[layer,
  head], ...] (the set before the round), "candidate": [layer, head], "pairs": [...], "scores": [...], "mean":
  float, "seconds": float, "settings_id": str}``, flushed and fsynced. ``settings_id`` (:func:`settings_id`, a hash
  of the settings) binds the record to the settings that produced it: a resume reuses only records of its own
  settings, also when ``settings.json`` was deleted or replaced. Every record is validated on read (types, keys,
  finite scores, ``mean`` the mean of ``scores``); an invalid one raises ``ValueError`` naming the file and line.
  The one exception is an unparseable *last* line (a write cut short by a crash): readers skip it and the next hunt
  of that rank cuts it (:func:`repair_records`, with a warning), so that appending never buries it mid-file;
- ``lock-rank{R}``: held (``flock``) by the hunt writing rank R's records, with its pid, host and start time; a second
  hunt of the same rank fails at once (:class:`RunDirectoryBusy`). The kernel drops the lock of a process that dies,
  so a killed hunt's lock is taken over by the next one. The file stays (harmless) after the hunt;
- ``thumbs/L{layer}_H{head}.png``: the candidate's first image in round 1 (may be missing for some heads);
- at the end ``heads.json`` (a HeadSet file) and ``summary.json`` (``{"heads": [[layer, head, u], ...], "rounds":
  [...], "timings", "images_generated", "images_exact"}``).

``settings.json``, ``heads.json``, ``summary.json`` and the thumbnails are written atomically (a uniquely named,
fsynced temporary file in the directory, then ``os.replace``): a reader sees the old or the new file, never a torn
one, and concurrent writers never share a temporary file.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
import os
import re
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ..archs import list_layers, model_class_name, named_denoisers

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = [
    "FORMAT", "VERSION", "RecordWriter", "RunDirectoryBusy", "RunLock", "check_settings", "chosen_in_round",
    "final_heads", "merged_scores", "module_fingerprint", "parse_head", "parse_heads", "pipeline_components",
    "prepare", "read_records", "read_settings", "repair_records", "save_thumbnail", "settings_id",
    "settings_record", "state_key", "summary_record", "thumbnail_path", "write_atomic", "write_results",
]

FORMAT = "headpag-hunt"
#: Version 2 binds records to the settings (weights, dtype, pipeline arguments, ...); version 1 did not.
VERSION = 2

_RECORDS = re.compile(r"^records-rank(\d+)\.jsonl$")
_HEAD_STR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@.*)?$")
_REQUIRED = ("round", "candidate", "mean")
_RESUME_REQUIRED = ("selected", "pairs", "scores", "settings_id")
_FRESH = "use a new out_dir (headpag hunt --out) for a fresh run, or delete {dir} to start over"

#: Elements of each tensor whose bytes go into a weights fingerprint (evenly spaced, first and last included).
FINGERPRINT_SAMPLES = 256

#: A head as ``(layer, head)``.
Head = tuple[int, int]


# --- what determines a record ---------------------------------------------------------------------------------------

def module_fingerprint(module, samples: int = FINGERPRINT_SAMPLES) -> str:
    """A content fingerprint of a model's weights, cheap enough for a 12B-parameter model: ``"sha256:<hex>"``.

    Hashed: the class, the config (keys not starting with ``_``), and for every entry of ``state_dict()`` (in
    order) its name, shape and dtype and the bytes of ``samples`` evenly spaced elements (the first and the last
    included). The samples are gathered where the tensors live and copied to the host in one transfer per device,
    so the cost is a few kernel launches per tensor, not a pass over the weights; the result does not depend on the
    device. What it catches: other weights (another checkpoint, a fine-tune, a fused LoRA: they change every element
    of the tensors they touch), another dtype, another shape or config. What it misses: a change confined to
    elements that are not sampled (e.g. one edited weight). Tensors on the meta device (sequential CPU offload)
    contribute their name, shape and dtype only.
    """
    import torch

    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    config = getattr(module, "config", None)
    if config is not None:
        try:
            items = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        except (TypeError, ValueError):
            items = {}
        h.update(json.dumps(_jsonable(items), sort_keys=True).encode())
    chunks: list[tuple[Any, Any]] = []  # (device, uint8 tensor) per tensor read, in state_dict order
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):
                h.update(f"{name}|{type(t).__name__}\n".encode())
                continue
            t = t.detach()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
            if t.device.type == "meta" or t.numel() == 0:
                chunks.append((None, None))
                continue
            try:
                flat = t.reshape(-1)
                n = flat.numel()
                if n > samples:
                    idx = torch.arange(samples, dtype=torch.int64) * (n - 1) // (samples - 1)
                    flat = flat[idx.to(flat.device)]
                chunks.append((flat.device, flat.contiguous().view(torch.uint8).reshape(-1)))
            except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass that cannot be read so
                chunks.append((None, None))
        by_device: dict[Any, list] = {}
        for device, data in chunks:
            if device is not None:
                by_device.setdefault(device, []).append(data)
        host = {device: iter(torch.cat(parts).cpu().split([p.numel() for p in parts]))
                for device, parts in by_device.items()}
        for device, _ in chunks:
            h.update(b"-" if device is None else next(host[device]).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _module_dtype(module) -> str:
    """The floating dtypes of a model's parameters and buffers, e.g. ``"torch.float32"`` (several joined by ``,``)."""
    dtypes = sorted({str(t.dtype) for t in module.state_dict(keep_vars=True).values()
                     if getattr(t, "is_floating_point", lambda: False)()})
    return ",".join(dtypes) or "none"


def pipeline_components(pipe) -> dict:
    """What the components of ``pipe`` are (part of ``settings.json``): for each model (``torch.nn.Module``) its
    class, dtype and :func:`module_fingerprint`; for the scheduler (anything with a ``config`` that is no model) its
    class and config; for the rest (tokenizers, processors) the class; None for an absent component."""
    import torch

    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = dict(named_denoisers(pipe))
    out = {}
    for name in sorted(components):
        value = components[name]
        if value is None:
            out[name] = None
        elif isinstance(value, torch.nn.Module):
            out[name] = {"class": type(value).__name__, "dtype": _module_dtype(value),
                         "weights": module_fingerprint(value)}
        elif getattr(value, "config", None) is not None and not isinstance(value, (str, bytes)):
            config = {k: v for k, v in dict(value.config).items() if not str(k).startswith("_")}
            out[name] = {"class": type(value).__name__, "config": _jsonable(config)}
        else:
            out[name] = {"class": type(value).__name__}
    return out


def _jsonable(x: Any) -> Any:
    """``x`` as JSON data that changes when ``x`` does: numbers, strings, lists and dicts as they are; a tensor or
    array as its shape, dtype and the sha256 of its bytes; a PIL image as its size, mode and bytes' sha256; a
    callable as its module and name; anything else as its type (documented as recorded by type only)."""
    import numpy as np
    import torch

    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.generic,)):
        return _jsonable(x.item())
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else ""
        return {"tensor": list(t.shape), "dtype": str(t.dtype), "sha256": digest}
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        return {"array": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    if hasattr(x, "tobytes") and hasattr(x, "mode") and hasattr(x, "size"):  # PIL image
        return {"image": list(x.size), "mode": x.mode, "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    if callable(x) and hasattr(x, "__name__"):
        return f"{getattr(x, '__module__', None)}.{getattr(x, '__qualname__', x.__name__)}"
    return f"<{type(x).__module__}.{type(x).__qualname__}>"


def settings_record(pipe, prompts, seeds, k, rounds, candidates, init, scale, u, mode, guidance_scale,
                    num_inference_steps, strategy, objective, pipeline_kwargs=None, execution="fused",
                    encode=None, refresh=1) -> dict:
    """The ``settings.json`` of a search: the model's shape and components and every setting that changes a record.
    ``objective`` and ``encode`` are recorded by their identity (:func:`headpag.search.objectives.objective_identity`:
    a ``name`` or ``identity()`` of the objective, else its module and name); ``refresh`` only when it is not 1, so
    that run directories written before it existed keep their settings."""
    from .objectives import objective_identity

    layers = list_layers(pipe)
    record = {
        "format": FORMAT, "version": VERSION,
        "model_class": model_class_name(pipe),
        "heads_per_layer": [layer.heads for layer in layers],
        "layer_names": [layer.name for layer in layers],
        "pipeline_class": type(pipe).__name__,
        "components": pipeline_components(pipe),
        "prompts": list(prompts), "seeds": list(seeds), "k": k, "rounds": rounds,
        "candidates": [list(h) for h in candidates], "init": [[l, h, c] for l, h, c in init] if init else [],
        "scale": float(scale), "u": float(u), "mode": mode,
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "num_inference_steps": num_inference_steps,
        "pipeline_kwargs": _jsonable(dict(pipeline_kwargs or {})),
        "execution": execution, "strategy": strategy,
        "objective": objective_identity(objective),
        "encode": None if encode is None else objective_identity(encode),
    }
    if refresh != 1:
        record["refresh"] = refresh
    return record


def _canonical(x: Any) -> str:
    return json.dumps(x, sort_keys=True, allow_nan=True)


def settings_id(settings: dict) -> str:
    """The hash of ``settings`` written into every record (16 hex digits of the sha256 of its canonical JSON)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` of every leaf where ``old`` and ``new`` differ (dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if _canonical(old) == _canonical(new) else [(prefix.rstrip("."), old, new)]


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a damaged HeadHunter run directory file") from None


def check_settings(out_dir: Path, settings: dict) -> bool:
    """Refuses (``ValueError``) a run directory whose ``settings.json`` differs from ``settings`` (naming every
    difference, recorded and current value) or is of another format version; True when it matches, False when the
    directory has no ``settings.json``."""
    out_dir = Path(out_dir)
    path = out_dir / "settings.json"
    if not path.exists():
        return False
    existing = _load_json(path)
    fresh = _FRESH.format(dir=out_dir)
    if not isinstance(existing, dict) or existing.get("format") != FORMAT:
        raise ValueError(f"{path} is not the settings of a HeadHunter run directory (no \"format\": \"{FORMAT}\"): "
                         f"{fresh}")
    if existing.get("version") != VERSION:
        raise ValueError(
            f"run directory {out_dir} was written in run-directory format version {existing.get('version')!r}; this "
            f"headpag resumes version {VERSION} only (version 1 did not bind records to the model weights, dtype and "
            f"pipeline arguments, so its records cannot be reused safely; headpag atlas still draws it): {fresh}"
        )
    diff = _differences(existing, settings)
    if diff:
        lines = "\n".join(f"  {key}: recorded {_short(old)}, now {_short(new)}" for key, old, new in diff)
        raise ValueError(
            f"run directory {out_dir} was written with other search settings (differing: "
            f"{', '.join(key for key, _, _ in diff)}):\n{lines}\n"
            f"Its records were produced under the recorded settings and are never reused under others: {fresh}, or "
            f"rerun with the recorded settings."
        )
    return True


def prepare(out_dir: Path, settings: dict, rank: int) -> None:
    """Creates ``out_dir`` and its ``thumbs/``; refuses a directory written with other settings
    (:func:`check_settings`), else writes ``settings.json`` when it is missing (rank 0)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not check_settings(out_dir, settings) and rank == 0:
        write_atomic(out_dir / "settings.json", json.dumps(settings, indent=1))
    (out_dir / "thumbs").mkdir(exist_ok=True)


# --- atomic writes, the lock ----------------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (best effort: not every file system supports it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a new uniquely named temporary file next to ``path``, fsync it, rename it over ``path``;
    on any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserve the name (umask applies)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, text: str) -> None:
    """Writes ``path`` through a uniquely named fsynced temporary file and a rename: readers see the old or the new
    file, and concurrent writers do not collide."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _replace_atomically(path, write)


class RunDirectoryBusy(RuntimeError):
    """Another hunt holds the run directory's lock of this rank."""


class RunLock:
    """The lock of one rank of a run directory: ``lock-rank{rank}``, held with ``flock`` while a hunt writes.

    The kernel drops a ``flock`` when its process dies, so the lock of a killed hunt is free for the next one (a
    warning names the previous holder, which ended without releasing it). On a system without ``fcntl`` (not POSIX)
    nothing is locked (a warning says so)."""

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"lock-rank{rank}"
        self.rank = rank
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:  # pragma: no cover - not POSIX
            warnings.warn(f"no fcntl on this system: {self.run_dir} is not locked against a second hunt", stacklevel=3)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryBusy(
                f"run directory {self.run_dir} is in use by another hunt ({holder}; rank {self.rank} lock "
                f"{self.path}): wait for it to finish, stop it, or use another out_dir"
            ) from None
        previous = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
        if previous:
            warnings.warn(f"{self.path}: taking over the lock of a hunt that ended without releasing it ({previous})",
                          stacklevel=3)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean release leaves an empty file
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# --- records --------------------------------------------------------------------------------------------------------

def state_key(selected: Sequence[Head]) -> str:
    """The selected set before a round as a record key, e.g. ``"2:0,4:1"``."""
    return ",".join(f"{l}:{h}" for l, h in sorted(selected))


def _record_files(run_dir: Path) -> list[Path]:
    """``records-rank{R}.jsonl`` files of ``run_dir``, in rank order (rank 10 after rank 2)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _RECORDS.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_head(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_int(v) for v in x)


def _check_record(rec: Any, resume: bool) -> None:
    """ValueError (the reason) unless ``rec`` is a valid record; ``resume`` also requires what a resume reuses."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED + (_RESUME_REQUIRED if resume else ()) if k not in rec]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    if not _is_int(rec["round"], 1):
        raise ValueError(f"'round' must be an int >= 1, got {rec['round']!r}")
    if not _is_head(rec["candidate"]):
        raise ValueError(f"'candidate' must be [layer, head] (ints >= 0), got {_short(rec['candidate'])}")
    if "selected" in rec and not (isinstance(rec["selected"], list) and all(map(_is_head, rec["selected"]))):
        raise ValueError(f"'selected' must be a list of [layer, head], got {_short(rec['selected'])}")
    mean = rec["mean"]
    if not _is_number(mean) or not math.isfinite(mean):
        raise ValueError(f"'mean' must be a finite number, got {mean!r}")
    pairs, scores = rec.get("pairs"), rec.get("scores")
    if pairs is not None and not (isinstance(pairs, list) and all(_is_int(p) for p in pairs)
                                  and len(set(pairs)) == len(pairs)):
        raise ValueError(f"'pairs' must be a list of distinct ints >= 0, got {_short(pairs)}")
    if scores is not None:
        if not isinstance(scores, list) or not all(_is_number(v) for v in scores):
            raise ValueError(f"'scores' must be a list of numbers, got {_short(scores)}")
        bad = [v for v in scores if not math.isfinite(v)]
        if bad:
            raise ValueError(f"'scores' must be finite, got {bad[0]!r}")
        if pairs is not None and len(pairs) != len(scores):
            raise ValueError(f"'scores' has {len(scores)} entries for {len(pairs)} 'pairs'")
        if not scores:
            raise ValueError("'scores' is empty")
        if not math.isclose(mean, math.fsum(scores) / len(scores), rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"'mean' {mean!r} is not the mean of 'scores' ({math.fsum(scores) / len(scores)!r})")
    if "seconds" in rec and not (_is_number(rec["seconds"]) and math.isfinite(rec["seconds"])):
        raise ValueError(f"'seconds' must be a finite number, got {rec['seconds']!r}")
    if "settings_id" in rec and not isinstance(rec["settings_id"], str):
        raise ValueError(f"'settings_id' must be a string, got {rec['settings_id']!r}")


def _parse_json(raw: bytes) -> Any:
    """The JSON value of one line; ValueError when it is not JSON (a line cut short)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None


def _lines(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(1-based line number, byte offset, text)`` of every non-blank line."""
    out, offset = [], 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            out.append((lineno, offset, raw))
        offset += len(raw) + 1
    return out


def read_records(run_dir: str | os.PathLike, settings_id: str | None = None) -> list[dict]:
    """All complete records of all ranks (``records-rank0.jsonl``, ``records-rank1.jsonl``, ...), file by file.

    Every record is validated (types, keys, finite scores, ``mean`` the mean of ``scores``); an invalid one raises
    ``ValueError`` naming the file and the 1-based line number. Blank lines are skipped; so is an unparseable *last*
    line of a file (a write cut short by a crash; :func:`repair_records` cuts it). With ``settings_id`` (a resume),
    records must also hold what a resume reuses (``selected``, ``pairs``, ``scores``) and carry that settings id: a
    record of other settings is refused, never reused. A run directory without records files gives ``[]``.
    """
    run_dir = Path(run_dir)
    records: list[dict] = []
    for path in _record_files(run_dir):
        lines = _lines(path.read_bytes())
        for n, (lineno, _, raw) in enumerate(lines):
            try:
                rec = _parse_json(raw)
            except ValueError as e:
                if n == len(lines) - 1:
                    break  # truncated trailing line
                raise ValueError(f"{path} line {lineno}: malformed record: {e}") from None
            try:
                _check_record(rec, resume=settings_id is not None)
            except ValueError as e:
                raise ValueError(f"{path} line {lineno}: invalid record: {e}") from None
            if settings_id is not None and rec["settings_id"] != settings_id:
                raise ValueError(
                    f"{path} line {lineno}: record produced under other settings (settings id "
                    f"{rec['settings_id']!r}, this run's {settings_id!r}; was settings.json deleted or replaced?). "
                    f"Records are reused only under the settings that produced them: rerun with those settings, or "
                    f"{_FRESH.format(dir=run_dir)}"
                )
            records.append(rec)
    return records


def repair_records(run_dir: str | os.PathLike, rank: int) -> None:
    """Cuts an unparseable last line of ``records-rank{rank}.jsonl`` (a write cut short by a crash, with or without
    a newline after it), with a warning naming the file and the line, so that the next append starts on a fresh
    line and no bad line ever ends up mid-file; a complete last record without its newline gets one. Call it only
    while holding that rank's :class:`RunLock`."""
    path = Path(run_dir) / f"records-rank{rank}.jsonl"
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = _lines(data)
    if lines:
        lineno, offset, raw = lines[-1]
        try:
            _parse_json(raw)
        except ValueError:
            warnings.warn(f"{path} line {lineno}: cut an incomplete record ({len(data) - offset} bytes, a write "
                          f"interrupted by a crash); that evaluation is done again", stacklevel=3)
            with open(path, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
            return
    if data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def read_settings(run_dir: str | os.PathLike) -> dict:
    """``settings.json`` of a run directory, with ``heads_per_layer`` checked."""
    run_dir = Path(run_dir)
    path = run_dir / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a HeadHunter run directory?")
    settings = _load_json(path)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    hpl = settings.get("heads_per_layer")
    if not isinstance(hpl, list) or not all(isinstance(n, int) and n >= 0 for n in hpl):
        raise ValueError(f"{path}: 'heads_per_layer' must be a list of non-negative ints, got {hpl!r}")
    return settings


def parse_head(x: Any) -> Head | None:
    """``(layer, head)`` from ``[layer, head, ...]``, ``{"layer": .., "head": ..}`` or ``"12:3[@u]"``; else None."""
    if isinstance(x, str):
        m = _HEAD_STR.match(x)
        return (int(m.group(1)), int(m.group(2))) if m else None
    if isinstance(x, dict):
        x = [x.get("layer"), x.get("head")]
    if isinstance(x, (list, tuple)) and len(x) >= 2:
        layer, head = x[0], x[1]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (layer, head)):
            return (layer, head)
    return None


def parse_heads(items: Any) -> set[Head]:
    return {h for h in map(parse_head, items or ()) if h is not None}


def final_heads(run_dir: Path) -> set[Head] | None:
    """The run's final selection from ``summary.json`` (keys ``heads``/``entries``/``selected``), or None."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    for key in ("heads", "entries", "selected"):
        value = summary.get(key)
        if isinstance(value, dict):  # a HeadSet file stored inline
            value = value.get("entries")
        if isinstance(value, list):
            return parse_heads(value)
    return None


def chosen_in_round(run_dir: Path, records: list[dict], rnd: int) -> set[Head] | None:
    """Heads the search added in round ``rnd``: in round ``rnd+1``'s ``selected`` but not in round ``rnd``'s (for
    the last round with records, ``summary.json``'s heads instead of round ``rnd+1``'s). None if unknown."""
    this = [r for r in records if r.get("round") == rnd]
    if not this:
        return None
    before = parse_heads(this[0].get("selected"))
    after_recs = [r for r in records if r.get("round") == rnd + 1]
    if after_recs:
        after = parse_heads(after_recs[0].get("selected"))
    elif rnd == max(r.get("round", 0) for r in records):
        after = final_heads(run_dir)
        if after is None:
            return None
    else:
        return None
    return after - before


def merged_scores(run_dir, round_: int, state: str, scores: dict, settings_id: str | None = None) -> dict:
    """``scores`` updated with every rank's records of round ``round_`` from state ``state`` (distributed runs
    exchange their scores through the run directory); with ``settings_id``, records of other settings raise."""
    merged = {h: dict(v) for h, v in scores.items()}
    for rec in read_records(run_dir, settings_id):
        if rec["round"] == round_ and state_key([tuple(h) for h in rec["selected"]]) == state:
            head = tuple(rec["candidate"])
            if head in merged:
                merged[head].update(dict(zip(rec["pairs"], rec["scores"])))
    return merged


def thumbnail_path(run_dir: Path, head: Head) -> Path:
    """Where a candidate's first round-1 image is kept."""
    return Path(run_dir) / "thumbs" / f"L{head[0]}_H{head[1]}.png"


def save_thumbnail(image, path: Path, size: int = 64) -> None:
    """Writes ``image`` (float ``(3, H, W)`` in [0, 1]) as a ``size`` x ``size`` PNG (atomically)."""
    import numpy as np
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    thumb = Image.fromarray(arr).resize((size, size))
    _replace_atomically(Path(path), lambda tmp: thumb.save(tmp, format="PNG"))


class RecordWriter:
    """Appends records to ``records-rank{rank}.jsonl`` of a run directory, one fsynced JSON line each, every one
    carrying ``settings_id``. The writer holds the rank's :class:`RunLock` and has called :func:`repair_records`
    first; a record that would not pass the readers' check (e.g. a NaN score) raises before anything is written."""

    def __init__(self, run_dir: Path, rank: int, settings_id: str):
        self.path = Path(run_dir) / f"records-rank{rank}.jsonl"
        self.settings_id = settings_id
        self._file = None

    def write(self, entry: dict) -> None:
        entry = {**entry, "settings_id": self.settings_id}
        _check_record(entry, resume=True)
        line = json.dumps(entry, allow_nan=False) + "\n"
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def summary_record(result) -> dict:
    """``summary.json`` of a finished search (a :class:`headpag.search.hunter.HuntResult`)."""
    return {
        "heads": [[l, h, u] for l, h, u in result.heads],
        "rounds": [
            {"round": r.round, "selected_before": [list(h) for h in r.selected_before],
             "added": [list(h) for h in r.added],
             "means": {f"{l}:{h}": m for (l, h), m in sorted(r.means.items())}}
            for r in result.rounds
        ],
        "timings": result.timings,
        "images_generated": result.images_generated,
        "images_exact": result.images_exact,
    }


def write_results(run_dir: Path, heads, summary: dict, model) -> None:
    """The final ``heads.json`` (``heads.save``) and ``summary.json``, both atomic."""
    _replace_atomically(Path(run_dir) / "heads.json", lambda tmp: heads.save(tmp, model=model))
    write_atomic(Path(run_dir) / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
