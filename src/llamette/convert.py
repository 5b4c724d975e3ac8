"""Model conversion: any model llamette reads to a llama2.c or GGUF file, tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from llamette.errors import LlametteError
from llamette.formats import find_tokenizer, read_model
from llamette.formats.gguf import WRITTEN_TYPES, chat_template_of, write_gguf
from llamette.formats.llama2c import write_llama2c
from llamette.weights import Tensor, Weights

FORMATS = ("llama2c-v0", "llama2c-v1", "llama2c-v2", "gguf")
LLAMA2C_TYPES = {"llama2c-v0": "f32", "llama2c-v1": "f32", "llama2c-v2": "q8_0"}
# what llama2.c's run.c hard-codes, so what its files cannot say otherwise
LLAMA2C_ROPE_THETA, LLAMA2C_NORM_EPS = 10000.0, 1e-5


def guess_format(out: str) -> str:
    """The output format from OUT's suffix: .gguf is GGUF, anything else llama2.c v0 (run.c's)."""
    return "gguf" if out.lower().endswith(".gguf") else "llama2c-v0"


def convert(
    source: str,
    out: str,
    out_format: str | None = None,
    weight_type: str | None = None,
    group_size: int | None = None,
    tokenizer_path: str | None = None,
    seq_len: int | None = None,
    progress: bool = False,
) -> tuple[Weights, str]:
    """Convert SOURCE to OUT, one tensor in memory at a time: GGUF in the source's weight type
    unless `weight_type` names another. Returns the source's description and the type written."""
    out_format = out_format or guess_format(out)
    if out_format not in FORMATS:
        raise LlametteError(f"--format: {out_format!r} is not one of {', '.join(FORMATS)}")
    weights = read_model(source, seq_len)
    c = weights.config
    if out_format == "gguf":
        weight_type = weight_type or weights.stored_type
        if weight_type not in WRITTEN_TYPES:
            raise LlametteError(f"--type: GGUF takes {', '.join(WRITTEN_TYPES)}, not {weight_type}")
        tokenizer = find_tokenizer(source, tokenizer_path, c.vocab_size, "--tokenizer")
        template = chat_template_of(source)
        write_gguf(_streamed(weights, progress, out), out, tokenizer, weight_type, template)
        return weights, weight_type

    needed = LLAMA2C_TYPES[out_format]
    if weight_type not in (None, needed):
        raise LlametteError(f"--type: {out_format} holds {needed} weights, not {weight_type}")
    if group_size is not None and out_format != "llama2c-v2":
        raise LlametteError(f"--group-size: only llama2c-v2 has groups, not {out_format}")
    if c.rope_theta != LLAMA2C_ROPE_THETA or abs(c.norm_eps - LLAMA2C_NORM_EPS) > 1e-9:
        raise LlametteError(
            f"{source}: rope_theta {c.rope_theta:g} and norm eps {c.norm_eps:g} cannot be kept in "
            f"a llama2.c file (run.c assumes 10000 and 1e-5); write GGUF instead"
        )
    if c.rope_scaled or c.head_dim is not None:
        raise LlametteError(
            f"{source}: its {'RoPE scaling' if c.rope_scaled else f'head size {c.head_dim}'} "
            "cannot be kept in a llama2.c file; write GGUF instead"
        )
    version = int(out_format[-1])
    write_llama2c(_streamed(weights, progress, out), out, version, group_size)
    return weights, needed


class _Progress(Mapping):
    """A model's tensors, ticking a progress bar (on stderr) as each one is fetched."""

    def __init__(self, tensors: Mapping[str, Tensor], description: str):
        from tqdm import tqdm

        self.tensors = tensors
        self.bar = tqdm(total=len(tensors), desc=description, unit="tensor", leave=False)

    def __getitem__(self, name: str) -> Tensor:
        tensor = self.tensors[name]
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _streamed(weights: Weights, progress: bool, out: str) -> Weights:
    if not progress:
        return weights
    description = f"writing {os.path.basename(out)}"
    return Weights(weights.config, _Progress(weights.tensors, description), weights.source)
