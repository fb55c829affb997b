"""Train the shipped digits models: ``python -m headpag.apps.digits.train --out headpag/apps/digits/weights``.

Needs scikit-learn (``pip install -e '.[train]'``): the data are ``sklearn.datasets.load_digits`` (1,797 images of
8x8, pixels 0-16), split once with a fixed seed into train (80 %) and held-out test (20 %) images.

1. The classifier (:class:`~headpag.apps.digits.model.DigitClassifier`, a small CNN) on the train split, with small
   random shifts, intensity jitter and noise; its accuracy on the test split is recorded.
2. The denoiser: a diffusers ``SD3Transformer2DModel`` (config :data:`~headpag.apps.digits.model.TRANSFORMER_CONFIG`)
   trained by rectified flow matching in pixel space on the train split: ``x_t = (1 - s) x_0 + s e``,
   ``s ~ U(0, 1)``, timestep ``1000 s`` (the scale of ``FlowMatchEulerDiscreteScheduler``), target velocity
   ``e - x_0``; the digit is the conditioning ("text") and is replaced by the null label with probability
   ``--label-dropout`` so that classifier-free guidance works. AdamW, linear warm-up then cosine decay, an EMA of the
   weights (what ships).
3. Evaluation: samples of every digit at several CFG scales, recognised by the classifier.

Writes ``OUT/pipeline`` (``DigitsPipeline.save_pretrained``), ``OUT/classifier`` (``save_pretrained``) and
``OUT/train.json`` (the command, every setting, versions, wall times, losses, accuracy, recognition rates).
Deterministic for a given seed and thread count up to floating-point reduction order.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of -1..1 pixel (zero fill), intensity jitter and noise on images in [0, 1]."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(b)])
    out = out * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen))
    out = out + 0.05 * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def train_classifier(x_train, y_train, x_test, y_test, *, epochs: int, batch_size: int, lr: float, seed: int, log):
    from .model import DigitClassifier

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xs, xt = x_train / 16.0, x_test / 16.0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_augment(xs[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(xt).argmax(1) == y_test).float().mean().item()
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(perm):.4f}, test accuracy {acc:.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == y_test).float().mean().item()
        train_acc = (model(xs).argmax(1) == y_train).float().mean().item()
    return model, {"test_accuracy": acc, "train_accuracy": train_acc, "n_test": len(y_test)}


def train_denoiser(x_train, y_train, *, steps: int, batch_size: int, lr: float, warmup: int, ema_decay: float,
                   label_dropout: float, seed: int, log, log_every: int = 100):
    from diffusers import SD3Transformer2DModel

    from .model import NULL_LABEL, TRANSFORMER_CONFIG, encode_labels, to_model_space

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    data = to_model_space(x_train)
    n = len(y_train)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses, window = [], []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x0, y = data[idx], y_train[idx].clone()
        y[torch.rand(len(y), generator=gen) < label_dropout] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(len(y), generator=gen)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        ehs, pooled = encode_labels(y)
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ehs, pooled_projections=pooled,
                     return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            mean = sum(window) / len(window)
            losses.append([step + 1, mean])
            window = []
            elapsed = time.perf_counter() - start
            log(f"denoiser step {step + 1}/{steps}: loss {mean:.4f}, lr {lr_at(step):.2e}, {elapsed:.0f} s "
                f"({elapsed / (step + 1):.3f} s/step)")
    ema.eval()
    return ema, losses


@torch.no_grad()
def recognition(pipe, classifier, *, guidance_scales, seeds: int, steps: int) -> dict:
    """Fraction of samples (every digit x ``seeds`` seeds) the classifier labels as the asked digit, per CFG scale."""
    digits = [d for d in range(10) for _ in range(seeds)]
    result = {}
    for g in guidance_scales:
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(digits))]
        images = pipe(digits, generator=gens, guidance_scale=g, num_inference_steps=steps, output_type="pt").images
        logits = classifier(classifier.prepare(images))
        pred = logits.argmax(1)
        conf = logits.softmax(1)[torch.arange(len(digits)), torch.tensor(digits)]
        result[str(g)] = {"recognised": (pred == torch.tensor(digits)).float().mean().item(),
                          "mean_confidence": conf.mean().item()}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m headpag.apps.digits.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights"), help="output directory")
    p.add_argument("--steps", type=int, default=3000, help="denoiser optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="denoiser batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="denoiser peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="denoiser warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped denoiser weights")
    p.add_argument("--label-dropout", type=float, default=0.15, help="probability of the null label (for CFG)")
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a small shared CPU one thread avoids oversubscription)")
    p.add_argument("--eval-seeds", type=int, default=20, help="samples per digit in the final evaluation")
    p.add_argument("--samples", default=None, help="optional PNG path: a grid of samples of every digit")
    args = p.parse_args(argv)

    from diffusers import FlowMatchEulerDiscreteScheduler
    import diffusers

    from .model import TRANSFORMER_CONFIG, load_sklearn_digits
    from .pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, DigitsPipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    x_train, y_train, x_test, y_test = load_sklearn_digits(seed=args.seed)
    log(f"data: {len(y_train)} train, {len(y_test)} test images of 8x8")

    classifier, cls_metrics = train_classifier(x_train, y_train, x_test, y_test, epochs=args.classifier_epochs,
                                               batch_size=64, lr=3e-3, seed=args.seed, log=log)
    t_cls = time.perf_counter() - t0
    classifier.save_pretrained(out / "classifier")
    log(f"classifier: test accuracy {cls_metrics['test_accuracy']:.4f} ({t_cls:.0f} s)")

    transformer, losses = train_denoiser(
        x_train, y_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        ema_decay=args.ema, label_dropout=args.label_dropout, seed=args.seed, log=log,
    )
    t_den = time.perf_counter() - t0 - t_cls
    pipe = DigitsPipeline(transformer, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out / "pipeline")
    log(f"denoiser: {args.steps} steps in {t_den:.0f} s")

    rec = recognition(pipe, classifier, guidance_scales=[1.0, 1.5, 2.0, 3.0, 4.0], seeds=args.eval_seeds,
                      steps=DEFAULT_STEPS)
    for g, r in rec.items():
        log(f"CFG {g}: recognised {r['recognised']:.3f}, mean confidence {r['mean_confidence']:.3f}")
    if args.samples:
        from .grid import save_grid

        gens = [torch.Generator().manual_seed(i) for i in range(100)]
        images = pipe([d for d in range(10) for _ in range(10)], generator=gens, output_type="pt").images
        save_grid(list(images.split(10)), args.samples)
        log(f"wrote {args.samples}")

    record = {
        "command": "python -m headpag.apps.digits.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "settings": vars(args),
        "transformer_config": TRANSFORMER_CONFIG,
        "data": {"source": "sklearn.datasets.load_digits", "train": len(y_train), "test": len(y_test),
                 "split_seed": args.seed},
        "parameters": {"transformer": sum(p.numel() for p in transformer.parameters()),
                       "classifier": sum(p.numel() for p in classifier.parameters())},
        "classifier": cls_metrics,
        "denoiser_loss": losses,
        "recognition": {"steps": DEFAULT_STEPS, "samples_per_digit": args.eval_seeds,
                        "default_guidance_scale": DEFAULT_GUIDANCE_SCALE, "by_guidance_scale": rec},
        "wall_seconds": {"classifier": round(t_cls, 1), "denoiser": round(t_den, 1),
                         "total": round(time.perf_counter() - t0, 1)},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads},
    }
    (out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out} (total {record['wall_seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
