"""The command line refuses bad input before any sampling, with one clear line on stderr and exit status 2 (as
argparse does), and a traceback only under ``--debug``: scales, head files checked against the loaded model,
output directories, devices, demo settings."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from PIL import Image

import headpag.search
from headpag import HeadSet
from headpag.apps import cli
from headpag.apps.cli import main
from headpag.guided import api


def run(argv, capsys):
    """``(exit status, stderr)`` of ``headpag ARGV``; argparse's own errors exit through SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    """The error line of a refused command; fails on a traceback or several lines."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def digits_transformer():
    from headpag.apps.digits import load_pipeline

    return load_pipeline().transformer  # SD3Transformer2DModel, 6 layers x 4 heads


class FakePipe:
    """A pipeline stand-in around the digits denoiser (so head files can be checked against it) that records
    calls instead of sampling."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(prompt)
        return types.SimpleNamespace(images=[Image.new("RGB", (4, 4))])


@pytest.fixture
def fake(monkeypatch, digits_transformer):
    """Stand-ins for loading, enabling and hunting; ``fake.loads`` and ``fake.hunts`` record what ran."""
    state = types.SimpleNamespace(loads=[], hunts=[], pipe=FakePipe(digits_transformer))
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: state.loads.append(args) or state.pipe)
    monkeypatch.setattr(api, "enable", lambda pipe, heads, **kwargs: None)
    monkeypatch.setattr(api, "detach", lambda pipe: None)

    def fake_hunt(pipe, objective, prompts, **kwargs):
        state.hunts.append(kwargs)
        return types.SimpleNamespace(heads=HeadSet("0:0"), images_generated=0, timings={"total": 0.0})

    monkeypatch.setattr(headpag.search, "hunt", fake_hunt)
    monkeypatch.setattr(headpag.search.objectives, "get_objective", lambda name, **kwargs: "OBJECTIVE")
    return state


def generate(tmp_path, *extra):
    return ["generate", "--model", "MODEL", "--device", "cpu", "--prompt", "3", "--steps", "2",
            "--output", str(tmp_path / "out.png"), *extra]


def hunt(tmp_path, *extra, prompts="3\n4\n"):
    path = tmp_path / "prompts.txt"
    path.write_text(prompts)
    return ["hunt", "--model", "MODEL", "--device", "cpu", "--prompts", str(path), "--objective", "clip",
            "--out", str(tmp_path / "run"), "--quiet", *extra]


# --- item 4: --scale -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
@pytest.mark.parametrize("heads", [[], ["--heads", "0:0"]], ids=["no-heads", "heads"])
def test_generate_refuses_a_bad_scale_before_loading(value, heads, fake, tmp_path, capsys):
    rc, err = run(generate(tmp_path, "--scale", value, *heads), capsys)
    assert rc == 2 and "argument --scale" in err and "finite number >= 0" in err
    assert fake.loads == [] and fake.pipe.calls == []


@pytest.mark.parametrize("option, value", [("--scale", "-1"), ("--scale", "nan"), ("--u", "1.5"), ("--u", "nan")])
def test_hunt_refuses_bad_numbers_before_loading(option, value, fake, tmp_path, capsys):
    rc, err = run(hunt(tmp_path, option, value), capsys)
    assert rc == 2 and f"argument {option}" in err
    assert fake.loads == [] and fake.hunts == []


def test_generate_scale_zero_still_runs(fake, tmp_path, capsys):
    assert run(generate(tmp_path, "--scale", "0", "--heads", "0:0"), capsys)[0] == 0
    assert fake.pipe.calls == ["3"]


# --- item 5: head files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "hunt"])
def test_a_missing_head_file_says_file_not_found(command, fake, tmp_path, capsys):
    missing = tmp_path / "missing.json"
    argv = generate(tmp_path, "--heads", str(missing)) if command == "generate" else hunt(tmp_path, "--init", str(missing))
    rc, err = run(argv, capsys)
    line = one_line_error(err)
    assert rc == 2 and "file not found" in line and str(missing) in line and "bad head spec" not in line
    assert fake.loads == [] and fake.pipe.calls == [] and fake.hunts == []


def test_a_non_utf8_head_file_is_named(fake, tmp_path, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"format": "headpag.HeadSet", "note": "caf\xe9"}')
    rc, err = run(generate(tmp_path, "--heads", str(path)), capsys)
    line = one_line_error(err)
    assert rc == 2 and f"--heads: {path} is not a headpag HeadSet file: not UTF-8 text" in line
    assert fake.loads == []


def _file_for_another_model(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    if kind == "shape":  # two layers of 4 heads: the digits model has 6
        HeadSet("0:0").save(path, [4, 4])
    else:  # the digits model's shape, another model class
        HeadSet("0:0").save(path, [4] * 6)
        data = json.loads(path.read_text())
        data["model_class"] = "FluxTransformer2DModel"
        path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("kind, message", [("shape", "different shape: file has 2 layers"),
                                           ("class", "written for FluxTransformer2DModel, not SD3Transformer2DModel")])
@pytest.mark.parametrize("option", ["generate --heads", "hunt --init", "hunt --candidates"])
def test_a_head_file_for_another_model_is_refused(option, kind, message, fake, tmp_path, capsys):
    path = _file_for_another_model(tmp_path, kind)
    command, flag = option.split()
    argv = generate(tmp_path, flag, str(path)) if command == "generate" else hunt(tmp_path, flag, str(path))
    rc, err = run(argv, capsys)
    line = one_line_error(err)
    assert rc == 2 and message in line and flag in line and str(path) in line
    assert fake.pipe.calls == [] and fake.hunts == []


def test_a_head_file_for_the_model_is_used(fake, tmp_path, capsys):
    path = tmp_path / "heads.json"
    HeadSet("1:2@0.5").save(path, fake.pipe)
    assert run(hunt(tmp_path, "--init", str(path), "--candidates", "0:*"), capsys)[0] == 0
    assert fake.hunts[0]["init"] == HeadSet("1:2@0.5") and fake.hunts[0]["candidates"] == HeadSet("0:*")


@pytest.mark.parametrize("spec, message", [("9:0", "layer 9 (in 9:0) out of range"), ("1:x", "bad head spec")])
def test_a_bad_head_string_is_refused_before_sampling(spec, message, fake, tmp_path, capsys):
    rc, err = run(generate(tmp_path, "--heads", spec), capsys)
    line = one_line_error(err)
    assert rc == 2 and "--heads" in line and message in line and fake.pipe.calls == []


# --- item 12: everything a command needs is checked before sampling ---------------------------------------------


def test_generate_output_is_checked_before_loading(fake, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    (tmp_path / "adir.png").mkdir()
    for output, message in [(str(blocker / "out.png"), "not a directory"), ("", "must not be empty"),
                            (str(tmp_path / "out.xyz"), "image file extension"),
                            (str(tmp_path / "out"), "image file extension"),
                            (str(tmp_path / "adir.png"), "is a directory")]:
        rc, err = run(generate(tmp_path) + ["--output", output], capsys)
        line = one_line_error(err)
        assert rc == 2 and "--output" in line and message in line, (output, line)
    assert fake.loads == [] and fake.pipe.calls == []


def test_generate_creates_a_missing_output_directory(fake, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "out.png"
    assert run(generate(tmp_path) + ["--output", str(out)], capsys)[0] == 0
    assert Image.open(out).size == (256, 256)  # the 4 x 4 image upscaled to a viewable size


def test_a_read_only_output_directory_is_refused(fake, tmp_path, capsys, monkeypatch):
    """A directory the process may not write into (``os.access`` says so; root writes everywhere, so the check is
    what is tested) is refused before anything is loaded."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(ro))
                        else access(path, mode, **kw))
    try:
        rc, err = run(generate(tmp_path) + ["--output", str(ro / "out.png")], capsys)
        assert rc == 2 and "not writable" in one_line_error(err)
        rc, err = run(hunt(tmp_path) + ["--out", str(ro / "run")], capsys)
        assert rc == 2 and "not writable" in one_line_error(err)
    finally:
        ro.chmod(0o755)


def test_hunt_out_is_checked_before_loading(fake, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    for out, message in [("", "must not be empty"), (str(blocker), "not a directory"),
                         (str(blocker / "run"), "not a directory")]:
        rc, err = run(hunt(tmp_path) + ["--out", out], capsys)
        line = one_line_error(err)
        assert rc == 2 and "--out" in line and message in line, (out, line)
    assert fake.loads == [] and fake.hunts == []


def test_hunt_prompts_are_checked_before_loading(fake, tmp_path, capsys):
    argv = hunt(tmp_path)
    argv[argv.index("--prompts") + 1] = str(tmp_path / "nothing.txt")
    rc, err = run(argv, capsys)
    assert rc == 2 and "--prompts" in one_line_error(err) and "file not found" in err
    rc, err = run(hunt(tmp_path, prompts="\n  \n"), capsys)
    assert rc == 2 and "no prompts" in one_line_error(err)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    argv = hunt(tmp_path)
    argv[argv.index("--prompts") + 1] = str(tmp_path / "latin1.txt")
    rc, err = run(argv, capsys)
    assert rc == 2 and "latin1.txt" in one_line_error(err) and "UTF-8" in err
    assert fake.loads == [] and fake.hunts == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "hunt"])
def test_device_cuda_without_cuda_is_a_clear_error(command, tmp_path, capsys):
    """The real loader (the embedded digits model): before, an AssertionError from torch."""
    argv = generate(tmp_path) if command == "generate" else hunt(tmp_path)
    argv[argv.index("--model") + 1] = "digits"
    argv[argv.index("--device") + 1] = "cuda"
    rc, err = run(argv, capsys)
    line = one_line_error(err)
    assert rc == 2 and "--device cuda" in line and "CUDA is not available" in line


def test_a_bad_device_string_is_a_clear_error(fake, tmp_path, capsys):
    argv = generate(tmp_path)
    argv[argv.index("--device") + 1] = "gpu0"
    rc, err = run(argv, capsys)
    assert rc == 2 and "--device 'gpu0'" in one_line_error(err) and fake.loads == []


def test_errors_name_the_command_and_debug_shows_the_traceback(fake, tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    rc, err = run(generate(tmp_path, "--heads", missing), capsys)
    assert rc == 2 and one_line_error(err).startswith("headpag generate: error: ")
    with pytest.raises(cli.CommandError, match="--heads: file not found: .*missing.json"):
        main(generate(tmp_path, "--heads", missing, "--debug"))
    fake.pipe.transformer = None  # an unexpected failure: its type named on the line, its traceback under --debug
    rc, err = run(generate(tmp_path, "--heads", "0:0"), capsys)
    assert rc == 2 and one_line_error(err).startswith("headpag generate: error: ") and "Traceback" not in err
    with pytest.raises(Exception):
        main(generate(tmp_path, "--heads", "0:0", "--debug"))


def test_a_failing_model_load_is_one_line(tmp_path, capsys):
    rc, err = run(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x",
                   "--output", str(tmp_path / "x.png")], capsys)
    assert rc == 2 and "local directory" in one_line_error(err)


@pytest.fixture
def no_sampling(monkeypatch):
    """Records every call of the digits pipeline (the demo must not sample before refusing its settings)."""
    from headpag.apps.digits.pipeline import DigitsPipeline

    calls = []
    monkeypatch.setattr(DigitsPipeline, "__call__", lambda self, *args, **kwargs: calls.append(args))
    return calls


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "--out must not be empty"),
    (["--u", "2"], "argument --u"),
    (["--u", "0"], "argument --u"),
    (["--u", "nan"], "argument --u"),
    (["--scale", "-1"], "argument --scale"),
    (["--scale", "nan"], "argument --scale"),
    (["--cfg", "inf"], "argument --cfg"),
    (["--threads", "-1"], "argument --threads"),
    (["--heads", "1:x"], "--heads: bad head spec"),
    (["--layers", "2,a"], "--layers"),
    (["--heads", "9:0"], "--heads: layer 9 (in 9:0) out of range"),
    (["--heads", "1:4"], "--heads: head 4 (in 1:4) out of range"),
    (["--layers", "6"], "--layers: layer 6 (in 6:*) out of range"),
])
def test_demo_settings_are_checked_before_sampling(argv, message, no_sampling, tmp_path, capsys):
    rc, err = run(["demo", "--quick", "--out", str(tmp_path / "demo"), *argv], capsys)
    assert rc == 2 and message in err, err
    assert no_sampling == []


def test_demo_out_is_checked_before_sampling(no_sampling, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    rc, err = run(["demo", "--quick", "--out", str(blocker / "demo")], capsys)
    assert rc == 2 and "--out" in one_line_error(err) and "not a directory" in err
    assert no_sampling == []
