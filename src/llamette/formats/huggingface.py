"""Hugging Face Llama folders: config.json and safetensors (or pytorch_model*.bin) shards.

transformers names tensors `model.layers.N.self_attn.q_proj.weight` and so on, and stores wq and
wk with each head's rows permuted (first all real parts of the rotary pairs, then all imaginary
parts) for its rotate-half RoPE; reading undoes that, with the key heads counted separately.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.jsonfile import read_json_object
from llamette.formats.pytorch import TorchTensor, read_torch_state_dict
from llamette.formats.safetensors import read_safetensors
from llamette.tokenizer import (
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    UNUSED,
    USER_DEFINED,
    BPETokenizer,
    SpecialTokens,
)
from llamette.weights import LazyTensors, ModelConfig, Weights, llama3_rope_divisors

HF_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """transformers' name for one of llamette's (Meta's) tensor names."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"model.layers.{index}.{HF_LAYER_NAMES[rest]}"
    return HF_NAMES[name]


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo transformers' per-head row order for wq or wk: (halves, pairs) back to (pairs, halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_hf(folder: str | os.PathLike) -> Weights:
    """A Hugging Face LlamaForCausalLM folder as lazily read float32 tensors in Meta's layout."""
    folder = os.fspath(folder)
    hf = _read_config(folder)
    tensors = _read_tensor_files(folder)

    def tensor(name: str) -> TorchTensor:
        key = hf_name(name)
        if key not in tensors:
            raise LlametteError(f"{folder}: no tensor {key} in its weight files")
        return tensors[key]

    config = _config(folder, hf, tensors, tensor)

    def load(name: str) -> np.ndarray:
        if name == "rope_freqs.weight":  # not a tensor of the folder: its config's scaling
            return _llama3_rope_divisors(folder, hf, config)
        w = tensor(name).to_float32()
        if name.endswith("attention.wq.weight"):
            return unpermute_rotary(w, config.n_heads)
        if name.endswith("attention.wk.weight"):
            return unpermute_rotary(w, config.n_kv_heads)
        return w

    stored_type = tensor("layers.0.attention.wq.weight").weight_type
    return Weights(config, LazyTensors(config.tensor_shapes(), load, folder), folder, stored_type)


def _config(folder: str, hf: dict, tensors: dict, tensor) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        dim = int(hf["hidden_size"])
        n_heads = int(hf["num_attention_heads"])
        config = dict(
            dim=dim,
            hidden_dim=int(hf["intermediate_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            vocab_size=int(hf["vocab_size"]),
            seq_len=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LlametteError(f"{path}: missing or malformed {error}") from None
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    config["head_dim"] = None if head_dim * n_heads == dim else head_dim
    rope = _rope_parameters(hf)
    config["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    config["rope_scaled"] = rope.get("rope_type", "default") == "llama3"

    embedding = tensor("tok_embeddings.weight")
    if "lm_head.weight" not in tensors:
        if not hf.get("tie_word_embeddings", False):
            raise LlametteError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
        shared = True
    else:
        shared = np.array_equal(tensors["lm_head.weight"].data, embedding.data)
    return ModelConfig(**config, shared_classifier=shared)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    hf = read_json_object(path)
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or "LlamaForCausalLM" not in architectures:
        kind = ", ".join(architectures) or hf.get("model_type") or "unknown"
        raise LlametteError(f"{path}: architecture {kind} is not supported (LlamaForCausalLM)")
    rope_type = _rope_parameters(hf).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise LlametteError(f"{path}: rope scaling {rope_type!r} is not supported (llama3)")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LlametteError(f"{path}: not a plain Llama (activation other than silu, or biases)")
    return hf


def _read_tensor_files(folder: str) -> dict[str, TorchTensor]:
    """Every tensor of the folder's safetensors files, or else of its pytorch_model*.bin files."""
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    read = read_safetensors
    if not paths:
        paths = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        read = read_torch_state_dict
    if not paths:
        raise LlametteError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    for index in glob.glob(os.path.join(folder, "*.index.json")):
        _check_index(index, folder)
    tensors: dict[str, TorchTensor] = {}
    for path in paths:
        tensors.update(read(path))
    return tensors


def _check_index(path: str, folder: str) -> None:
    """Every shard that an index names exists."""
    try:
        with open(path) as f:
            shards = set(json.load(f).get("weight_map", {}).values())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise LlametteError(f"{path}: unreadable or not an index") from None
    for shard in sorted(shards):
        if not os.path.exists(os.path.join(folder, shard)):
            raise LlametteError(f"{os.path.join(folder, shard)}: missing (named in {path})")


def _rope_parameters(hf: dict) -> dict:
    """RoPE's settings: transformers 5's rope_parameters, or the older rope_scaling (whose
    `type` was later named `rope_type`)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _llama3_rope_divisors(folder: str, hf: dict, config: ModelConfig) -> np.ndarray:
    rope = _rope_parameters(hf)
    try:
        return llama3_rope_divisors(
            config.head_size, config.rope_theta, float(rope["factor"]),
            float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise LlametteError(f"{folder}/config.json: llama3 rope scaling without {error}") from None


# tokenizer.json's pre-tokenizers, by the `tokenizer.ggml.pre` name llama.cpp gives them: the
# Split expressions as Hugging Face writes them (llama.cpp rewrites some for its own engine)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
SPLITS = {LLAMA3_SPLIT: "llama-bpe", LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


def has_bpe_tokenizer(folder: str) -> bool:
    """A tokenizer.json without a SentencePiece tokenizer.model (which llamette prefers)."""
    return os.path.isfile(os.path.join(folder, "tokenizer.json")) and not os.path.isfile(
        os.path.join(folder, "tokenizer.model")
    )


def read_tokenizer(folder: str, vocab_size: int) -> BPETokenizer:
    """A folder's byte-level BPE tokenizer (tokenizer.json), with its special tokens from
    tokenizer_config.json, config.json and generation_config.json, as llama.cpp's converter
    takes them: added tokens that are special (or look it, <|...|>) are control tokens, the
    others user-defined; ids beyond the tokenizer's up to the model's vocabulary are unused."""
    path = os.path.join(folder, "tokenizer.json")
    spec = read_json_object(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise LlametteError(f"{path}: not a BPE tokenizer (model.type {model.get('type')!r})")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    try:
        added = [(entry["content"], int(entry["id"]), bool(entry.get("special")))
                 for entry in spec.get("added_tokens") or []]  # fmt: skip
        ids = [int(i) for i in model["vocab"].values()] + [i for _, i, _ in added]
    except (KeyError, TypeError, ValueError) as error:
        raise LlametteError(f"{path}: a malformed token entry ({error})") from None
    size = max(ids, default=-1) + 1
    if vocab_size and size > vocab_size:
        raise LlametteError(f"{path}: has token ids up to {size - 1}; the model's vocabulary "
                            f"is {vocab_size}")  # fmt: skip
    size = max(size, vocab_size)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for token, i, special in added:
        tokens[i] = token
        types[i] = CONTROL if special or looks_special(token) else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    specials = _special_tokens(folder, spec, tokens, types, PRE_TOKENIZERS[pre].add_bos)
    return BPETokenizer(tokens, types, merges, pre, specials, path)


def looks_special(token: str) -> bool:
    """An added token that llama.cpp's converter makes a control token though its folder does not
    mark it special: <|...|> and its full-width form, <pad>, <mask>, <unused...>."""
    return (
        token in ("<pad>", "<mask>")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _pre_tokenizer_name(pre_tokenizer: dict | None, path: str) -> str:
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise LlametteError(
        f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds))}) is not one llamette knows"
    )


def _special_tokens(
    folder: str, spec: dict, tokens: list[str], types: list[int], add_bos: bool
) -> SpecialTokens:
    """BOS, EOS and padding named by tokenizer_config.json (else config.json's ids); whether BOS
    is added, from tokenizer.json's post-processor (else tokenizer_config.json); the end ids of
    generation_config.json besides those the tokens themselves mark."""

    def optional_json(name: str) -> dict:
        path = os.path.join(folder, name)
        return read_json_object(path) if os.path.isfile(path) else {}

    config, model_config = optional_json("tokenizer_config.json"), optional_json("config.json")
    ids_of = {token: i for i, token in enumerate(tokens)}

    def token_id(kind: str) -> int | None:
        entry = config.get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in ids_of:
            return ids_of[text]
        number = model_config.get(f"{kind}_token_id")
        return number if isinstance(number, int) and 0 <= number < len(tokens) else None

    said = None  # what the post-processor says, then tokenizer_config.json, as llama.cpp reads them
    processor = spec.get("post_processor") or {}
    for step in processor.get("processors") or [processor]:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            said = step["single"][0].get("SpecialToken", {}).get("id") in ids_of
        elif step.get("type") == "ByteLevel" and said is None:
            said = False
    if said is None and isinstance(config.get("add_bos_token"), bool):
        said = config["add_bos_token"]
    add_bos = add_bos if said is None else said
    keys = {"bos": token_id("bos"), "eos": token_id("eos"), "padding": token_id("pad")}
    values = {f"tokenizer.ggml.{k}_token_id": i for k, i in keys.items() if i is not None}
    specials = SpecialTokens.from_gguf(
        lambda key, default=None: values.get(key, default), tokens, types, add_bos, folder
    )
    ends = optional_json("generation_config.json").get("eos_token_id")
    ends = {i for i in (ends if isinstance(ends, list) else [ends]) if isinstance(i, int)}
    return dataclasses.replace(
        specials, end_ids=specials.end_ids | (ends & set(range(len(tokens))))
    )
