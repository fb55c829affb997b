"""HeadHunter: greedy search of the heads whose perturbation maximises an objective; batched, resumable,
distributed.

Exact strategy (the paper's): start from ``init`` (or the empty set) S; each round, for every candidate head h not
in S, generate the prompt x seed images with S + {h} perturbed, score them with the objective; a candidate's score
is the mean; add the top ``k`` (ties broken by (layer, head)) to S.

Speed comes from batching: one pipeline call carries many (candidate, prompt, seed) jobs, each batch row with its
own head set (the kernel's ``u`` is per row and head), each perturbed row forking at its own first fork unit.
Every job has its own seeded generator, so a candidate's images do not depend on which jobs share its batch.

Successive halving (``strategy="halving"``, an approximation): score every candidate on a first slice of the
prompt x seed pairs, keep the best half, extend their evaluation, repeat until the survivors have all pairs.

Run directory (``out_dir``): ``settings.json`` (refuses a directory written with other settings; batch size and
world size are not settings), ``records-rank{R}.jsonl`` (one JSON line per finished evaluation, flushed and
fsynced; a rerun skips everything recorded), ``thumbs/L{layer}_H{head}.png`` (each candidate's first image in
round 1), and at the end ``heads.json`` and ``summary.json``, written atomically.

Distributed: under ``torchrun`` (``torch.distributed`` initialised from the environment) the candidates of each
round are sharded over the ranks; every rank writes its own records; rank 0 merges and picks, and the choice is
broadcast.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .atlas import read_records
from .heads import HeadSet
from .layers import list_layers, model_class_name
from .objectives import check_scores
from .guidance import check_scale
from .patch import _PATCHES, MODES, disable, enable_eager, enable_fused
from .layers import get_denoiser

STRATEGIES = ("exact", "halving")
Head = tuple[int, int]


@dataclass
class RoundResult:
    """One round: every candidate's mean score and per-image scores (pair index -> score), what it added."""

    round: int
    selected_before: list[Head]
    means: dict[Head, float]
    scores: dict[Head, dict[int, float]]
    added: list[Head]


@dataclass
class HuntResult:
    """The selected heads, every round's scores, timings and the generation work done."""

    heads: HeadSet
    rounds: list[RoundResult]
    timings: dict[str, float]
    images_generated: int
    images_exact: int = 0  # what the exact search would generate for the same rounds

    @property
    def work_fraction(self) -> float:
        return self.images_generated / self.images_exact if self.images_exact else 1.0


@dataclass
class _Job:
    head: Head
    pair: int  # index into the prompt x seed pairs


# --- settings and the run directory --------------------------------------------------------------------------------

def _settings_record(pipe, prompts, seeds, k, rounds, candidates, init, scale, u, mode, guidance_scale,
                     num_inference_steps, strategy, objective) -> dict:
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_run_dir(out_dir: Path, settings: dict, rank: int) -> None:
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
        _write_atomic(path, json.dumps(settings, indent=1))


def _drop_partial_line(path: Path) -> None:
    """Cuts a half-written last line (a run interrupted mid-write) so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _state_key(selected: Sequence[Head]) -> str:
    return ",".join(f"{l}:{h}" for l, h in sorted(selected))


# --- images ---------------------------------------------------------------------------------------------------------

def _as_tensor_images(images) -> torch.Tensor:
    """Pipeline output (tensor, numpy array or PIL list) as float ``(B, 3, H, W)`` in [0, 1] on the CPU."""
    if isinstance(images, torch.Tensor):
        t = images
    elif isinstance(images, np.ndarray):
        t = torch.from_numpy(images).permute(0, 3, 1, 2)
    else:
        t = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images])
    return t.detach().float().cpu().clamp(0, 1)


def _save_thumbnail(image: torch.Tensor, path: Path, size: int = 64) -> None:
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((size, size)).save(path)


# --- the search -----------------------------------------------------------------------------------------------------

class _Hunter:
    def __init__(self, pipe, objective, prompts, seeds, scale, u, mode, guidance_scale, num_inference_steps,
                 batch_size, encode, out_dir, rank, world, verbose, pipeline_kwargs):
        self.pipe = pipe
        self.objective = objective
        self.prompts = list(prompts)
        self.pairs = [(p, s) for p in range(len(prompts)) for s in seeds]
        self.seeds = list(seeds)
        self.scale, self.u, self.mode = scale, u, mode
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.batch_size = batch_size
        self.encode = encode or (lambda texts: {"prompt": texts})
        self.out_dir = out_dir
        self.rank, self.world = rank, world
        self.verbose = verbose
        self.pipeline_kwargs = pipeline_kwargs or {}
        self.images_generated = 0
        self.generate_seconds = 0.0
        self.score_seconds = 0.0
        self._record_file = None

    # records
    def record(self, entry: dict) -> None:
        if self.out_dir is None:
            return
        if self._record_file is None:
            path = self.out_dir / f"records-rank{self.rank}.jsonl"
            _drop_partial_line(path)
            self._record_file = open(path, "a")
        self._record_file.write(json.dumps(entry) + "\n")
        self._record_file.flush()
        os.fsync(self._record_file.fileno())

    def close(self) -> None:
        if self._record_file is not None:
            self._record_file.close()

    # generation
    def _call_kwargs(self) -> dict:
        kw = {"num_inference_steps": self.num_inference_steps, "output_type": "pt", **self.pipeline_kwargs}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        elif type(self.pipe).__name__ != "FluxPipeline":
            kw["guidance_scale"] = 1.0  # CFG off, as in the paper (Flux keeps its distilled guidance)
        return kw

    def generate(self, jobs: list[_Job], selected: dict[Head, float]) -> torch.Tensor:
        """Images ``(len(jobs), 3, H, W)`` of the jobs, each with S + {its head} perturbed."""
        row_heads = []
        for job in jobs:
            heads = dict(selected)
            heads[job.head] = self.u
            row_heads.append(HeadSet([(l, h, c) for (l, h), c in heads.items()]))
        patch = _PATCHES[get_denoiser(self.pipe)]
        patch.set_row_heads(row_heads)
        texts = [self.prompts[self.pairs[j.pair][0]] for j in jobs]
        generators = [torch.Generator(device="cpu").manual_seed(self.pairs[j.pair][1]) for j in jobs]
        start = time.perf_counter()
        out = self.pipe(**self.encode(texts), generator=generators, **self._call_kwargs())
        self.generate_seconds += time.perf_counter() - start
        self.images_generated += len(jobs)
        return _as_tensor_images(out.images)

    def evaluate(self, jobs: list[_Job], selected: dict[Head, float], round_: int, progress) -> dict[Head, dict[int, float]]:
        """Scores of ``jobs`` (pairs of candidates), recorded per candidate once all its jobs in ``jobs`` are done."""
        remaining: dict[Head, int] = {}
        for job in jobs:
            remaining[job.head] = remaining.get(job.head, 0) + 1
        done: dict[Head, dict[int, float]] = {}
        started = {head: time.perf_counter() for head in remaining}
        bs = self.batch_size
        for i in range(0, len(jobs), bs):
            batch = jobs[i:i + bs]
            images = self.generate(batch, selected)
            texts = [self.prompts[self.pairs[j.pair][0]] for j in batch]
            start = time.perf_counter()
            scores = check_scores(self.objective(images, texts), images, texts)
            self.score_seconds += time.perf_counter() - start
            for job, image, score in zip(batch, images, scores.tolist()):
                if round_ == 1 and job.pair == 0 and self.out_dir is not None:
                    _save_thumbnail(image, self.out_dir / "thumbs" / f"L{job.head[0]}_H{job.head[1]}.png")
                done.setdefault(job.head, {})[job.pair] = score
                remaining[job.head] -= 1
                if remaining[job.head] == 0:
                    pairs = sorted(done[job.head])
                    self.record({
                        "round": round_, "selected": [list(h) for h in sorted(selected)], "candidate": list(job.head),
                        "pairs": pairs, "scores": [done[job.head][p] for p in pairs],
                        "mean": float(np.mean([done[job.head][p] for p in pairs])),
                        "seconds": time.perf_counter() - started[job.head],
                    })
                    progress.update(1)
        return done


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _top(means: dict[Head, float], k: int) -> list[Head]:
    return sorted(means, key=lambda h: (-means[h], h))[:k]


def _auto_batch_size(pipe, n_jobs: int) -> int:
    """Jobs per pipeline call: on CUDA from the free memory and a measured per-row cost, else 4."""
    device = getattr(pipe, "device", torch.device("cpu"))
    if device.type != "cuda":
        return max(1, min(4, n_jobs))
    free, _ = torch.cuda.mem_get_info(device)
    denoiser = get_denoiser(pipe)
    params = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    # Activations of one guided row grow with the model; a conservative tenth of the weights per row.
    per_row = max(params // 10, 64 << 20)
    return max(1, min(n_jobs, int(0.5 * free // per_row)))


def hunt(
    pipe,
    objective: Callable,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    k: int = 3,
    rounds: int = 1,
    candidates=None,
    init=None,
    scale: float = 3.0,
    u: float = 1.0,
    mode: str = "joint",
    guidance_scale: float | None = None,
    num_inference_steps: int = 20,
    out_dir: str | os.PathLike | None = None,
    batch_size: int | str = "auto",
    strategy: str = "exact",
    verbose: bool = True,
    encode: Callable[[list[str]], dict] | None = None,
    pipeline_kwargs: dict | None = None,
    execution: str = "fused",
) -> HuntResult:
    """Greedy head search (module docstring). Returns the selected heads, every round's scores and timings.

    Args:
        pipe: a pipeline ``headpag.enable_fused`` supports.
        objective: ``(images (B, 3, H, W) in [0, 1], prompts) -> B scores``; higher is better.
        prompts, seeds: each candidate is scored on every (prompt, seed) pair.
        k, rounds: heads added per round, number of rounds.
        candidates: heads to consider (anything ``HeadSet`` parses); default every head of every layer.
        init: a starting head set S.
        scale, u, mode: PAG scale, the coefficient of a candidate head, and the identity mode.
        guidance_scale: the pipeline's CFG scale; None turns CFG off, as in the paper (Flux keeps its distilled
            guidance).
        out_dir: run directory for records, thumbnails and results; rerunning resumes.
        batch_size: jobs per pipeline call, or "auto" (from free GPU memory; 4 on CPU).
        strategy: "exact" or "halving" (successive halving, an approximation).
        encode: maps a list of prompt strings to pipeline keyword arguments (default ``{"prompt": texts}``),
            e.g. to pass precomputed ``prompt_embeds``.
        pipeline_kwargs: further keyword arguments of every pipeline call (height, width, ...).
        execution: "fused" (batched twins, the point of headpag) or "eager" (a separate perturbed forward with
            materialised maps; with ``batch_size=1`` this is the paper's one-candidate-at-a-time baseline).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    seeds = list(seeds)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    check_scale(scale)
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < float(u) <= 1.0:
        raise ValueError(f"u must be a number in (0, 1] (the coefficient of a candidate head), got {u!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))):
        raise ValueError(f"guidance_scale must be a number or None (CFG off), got {guidance_scale!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if execution not in ("fused", "eager"):
        raise ValueError(f"execution must be 'fused' or 'eager', got {execution!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not callable(objective):
        raise TypeError(f"objective must be a callable (images, prompts) -> scores, got {type(objective).__name__}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {batch_size!r}")
    layers = list_layers(pipe)
    all_heads = HeadSet([(layer.index, "*") for layer in layers]).resolve(pipe)
    pool = [(l, h) for l, h, _ in (HeadSet.from_any(candidates).resolve(pipe) if candidates is not None else all_heads)]
    init_set = HeadSet.from_any(init).resolve(pipe) if init is not None else None
    selected: dict[Head, float] = {(l, h): c for l, h, c in init_set} if init_set else {}
    pool = [h for h in pool if h not in selected]
    if k * rounds > len(pool):
        raise ValueError(f"k x rounds = {k * rounds} exceeds the {len(pool)} candidate heads")

    rank, world = _rank_and_world()
    run_dir = Path(out_dir) if out_dir is not None else None
    settings = _settings_record(pipe, prompts, seeds, k, rounds, pool, list(init_set) if init_set else [], scale, u,
                                mode, guidance_scale, num_inference_steps, strategy, objective)
    recorded: dict[tuple[int, str, Head], dict[int, float]] = {}
    if run_dir is not None:
        _prepare_run_dir(run_dir, settings, rank)
        _barrier()
        (run_dir / "thumbs").mkdir(exist_ok=True)
        for rec in read_records(run_dir):
            key = (rec["round"], _state_key([tuple(h) for h in rec["selected"]]), tuple(rec["candidate"]))
            recorded.setdefault(key, {}).update(dict(zip(rec["pairs"], rec["scores"])))

    base = HeadSet([pool[0]])
    (enable_fused if execution == "fused" else enable_eager)(pipe, base, scale=scale, mode=mode)
    hunter = _Hunter(pipe, objective, prompts, seeds, scale, u, mode, guidance_scale, num_inference_steps,
                     _auto_batch_size(pipe, len(pool) * len(prompts) * len(seeds)) if batch_size == "auto" else batch_size,
                     encode, run_dir, rank, world, verbose, pipeline_kwargs)
    n_pairs = len(hunter.pairs)
    results: list[RoundResult] = []
    images_exact = 0
    start = time.perf_counter()
    try:
        for round_ in range(1, rounds + 1):
            remaining = [h for h in pool if h not in selected]
            images_exact += len(remaining) * n_pairs
            state = _state_key(selected)
            scores: dict[Head, dict[int, float]] = {h: dict(recorded.get((round_, state, h), {})) for h in remaining}
            stages = _stages(len(remaining), k, n_pairs) if strategy == "halving" else [(len(remaining), n_pairs)]
            survivors = remaining
            with tqdm(total=0, desc=f"round {round_}/{rounds}", unit="cand", disable=not verbose or rank != 0) as progress:
                for stage, (_, n_eval) in enumerate(stages):
                    if stage > 0:
                        survivors = _top(_means(scores, survivors), max(k, math.ceil(len(survivors) / 2)))
                    mine = survivors[rank::world]
                    jobs = [_Job(h, p) for h in mine for p in range(n_eval) if p not in scores[h]]
                    progress.total += len(mine)
                    progress.update(sum(1 for h in mine if all(p in scores[h] for p in range(n_eval))))
                    for head, new in hunter.evaluate(jobs, selected, round_, progress).items():
                        scores[head].update(new)
                    _barrier()
                    if world > 1:
                        scores = _merged_scores(run_dir, round_, state, remaining, scores)
            means = _means(scores, survivors)
            added = _broadcast(_top(means, k) if rank == 0 else None)
            results.append(RoundResult(round_, sorted(selected), means, scores, added))
            for head in added:
                selected[head] = u
    finally:
        hunter.close()
        disable(pipe)
    elapsed = time.perf_counter() - start
    heads = HeadSet([(l, h, c) for (l, h), c in sorted(selected.items())])
    result = HuntResult(
        heads, results,
        {"total": elapsed, "generate": hunter.generate_seconds, "score": hunter.score_seconds},
        hunter.images_generated, images_exact,
    )
    if run_dir is not None and rank == 0:
        heads.save(run_dir / "heads.json", model=pipe)
        _write_atomic(run_dir / "summary.json", json.dumps(_summary(result), indent=1))
    return result


def _stages(n_candidates: int, k: int, n_pairs: int) -> list[tuple[int, int]]:
    """Successive-halving schedule: ``(survivors, pairs evaluated)`` per stage; the last stage has every pair."""
    n_stages = max(1, min(math.ceil(math.log2(max(n_candidates / k, 1))) + 1, n_pairs))
    stages = []
    survivors = n_candidates
    for s in range(n_stages):
        n_eval = n_pairs if s == n_stages - 1 else max(1, math.ceil(n_pairs / 2 ** (n_stages - 1 - s)))
        stages.append((survivors, n_eval))
        survivors = max(k, math.ceil(survivors / 2))
    return stages


def _means(scores: dict[Head, dict[int, float]], heads: Sequence[Head]) -> dict[Head, float]:
    return {h: float(np.mean(list(scores[h].values()))) for h in heads if scores[h]}


def _merged_scores(run_dir, round_, state, remaining, scores):
    """Every rank's records of this round (distributed runs write to the run directory)."""
    if run_dir is None:
        raise ValueError("a distributed hunt needs out_dir: the ranks exchange their records through it")
    merged = {h: dict(v) for h, v in scores.items()}
    for rec in read_records(run_dir):
        if rec["round"] == round_ and _state_key([tuple(h) for h in rec["selected"]]) == state:
            head = tuple(rec["candidate"])
            if head in merged:
                merged[head].update(dict(zip(rec["pairs"], rec["scores"])))
    return merged


def _summary(result: HuntResult) -> dict:
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
