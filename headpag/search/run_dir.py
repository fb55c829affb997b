"""The HeadHunter run directory: the one module that writes and reads its format.

A run directory holds:

- ``settings.json``: ``{"format": "headpag-hunt", "version": 1, "model_class": str, "heads_per_layer": [int, ...],
  "layer_names": [str, ...], "prompts", "seeds", "k", "rounds", "candidates", "init", "scale", "u", "mode",
  "guidance_scale", "num_inference_steps", "strategy", "objective"}``; a rerun with other settings is refused
  (batch size and world size are not settings);
- ``records-rank{R}.jsonl``: one JSON line per finished candidate evaluation, ``{"round": 1, "selected": [[layer,
  head], ...] (the set before the round), "candidate": [layer, head], "pairs": [...], "scores": [...], "mean":
  float, "seconds": float}``, flushed and fsynced; a truncated last line (a crash while writing) is ignored by
  readers and cut before the next append;
- ``thumbs/L{layer}_H{head}.png``: the candidate's first image in round 1 (may be missing for some heads);
- at the end ``heads.json`` (a HeadSet file) and ``summary.json`` (``{"heads": [[layer, head, u], ...], "rounds":
  [...], "timings", "images_generated", "images_exact"}``), written atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..archs import list_layers, model_class_name

__all__ = [
    "RecordWriter", "chosen_in_round", "final_heads", "merged_scores", "parse_head", "parse_heads", "prepare",
    "read_records", "read_settings", "save_thumbnail", "settings_record", "state_key", "summary_record", "thumbnail_path",
    "write_atomic", "write_results",
]

_RECORDS = re.compile(r"^records-rank(\d+)\.jsonl$")
_HEAD_STR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@.*)?$")
_REQUIRED = ("round", "candidate", "mean")

#: A head as ``(layer, head)``.
Head = tuple[int, int]


def settings_record(pipe, prompts, seeds, k, rounds, candidates, init, scale, u, mode, guidance_scale,
                    num_inference_steps, strategy, objective) -> dict:
    """The ``settings.json`` of a search: the model's shape and every setting that changes the result."""
    layers = list_layers(pipe)
    return {
        "format": "headpag-hunt", "version": 1,
        "model_class": model_class_name(pipe),
        "heads_per_layer": [layer.heads for layer in layers],
        "layer_names": [layer.name for layer in layers],
        "prompts": list(prompts), "seeds": list(seeds), "k": k, "rounds": rounds,
        "candidates": [list(h) for h in candidates], "init": [[l, h, c] for l, h, c in init] if init else [],
        "scale": scale, "u": u, "mode": mode, "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps, "strategy": strategy,
        "objective": getattr(objective, "name", getattr(objective, "__name__", type(objective).__name__)),
    }


def write_atomic(path: Path, text: str) -> None:
    """Writes ``path`` through a fsynced temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(out_dir: Path, settings: dict, rank: int) -> None:
    """Creates ``out_dir`` and its ``thumbs/``; writes ``settings.json`` (rank 0) or refuses a directory written with
    other settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "settings.json"
    if path.exists():
        existing = json.loads(path.read_text())
        diff = sorted(key for key in set(existing) | set(settings) if existing.get(key) != settings.get(key))
        if diff:
            raise ValueError(
                f"run directory {out_dir} was written with other search settings (differing: {', '.join(diff)}); use a "
                f"new out_dir or the original settings"
            )
    elif rank == 0:
        write_atomic(path, json.dumps(settings, indent=1))
    (out_dir / "thumbs").mkdir(exist_ok=True)


def _drop_partial_line(path: Path) -> None:
    """Cuts a half-written last line (a run interrupted mid-write) so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def state_key(selected: Sequence[Head]) -> str:
    """The selected set before a round as a record key, e.g. ``"2:0,4:1"``."""
    return ",".join(f"{l}:{h}" for l, h in sorted(selected))


def _record_files(run_dir: Path) -> list[Path]:
    """``records-rank{R}.jsonl`` files of ``run_dir``, in rank order (rank 10 after rank 2)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _RECORDS.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _parse_line(raw: bytes) -> dict:
    """One record from one line; ValueError (with the reason) if it is not a JSON object with the needed keys."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    return rec


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """All complete records of all ranks (``records-rank0.jsonl``, ``records-rank1.jsonl``, ...), file by file.

    Blank lines are skipped; so is a malformed *last* line of a file (a write cut short by a crash). A malformed
    line anywhere else raises ValueError naming the file and the 1-based line number. A run directory without
    records files gives ``[]``.
    """
    run_dir = Path(run_dir)
    records: list[dict] = []
    for path in _record_files(run_dir):
        lines = [(i, raw) for i, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
        for n, (lineno, raw) in enumerate(lines):
            try:
                records.append(_parse_line(raw))
            except ValueError as e:
                if n == len(lines) - 1:
                    break  # truncated trailing line
                raise ValueError(f"{path} line {lineno}: malformed record: {e}") from None
    return records


def read_settings(run_dir: str | os.PathLike) -> dict:
    """``settings.json`` of a run directory, with ``heads_per_layer`` checked."""
    run_dir = Path(run_dir)
    path = run_dir / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a HeadHunter run directory?")
    settings = json.loads(path.read_text())
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


def merged_scores(run_dir, round_: int, state: str, scores: dict) -> dict:
    """``scores`` updated with every rank's records of round ``round_`` from state ``state`` (distributed runs
    exchange their scores through the run directory)."""
    merged = {h: dict(v) for h, v in scores.items()}
    for rec in read_records(run_dir):
        if rec["round"] == round_ and state_key([tuple(h) for h in rec["selected"]]) == state:
            head = tuple(rec["candidate"])
            if head in merged:
                merged[head].update(dict(zip(rec["pairs"], rec["scores"])))
    return merged


def thumbnail_path(run_dir: Path, head: Head) -> Path:
    """Where a candidate's first round-1 image is kept."""
    return Path(run_dir) / "thumbs" / f"L{head[0]}_H{head[1]}.png"


def save_thumbnail(image, path: Path, size: int = 64) -> None:
    """Writes ``image`` (float ``(3, H, W)`` in [0, 1]) as a ``size`` x ``size`` PNG."""
    import numpy as np
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((size, size)).save(path)


class RecordWriter:
    """Appends records to ``records-rank{rank}.jsonl`` of a run directory, one fsynced JSON line each."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / f"records-rank{rank}.jsonl"
        self._file = None

    def write(self, entry: dict) -> None:
        if self._file is None:
            _drop_partial_line(self.path)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(entry) + "\n")
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
    heads.save(Path(run_dir) / "heads.json", model=model)
    write_atomic(Path(run_dir) / "summary.json", json.dumps(summary, indent=1))
