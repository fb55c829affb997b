"""The run directory never reuses stale work and never loses work (issue 13, items 7-11).

7. records are bound to everything that determines them (weights, dtype, pipeline arguments, objective, ...);
8. every record is validated on read (the error names the file and the line);
9. a malformed last line is cut on the first resume, so that later appends never bury it mid-file;
10. one writer per rank (a lock; a dead holder's lock is taken over), unique temporary names, atomic heads.json;
11. ``hunt`` gives back a patch the user had enabled on the pipeline, also when it fails.

The model is the tiny SD3 pipeline of tests/support; the objective is mean brightness.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import headpag
from headpag.search import hunt
from headpag.search import run_dir as runs
from headpag.search.objectives import Weighted
from support import models
from support.hunting import PROMPTS, brightness, encode

COMMON = dict(seeds=(0,), num_inference_steps=2, encode=encode, pipeline_kwargs=dict(height=16, width=16),
              verbose=False, k=1, rounds=1, candidates="0:0,1:1", batch_size=2)


@pytest.fixture(scope="module")
def pipe():
    return models.sd3(num_layers=3)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().split("\n") if line.strip()]


# ----------------------------------------------------------------------------------------------- 7: binding


def test_resume_refuses_other_weights(pipe, tmp_path):
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    param = pipe.transformer.transformer_blocks[1].attn.to_q.weight
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.mul_(1.01)  # a fine-tune: every element changes
        with pytest.raises(ValueError, match=r"(?s)other search settings.*weights.*new out_dir"):
            hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    # The original weights resume: nothing to generate.
    assert hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON).images_generated == 0


def test_resume_refuses_another_dtype(tmp_path):
    pipe = models.sd3(num_layers=3)
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    pipe.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"(?s)other search settings.*dtype.*torch\.float32.*torch\.bfloat16"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)


def test_resume_refuses_other_pipeline_kwargs_and_objective(pipe, tmp_path):
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    with pytest.raises(ValueError, match=r"other search settings.*pipeline_kwargs"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **{**COMMON, "pipeline_kwargs": dict(height=16, width=24)})
    with pytest.raises(ValueError, match=r"other search settings.*execution"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, execution="eager", **COMMON)
    # Two weighted sums of the same callable, with other weights, are other objectives.
    other = tmp_path / "weighted"
    hunt(pipe, Weighted([(1.0, brightness)]), PROMPTS, out_dir=other, **COMMON)
    with pytest.raises(ValueError, match=r"other search settings.*objective"):
        hunt(pipe, Weighted([(-1.0, brightness)]), PROMPTS, out_dir=other, **COMMON)


def test_records_without_settings_json_are_not_reused_under_other_settings(pipe, tmp_path):
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    (tmp_path / "settings.json").unlink()
    with pytest.raises(ValueError, match=r"(?s)records-rank0\.jsonl line 1.*other settings"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **{**COMMON, "num_inference_steps": 3})
    # Under the settings that produced them they are reused (and settings.json is written again).
    assert hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON).images_generated == 0
    assert (tmp_path / "settings.json").is_file()


def test_a_run_directory_of_format_version_1_is_refused(pipe, tmp_path):
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    settings = json.loads((tmp_path / "settings.json").read_text())
    settings["version"] = 1
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"version 1.*fresh"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)


def test_weights_fingerprint():
    a, b = models.sd3(num_layers=3), models.sd3(num_layers=3)
    fa = runs.module_fingerprint(a.transformer)
    assert fa == runs.module_fingerprint(b.transformer)  # same seed, same weights
    assert fa != runs.module_fingerprint(models.sd3(num_layers=3, seed=1).transformer)
    with torch.no_grad():
        b.transformer.pos_embed.proj.bias[0] += 1e-3  # the first element of a tensor is always sampled
    assert fa != runs.module_fingerprint(b.transformer)
    with torch.device("meta"):
        meta = models.sd3_transformer(num_layers=3)
    assert runs.module_fingerprint(meta) != fa  # shapes only, but reported, never an error


# ----------------------------------------------------------------------------------------------- 8: validation


def _finished_run(pipe, tmp_path) -> Path:
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    return tmp_path / "records-rank0.jsonl"


def _edit_record(path: Path, index: int, **changes) -> None:
    lines = _lines(path)
    rec = json.loads(lines[index])
    for key, value in changes.items():
        if value is KeyError:
            del rec[key]
        else:
            rec[key] = value
    lines[index] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("changes, match", [
    (dict(scores=[float("nan")], mean=float("nan")), r"line 1: .*finite"),
    (dict(mean=float("inf")), r"line 1: .*finite"),
    (dict(pairs=KeyError), r"line 1: .*pairs"),
    (dict(candidate="0:0"), r"line 1: .*candidate"),
    (dict(round="1"), r"line 1: .*round"),
    (dict(scores=[1.0], mean=1.0), r"line 1: .*scores"),
    (dict(mean=0.123456), r"line 1: .*mean"),
])
def test_invalid_records_are_refused_naming_file_and_line(pipe, tmp_path, changes, match):
    path = _finished_run(pipe, tmp_path)
    _edit_record(path, 0, **changes)
    if "pairs" not in changes:  # a reader without a resume (the atlas) needs no "pairs"
        with pytest.raises(ValueError, match=r"records-rank0\.jsonl " + match):
            runs.read_records(tmp_path)
    with pytest.raises(ValueError, match=r"records-rank0\.jsonl " + match):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    assert not math.isnan(json.loads((tmp_path / "summary.json").read_text())["rounds"][0]["means"]["0:0"])


# ----------------------------------------------------------------------------------------------- 9: repair


def test_malformed_last_line_with_newline_is_cut_on_resume(pipe, tmp_path):
    kw = {**COMMON, "candidates": "0:0,1:1,2:2", "batch_size": 1}
    calls = []

    def interrupted(images, prompts):
        calls.append(1)
        if len(calls) == 3:  # after candidate 0:0's two images, recorded
            raise KeyboardInterrupt
        return brightness(images, prompts)

    interrupted.__name__, interrupted.__module__ = brightness.__name__, brightness.__module__
    with pytest.raises(KeyboardInterrupt):
        hunt(pipe, interrupted, PROMPTS, out_dir=tmp_path, **kw)
    path = tmp_path / "records-rank0.jsonl"
    n_before = len(_lines(path))
    with open(path, "a") as f:
        f.write('{"round": 1, "candid\n')  # cut short, then a newline (e.g. an editor or a torn block)
    with pytest.warns(UserWarning, match=r"records-rank0\.jsonl line \d+"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **kw)
    lines = _lines(path)
    assert len(lines) == 3 > n_before and all(json.loads(line) for line in lines)
    # Every later reader and rerun works.
    assert len(runs.read_records(tmp_path)) == 3
    assert hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **kw).images_generated == 0


# ----------------------------------------------------------------------------------------------- 10: lock, atomic

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{here!r}, {tests!r}]
    import test_run_dir_reliability as t
    from support import models
    from headpag.search import hunt

    def blocking(images, prompts):
        Path({started!r}).write_text("x")
        while True:
            time.sleep(0.05)

    blocking.__name__, blocking.__module__ = "brightness", t.brightness.__module__  # brightness, to the directory
    hunt(models.sd3(num_layers=3), blocking, t.PROMPTS, out_dir={out!r}, **t.COMMON)
    """
)


def test_a_second_hunt_on_a_run_directory_in_use_fails_fast_and_a_dead_holders_lock_is_taken_over(pipe, tmp_path):
    here = Path(__file__).parent
    started, out = tmp_path / "started", tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER.format(here=str(here), tests=str(here.parent), started=str(started), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the holder never started scoring"
            time.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=rf"(?s)in use by another hunt.*pid {proc.pid}"):
            hunt(pipe, brightness, PROMPTS, out_dir=out, **COMMON)
        assert time.perf_counter() - t0 < 5
        assert not (out / "records-rank0.jsonl").exists() or not _lines(out / "records-rank0.jsonl")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The holder died holding the lock: the next hunt takes it over and does the work.
    with pytest.warns(UserWarning, match=rf"taking over the lock .*pid {proc.pid}"):
        result = hunt(pipe, brightness, PROMPTS, out_dir=out, **COMMON)
    assert result.images_generated == 2 * 2 and len(runs.read_records(out)) == 2  # 2 candidates x 2 prompts


def test_write_atomic_from_many_threads(tmp_path):
    path = tmp_path / "summary.json"
    errors = []

    def writer(i):
        try:
            for j in range(40):
                runs.write_atomic(path, json.dumps({"writer": i, "j": j}))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert set(json.loads(path.read_text())) == {"writer", "j"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_heads_json_is_written_atomically(pipe, tmp_path, monkeypatch):
    hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    before = (tmp_path / "heads.json").read_text()
    real_open = open

    class Torn:
        """A file that writes half of what it is given, then fails (a full disk)."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def torn_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Torn(f) if "w" in mode else f

    import headpag.heads

    monkeypatch.setattr(headpag.heads, "open", torn_open, raising=False)
    with pytest.raises(OSError, match="No space"):
        hunt(pipe, brightness, PROMPTS, out_dir=tmp_path, **COMMON)
    assert (tmp_path / "heads.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]


# ----------------------------------------------------------------------------------------------- 11: user's patch


def _image(pipe):
    return pipe(**encode(["a cat"]), generator=torch.Generator().manual_seed(5), guidance_scale=1.0,
                num_inference_steps=2, height=16, width=16, output_type="pt").images


@pytest.mark.parametrize("execution", ["fused", "eager"])
def test_hunt_gives_back_the_users_patch(execution, tmp_path):
    pipe = models.sd3(num_layers=3)
    headpag.enable(pipe, "1:0,2:3@0.5", execution=execution, scale=2.0, mode="image", interval=(0.0, 0.5))
    expected = _image(pipe)
    session = headpag.guided.session.session_of(pipe)
    settings, fused = session.settings, session.fused

    hunt(pipe, brightness, PROMPTS, **COMMON)
    session = headpag.guided.session.session_of(pipe)
    assert session is not None and session.settings == settings and session.fused == fused
    assert torch.equal(_image(pipe), expected)

    def failing(images, prompts):
        raise RuntimeError("objective failed")

    headpag.set_row_heads(pipe, ["0:1", "2:0,2:1"])
    rows = headpag.guided.session.session_of(pipe).row_heads
    with pytest.raises(RuntimeError, match="objective failed"):
        hunt(pipe, failing, PROMPTS, out_dir=tmp_path, **COMMON)
    session = headpag.guided.session.session_of(pipe)
    assert session is not None and session.settings == settings and session.row_heads == rows
    headpag.set_row_heads(pipe, None)
    assert torch.equal(_image(pipe), expected)
    headpag.disable(pipe)
