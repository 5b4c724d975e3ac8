"""GGUF files (llama architecture): read by a parser of their own layout, written through the
`gguf` package.

llama.cpp names tensors `blk.N.attn_q.weight` and so on, stores Q and K in Meta's (rotary pairs
adjacent) order, as llama2.c does, and keeps the tokenizer inside the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.jsonfile import read_json_object
from llamette.formats.output import atomic_output
from llamette.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    BPETokenizer,
    SpecialTokens,
    Tokenizer,
)
from llamette.weight_types import BY_GGUF_TYPE, file_types, gguf_names, quantize, to_float32
from llamette.weight_types import weight_type as weight_type_of
from llamette.weights import BOS_ID, EOS_ID, LazyTensors, ModelConfig, Tensor, Weights

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
    "rope_freqs.weight": "rope_freqs.weight",
}

GGUF_TYPES = gguf_names(written=True)  # what write_gguf stores matrices as
# ...and what it takes as a type: those, and llama.cpp's file types (mixes of them)
WRITTEN_TYPES = GGUF_TYPES + tuple(t for t in file_types.MAIN_TYPE if t not in GGUF_TYPES)
RUN_TYPES = gguf_names()  # what llamette runs


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


# GGUF metadata value types: the scalars' formats (little-endian, as struct and NumPy spell
# them), strings and arrays
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32  # of the tensor data, unless general.alignment says otherwise
VERSIONS = (2, 3)  # version 1 counted in 32 bits


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF file's tensor table."""

    name: str
    shape: tuple[int, ...]  # outermost first: (rows, cols) for a matrix (GGUF lists cols first)
    gguf_type: int
    offset: int  # of its data, from the start of the file
    nbytes: int | None  # None for types llamette has no layout of


class GGUFFile:
    """A GGUF file's metadata and tensor table, read in one pass; its data memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise LlametteError(f"{self.path}: not a GGUF file ({size} bytes)")
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._buffer, np.uint8)  # the whole file, read-only
        self._position = 4
        if self._buffer[:4] != b"GGUF":
            raise LlametteError(
                f"{self.path}: not a GGUF file (it starts with {self._buffer[:4]!r})"
            )
        version = self._scalar("<I", "the version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise LlametteError(
                f"{self.path}: big-endian GGUF files are not supported" if swapped in VERSIONS
                else f"{self.path}: GGUF version {version} is not supported (2 or 3)"
            )  # fmt: skip
        n_tensors = self._scalar("<Q", "the tensor count")
        n_values = self._scalar("<Q", "the metadata count")
        self.metadata: dict[str, object] = {}
        for _ in range(n_values):
            key = self._string("a metadata key")
            self.metadata[key] = self._value(self._scalar("<I", key), key)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise LlametteError(f"{self.path}: general.alignment is {alignment!r}")
        start = -(-self._position // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, gguf_type, offset in infos:
            info = TensorInfo(
                name, shape, gguf_type, start + offset, _tensor_bytes(shape, gguf_type)
            )
            if info.nbytes is not None and info.offset + info.nbytes > size:
                raise LlametteError(
                    f"{self.path}: truncated: tensor {name} takes bytes {info.offset} to "
                    f"{info.offset + info.nbytes}, the file has {size}"
                )
            self.tensors[name] = info

    def tensor_data(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes as a flat view of the file: float32 for F32, else uint8."""
        if info.nbytes is None:
            raise LlametteError(f"{self.path}: {info.name} is {type_name(info.gguf_type)}")
        data = self.data[info.offset : info.offset + info.nbytes]
        return data.view(np.float32) if info.gguf_type == F32 else data

    def _take(self, nbytes: int, what: str) -> int:
        """The position of the next nbytes, after moving past them."""
        start = self._position
        if nbytes < 0 or start + nbytes > len(self._buffer):
            raise LlametteError(
                f"{self.path}: truncated: {what} needs {nbytes} bytes at byte {start}, the file "
                f"has {len(self._buffer)}"
            )
        self._position = start + nbytes
        return start

    def _scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self._buffer, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        length = self._scalar("<Q", what)
        start = self._take(length, what)
        try:
            return self._buffer[start : start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise LlametteError(f"{self.path}: {what} is not UTF-8 text") from None

    def _value(self, value_type: int, key: str):
        if value_type in SCALAR_FORMATS:
            return self._scalar(SCALAR_FORMATS[value_type], key)
        if value_type == STRING:
            return self._string(key)
        if value_type != ARRAY:
            raise LlametteError(f"{self.path}: {key} has value type {value_type}, not a GGUF one")
        item_type, count = self._scalar("<I", key), self._scalar("<Q", key)
        if item_type in SCALAR_FORMATS:  # numbers: one read
            kind = np.dtype(SCALAR_FORMATS[item_type])
            start = self._take(count * kind.itemsize, key)
            return np.frombuffer(self._buffer, kind, count, start).tolist()
        if item_type == STRING:
            return self._strings(count, key)
        return [self._value(item_type, key) for _ in range(count)]

    def _strings(self, count: int, key: str) -> list[str]:
        """An array of strings (a vocabulary's tokens, merges), read in one tight loop."""
        buffer, position, size = self._buffer, self._position, len(self._buffer)
        length_at = struct.Struct("<Q").unpack_from
        strings = []
        try:
            for _ in range(count):
                (length,) = length_at(buffer, position)
                start, position = position + 8, position + 8 + length
                if position > size:
                    break
                strings.append(buffer[start:position].decode("utf-8"))
            else:
                self._position = position
                return strings
        except struct.error:
            pass
        except UnicodeDecodeError:
            raise LlametteError(f"{self.path}: {key}[{len(strings)}] is not UTF-8 text") from None
        raise LlametteError(
            f"{self.path}: truncated: the file ends (at byte {size}) in {key}, after "
            f"{len(strings)} of its {count} strings"
        )

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string("a tensor name")
        n_dims = self._scalar("<I", name)
        if not 1 <= n_dims <= 4:
            raise LlametteError(f"{self.path}: tensor {name} has {n_dims} dimensions")
        start = self._take(8 * n_dims, name)
        dims = struct.unpack_from(f"<{n_dims}Q", self._buffer, start)
        gguf_type, offset = self._scalar("<I", name), self._scalar("<Q", name)
        kind = BY_GGUF_TYPE.get(gguf_type)
        if kind is not None and dims[0] % kind.BLOCK:
            raise LlametteError(
                f"{self.path}: tensor {name} has rows of {dims[0]} values, not whole blocks of "
                f"{kind.BLOCK} ({kind.NAME.upper()})"
            )
        return name, tuple(reversed(dims)), gguf_type, offset


F32 = 0  # GGUF type number


def _tensor_bytes(shape: tuple[int, ...], gguf_type: int) -> int | None:
    """Bytes of a tensor of GGUF type `gguf_type`; None if llamette has no layout for it."""
    kind = BY_GGUF_TYPE.get(gguf_type)
    if kind is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) // kind.BLOCK * kind.BLOCK_BYTES


def type_name(gguf_type: int) -> str:
    """A GGUF type's name (Q4_K, IQ2_XXS, ...)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType(gguf_type).name
    except ValueError:
        return f"type {gguf_type}"


class GGUFModel:
    """A llama GGUF file: its metadata and its tensors, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.file = GGUFFile(path)
        self.path = self.file.path
        architecture = self.value("general.architecture")
        if architecture != "llama":
            raise LlametteError(
                f"{self.path}: architecture {architecture!r} is not supported (llama)"
            )
        scaling = self.value("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise LlametteError(f"{self.path}: rope scaling {scaling!r} is not supported")
        self.tensors: dict[str, TensorInfo] = {}  # by llamette's names
        for info in self.file.tensors.values():
            name = llamette_name(info.name)
            if name is not None:
                self.tensors[name] = info

    def value(self, key: str, default=None):
        return self.file.metadata.get(key, default)

    def config(self) -> ModelConfig:
        def number(key: str) -> int:
            value = self.value(key)
            if not isinstance(value, int):
                raise LlametteError(f"{self.path}: no {key} in its metadata")
            return value

        dim, n_heads = number("llama.embedding_length"), number("llama.attention.head_count")
        if "tok_embeddings.weight" not in self.tensors:
            raise LlametteError(f"{self.path}: no token_embd.weight tensor")
        head_dim = int(self.value("llama.attention.key_length", dim // n_heads))
        for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
            if int(self.value(key, head_dim)) != head_dim:
                raise LlametteError(
                    f"{self.path}: {key} {self.value(key)} is not the heads' size {head_dim} "
                    "(llamette rotates and attends over whole heads)"
                )
        return ModelConfig(
            dim=dim,
            hidden_dim=number("llama.feed_forward_length"),
            n_layers=number("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=int(self.value("llama.attention.head_count_kv", n_heads)),
            vocab_size=self.tensors["tok_embeddings.weight"].shape[0],
            seq_len=number("llama.context_length"),
            shared_classifier="output.weight" not in self.tensors,
            rope_theta=float(self.value("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=None if head_dim * n_heads == dim else head_dim,
            rope_scaled="rope_freqs.weight" in self.tensors,
        )

    def stored_type(self) -> str:
        """Its matrices' weight type, or the llama.cpp file type of their mix (q4_k_m, ...);
        "f32" where llamette writes neither."""
        matrix_types = {
            type_name(info.gguf_type).lower()
            for info in self.tensors.values()
            if len(info.shape) == 2
        }
        if len(matrix_types) == 1 and (only := matrix_types.pop()) in GGUF_TYPES:
            return only
        import gguf

        try:
            file_type = gguf.LlamaFileType(self.value("general.file_type")).name
        except ValueError:
            return "f32"
        mix = file_type.removeprefix("MOSTLY_").lower()
        return mix if mix in WRITTEN_TYPES else "f32"

    def float32(self, name: str) -> np.ndarray:
        """A tensor as float32: a view of the file when stored as F32, else dequantized."""
        info = self._info(name)
        if info.gguf_type == F32:
            return self.file.tensor_data(info).reshape(info.shape)
        kind = BY_GGUF_TYPE.get(info.gguf_type)
        if kind is not None and len(info.shape) == 2:
            return kind.from_gguf(self.file.tensor_data(info), info.shape).dequantize()
        return self._dequantized_by_gguf(info)

    def stored(self, name: str) -> Tensor:
        """A matrix as a view of the file in its own weight type where llamette has it, else (and
        vectors) as float32."""
        info = self._info(name)
        kind = BY_GGUF_TYPE.get(info.gguf_type)
        if kind is not None and len(info.shape) == 2:
            return kind.from_gguf(self.file.tensor_data(info), info.shape)
        return self.float32(name)

    def runnable_weights(self, dequantize: bool = False) -> Weights:
        """Weights the model runs: matrices of the types llamette runs (weight_types) as views of
        the file (memory-mapped, not copied, each in its own type); vectors (norms) as float32.

        Other types are refused, or with `dequantize` expanded to float32 in memory.
        """
        config = self.config()
        tensors: dict[str, Tensor] = {}
        for name, shape in config.tensor_shapes().items():
            info = self._info(name)
            if info.shape != shape:
                raise LlametteError(
                    f"{self.path}: {info.name} has shape {info.shape}, expected {shape}"
                )
            weight_type = BY_GGUF_TYPE.get(info.gguf_type)
            if info.gguf_type == F32 or len(shape) == 1:
                tensors[name] = self.float32(name)
            elif weight_type is not None:
                tensors[name] = weight_type.from_gguf(self.file.tensor_data(info), shape)
            elif dequantize:
                tensors[name] = self.float32(name)
            else:
                raise LlametteError(
                    f"{self.path}: {info.name} is {type_name(info.gguf_type)}; llamette runs "
                    f"{', '.join(name.upper() for name in RUN_TYPES)} GGUF weights (convert it: "
                    f"llamette convert {self.path} out.gguf)"
                )
        return Weights(config, tensors, source=self.path)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise LlametteError(f"{self.path}: no tensor {gguf_name(name)}")
        return info

    def _dequantized_by_gguf(self, info: TensorInfo) -> np.ndarray:
        """A tensor of a type llamette does not run, decoded by gguf-py."""
        import gguf

        try:
            kind = gguf.GGMLQuantizationType(info.gguf_type)
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise LlametteError(
                f"{self.path}: {info.name} has unknown type {info.gguf_type}"
            ) from None
        count = int(np.prod(info.shape, dtype=np.int64))
        nbytes = count // block * block_bytes
        if info.offset + nbytes > len(self.file.data):
            raise LlametteError(
                f"{self.path}: truncated: tensor {info.name} takes bytes {info.offset} to "
                f"{info.offset + nbytes}, the file has {len(self.file.data)}"
            )
        data = self.file.data[info.offset : info.offset + nbytes]
        rows = data.reshape(count // info.shape[-1], -1)
        return gguf.quants.dequantize(rows, kind).reshape(info.shape).astype(np.float32)

    def tokenizer(self) -> Tokenizer:
        """The embedded tokenizer: byte-level BPE (gpt2), or a SentencePiece vocabulary (llama)
        spelled as in a llama2.c tokenizer.bin."""
        kind = self.value("tokenizer.ggml.model")
        if kind == "gpt2":
            return BPETokenizer.from_gguf(self.value, self.path)
        if kind != "llama":
            raise LlametteError(
                f"{self.path}: tokenizer {kind!r} is not one llamette runs (llama, gpt2)"
                if kind
                else f"{self.path}: has no tokenizer inside (tokenizer.ggml.model)"
            )
        tokens, scores = self.value("tokenizer.ggml.tokens"), self.value("tokenizer.ggml.scores")
        if not tokens or not scores:
            raise LlametteError(f"{self.path}: its llama tokenizer has no tokens or scores")
        token_types = self.value("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        llama_ids = {"tokenizer.ggml.bos_token_id": BOS_ID, "tokenizer.ggml.eos_token_id": EOS_ID}

        def value(key: str, default=None):  # where the file does not say, Llama's ids
            return self.value(key, llama_ids.get(key, default))

        specials = SpecialTokens.from_gguf(value, tokens, token_types, True, self.path)
        pieces = []
        for i, token in enumerate(tokens):
            if i in (specials.bos_id, specials.eos_id):
                token = f"\n{token}\n"  # BOS and EOS, as llama2.c's tokenizer.bin spells them
            pieces.append(token.replace("\u2581", " ").encode("utf-8"))
        return Tokenizer(pieces, [float(score) for score in scores], self.path, specials)


def chat_template_of(path: str | os.PathLike) -> str | None:
    """A model's Jinja chat template: a GGUF's `tokenizer.chat_template`, or a Hugging Face
    folder's (tokenizer_config.json, or chat_template.jinja); None for other models or none."""
    path = os.fspath(path)
    if is_gguf(path):
        return GGUFModel(path).value("tokenizer.chat_template") or None
    if not os.path.isdir(path):
        return None
    config, jinja = (
        os.path.join(path, "tokenizer_config.json"),
        os.path.join(path, "chat_template.jinja"),
    )
    template = read_json_object(config).get("chat_template") if os.path.isfile(config) else None
    if not template and os.path.isfile(jinja):  # where newer folders keep it
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) and template else None


def read_gguf(path: str | os.PathLike) -> Weights:
    """A GGUF model to convert: matrices as views of the file in their own weight types where
    llamette has them, the rest dequantized to float32 when asked for."""
    model = GGUFModel(path)
    config = model.config()
    tensors = LazyTensors(config.tensor_shapes(), model.stored, model.path)
    return Weights(config, tensors, model.path, model.stored_type())


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
        if c.head_dim is not None:
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
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
            tensor, qtype = weights[name], stored_type(name)
            if qtype == weight_type_of(tensor).GGUF_TYPE:  # already in it: the blocks as they are
                writer.write_tensor_data(np.asarray(tensor if qtype == types["f32"] else tensor[0]))
            else:
                dense = np.asarray(to_float32(tensor), np.float32)
                writer.write_tensor_data(quantize(dense, qtype.name.lower()))
        writer.close()


def _add_tokenizer(writer, tokenizer: Tokenizer) -> None:
    """A byte-level BPE tokenizer as its GGUF keys held it; tokenizer.bin's pieces in
    SentencePiece's spelling: ▁ for space, <s> and </s> for BOS, EOS."""
    if isinstance(tokenizer, BPETokenizer):
        _add_bpe_tokenizer(writer, tokenizer)
        return
    specials = tokenizer.specials
    control = {i: text for text, i in specials.control.items()}
    user_defined = {i: text for text, i in specials.user_defined.items()}
    tokens, types = [], []
    for i, piece in enumerate(tokenizer.pieces):
        text = piece.decode("utf-8", "replace").replace(" ", "\u2581")
        kind = NORMAL
        if i == 0:
            kind = UNKNOWN
        elif i in control:
            text, kind = control[i], CONTROL
        elif i in user_defined:
            text, kind = user_defined[i], USER_DEFINED
        elif tokenizer.token_bytes[i] != piece:
            kind = BYTE
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")  # as llama.cpp's converter marks SentencePiece vocabularies
    writer.add_token_list(tokens)
    writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    _add_special_ids(writer, specials)


def _add_bpe_tokenizer(writer, tokenizer: BPETokenizer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    _add_special_ids(writer, tokenizer.specials)


def _add_special_ids(writer, specials: SpecialTokens) -> None:
    """The special tokens' ids that the vocabulary has, and whether BOS and EOS are added."""
    ids = {writer.add_bos_token_id: specials.bos_id, writer.add_eos_token_id: specials.eos_id,
           writer.add_eot_token_id: specials.eot_id, writer.add_eom_token_id: specials.eom_id,
           writer.add_pad_token_id: specials.padding_id}  # fmt: skip
    for add, token in ids.items():
        if token is not None:
            add(token)
    writer.add_add_bos_token(specials.add_bos)
    writer.add_add_eos_token(specials.add_eos)
