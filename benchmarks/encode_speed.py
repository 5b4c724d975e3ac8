"""How fast text becomes ids: llamette's encoder against SentencePiece's, side by side.

Usage: python benchmarks/encode_speed.py [TOKENIZER_DIR] [--kb N] [--runs N]

Encodes N KB of random sentences with tokenizer.bin (llamette, a fresh tokenizer each run, so
its word cache starts empty) and tokenizer.model (SentencePiece), alternating, and prints the
medians and their ratio. The folder defaults to ../shared/models.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from llamette import Tokenizer

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def sample_text(pieces: list[bytes], n_chars: int, seed: int = 0) -> str:
    """Random sentences of the vocabulary's own ASCII words, n_chars long."""
    rng = random.Random(seed)
    words = [p.decode().strip() for p in pieces[1000:9000] if p.isascii() and len(p) > 2]
    text = ""
    while len(text) < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        text += sentence.capitalize() + rng.choice([". ", "! ", "? ", ".\n"])
    return text[:n_chars]


def seconds(encode, text: str) -> float:
    start = time.perf_counter()
    encode(text)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=SHARED_MODELS)
    parser.add_argument("--kb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    import sentencepiece

    loaded = Tokenizer.load(args.folder / "tokenizer.bin")
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(args.folder / "tokenizer.model")
    )
    text = sample_text(loaded.pieces, args.kb * 1000)
    times: dict[str, list[float]] = {"llamette": [], "llamette warm": [], "sentencepiece": []}
    for _ in range(args.runs):
        fresh = Tokenizer(loaded.pieces, loaded.scores)
        times["llamette"].append(seconds(fresh.encode, text))
        times["llamette warm"].append(seconds(fresh.encode, text))
        times["sentencepiece"].append(seconds(processor.encode, text))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        ratio = medians["sentencepiece"] / median
        print(
            f"{name:14} {median * 1000:8.1f} ms for {args.kb} KB  ({ratio:.2f}x SentencePiece's speed)"
        )


if __name__ == "__main__":
    main()
