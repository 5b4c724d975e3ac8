"""Perplexity and KL divergence from f32 of each weight type, for the README.

For stories260K (../shared/models) and a random-weight stories15M-shaped model (the benchmark's,
in ~/.cache/llamette-bench): quantize to each type with `llamette quantize`, then score a short
story with `llamette perplexity --reference` the f32 model. Prints a Markdown table.

Usage: python benchmarks/quality.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from models import ensure_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"

# written for this benchmark, in the style of the TinyStories models' training text
STORY = """Once upon a time, there was a little boy named Tom. He had a red ball that he loved very
much. Every day, Tom took his ball to the park and played with his friend Sue. One day, the ball
rolled into the pond. Tom was sad. Sue said, "Don't be sad, Tom. We can get it back!" She found a
long stick and pulled the ball out of the water. Tom was very happy. He gave Sue a big hug and
said, "Thank you, Sue! You are my best friend." Then they played with the ball until the sun went
down, and they went home to eat dinner with their moms. The next day, Tom and Sue went to the park
again. They saw a little dog that was lost. The dog was cold and hungry. Tom gave the dog some of
his bread, and Sue gave it water. The dog wagged its tail and licked their hands. They looked for
the dog's family all day. At last, they found a girl who was crying because she lost her dog. When
she saw the dog, she smiled and ran to it. She said thank you to Tom and Sue, and they all played
together in the park.
"""

TYPES = ("q8_0", "q8_0.gguf", "q4_0.gguf", "q4_1.gguf", "bf16.gguf", "f16.gguf")


def llamette(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llamette", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip())
    return done.stdout


def main() -> None:
    models = {
        "stories260K": (SHARED / "stories260K.bin", SHARED / "tok512.bin"),
        "stories15M (random)": (ensure_model("stories15M", "f32", SHARED / "tokenizer.bin")["llamette"],
                                SHARED / "tokenizer.bin"),
    }  # fmt: skip
    lines = [
        "| model | weights | size MB | perplexity | mean KL from f32 (nats) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch) / "story.txt"
        text.write_text(STORY)
        for name, (f32, tokenizer) in models.items():
            variants = {"f32": f32}
            for kind in TYPES:
                out = (
                    Path(scratch) / f"{f32.stem}.{kind}"
                    if kind.endswith("gguf")
                    else Path(scratch) / f"{f32.stem}.q80.bin"
                )
                llamette(
                    "quantize",
                    str(f32),
                    str(out),
                    "--type",
                    kind.split(".")[0],
                    "--tokenizer",
                    str(tokenizer),
                )
                variants[
                    kind.replace(".gguf", " (GGUF)") if kind != "q8_0" else "q8_0 (llama2.c v2)"
                ] = out
            for label, path in variants.items():
                scores = json.loads(llamette("perplexity", str(path), "--text", str(text), "-z", str(tokenizer),
                                             "--reference", str(f32), "--json"))  # fmt: skip
                lines.append(f"| {name} | {label} | {path.stat().st_size / 1e6:.1f} | {scores['perplexity']:.4f} "
                             f"| {scores['mean_kl']:.6f} |")  # fmt: skip
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
