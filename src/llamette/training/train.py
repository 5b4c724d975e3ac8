"""Train llamette's bundled demo model: a small Llama on the generated story corpus (PyTorch, CPU).

The PyTorch model below computes what llamette's forward computes (RMSNorm, RoPE on adjacent
pairs, grouped-query attention, SwiGLU, a classifier tied to the embedding) and names its tensors
as llamette (and Meta) do, so it exports with llamette's own llama2.c writer. Seeded throughout:
the same seed, steps and thread count give the same model.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from llamette.formats.llama2c import write_llama2c
from llamette.perplexity import windows
from llamette.tokenizer import SentencePieceTokenizer
from llamette.training.corpus import make_corpus
from llamette.weights import ModelConfig, Weights


@dataclass(frozen=True)
class TrainConfig:
    """What a training run depends on; the defaults make the bundled model."""

    seed: int = 1
    train_stories: int = 5000
    heldout_stories: int = 300
    vocab_size: int = 1024
    dim: int = 128
    hidden_dim: int = 384
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 32
    steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    threads: int = 2

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads,
                           self.vocab_size, self.seq_len, shared_classifier=True)  # fmt: skip


def train_tokenizer(stories: list[str], vocab_size: int) -> SentencePieceTokenizer:
    """A SentencePiece BPE model with byte fallback, ids 0/1/2 for unk/BOS/EOS as Llama's."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for s in stories for line in s.split("\n")),
        model_writer=model, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    tokenizer = SentencePieceTokenizer(processor, source="trained")
    tokenizer.model_proto = model.getvalue()
    return tokenizer


def token_stream(stories: list[str], tokenizer) -> np.ndarray:
    """Every story as BOS + its ids, end to end."""
    ids: list[int] = []
    for text in stories:
        ids.extend(tokenizer.encode(text, bos=True))
    return np.asarray(ids, np.int64)


def build_model(c: TrainConfig):
    """The PyTorch Llama (defined inside, so that torch is imported only for training)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_size = c.dim // c.n_heads
            self.wq = nn.Linear(c.dim, c.dim, bias=False)
            self.wk = nn.Linear(c.dim, c.n_kv_heads * self.head_size, bias=False)
            self.wv = nn.Linear(c.dim, c.n_kv_heads * self.head_size, bias=False)
            self.wo = nn.Linear(c.dim, c.dim, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape  # noqa: N806 (batch, time)
            q = self.wq(x).view(B, T, c.n_heads, self.head_size)
            k = self.wk(x).view(B, T, c.n_kv_heads, self.head_size)
            v = self.wv(x).view(B, T, c.n_kv_heads, self.head_size)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            repeat = c.n_heads // c.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            return self.wo(out.transpose(1, 2).reshape(B, T, c.dim))

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=False)
            self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=False)
            self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm, self.attention = RMSNorm(c.dim), Attention()
            self.ffn_norm, self.feed_forward = RMSNorm(c.dim), FeedForward()

        def forward(self, x, cos, sin):
            x = x + self.attention(self.attention_norm(x), cos, sin)
            return x + self.feed_forward(self.ffn_norm(x))

    def rope(x, cos, sin):
        """Rotate adjacent pairs (x[2i], x[2i+1]) by position-dependent angles, as llamette does."""
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return rotated.flatten(-2)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
            self.layers = nn.ModuleList(Block() for _ in range(c.n_layers))
            self.norm = RMSNorm(c.dim)
            head_size = c.dim // c.n_heads
            freqs = 10000.0 ** (-torch.arange(0, head_size, 2).float() / head_size)
            angles = torch.outer(torch.arange(c.seq_len).float(), freqs)  # (seq_len, head_size/2)
            self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
            self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = (
                        0.02 / math.sqrt(2 * c.n_layers)
                        if name.endswith(("wo.weight", "w2.weight"))
                        else 0.02
                    )
                    nn.init.normal_(p, 0.0, std)

        def forward(self, tokens):
            T = tokens.shape[1]  # noqa: N806
            x = self.tok_embeddings(tokens)
            cos, sin = self.cos[:, :T], self.sin[:, :T]
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.norm(x) @ self.tok_embeddings.weight.T  # tied classifier

    return Llama()


def heldout_loss(model, stream: np.ndarray, c: TrainConfig) -> float:
    """Mean next-token loss over the held-out stream, in the windows `llamette perplexity` uses
    (each led by BOS), so that the two figures compare."""
    import torch
    from torch.nn import functional as F

    parts = list(windows(stream[1:].tolist(), c.seq_len))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for part in parts:
            ids = torch.tensor([part])
            logits = model(ids[:, :-1])[0]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(part) - 1
    model.train()
    return total / count


def train(
    out_dir: str,
    c: TrainConfig = TrainConfig(),
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
) -> dict:
    """Make the corpus and tokenizer, train, and write model.bin (v1), model_q80.bin (v2),
    tokenizer.bin, tokenizer.model and train-log.json into out_dir. Returns the log.

    on_eval receives each evaluation's {"step", "train_loss", "heldout_loss"} as it is made.
    """
    import torch
    from torch.nn import functional as F
    from tqdm import tqdm

    torch.manual_seed(c.seed)
    torch.set_num_threads(c.threads)
    started = time.perf_counter()
    stories = make_corpus(c.train_stories + c.heldout_stories, c.seed)
    train_stories, heldout_stories = stories[: c.train_stories], stories[c.train_stories :]
    tokenizer = train_tokenizer(train_stories, c.vocab_size)
    train_ids = token_stream(train_stories, tokenizer)
    heldout_ids = token_stream(heldout_stories, tokenizer)

    model = build_model(c)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=c.learning_rate, betas=(0.9, 0.95),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(c.seed)
    data = torch.from_numpy(train_ids)
    log = {"config": asdict(c), "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
           "steps": []}  # fmt: skip
    bar = tqdm(range(1, c.steps + 1), desc="training", unit="step", disable=not progress)
    for step in bar:
        lr = c.learning_rate * min(1.0, step / c.warmup_steps)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / c.steps))  # cosine to a tenth
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - c.seq_len - 1, (c.batch_size,), generator=generator)
        x = torch.stack([data[s : s + c.seq_len] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + c.seq_len + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(x).reshape(-1, c.vocab_size), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % c.eval_every == 0 or step == c.steps:
            held = heldout_loss(model, heldout_ids, c)
            log["steps"].append({"step": step, "train_loss": loss.item(), "heldout_loss": held})
            if on_eval:
                on_eval(log["steps"][-1])
            bar.set_postfix(train=f"{loss.item():.3f}", heldout=f"{held:.3f}")
    log["greedy"] = greedy_sample(model, tokenizer, GREEDY_PROMPT, GREEDY_TOKENS)
    log["heldout_loss"] = log["steps"][-1]["heldout_loss"]
    log["heldout_perplexity"] = math.exp(log["heldout_loss"])
    log["seconds"] = time.perf_counter() - started
    export(model, tokenizer, c, out_dir, log)
    return log


GREEDY_PROMPT, GREEDY_TOKENS = "Once upon a time", 120


def greedy_sample(model, tokenizer, prompt: str, n_tokens: int) -> dict:
    """PyTorch's greedy continuation of a prompt, recorded for llamette's tests to compare with."""
    import torch

    prompt_ids = tokenizer.encode(prompt, bos=True)
    ids = list(prompt_ids)
    context = model.cos.shape[1]
    model.eval()
    with torch.no_grad():
        for _ in range(min(n_tokens, context - len(ids))):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    model.train()
    return {"prompt": prompt, "prompt_ids": prompt_ids, "ids": ids[len(prompt_ids) :]}


def export(model, tokenizer, c: TrainConfig, out_dir: str, log: dict) -> None:
    """Write the model with llamette's llama2.c writers, the tokenizer, and the training log."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {name: p.detach().float().numpy() for name, p in model.state_dict().items()}
    weights = Weights(c.model_config(), tensors, source="trained")
    write_llama2c(weights, os.path.join(out_dir, "model.bin"), version=1)
    write_llama2c(weights, os.path.join(out_dir, "model_q80.bin"), version=2)
    tokenizer.save(os.path.join(out_dir, "tokenizer.bin"))
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tokenizer.model_proto)
    with open(os.path.join(out_dir, "train-log.json"), "w") as f:
        json.dump(log, f, indent=1)
