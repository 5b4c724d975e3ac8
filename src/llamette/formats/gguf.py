"""GGUF files (llama architecture), written through the `gguf` package.

llama.cpp names tensors `blk.N.attn_q.weight` and so on, stores Q and K in Meta's (rotary pairs
adjacent) order, as llama2.c does, and keeps the tokenizer inside the file.
"""

from __future__ import annotations

import os

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.output import atomic_output
from llamette.quant import Q8Tensor
from llamette.tokenizer import Tokenizer
from llamette.weights import Weights

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

# GGUF token types (SentencePiece's piece kinds)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of llamette's (Meta's) tensor names."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"blk.{index}.{GGUF_LAYER_NAMES[rest]}"
    return GGUF_NAMES[name]


def write_gguf(
    weights: Weights, path: str | os.PathLike, tokenizer: Tokenizer, weight_type: str = "f32"
) -> None:
    """Write weights and tokenizer as a GGUF file; matrices as F32 or Q8_0, norms always F32."""
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if weight_type not in types:
        raise LlametteError(f"GGUF weight type {weight_type!r} is not one of {', '.join(types)}")
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
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if weight_type == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0
        )
        _add_tokenizer(writer, tokenizer)

        shapes = c.tensor_shapes()

        def stored_type(name: str) -> gguf.GGMLQuantizationType:
            """Matrices in the requested type where their rows are whole blocks; the rest F32."""
            qtype = types[weight_type] if len(shapes[name]) == 2 else types["f32"]
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
            dense = tensor.dequantize() if isinstance(tensor, Q8Tensor) else tensor
            writer.write_tensor_data(
                gguf.quants.quantize(np.asarray(dense, np.float32), stored_type(name))
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
