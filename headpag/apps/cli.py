"""Command line: ``headpag hunt | generate | atlas | demo | bench``.

``headpag hunt --model PATH_OR_ID --prompts FILE --objective pickscore --k 3 --rounds 5 --out DIR`` searches heads
(``torchrun --nproc-per-node N -m headpag hunt ...`` shards the candidates over N processes);
``headpag generate --model ... --heads heads.json --scale 3 --u 0.5 --prompt ...`` samples with head-level PAG;
``headpag atlas RUN_DIR`` draws the head atlas and the score heatmap of a hunt.

This module imports only the standard library at import time: torch, diffusers and transformers are imported by
the command that needs them, so ``headpag --help`` answers at once.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from .host_memory import keep_freed_memory

# headpag.kernels.MODES, spelled out so that building the parser imports no torch (a test checks they agree).
MODES = ("joint", "image")
# The embedded model's name for --model, and its objective (the default objective with --model digits).
DIGITS = "digits"
# generate: images whose shorter side is below this are upscaled (nearest neighbour) to at least this size.
VIEW_SIDE = 256
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class CommandError(ValueError):
    """A command's input is unusable (a file, directory, device or setting): printed as one line, exit status 2."""


def _int_at_least(low: int):
    """argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _batch_size(text: str):
    """argparse type: 'auto' or an int >= 1."""
    return "auto" if text == "auto" else _positive_int(text)


def _number(text: str, expected: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _finite(text: str) -> float:
    """argparse type: a finite number."""
    return _number(text, "a finite number", lambda x: True)


def _scale(text: str) -> float:
    """argparse type: a finite number >= 0 (a PAG scale; 0 runs the plain pipeline)."""
    return _number(text, "a finite number >= 0", lambda x: x >= 0)


def _unit(text: str) -> float:
    """argparse type: a number in [0, 1] (a head's coefficient u)."""
    return _number(text, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def _open_unit(text: str) -> float:
    """argparse type: a number in (0, 1) (the demo's SoftPAG coefficient)."""
    return _number(text, "a number in (0, 1), exclusive", lambda x: 0 < x < 1)


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a directory a command may write into: an existing writable directory, or one that can be created
    (its nearest existing ancestor is a writable directory). Creates nothing; raises :class:`CommandError` naming
    ``option``."""
    if not os.fspath(path):
        raise CommandError(f"{option} must not be empty (use '.' for the current directory)")
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise CommandError(f"{option} {os.fspath(path)!r}: {os.fspath(probe)!r} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({os.fspath(probe)!r} is a file)"
        raise CommandError(f"{option} {os.fspath(path)!r}: not a directory{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "directory" if probe == path else f"parent directory {os.fspath(probe)!r}"
        raise CommandError(f"{option} {os.fspath(path)!r}: the {what} is not writable")
    return path


def _check_output_file(path: str, option: str) -> None:
    """An image file ``generate`` may write: a name with an extension PIL writes, in a writable or creatable
    directory."""
    from PIL import Image

    if not path:
        raise CommandError(f"{option} must not be empty")
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{option} {path!r} is a directory; give an image file name such as out.png")
    Image.init()
    suffix = target.suffix.lower()
    if suffix not in Image.registered_extensions() or Image.registered_extensions()[suffix] not in Image.SAVE:
        raise CommandError(f"{option} {path!r}: needs an image file extension PIL writes, such as .png or .jpg")
    check_output_dir(target.parent, option)


def _check_device(device: str | None) -> None:
    """A ``--device`` torch can parse and that this machine has."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CommandError(f"--device {device!r} is not a torch device ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: CUDA is not available on this machine "
                               f"(torch.cuda.is_available() is False); use --device cpu or leave --device out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise CommandError(f"--device {device}: {dev.type} is not available on this machine")


def _read_prompts(path: str) -> list[str]:
    """The non-empty lines of ``--prompts``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f"--prompts: file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise CommandError(f"--prompts {path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise CommandError(f"--prompts {path}: cannot read it ({err.strerror or err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CommandError(f"--prompts {path} has no prompts (one per line)")
    return prompts


def _load_pipeline(model: str, device: str | None, dtype: str):
    import torch
    from diffusers import DiffusionPipeline

    from .digits.pipeline import dtype_kwargs

    if model == DIGITS:  # the embedded default: the digits model shipped with headpag
        from .digits import load_pipeline

        return load_pipeline(device=device or "cpu", torch_dtype=getattr(torch, dtype))
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwargs(getattr(torch, dtype)))
    except Exception as err:  # hub or file errors: say what failed and how to point at a local copy
        reason = " ".join(str(err).split())  # hub errors span lines
        raise CommandError(f"cannot load pipeline {model!r} ({type(err).__name__}: {reason}); pass --model a local "
                           f"directory written by DiffusionPipeline.save_pretrained") from err
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _set_threads(args) -> None:
    """``--threads``: torch's CPU threads; by default 1 with ``--model digits`` (the tiny model runs fastest on one
    thread, and far faster than on several when the machine is busy), else torch's own setting."""
    import torch

    threads = args.threads if args.threads is not None else (1 if args.model == DIGITS else 0)
    if threads:
        torch.set_num_threads(threads)


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _objective_name(args) -> str:
    """``--objective``, or its default: ``digits`` with ``--model digits``, else ``pickscore``."""
    if args.objective is not None:
        return args.objective
    return DIGITS if args.model == DIGITS else "pickscore"


def _objective(args):
    """The objective of ``hunt``; a failure to build it (a model not on disk and no hub) is one line that names
    the options to use."""
    from ..search.objectives import get_objective

    name = _objective_name(args)
    if name == DIGITS:  # the embedded digit classifier: confidence in the asked digit
        from .digits.objective import DigitObjective

        return DigitObjective()

    kwargs = {}
    if args.objective_model:
        kwargs["model"] = args.objective_model
    if args.objective_processor:
        kwargs["processor"] = args.objective_processor
    try:
        return get_objective(name, **kwargs)
    except Exception as err:  # hub or file errors, raised from deep inside transformers
        reason = " ".join(str(err).split())
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        hint = (" (with --model digits, --objective digits uses the embedded classifier)" if args.model == DIGITS
                else "")
        raise CommandError(f"--objective {name}: cannot load its model ({type(err).__name__}: {reason}); pass "
                           f"--objective-model and --objective-processor local directories{hint}") from None


class _Heads:
    """A head option (``--heads``, ``--init``, ``--candidates``): a head string or a HeadSet file (``*.json``, or any
    existing file). Read when the command starts, so a missing file or a bad string fails before the model loads;
    :meth:`for_model` then checks it against the loaded model before anything is sampled."""

    def __init__(self, text: str, option: str):
        from ..heads import HeadSet

        self.option, self.path = option, None
        path = Path(text)
        if text.endswith(".json") or path.is_file():
            if not path.exists():
                raise CommandError(f"{option}: file not found: {text}")
            self.path = path
            self.heads = self._read(lambda: HeadSet.load(path))
        else:
            self.heads = self._read(lambda: HeadSet(text))

    def _read(self, load):
        try:
            return load()
        except OSError as err:
            raise CommandError(f"{self.option} {os.fspath(self.path)}: cannot read it ({err.strerror or err})") from None
        except (ValueError, TypeError) as err:
            raise CommandError(f"{self.option}: {err}") from None

    def for_model(self, pipe):
        """A file read against ``pipe`` (refused when written for another model class or shape); a string checked
        against it (ranges) and returned as given (wildcards are expanded by the API)."""
        from ..heads import HeadSet

        if self.path is not None:
            return self._read(lambda: HeadSet.load(self.path, pipe))
        self._read(lambda: self.heads.resolve(pipe))
        return self.heads


def _heads_arg(text: str | None, option: str) -> _Heads | None:
    return None if text is None else _Heads(text, option)


def _denoiser_shape(model: str):
    """The pipeline's denoiser built from its config alone on the meta device (no weights read), to check head
    options before the model loads; None when that cannot be done quickly (a hub id not on disk, an unknown class)."""
    import torch

    if model == DIGITS:
        from diffusers import SD3Transformer2DModel

        from .digits import TRANSFORMER_CONFIG

        with torch.device("meta"):
            return SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    if not (Path(model) / "model_index.json").is_file():
        return None
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(model)
        for sub in ("transformer", "unet"):
            if isinstance(index.get(sub), (list, tuple)) and len(index[sub]) == 2:
                cls = getattr(diffusers, index[sub][1], None)
                if cls is None:
                    return None
                with torch.device("meta"):
                    return cls.from_config(cls.load_config(model, subfolder=sub))
    except Exception:  # noqa: BLE001 - an early check only: the loaded model is checked again
        return None
    return None


def _check_heads_early(model: str, *heads: _Heads | None) -> None:
    """Head options checked against the model's shape before it loads (ranges, files written for another
    model); anything this cannot tell is checked again against the loaded model."""
    heads = [h for h in heads if h is not None]
    if not heads:
        return
    denoiser = _denoiser_shape(model)
    if denoiser is None:
        return
    for h in heads:
        try:
            h.for_model(denoiser)
        except CommandError:
            raise
        except Exception:  # noqa: BLE001 - e.g. a check that needs weights: the loaded model decides
            pass


def _check_objective(args) -> None:
    """``--objective`` is a known name (before anything loads)."""
    from ..search.objectives import OBJECTIVES

    name = _objective_name(args)
    if name != DIGITS and name.strip().lower() not in OBJECTIVES:
        raise CommandError(f"--objective must be one of {', '.join(sorted([*OBJECTIVES, DIGITS]))}, got {name!r}")


def _check_digit_prompts(prompts: list[str], path: str) -> None:
    """With ``--model digits`` every prompt is one digit 0-9."""
    bad = [p for p in prompts if not re.fullmatch(r"[0-9]", p)]
    if bad:
        raise CommandError(f"--prompts {path}: --model digits takes one digit 0-9 per line, got {bad[0]!r}")


def _recorded_candidates(out: str) -> int:
    """Candidate evaluations recorded in a run directory (0 when none can be read)."""
    try:
        from ..search.run_dir import read_records

        return len(read_records(out))
    except Exception:  # noqa: BLE001 - a count for a message; the rerun checks the directory properly
        return 0


def cmd_hunt(args) -> int:
    prompts = _read_prompts(args.prompts)
    check_output_dir(args.out, "--out")
    _check_objective(args)
    if args.model == DIGITS:
        _check_digit_prompts(prompts, args.prompts)
    _check_device(args.device)
    candidates, init = _heads_arg(args.candidates, "--candidates"), _heads_arg(args.init, "--init")
    _check_heads_early(args.model, candidates, init)
    try:
        return _hunt(args, prompts, candidates, init)
    except KeyboardInterrupt:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\nheadpag hunt: interrupted; {_recorded_candidates(args.out)} candidate evaluation(s) are recorded "
                  f"in {args.out}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _hunt(args, prompts, candidates, init) -> int:
    from ..search import hunt

    objective = _objective(args)  # before the pipeline: a missing objective model fails in seconds
    _set_threads(args)
    _init_distributed()
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    candidates = candidates and candidates.for_model(pipe)
    init = init and init.for_model(pipe)
    result = hunt(
        pipe, objective, prompts, seeds=args.seeds, k=args.k, rounds=args.rounds,
        candidates=candidates, init=init, scale=args.scale, u=args.u, mode=args.mode,
        guidance_scale=args.guidance_scale, num_inference_steps=args.steps, out_dir=args.out,
        batch_size=args.batch_size, strategy=args.strategy,
        verbose=not args.quiet, refresh=args.refresh,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"selected heads: {result.heads}")
        print(f"images generated: {result.images_generated}, time: {result.timings['total']:.1f} s; results in {args.out}")
    return 0


def default_output_name(args, heads) -> str:
    """``generate``'s file name when ``--output`` is not given: the prompt and the settings, e.g.
    ``headpag-7-seed0-heads-1.1_2.0-w3-20steps.png`` (``-grid`` with ``--grid``; ``-noPAG`` without ``--heads``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:40].rstrip("-") or "prompt"
    parts = ["headpag", slug, f"seed{args.seed}"]
    if heads is None:
        parts.append("noPAG")
    else:
        text = str(heads.heads)
        label = re.sub(r"[^0-9a-z*.@]+", "_", text.replace(":", ".").replace("*", "all"))
        parts += [f"heads-{label}" if len(label) <= 40 else f"heads-{Path(heads.path).stem if heads.path else len(heads.heads)}",
                  f"w{args.scale:g}"]
        if args.u is not None:
            parts.append(f"u{args.u:g}")
        if args.mode != "joint":
            parts.append(args.mode)
        if args.refresh != 1:
            parts.append(f"refresh{args.refresh}")
    parts.append(f"{args.steps}steps")
    if args.grid:
        parts.append("grid")
    return "-".join(parts) + ".png"


def viewable(image, side: int = VIEW_SIDE):
    """``image`` (PIL) upscaled by the smallest integer factor that makes its shorter side at least ``side``,
    nearest neighbour (pixels stay sharp squares); unchanged when it is that large already."""
    from PIL import Image

    factor = math.ceil(side / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def side_by_side(images, captions, gap: int = 8):
    """The images (PIL, same size) in a row on a grey background, each with its caption above it."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    band = 16
    canvas = Image.new("RGB", (len(images) * w + (len(images) + 1) * gap, h + band + 2 * gap), (64, 64, 64))
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = gap + i * (w + gap)
        draw.text((x, gap), caption, fill=(255, 255, 255))
        canvas.paste(image.convert("RGB"), (x, gap + band))
    return canvas


def cmd_generate(args) -> int:
    heads = _heads_arg(args.heads, "--heads")
    if args.grid and heads is None:
        raise CommandError("--grid puts the unguided and the guided image side by side: it needs --heads")
    output = args.output if args.output is not None else default_output_name(args, heads)
    _check_output_file(output, "--output")
    _check_device(args.device)
    _check_heads_early(args.model, heads)
    import torch

    from .. import disable, enable_fused

    _set_threads(args)
    pipe = _load_pipeline(args.model, args.device, args.dtype)

    def sample():
        kwargs = {"num_inference_steps": args.steps, "generator": torch.Generator("cpu").manual_seed(args.seed)}
        if args.guidance_scale is not None:
            kwargs["guidance_scale"] = args.guidance_scale
        if args.guidance_rescale is not None:
            kwargs["guidance_rescale"] = args.guidance_rescale
        return pipe(args.prompt, **kwargs).images[0]

    selected = heads and heads.for_model(pipe)
    plain = sample() if args.grid else None  # the same seed without PAG
    if heads is not None:  # enable_fused checks scale (negative or NaN refused; 0 runs the plain pipeline)
        enable_fused(pipe, selected, scale=args.scale, u=args.u, mode=args.mode, adaptive_scale=args.adaptive_scale,
                     refresh=args.refresh)
    try:
        image = sample()
    finally:
        disable(pipe)
    size = image.size
    image = viewable(image)
    if plain is not None:
        guided = f"PAG w={args.scale:g} heads {selected}" + (f" u={args.u:g}" if args.u is not None else "")
        image = side_by_side([viewable(plain), image], ["no PAG", guided if len(guided) <= 48 else guided[:45] + "..."])
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    note = "" if image.size == size else f" (model output {size[0]}x{size[1]}, upscaled nearest-neighbour)"
    print(f"wrote {output}: {image.size[0]}x{image.size[1]}{note}")
    return 0


def cmd_atlas(args) -> int:
    from ..search.run_dir import read_settings

    if not Path(args.run_dir).is_dir():
        raise CommandError(f"run directory not found: {args.run_dir}")
    settings = read_settings(args.run_dir)
    model = args.model
    if model is None and settings.get("pipeline_class") == "DigitsPipeline":
        model = DIGITS  # the embedded model: regenerating its images takes seconds
    pipe = None
    if model is not None:
        _check_device(args.device)
        _set_threads(argparse.Namespace(threads=args.threads, model=model))
        from ..search.atlas import regenerate

        pipe = _load_pipeline(model, args.device, args.dtype)
        print(f"atlas: generating every round-1 candidate on every prompt/seed with {model} to show where each "
              f"head differs most from the unguided image", flush=True)
    from ..search.atlas import head_atlas, score_heatmap

    images = regenerate(args.run_dir, pipe) if pipe is not None else None
    for path in (head_atlas(args.run_dir, images=images), score_heatmap(args.run_dir)):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def cmd_bench(args) -> int:
    from .benchmarks.report import main as bench_main

    check_output_dir(args.out, "--out")
    return bench_main(out_dir=args.out, sections=args.sections, quick=args.quick, rounds=args.rounds,
                      readme=args.readme)


def build_parser() -> argparse.ArgumentParser:
    from .benchmarks import SECTIONS

    parser = argparse.ArgumentParser(prog="headpag", description="Head-level perturbed-attention guidance for diffusers. "
                                     "A command refuses unusable input before any work with one line on stderr and "
                                     "exit status 2 (--debug: the traceback instead).")
    # Every command takes --debug (after the command name, with its other options).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, raise it with its traceback instead of "
                        "printing one line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser_class(common))

    def model_args(p):
        p.add_argument("--model", required=True, help="pipeline id or local directory (DiffusionPipeline.from_pretrained), "
                       "or 'digits' for the embedded digits model")
        p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype")
        p.add_argument("--steps", type=_positive_int, default=20, help="inference steps")
        p.add_argument("--scale", type=_scale, default=3.0, help="PAG scale w (a finite number >= 0)")
        p.add_argument("--mode", default="joint", choices=MODES, help="identity over the whole sequence or "
                       "over the image-image block only")
        p.add_argument("--guidance-scale", type=_finite, default=None, help="CFG scale (default: the pipeline's; hunt: "
                       "CFG off as in the paper)")
        p.add_argument("--refresh", type=_positive_int, default=1, help="run the perturbed rows on every k-th guided "
                       "step and reuse their difference in between (default 1: every step)")
        p.add_argument("--threads", type=_non_negative_int, default=None, help="torch CPU threads (default: 1 with "
                       "--model digits, fastest for the tiny model; else torch's setting; 0 keeps torch's setting)")

    p = sub.add_parser("hunt", help="greedy head search (HeadHunter)")
    model_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (--model digits: one digit 0-9 "
                   "per line)")
    p.add_argument("--objective", default=None, help="pickscore, clip, or digits (the embedded digit classifier; the "
                   "default with --model digits, else pickscore)")
    p.add_argument("--objective-model", default=None, help="local path or id of the objective's model")
    p.add_argument("--objective-processor", default=None, help="local path or id of the objective's processor")
    p.add_argument("--k", type=_positive_int, default=3, help="heads added per round")
    p.add_argument("--rounds", type=_positive_int, default=1, help="rounds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt")
    p.add_argument("--u", type=_unit, default=1.0, help="coefficient of a candidate head, in [0, 1] (SoftPAG when < 1)")
    p.add_argument("--candidates", default=None, help="heads to consider, e.g. '4:*,5:*' (default: all)")
    p.add_argument("--init", default=None, help="starting heads: a heads.json or a head string")
    p.add_argument("--batch-size", type=_batch_size, default="auto", help="jobs per pipeline call, or auto (from "
                   "the model's measured cost per row and the device's memory; printed)")
    p.add_argument("--strategy", default="exact", choices=("exact", "halving"), help="exact greedy search or "
                   "successive halving (an approximation)")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume, e.g. after Ctrl-C)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_hunt)

    p = sub.add_parser("generate", help="sample one image with head-level PAG")
    model_args(p)
    p.add_argument("--heads", default=None, help="heads.json or a head string like '4:3,6:*'")
    p.add_argument("--u", type=_unit, default=None, help="override every head's coefficient, in [0, 1]")
    p.add_argument("--adaptive-scale", type=_scale, default=0.0, help="diffusers' pag_adaptive_scale a: the PAG scale "
                   "at timestep t is max(0, scale - a * (1000 - t))")
    p.add_argument("--guidance-rescale", type=_finite, default=None, help="the pipeline's guidance_rescale (SD, SDXL, "
                   "HunyuanDiT), applied as diffusers' PAG pipelines do")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="image path (default: a name from the prompt and the settings, "
                   "printed, in the current directory); images smaller than 256 pixels are upscaled "
                   "nearest-neighbour")
    p.add_argument("--grid", action="store_true", help="write the unguided and the guided image (same seed) side "
                   "by side")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("atlas", help="head atlas and score heatmap of a hunt's run directory")
    p.add_argument("run_dir")
    p.add_argument("--model", default=None, help="the run's model (as for hunt): generate every round-1 candidate "
                   "again to show each head where it changes the image most (default: 'digits' for a run of the "
                   "digits model; else the stored first-prompt thumbnails)")
    p.add_argument("--device", default=None, help="torch device for --model")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype for --model")
    p.add_argument("--threads", type=_non_negative_int, default=None, help="torch CPU threads (as for hunt)")
    p.set_defaults(func=cmd_atlas)

    p = sub.add_parser("demo", help="head-level PAG on the embedded digits model: table and sample grid (CPU, minutes)",
                       description="Loads the digits model shipped with headpag (an SD3Transformer2DModel trained on "
                       "scikit-learn's 8x8 digits) and its digit classifier; generates the same seeds with no guidance, "
                       "CFG, layer-level PAG, a head-level HeadSet, SoftPAG and the heads of a short HeadHunter run "
                       "(objective: the classifier's confidence in the asked digit); prints the objective per setting "
                       "and eager vs fused time per step; writes headpag-demo.png and headpag-demo.json.")
    p.add_argument("--quick", action="store_true", help="small setting for a smoke test: 2 seeds, 8 steps, 1 hunt "
                   "round with k=1 on 1 seed, timings not repeated (explicit options still override)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="images per digit, i.e. samples = 10 x SEEDS (default 8)")
    p.add_argument("--steps", type=_positive_int, default=None, help="inference steps (default 16)")
    p.add_argument("--scale", type=_scale, default=None, help="PAG scale w (default 3)")
    p.add_argument("--u", type=_open_unit, default=None, help="SoftPAG coefficient of the softpag row, in (0, 1) (default 0.5)")
    p.add_argument("--layers", default=None, help="layer-level PAG: comma-separated layer indices, every head of "
                   "each (default '2,3'; the model has 6 layers x 4 heads)")
    p.add_argument("--heads", default=None, help="head-level HeadSet, e.g. '1:1,2:0,3:3' (default)")
    p.add_argument("--mode", default=None, choices=MODES, help="identity over the whole sequence "
                   "(default) or over the image-image block only")
    p.add_argument("--guidance-scale", type=_finite, default=None, help="CFG scale used with PAG (default 1: CFG off, "
                   "as in HeadHunter's searches)")
    p.add_argument("--cfg", type=_finite, default=None, help="CFG scale of the CFG-only reference row (default 2)")
    p.add_argument("--hunt-rounds", type=_positive_int, default=None, help="HeadHunter rounds (default 2)")
    p.add_argument("--hunt-k", type=_positive_int, default=None, help="heads added per HeadHunter round (default 2)")
    p.add_argument("--hunt-seeds", type=_positive_int, default=None, help="seeds per digit in the search; they differ from "
                   "the evaluated seeds (default 2)")
    p.add_argument("--threads", type=_non_negative_int, default=None, help="torch CPU threads (default 1: fastest for this tiny "
                   "model, and far faster than several on a busy machine; 0 keeps torch's setting)")
    p.add_argument("--out", default=".", help="directory for headpag-demo.png and headpag-demo.json (default: the "
                   "current directory)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="performance report as JSON and a Markdown table: full-size FLOPs per guided step "
                       "(SD3-medium, FLUX.1-dev, SD1.5, SDXL) with an H100 roofline projection, CPU wall clock, and "
                       "the GPU suites when CUDA is present")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to run (default: all; gpu is skipped with a message without CUDA)")
    p.add_argument("--quick", action="store_true", help="smoke test of a minute or two: FLOPs of SD3-medium with one "
                   "head set, the CPU section on a small image with 2 rounds and the N=256 kernel cases")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timed rounds per wall-clock benchmark "
                   "(default: each suite's own)")
    p.add_argument("--readme", default=None, metavar="PATH", help="also replace the report between the "
                   "'<!-- headpag bench: begin/end -->' lines of this Markdown file (e.g. README.md)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="directory for headpag-bench.json and "
                   "report.md (default: bench/results under the current directory; printed)")
    p.set_defaults(func=cmd_bench)
    return parser


def _subparser_class(common: argparse.ArgumentParser):
    """The parser class of the commands: each gets ``common``'s options (``--debug``)."""

    class CommandParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, parents=[common])

    return CommandParser


def main(argv=None) -> int:
    """Runs one command. An error prints one line, ``headpag COMMAND: error: MESSAGE``, on stderr and returns 2 (as
    argparse does for bad options); Ctrl-C prints one line and returns 130; with ``--debug`` either is raised with
    its traceback instead."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # glibc keeps freed host memory (host_memory.py says why)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (hunt says how to resume)
        if args.debug:
            raise
        print(f"\nheadpag {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every error of a command becomes one line (or a traceback with --debug)
        if args.debug:
            raise
        message = str(err) if isinstance(err, (ValueError, TypeError, OSError)) else f"{type(err).__name__}: {err}"
        print(f"headpag {args.command}: error: {message or type(err).__name__} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
