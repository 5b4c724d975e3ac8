"""Size, perplexity and KL divergence from F32 of every weight type, quantized by llamette and by
llama.cpp, for the README.

For stories260K (../shared/models: rows of 64 and 172 values, which are not whole 256-value
blocks, so the K-quant file types fall back to other types) and a random-weight stories110M-shaped
model (the benchmark's, in ~/.cache/llamette-bench: rows of whole blocks): each type written from
the F32 GGUF by `llamette quantize` and by llama.cpp's quantizer (llama-cpp-python's
llama_model_quantize, a test dependency), then a short story scored by `llamette perplexity
--reference` the F32 model. Prints a Markdown table and writes it to results/quality.md.

Usage: python benchmarks/quality.py [--models stories260K,stories110M]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from models import ensure_model, quantize_with_llama_cpp

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "models"

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

# (type, llamette's --type or None, llama.cpp's file type or None), by size
TYPES = [
    ("Q2_K", None, "Q2_K"),
    ("Q3_K_M", None, "Q3_K_M"),
    ("IQ4_XS", "iq4_xs", "IQ4_XS"),
    ("IQ4_NL", "iq4_nl", "IQ4_NL"),
    ("Q4_0", "q4_0", "Q4_0"),
    ("Q4_K_S", "q4_k_s", "Q4_K_S"),
    ("Q4_K_M", "q4_k_m", "Q4_K_M"),
    ("Q4_1", "q4_1", "Q4_1"),
    ("Q5_0", "q5_0", "Q5_0"),
    ("Q5_K_S", "q5_k_s", "Q5_K_S"),
    ("Q5_K_M", "q5_k_m", "Q5_K_M"),
    ("Q5_1", "q5_1", "Q5_1"),
    ("Q6_K", "q6_k", "Q6_K"),
    ("Q8_0", "q8_0", "Q8_0"),
    ("BF16", "bf16", None),
    ("F16", "f16", None),
]


def llamette(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llamette", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip())
    return done.stdout


def f32_gguf(name: str) -> Path:
    if name == "stories260K":
        return SHARED / "stories260K.gguf"
    return ensure_model(name, "f32", SHARED / "tokenizer.bin")["llama.cpp"]


def quantized(f32: Path, scratch: Path, kind: str, ours: str | None, theirs: str | None) -> dict:
    """The files of one type: {quantizer: path}."""
    files = {}
    if ours:
        files["llamette"] = scratch / f"{f32.stem}.{kind}.llamette.gguf"
        llamette("quantize", str(f32), str(files["llamette"]), "--type", ours)
    if theirs:
        files["llama.cpp"] = scratch / f"{f32.stem}.{kind}.llama-cpp.gguf"
        quantize_with_llama_cpp(Path(sys.executable), f32, files["llama.cpp"], theirs)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="stories260K,stories110M")
    args = parser.parse_args()
    lines = [
        "| model | type | quantized by | size MB | perplexity | mean KL from F32 (nats) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch) / "story.txt"
        text.write_text(STORY)
        for name in args.models.split(","):
            f32 = f32_gguf(name)
            rows = [("F32", "", f32)]
            for kind, ours, theirs in TYPES:
                files = quantized(f32, Path(scratch), kind, ours, theirs)
                rows += [(kind, who, path) for who, path in files.items()]
            for kind, who, path in rows:
                scores = json.loads(llamette("perplexity", str(path), "--text", str(text),
                                             "--reference", str(f32), "--json"))  # fmt: skip
                lines.append(f"| {name} | {kind} | {who} | {path.stat().st_size / 1e6:.1f} "
                             f"| {scores['perplexity']:.4f} | {scores['mean_kl']:.6f} |")  # fmt: skip
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    (HERE / "results" / "quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
