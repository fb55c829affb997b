"""A tiny random CLIP (model, tokenizer, image processor) written to disk offline, for objectives and pipelines.

The tokenizer is byte-level: vocab.json holds every byte character (with and without ``</w>``) and merges.txt no
merges; files are passed positionally (transformers 5.x ignores ``vocab_file=`` / ``merges_file=``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer(root: Path) -> CLIPTokenizer:
    """A byte-level CLIPTokenizer whose files live in ``root``."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)


def _text_config(tok: CLIPTokenizer, **kwargs) -> dict:
    bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **kwargs)


def save_tiny_clip(root: Path) -> tuple[str, str]:
    """``(model_dir, processor_dir)``: a tiny random CLIPModel (its processor saved alongside) and the processor
    alone in a second directory."""
    root = Path(root)
    tok = tokenizer(root)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_text_config(tok),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model_dir, processor_dir = root / "model", root / "processor"
    CLIPModel(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    processor.save_pretrained(processor_dir)
    return str(model_dir), str(processor_dir)


def text_encoder(root: Path, hidden_size: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A tiny random CLIP text encoder of width ``hidden_size`` and its tokenizer (for SD-style pipelines)."""
    tok = tokenizer(Path(root))
    torch.manual_seed(0)
    cfg = _text_config(tok)
    cfg.update(hidden_size=hidden_size)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval(), tok
