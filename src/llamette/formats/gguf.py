"""GGUF files (llama architecture), read and written through the `gguf` package.

llama.cpp names tensors `blk.N.attn_q.weight` and so on, stores Q and K in Meta's (rotary pairs
adjacent) order, as llama2.c does, and keeps the tokenizer inside the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.jsonfile import read_json_object
from llamette.formats.output import atomic_output
from llamette.tokenizer import Tokenizer
from llamette.weight_types import BY_GGUF_TYPE, file_types, gguf_names, quantize, to_float32
from llamette.weights import LazyTensors, ModelConfig, Tensor, Weights

GGUF_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}

GGUF_TYPES = gguf_names(written=True)  # what write_gguf stores matrices as
# ...and what it takes as a type: those, and llama.cpp's file types (mixes of them)
WRITTEN_TYPES = GGUF_TYPES + tuple(t for t in file_types.MAIN_TYPE if t not in GGUF_TYPES)
RUN_TYPES = gguf_names()  # what llamette runs

# GGUF token types (SentencePiece's piece kinds)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of llamette's (Meta's) tensor names."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"blk.{index}.{GGUF_LAYER_NAMES[rest]}"
    return GGUF_NAMES[name]


LLAMETTE_NAMES = {"blk." + v: k for k, v in GGUF_LAYER_NAMES.items()} | {
    v: k for k, v in GGUF_NAMES.items()
}


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def llamette_name(name: str) -> str | None:
    """llamette's (Meta's) name for one of llama.cpp's tensor names; None for others."""
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        meta = LLAMETTE_NAMES.get("blk." + rest)
        return f"layers.{index}.{meta}" if meta else None
    return LLAMETTE_NAMES.get(name)


class GGUFModel:
    """A GGUF file opened with the gguf package: its metadata and its tensors, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OSError, AssertionError) as error:
            raise LlametteError(f"{self.path}: truncated or not a GGUF file ({error})") from None
        architecture = self.value("general.architecture")
        if architecture != "llama":
            raise LlametteError(
                f"{self.path}: architecture {architecture!r} is not supported (llama)"
            )
        scaling = self.value("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise LlametteError(f"{self.path}: rope scaling {scaling!r} is not supported")
        self.tensors = {}
        for tensor in self.reader.tensors:
            name = llamette_name(tensor.name)
            if name is not None:
                self.tensors[name] = tensor

    def value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> ModelConfig:
        def number(key: str) -> int:
            value = self.value(key)
            if value is None:
                raise LlametteError(f"{self.path}: no {key} in its metadata")
            return int(value)

        dim, n_heads = number("llama.embedding_length"), number("llama.attention.head_count")
        if "tok_embeddings.weight" not in self.tensors:
            raise LlametteError(f"{self.path}: no token_embd.weight tensor")
        return ModelConfig(
            dim=dim,
            hidden_dim=number("llama.feed_forward_length"),
            n_layers=number("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=int(self.value("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(self.tensors["tok_embeddings.weight"].shape[-1]),
            seq_len=number("llama.context_length"),
            shared_classifier="output.weight" not in self.tensors,
            rope_theta=float(self.value("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        )

    def float32(self, name: str) -> np.ndarray:
        """A tensor as float32: a view of the file when stored as F32, else dequantized."""
        import gguf

        tensor = self.tensors.get(name)
        if tensor is None:
            raise LlametteError(f"{self.path}: no tensor {gguf_name(name)}")
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            return tensor.data
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)

    def runnable_weights(self, dequantize: bool = False) -> Weights:
        """Weights the model runs: matrices of the types llamette runs (weight_types) as views of
        the file (memory-mapped, not copied, each in its own type); vectors (norms) as float32.

        Other types are refused, or with `dequantize` expanded to float32 in memory.
        """
        import gguf

        config = self.config()
        tensors: dict[str, Tensor] = {}
        for name, shape in config.tensor_shapes().items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise LlametteError(f"{self.path}: no tensor {gguf_name(name)}")
            kind = gguf.GGMLQuantizationType(tensor.tensor_type)
            weight_type = BY_GGUF_TYPE.get(int(kind))
            if kind == gguf.GGMLQuantizationType.F32 or len(shape) == 1:
                data = self.float32(name)
            elif weight_type is not None:
                data = weight_type.from_gguf(self._matrix_bytes(tensor, shape, weight_type), shape)
            elif dequantize:
                data = self.float32(name)
            else:
                raise LlametteError(
                    f"{self.path}: {tensor.name} is {kind.name}; llamette runs "
                    f"{', '.join(name.upper() for name in RUN_TYPES)} GGUF weights (convert it: "
                    f"llamette convert {self.path} out.gguf)"
                )
            if tuple(data.shape) != shape:
                raise LlametteError(
                    f"{self.path}: {tensor.name} has shape {tuple(data.shape)}, expected {shape}"
                )
            tensors[name] = data
        return Weights(config, tensors, source=self.path)

    def _matrix_bytes(self, tensor, shape: tuple[int, int], weight_type) -> np.ndarray:
        """A matrix's data as the file holds it (a view), checked against its type's layout."""
        rows, cols = shape
        block, block_bytes = weight_type.BLOCK, weight_type.BLOCK_BYTES
        if cols % block or tensor.data.nbytes != rows * cols // block * block_bytes:
            raise LlametteError(
                f"{self.path}: {tensor.name} holds {tensor.data.nbytes} bytes, not {rows}x{cols} "
                f"{weight_type.NAME} values in blocks of {block}"
            )
        return tensor.data

    def tokenizer(self) -> Tokenizer:
        """The embedded SentencePiece vocabulary, spelled as in a llama2.c tokenizer.bin."""
        tokens, scores = self.value("tokenizer.ggml.tokens"), self.value("tokenizer.ggml.scores")
        if self.value("tokenizer.ggml.model") != "llama" or not tokens or not scores:
            raise LlametteError(f"{self.path}: has no SentencePiece (llama) tokenizer inside")
        pieces = []
        for i, token in enumerate(tokens):
            if i == 1 or i == 2:
                token = f"\n{token}\n"  # BOS and EOS, as llama2.c's tokenizer.bin spells them
            pieces.append(token.replace("\u2581", " ").encode("utf-8"))
        return Tokenizer(pieces, [float(score) for score in scores], source=self.path)


def chat_template_of(path: str | os.PathLike) -> str | None:
    """A model's Jinja chat template: a GGUF's `tokenizer.chat_template`, or a Hugging Face
    folder's (tokenizer_config.json); None for other models or none."""
    path = os.fspath(path)
    if is_gguf(path):
        return GGUFModel(path).value("tokenizer.chat_template") or None
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isdir(path) and os.path.isfile(config):
        template = read_json_object(config).get("chat_template")
        return template if isinstance(template, str) and template else None
    return None


def read_gguf(path: str | os.PathLike) -> Weights:
    """A GGUF model: F32 tensors as views into the file, other types dequantized when asked for."""
    model = GGUFModel(path)
    config = model.config()
    return Weights(
        config, LazyTensors(config.tensor_shapes(), model.float32, model.path), model.path
    )


def write_gguf(
    weights: Weights,
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    weight_type: str = "f32",
    chat_template: str | None = None,
    tensor_types: Mapping[str, str] | None = None,
) -> None:
    """Write weights and tokenizer (and a Jinja chat template) as a GGUF file; matrices in
    `weight_type`, or in their own type where `tensor_types` names one (files may mix types),
    norms always F32. A llama.cpp file type (file_types: q4_k_m, ...) as `weight_type` gives each
    matrix the type llama.cpp's quantizer gives it."""
    import gguf

    tensor_types = tensor_types or {}
    gguf_file_type = f"MOSTLY_{weight_type.upper()}"
    if weight_type in file_types.MAIN_TYPE:
        tensor_types = file_types.tensor_types(weight_type, weights.config) | dict(tensor_types)
        gguf_file_type = file_types.GGUF_FILE_TYPE[weight_type]
        weight_type = file_types.MAIN_TYPE[weight_type]
    for kind in (weight_type, *tensor_types.values()):
        if kind not in GGUF_TYPES:
            raise LlametteError(f"GGUF weight type {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    types = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_TYPES}
    file_type = gguf.LlamaFileType["ALL_F32" if weight_type == "f32" else gguf_file_type]
    c = weights.config
    tokenizer.check_vocab_size(c.vocab_size, "the model")
    with atomic_output(path) as temporary:
        writer = gguf.GGUFWriter(temporary, "llama")
        writer.add_name(os.path.splitext(os.path.basename(os.fspath(path)))[0])
        writer.add_context_length(c.seq_len)
        writer.add_embedding_length(c.dim)
        writer.add_block_count(c.n_layers)
        writer.add_feed_forward_length(c.hidden_dim)
        writer.add_rope_dimension_count(c.head_size)
        writer.add_head_count(c.n_heads)
        writer.add_head_count_kv(c.n_kv_heads)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_file_type(file_type)
        _add_tokenizer(writer, tokenizer)
        if chat_template:
            writer.add_chat_template(chat_template)

        shapes = c.tensor_shapes()

        def stored_type(name: str) -> gguf.GGMLQuantizationType:
            """Matrices in the requested type where their rows are whole blocks; the rest F32."""
            matrix_type = types[tensor_types.get(name, weight_type)]
            qtype = matrix_type if len(shapes[name]) == 2 else types["f32"]
            block, _ = gguf.GGML_QUANT_SIZES[qtype]
            return qtype if shapes[name][-1] % block == 0 else types["f32"]

        for name, shape in shapes.items():  # tensor infos first: shapes and sizes, no data
            qtype = stored_type(name)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * block_bytes
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in shapes:  # then the data, one tensor in memory at a time
            tensor = weights[name]
            dense = to_float32(tensor)
            writer.write_tensor_data(
                quantize(np.asarray(dense, np.float32), stored_type(name).name.lower())
            )
        writer.close()


def _add_tokenizer(writer, tokenizer: Tokenizer) -> None:
    """tokenizer.bin's pieces in SentencePiece's spelling: ▁ for space, <s> and </s> for BOS, EOS."""
    tokens, types = [], []
    for i, piece in enumerate(tokenizer.pieces):
        text = piece.decode("utf-8", "replace").replace(" ", "\u2581")
        kind = NORMAL
        if i == 0:
            kind = UNKNOWN
        elif i in (1, 2):
            text, kind = ("<s>", "</s>")[i - 1], CONTROL
        elif tokenizer.token_bytes[i] != piece:
            kind = BYTE
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
