"""Command line: ``headpag hunt | generate | atlas``.

``headpag hunt --model PATH_OR_ID --prompts FILE --objective pickscore --k 3 --rounds 5 --out DIR`` searches heads
(``torchrun --nproc-per-node N -m headpag hunt ...`` shards the candidates over N processes);
``headpag generate --model ... --heads heads.json --scale 3 --u 0.5 --prompt ...`` samples with head-level PAG;
``headpag atlas RUN_DIR`` draws the head atlas and the score heatmap of a hunt.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..kernels import MODES

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

    if model == "digits":  # the embedded default: the digits model shipped with headpag
        from .digits import load_pipeline

        return load_pipeline(device=device or "cpu", torch_dtype=getattr(torch, dtype))
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    except Exception as err:  # hub or file errors: say what failed and how to point at a local copy
        reason = " ".join(str(err).split())  # hub errors span lines
        raise CommandError(f"cannot load pipeline {model!r} ({type(err).__name__}: {reason}); pass --model a local "
                           f"directory written by DiffusionPipeline.save_pretrained") from err
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _objective(args):
    from ..search.objectives import get_objective

    if args.objective == "digits":  # the embedded digit classifier: confidence in the asked digit
        from .digits.objective import DigitObjective

        return DigitObjective()

    kwargs = {}
    if args.objective_model:
        kwargs["model"] = args.objective_model
    if args.objective_processor:
        kwargs["processor"] = args.objective_processor
    return get_objective(args.objective, **kwargs)


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


def cmd_hunt(args) -> int:
    from ..search import hunt

    prompts = _read_prompts(args.prompts)
    check_output_dir(args.out, "--out")
    _check_device(args.device)
    candidates, init = _heads_arg(args.candidates, "--candidates"), _heads_arg(args.init, "--init")
    _init_distributed()
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    candidates = candidates and candidates.for_model(pipe)
    init = init and init.for_model(pipe)
    result = hunt(
        pipe, _objective(args), prompts, seeds=args.seeds, k=args.k, rounds=args.rounds,
        candidates=candidates, init=init, scale=args.scale, u=args.u, mode=args.mode,
        guidance_scale=args.guidance_scale, num_inference_steps=args.steps, out_dir=args.out,
        batch_size=args.batch_size, strategy=args.strategy,
        verbose=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"selected heads: {result.heads}")
        print(f"images generated: {result.images_generated}, time: {result.timings['total']:.1f} s; results in {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .. import disable, enable_fused

    _check_output_file(args.output, "--output")
    _check_device(args.device)
    heads = _heads_arg(args.heads, "--heads")
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    if heads is not None:  # enable_fused checks scale (negative or NaN refused; 0 runs the plain pipeline)
        enable_fused(pipe, heads.for_model(pipe), scale=args.scale, u=args.u, mode=args.mode,
                     adaptive_scale=args.adaptive_scale)
    kwargs = {"num_inference_steps": args.steps, "generator": torch.Generator("cpu").manual_seed(args.seed)}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.guidance_rescale is not None:
        kwargs["guidance_rescale"] = args.guidance_rescale
    try:
        image = pipe(args.prompt, **kwargs).images[0]
    finally:
        disable(pipe)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_atlas(args) -> int:
    from ..search.atlas import make_atlas

    if not Path(args.run_dir).is_dir():
        raise CommandError(f"run directory not found: {args.run_dir}")
    for path in make_atlas(args.run_dir):
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

    p = sub.add_parser("hunt", help="greedy head search (HeadHunter)")
    model_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--objective", default="pickscore", help="pickscore, clip, or digits (the embedded digit classifier, "
                   "for --model digits)")
    p.add_argument("--objective-model", default=None, help="local path or id of the objective's model")
    p.add_argument("--objective-processor", default=None, help="local path or id of the objective's processor")
    p.add_argument("--k", type=_positive_int, default=3, help="heads added per round")
    p.add_argument("--rounds", type=_positive_int, default=1, help="rounds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt")
    p.add_argument("--u", type=_unit, default=1.0, help="coefficient of a candidate head, in [0, 1] (SoftPAG when < 1)")
    p.add_argument("--candidates", default=None, help="heads to consider, e.g. '4:*,5:*' (default: all)")
    p.add_argument("--init", default=None, help="starting heads: a heads.json or a head string")
    p.add_argument("--batch-size", type=_batch_size, default="auto", help="jobs per pipeline call, or auto")
    p.add_argument("--strategy", default="exact", choices=("exact", "halving"), help="exact greedy search or "
                   "successive halving (an approximation)")
    p.add_argument("--out", required=True, help="run directory (rerun to resume)")
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
    p.add_argument("--output", default="headpag.png", help="PNG path")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("atlas", help="head atlas and score heatmap of a hunt's run directory")
    p.add_argument("run_dir")
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
    p.add_argument("--quick", action="store_true", help="FLOPs of SD3-medium with one head set only (smoke test)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timed rounds per wall-clock benchmark "
                   "(default: each suite's own)")
    p.add_argument("--readme", default=None, metavar="PATH", help="also replace the report between the "
                   "'<!-- headpag bench: begin/end -->' lines of this Markdown file (e.g. README.md)")
    p.add_argument("--out", default="bench/results", help="directory for headpag-bench.json and report.md "
                   "(default: bench/results)")
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
    argparse does for bad options); with ``--debug`` it is raised with its traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - every error of a command becomes one line (or a traceback with --debug)
        if args.debug:
            raise
        message = str(err) if isinstance(err, (ValueError, TypeError, OSError)) else f"{type(err).__name__}: {err}"
        print(f"headpag {args.command}: error: {message or type(err).__name__} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
