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

Run directory (``out_dir``, format in :mod:`headpag.search.run_dir`): the settings (the model's weights
fingerprint and dtype, the pipeline arguments, the objective, ...; a directory written with other settings is
refused, naming what differs), one fsynced record per finished evaluation, bound to those settings (a rerun skips
everything recorded under its own settings and refuses records of others), round-1 thumbnails, and at the end
``heads.json`` and ``summary.json``. A hunt holds the directory's lock of its rank: a second hunt on it fails at
once.

A patch the caller had enabled on the pipeline (``enable_fused`` / ``enable_eager``, its settings and row heads) is
given back when the search ends, also when it fails.

Distributed: under ``torchrun`` (``torch.distributed`` initialised from the environment) the candidates of each
round are sharded over the ranks; every rank writes its own records; rank 0 merges and picks, and the choice is
broadcast.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..archs import call_pattern_of, list_layers
from ..guided import EXECUTIONS, disable, enable, set_row_heads
from ..guided.session import attach, sessions_of
from ..guided.settings import check_refresh, check_scale
from ..heads import HeadSet
from ..kernels import MODES
from . import run_dir as runs
from .run_dir import Head
from .objectives import check_scores

STRATEGIES = ("exact", "halving")


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


# --- the search -----------------------------------------------------------------------------------------------------

class _Hunter:
    def __init__(self, pipe, objective, prompts, seeds, scale, u, mode, guidance_scale, num_inference_steps,
                 batch_size, encode, out_dir, rank, world, verbose, pipeline_kwargs, settings_id=None):
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
        self.settings_id = settings_id
        self.records = runs.RecordWriter(out_dir, rank, settings_id) if out_dir is not None else None

    def record(self, entry: dict) -> None:
        if self.records is not None:
            self.records.write(entry)

    def close(self) -> None:
        if self.records is not None:
            self.records.close()

    # generation
    def _call_kwargs(self) -> dict:
        kw = {"num_inference_steps": self.num_inference_steps, "output_type": "pt", **self.pipeline_kwargs}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        else:
            kw.update(call_pattern_of(self.pipe).cfg_off)  # CFG off, as in the paper
        return kw

    def generate(self, jobs: list[_Job], selected: dict[Head, float]) -> torch.Tensor:
        """Images ``(len(jobs), 3, H, W)`` of the jobs, each with S + {its head} perturbed."""
        row_heads = []
        for job in jobs:
            heads = dict(selected)
            heads[job.head] = self.u
            row_heads.append(HeadSet([(l, h, c) for (l, h), c in heads.items()]))
        set_row_heads(self.pipe, row_heads)
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
                    runs.save_thumbnail(image, runs.thumbnail_path(self.out_dir, job.head))
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

    def score_round(self, round_: int, stages, remaining: list[Head], selected: dict[Head, float],
                    scores: dict[Head, dict[int, float]], k: int, progress) -> list[Head]:
        """Scores this rank's share of the candidates through the stages (one stage for the exact search), updating
        ``scores`` in place with every rank's results; returns the candidates of the last stage."""
        survivors = remaining
        state = runs.state_key(selected)
        for stage, (_, n_eval) in enumerate(stages):
            if stage > 0:
                survivors = _top(_means(scores, survivors), max(k, math.ceil(len(survivors) / 2)))
            mine = survivors[self.rank::self.world]
            jobs = [_Job(h, p) for h in mine for p in range(n_eval) if p not in scores[h]]
            progress.total += len(mine)
            progress.update(sum(1 for h in mine if all(p in scores[h] for p in range(n_eval))))
            for head, new in self.evaluate(jobs, selected, round_, progress).items():
                scores[head].update(new)
            _barrier()
            if self.world > 1:
                scores.update(runs.merged_scores(self.out_dir, round_, state, scores, self.settings_id))
        return survivors


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


def _auto_batch_size(hunter: "_Hunter", heads: list[Head], selected: dict[Head, float], n_jobs: int) -> int:
    """Jobs per pipeline call from a probe of this pipeline (one-step calls of 1 and a few jobs): its measured
    bytes and seconds per row, the device's available memory and the steps per call
    (:mod:`headpag.search.batching`)."""
    from .batching import auto_batch_size

    def probe(rows: int) -> None:
        jobs = [_Job(heads[i % len(heads)], i % len(hunter.pairs)) for i in range(rows)]
        saved = hunter.num_inference_steps, hunter.images_generated, hunter.generate_seconds
        hunter.num_inference_steps = 1
        try:
            hunter.generate(jobs, selected)
        finally:
            hunter.num_inference_steps, hunter.images_generated, hunter.generate_seconds = saved

    device = getattr(hunter.pipe, "_execution_device", None) or getattr(hunter.pipe, "device", torch.device("cpu"))
    size, cost = auto_batch_size(probe, torch.device(device), hunter.num_inference_steps, n_jobs)
    if hunter.verbose and hunter.rank == 0:
        print(f"batch size auto: {size} jobs per pipeline call (measured per row: "
              f"{cost.bytes_per_row / 2**20:.1f} MiB, {1000 * cost.seconds_per_row_step:.1f} ms per step; "
              f"{n_jobs} jobs per round at most)", flush=True)
    return size


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
    refresh: int = 1,
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
        batch_size: jobs per pipeline call, or "auto": from a probe of the pipeline's bytes and seconds per row
            and the device's available memory (GPU or CPU alike; :mod:`headpag.search.batching`).
        strategy: "exact" or "halving" (successive halving, an approximation).
        encode: maps a list of prompt strings to pipeline keyword arguments (default ``{"prompt": texts}``),
            e.g. to pass precomputed ``prompt_embeds``.
        pipeline_kwargs: further keyword arguments of every pipeline call (height, width, ...).
        refresh: ``k`` of ``enable_fused(..., refresh=k)``: candidates are scored with the perturbed rows run every
            ``k``-th guided step and their difference reused in between (1: every step, the paper's setting).
        execution: "fused" (batched twins, the point of headpag) or "eager" (a separate perturbed forward with
            materialised maps; with ``batch_size=1`` this is the paper's one-candidate-at-a-time baseline).

    Raises:
        ValueError: a bad argument; a run directory written with other settings (naming what differs), of another
            format version, or holding an invalid record (naming the file and line).
        RunDirectoryBusy: (a ``RuntimeError``) another hunt holds ``out_dir`` (the same rank).
    """
    prompts, seeds = list(prompts), list(seeds)
    check_refresh(refresh)
    _check_arguments(objective, prompts, seeds, k, rounds, scale, u, mode, guidance_scale, num_inference_steps,
                     batch_size, strategy, execution)
    layers = list_layers(pipe)
    all_heads = HeadSet([(layer.index, "*") for layer in layers]).resolve(pipe)
    pool = [(l, h) for l, h, _ in (HeadSet.from_any(candidates).resolve(pipe) if candidates is not None else all_heads)]
    init_set = HeadSet.from_any(init).resolve(pipe) if init is not None else None
    selected: dict[Head, float] = {(l, h): c for l, h, c in init_set} if init_set else {}
    pool = [h for h in pool if h not in selected]
    if k * rounds > len(pool):
        raise ValueError(f"k x rounds = {k * rounds} exceeds the {len(pool)} candidate heads")

    rank, world = _rank_and_world()
    if world > 1 and out_dir is None:
        raise ValueError("a distributed hunt needs out_dir: the ranks exchange their records through it")
    run_dir = Path(out_dir) if out_dir is not None else None
    user_patch = _user_patch(pipe)
    lock = None
    try:
        recorded: dict[tuple[int, str, Head], dict[int, float]] = {}
        settings_id = None
        if run_dir is not None:
            settings = runs.settings_record(
                pipe, prompts, seeds, k, rounds, pool, list(init_set) if init_set else [], scale, u, mode,
                guidance_scale, num_inference_steps, strategy, objective, pipeline_kwargs, execution, encode, refresh)
            settings_id = runs.settings_id(settings)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = runs.RunLock(run_dir, rank).acquire()
            runs.check_settings(run_dir, settings)  # before anything is changed in the directory
            runs.repair_records(run_dir, rank)
            recorded = _recorded_scores(run_dir, settings_id)
            runs.prepare(run_dir, settings, rank)
            _barrier()

        result = _search(pipe, objective, prompts, seeds, k, rounds, pool, selected, scale, u, mode, guidance_scale,
                         num_inference_steps, batch_size, strategy, verbose, encode, pipeline_kwargs, execution,
                         run_dir, rank, world, recorded, settings_id, refresh)
        if run_dir is not None and rank == 0:
            runs.write_results(run_dir, result.heads, runs.summary_record(result), model=pipe)
    except BaseException:
        try:
            _restore_patch(user_patch)
        except Exception as err:  # the search's own error is the one to see
            warnings.warn(f"headpag.hunt could not give back the patch enabled on the pipeline before the search: "
                          f"{err}", stacklevel=2)
        if lock is not None:
            lock.release()
        raise
    try:
        _restore_patch(user_patch)
    finally:
        if lock is not None:
            lock.release()
    return result


def _search(pipe, objective, prompts, seeds, k, rounds, pool, selected, scale, u, mode, guidance_scale,
            num_inference_steps, batch_size, strategy, verbose, encode, pipeline_kwargs, execution, run_dir, rank,
            world, recorded, settings_id, refresh=1) -> HuntResult:
    """The rounds of :func:`hunt` on a prepared run directory (or none): patches ``pipe`` for the search and
    removes the patch at the end, also on error."""
    from tqdm.auto import tqdm

    base = HeadSet([pool[0]])
    enable(pipe, base, execution=execution, scale=scale, mode=mode, refresh=refresh)
    hunter = None
    results: list[RoundResult] = []
    images_exact = 0
    start = time.perf_counter()
    try:
        hunter = _Hunter(pipe, objective, prompts, seeds, scale, u, mode, guidance_scale, num_inference_steps,
                         1 if batch_size == "auto" else batch_size, encode, run_dir, rank, world, verbose,
                         pipeline_kwargs, settings_id)
        if batch_size == "auto":
            hunter.batch_size = _auto_batch_size(hunter, pool, selected,
                                                 math.ceil(len(pool) / world) * len(hunter.pairs))
        n_pairs = len(hunter.pairs)
        for round_ in range(1, rounds + 1):
            remaining = [h for h in pool if h not in selected]
            images_exact += len(remaining) * n_pairs
            state = runs.state_key(selected)
            scores: dict[Head, dict[int, float]] = {h: dict(recorded.get((round_, state, h), {})) for h in remaining}
            stages = _stages(len(remaining), k, n_pairs) if strategy == "halving" else [(len(remaining), n_pairs)]
            with tqdm(total=0, desc=f"round {round_}/{rounds}", unit="cand", disable=not verbose or rank != 0) as progress:
                survivors = hunter.score_round(round_, stages, remaining, selected, scores, k, progress)
            means = _means(scores, survivors)
            added = _broadcast(_top(means, k) if rank == 0 else None)
            results.append(RoundResult(round_, sorted(selected), means, scores, added))
            for head in added:
                selected[head] = u
    finally:
        if hunter is not None:
            hunter.close()
        disable(pipe)
    elapsed = time.perf_counter() - start
    heads = HeadSet([(l, h, c) for (l, h), c in sorted(selected.items())])
    return HuntResult(
        heads, results,
        {"total": elapsed, "generate": hunter.generate_seconds, "score": hunter.score_seconds},
        hunter.images_generated, images_exact,
    )


def _user_patch(pipe):
    """The headpag patch ``pipe`` carries before the search, to give back after it: ``(pipeline it was enabled on,
    execution, settings and row heads per denoiser)``, or None when there is none. (A pipeline sharing its
    denoiser with the one the patch was enabled on carries that pipeline's patch: it is given back to that one.)"""
    current = [session for _, session in sessions_of(pipe) if session is not None]
    if not current:
        return None
    owner = current[0].pipe_ref()
    owner = pipe if owner is None else owner
    sessions = [session for _, session in sessions_of(owner)]
    if any(session is None for session in sessions):
        warnings.warn("the pipeline carries a headpag patch on some of its denoisers only (was one replaced after "
                      "enabling?): headpag.hunt removes it and cannot give it back; call headpag.enable again after "
                      "the search", stacklevel=3)
        return None
    return (owner, "fused" if sessions[0].fused else "eager", [s.settings for s in sessions],
            [s.row_heads for s in sessions])


def _restore_patch(patch) -> None:
    """Enables again what :func:`_user_patch` saw (same execution, settings and row heads on every denoiser)."""
    if patch is None:
        return
    owner, execution, settings, row_heads = patch
    for session, s, rows in zip(attach(owner, execution, settings), settings, row_heads):
        if rows is not None:
            session.select(s, rows)


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


def _check_arguments(objective, prompts, seeds, k, rounds, scale, u, mode, guidance_scale, num_inference_steps,
                     batch_size, strategy, execution) -> None:
    """Every argument of :func:`hunt` that needs no model, checked before anything is written or generated."""
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
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not callable(objective):
        raise TypeError(f"objective must be a callable (images, prompts) -> scores, got {type(objective).__name__}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {batch_size!r}")


def _recorded_scores(run_dir: Path, settings_id: str) -> dict[tuple[int, str, Head], dict[int, float]]:
    """``{(round, state key, candidate): {pair: score}}`` of every record in the run directory (what a rerun skips);
    every record is validated and must carry ``settings_id`` (records of other settings are refused)."""
    recorded: dict[tuple[int, str, Head], dict[int, float]] = {}
    for rec in runs.read_records(run_dir, settings_id):
        key = (rec["round"], runs.state_key([tuple(h) for h in rec["selected"]]), tuple(rec["candidate"]))
        recorded.setdefault(key, {}).update(dict(zip(rec["pairs"], rec["scores"])))
    return recorded
