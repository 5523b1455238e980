"""Stand-ins for a trained LM's final hidden states and LM head, where no real model can be loaded (no downloads).

Two kinds, both with token ids ordered by frequency as in a BPE vocabulary (Qwen's ids follow its merge order, so
frequent tokens have small ids and the vocabulary tail is rare): the property that decides how many vocabulary
tiles a backward can skip.

- `trained_lm`: a byte-level BPE tokenizer and a small next-token MLP (two previous tokens → H) trained for a few
  seconds on real text (the MATH500 problems and solutions of the shared benchmark folder); its hidden states on
  held-out text and its LM head give a trained model's peaked, context-dependent softmax. Small V (~2-4k).
- `zipf_logits`: any shape (Qwen's V = 151,936 included): a Zipf prior over token ids (p ∝ rank^-exponent,
  carried by hidden column 0) plus a random context term of std `context_std`; labels sampled from the softmax.
  Not trained: its per-row distributions are independent draws around one prior. How much of the vocabulary a
  backward may skip depends on the tail's steepness: exponent 2 with context std 1 (entropy ~1.7 nats, top-1
  p ~0.55, as an LM sampling at temperature 1) leaves a light tail; exponent 1.1 a long flat one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

ZIPF_EXPONENT = 1.1
BENCHMARKS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks"


class LmRows(NamedTuple):
    """hidden (N, H) fp32, weight (V, H) fp32, labels (N,) int64: rows of a model scoring `labels`."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor


def math500_texts(root: Path = BENCHMARKS) -> list[str]:
    """Problem + solution of every MATH500 record (raises FileNotFoundError when the shared folder is missing)."""
    path = root / "math500" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["problem"] + "\n" + r["solution"] for r in records]


def _tokenize(texts: Iterable[str], vocab_size: int) -> tuple[list[list[int]], int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return [enc.ids for enc in tokenizer.encode_batch(texts)], tokenizer.get_vocab_size()


def trained_lm(texts: list[str], *, vocab_size: int = 2048, hidden: int = 64, steps: int = 300, rows: int = 512,
               seed: int = 0) -> LmRows:
    """Train the small next-token model on all but the last 10% of `texts`; return `rows` consecutive held-out
    positions (hidden states after the final layer, the LM head, the true next tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids, vocab = _tokenize(texts, vocab_size)
    split = int(len(ids) * 0.9)
    train = torch.tensor([t for doc in ids[:split] for t in doc])
    held = torch.tensor([t for doc in ids[split:] for t in doc])
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(vocab, hidden)
    trunk = torch.nn.Sequential(torch.nn.Linear(2 * hidden, 4 * hidden), torch.nn.GELU(),
                                torch.nn.Linear(4 * hidden, hidden), torch.nn.LayerNorm(hidden))
    head = torch.nn.Linear(hidden, vocab, bias=False)
    params = [*embed.parameters(), *trunk.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def features(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return trunk(torch.cat([embed(tokens[at - 2]), embed(tokens[at - 1])], dim=1))

    for _ in range(steps):
        at = torch.randint(2, train.numel(), (1024,), generator=gen)
        loss = torch.nn.functional.cross_entropy(head(features(train, at)), train[at])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        at = torch.arange(2, 2 + min(rows, held.numel() - 2))
        return LmRows(features(held, at).float(), head.weight.detach().clone().float(), held[at].clone())


def zipf_logits(n: int, h: int, v: int, *, context_std: float = 4.0, exponent: float = ZIPF_EXPONENT,
                seed: int = 0, device: str | torch.device = "cpu") -> LmRows:
    """n rows over a vocabulary of v frequency-ordered ids: logits = −exponent·log(rank) + a random term of std
    context_std; labels sampled from that softmax (fp32 on `device`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen)
    weight = torch.randn(v, h, device=device, generator=gen) * (context_std / (h - 1) ** 0.5)
    hidden[:, 0] = 1.0
    weight[:, 0] = -exponent * torch.log(torch.arange(1, v + 1, device=device, dtype=torch.float32))
    labels = torch.empty(n, dtype=torch.int64, device=device)
    chunk = max(1, (1 << 24) // v)
    for start in range(0, n, chunk):
        probs = torch.softmax(hidden[start:start + chunk] @ weight.T, dim=-1)
        labels[start:start + chunk] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return LmRows(hidden, weight, labels)
