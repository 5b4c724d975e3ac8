"""llama.cpp's file types (Q4_K_M, IQ4_XS and the rest): which weight type each matrix of a Llama model
takes, as llama.cpp's quantizer chooses it (its rules for Llama's tensors, without an importance
matrix), so that `llamette quantize --type q4_k_m` writes the mix a downloaded Q4_K_M file has.
`q4_k` and `q5_k` put every matrix in the one type (llama.cpp's `--pure`)."""

from __future__ import annotations

from llamette.weights import ModelConfig

# file type: the type of the matrices no rule singles out
MAIN_TYPE = {
    "q4_k_m": "q4_k", "q4_k_s": "q4_k", "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q6_k": "q6_k",
    "iq4_xs": "iq4_xs", "iq4_nl": "iq4_nl", "q4_k": "q4_k", "q5_k": "q5_k",
}  # fmt: skip
PURE = ("q4_k", "q5_k")
# GGUF's general.file_type of each (llama.cpp names no all-Q4_K or all-Q5_K type: the nearest)
GGUF_FILE_TYPE = {name: f"MOSTLY_{name.upper()}" for name in MAIN_TYPE} | {
    "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S",
}  # fmt: skip
BLOCK = {"q4_k": 256, "q5_k": 256, "q6_k": 256, "iq4_xs": 256, "q5_0": 32, "q5_1": 32, "q8_0": 32,
         "iq4_nl": 32, "f16": 1}  # fmt: skip
# where a matrix's rows are not whole blocks of its type
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}


def uses_more_bits(layer: int, n_layers: int) -> bool:
    """The layers whose attn_v and ffn_down Q4_K_M and Q5_K_M keep in Q6_K: the first and last
    eighths, and every third layer between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def tensor_types(file_type: str, config: ModelConfig) -> dict[str, str]:
    """Each matrix's weight type (by llamette's tensor names) in llama.cpp's file type."""
    main = MAIN_TYPE[file_type]
    types = {}
    for name, shape in config.tensor_shapes().items():
        if len(shape) == 2:
            types[name] = _fitting(_chosen(file_type, main, name, shape, config), shape[1])
    return types


def _chosen(file_type: str, main: str, name: str, shape: tuple, config: ModelConfig) -> str:
    if file_type in PURE:
        return main
    n = config.n_layers
    is_classifier = name == "output.weight" or (
        name == "tok_embeddings.weight" and config.shared_classifier
    )
    if is_classifier:
        return "q8_0" if shape[1] % BLOCK[main] else "q6_k"
    if not name.startswith("layers."):
        return main
    layer = int(name.split(".")[1])
    is_v = name.endswith("attention.wv.weight")
    if not (is_v or name.endswith("feed_forward.w2.weight")):
        return main
    if file_type in ("q4_k_m", "q5_k_m") and uses_more_bits(layer, n):
        return "q6_k"
    if file_type == "q4_k_s" and (layer < 4 if is_v else layer < n // 8):
        return "q5_k"
    if file_type in ("iq4_nl", "iq4_xs"):
        shared_by_4_heads = config.n_heads // config.n_kv_heads >= 4
        if (is_v and shared_by_4_heads) or (not is_v and layer < n // 8):
            return "q5_k"
    return main


def _fitting(kind: str, columns: int) -> str:
    """The type itself where a row is whole blocks of it, else its fallback, else F16."""
    if columns % BLOCK[kind] == 0:
        return kind
    fallback = FALLBACK.get(kind, "f16")
    return fallback if columns % BLOCK[fallback] == 0 else "f16"
