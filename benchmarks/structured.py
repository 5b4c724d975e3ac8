"""What structured output costs a decode step: JSON-schema answers against free ones.

Usage: python benchmarks/structured.py [MODEL] [--runs N] [--tokens N]

MODEL defaults to the benchmarks' stories110M F32 GGUF (Llama 2's 32,000-token vocabulary) when
it has been written, else the bundled model. Runs, alternating, one free request and one whose
answer a JSON schema constrains (temperature 1.0, seeded), and a crowd of four free requests
beside four free ones and beside four constrained ones; times each decode step (the engine's own
timings) and each mask llguidance computes. Medians; the table goes to
benchmarks/results/structured.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llamette
from llamette.completion import StopStrings, make_sampler
from llamette.engine import Engine, Request
from llamette.formats import find_tokenizer, load_weights
from llamette.model import Transformer
from llamette.structured import Grammars, JsonConstraint

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = Path.home() / ".cache" / "llamette-bench" / "models" / "stories110M.f32.gguf"
BUNDLED = Path(llamette.__file__).parent / "bundled" / "model.bin"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "kind": {"enum": ["dog", "cat", "bird"]},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 12}},
    },
    "required": ["name", "age", "kind", "friends"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


class TimedConstraint(JsonConstraint):
    """A constraint that records how long each mask took to compute."""

    times: list[float] = []

    def prepare(self) -> None:
        start = time.perf_counter()
        super().prepare()
        TimedConstraint.times.append(time.perf_counter() - start)


def request(engine: Engine, grammars: Grammars | None, seed: int, tokens: int) -> Request:
    prompt = engine.tokenizer.encode("Once upon a time", bos=True)
    made = Request(prompt, tokens, make_sampler(engine.tokenizer.vocab_size, seed=seed),
                   lambda event: None, StopStrings())  # fmt: skip
    if grammars is not None:
        constraint = grammars.constraint(FORMAT)
        made.constraint = TimedConstraint(constraint.matcher, constraint.vocab_size)
    return made


def step_seconds(engine: Engine, requests: list[Request], timed: list[Request]) -> float:
    """Run requests together; the mean decode step of the `timed` ones, in seconds."""
    for made in requests:
        engine.submit(made)
    while not engine.idle():
        engine.step()
    steps = [(r.finished_at - r.first_token_at) / (len(r.tokens) - 1) for r in timed
             if len(r.tokens) > 1]  # fmt: skip
    return statistics.mean(steps) if steps else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path,
                        default=DEFAULT_MODEL if DEFAULT_MODEL.exists() else BUNDLED)  # fmt: skip
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    weights = load_weights(args.model)
    model = Transformer(weights, n_slots=8)
    tokenizer = find_tokenizer(str(args.model), None, model.config.vocab_size, "MODEL")
    engine = Engine(model, tokenizer)
    grammars = Grammars(tokenizer, engine.end_ids)
    start = time.perf_counter()
    grammars.constraint(FORMAT)
    vocabulary_seconds = time.perf_counter() - start
    model.warm_up()
    step_seconds(engine, [request(engine, grammars, 0, 8)], [])  # load what the runs use

    results: dict[str, list[float]] = {"free": [], "json": [], "crowd free": [],
                                       "crowd free beside json": []}  # fmt: skip
    for run in range(args.runs):
        alone = request(engine, None, run, args.tokens)
        results["free"].append(step_seconds(engine, [alone], [alone]))
        constrained = request(engine, grammars, run, args.tokens)
        results["json"].append(step_seconds(engine, [constrained], [constrained]))
        free = [request(engine, None, run * 10 + i, args.tokens) for i in range(8)]
        results["crowd free"].append(step_seconds(engine, free, free[:4]))
        free = [request(engine, None, run * 10 + i, args.tokens) for i in range(4)]
        json_ones = [request(engine, grammars, run * 10 + i, args.tokens) for i in range(4)]
        results["crowd free beside json"].append(step_seconds(engine, free + json_ones, free))

    ms = {name: statistics.median(values) * 1000 for name, values in results.items()}
    mask_ms = statistics.median(TimedConstraint.times) * 1000
    lines = [
        f"Structured output on {args.model.name} (vocabulary {tokenizer.vocab_size}), "
        f"{args.runs} runs of {args.tokens} tokens, temperature 1.0, medians "
        f"({time.strftime('%Y-%m-%d')}):",
        "",
        "| measure | ms |",
        "|---|---|",
        f"| llguidance's view of the vocabulary, once per model | {vocabulary_seconds * 1000:.1f} |",
        f"| one mask ({len(TimedConstraint.times)} computed) | {mask_ms:.3f} |",
        f"| decode step, one free request | {ms['free']:.3f} |",
        f"| decode step, one JSON-schema request | {ms['json']:.3f} |",
        f"| added per token by the masking | {ms['json'] - ms['free']:.3f} |",
        f"| decode step of 4 free requests beside 4 free ones | {ms['crowd free']:.3f} |",
        f"| the same beside 4 JSON-schema requests | {ms['crowd free beside json']:.3f} |",
    ]
    print("\n".join(lines))
    (HERE / "results" / "structured.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
