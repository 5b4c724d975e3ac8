"""Memory of `llamette convert` on a Llama-2-7B-shaped Hugging Face checkpoint (random bf16).

Makes the checkpoint once (about 13.5 GB of safetensors shards in ~/.cache/llamette-bench, like a
real download: 2 shards and an index), converts it to llama2.c v2 (Q8_0) in a child process and
samples the child's anonymous resident memory (RssAnon: pages of the memory-mapped input do not
count) every 10 ms. Prints the peak, the bound the formats issue sets (2 GiB plus twice the
largest tensor in fp32) and the time taken.

Usage: python benchmarks/convert_memory.py [--keep-output]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from models import cache_dir

# Llama-2-7B
DIM, HIDDEN, LAYERS, HEADS, VOCAB, SEQ_LEN = 4096, 11008, 32, 32, 32000, 4096
SHARD_BYTES = 10 << 30


def hf_shapes() -> dict[str, tuple[int, int] | tuple[int]]:
    shapes: dict = {"model.embed_tokens.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (DIM,),
            prefix + "self_attn.q_proj.weight": (DIM, DIM),
            prefix + "self_attn.k_proj.weight": (DIM, DIM),
            prefix + "self_attn.v_proj.weight": (DIM, DIM),
            prefix + "self_attn.o_proj.weight": (DIM, DIM),
            prefix + "post_attention_layernorm.weight": (DIM,),
            prefix + "mlp.gate_proj.weight": (HIDDEN, DIM),
            prefix + "mlp.down_proj.weight": (DIM, HIDDEN),
            prefix + "mlp.up_proj.weight": (HIDDEN, DIM),
        }
    shapes |= {"model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}
    return shapes


def random_bf16(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal(0, 0.02) values (norms: around 1) rounded to bf16, as raw uint16."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    if len(shape) == 1:
        values += 1
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def make_checkpoint(folder: Path) -> None:
    """Write config.json, the safetensors shards and their index, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {
                "dtype": "BF16",
                "shape": list(shapes[name]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        partial = folder / (file + ".partial")
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in names:
                f.write(random_bf16(shapes[name], seed=list(shapes).index(name)).tobytes())
        partial.rename(folder / file)
        print(f"  wrote {file}", flush=True)
    weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
        "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": SEQ_LEN,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def rss_anon_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-output", action="store_true", help="keep the 7 GB output file")
    args = parser.parse_args()
    folder = cache_dir() / "models" / "llama2-7b-hf-bf16"
    if not (folder / "config.json").exists():
        print(f"making a random Llama-2-7B-shaped bf16 checkpoint in {folder} (once)", flush=True)
        make_checkpoint(folder)
    out = cache_dir() / "models" / "llama2-7b-from-hf.q80.bin"
    command = [
        sys.executable,
        "-m",
        "llamette",
        "convert",
        str(folder),
        str(out),
        "--format",
        "llama2c-v2",
    ]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    peak = 0
    while child.poll() is None:
        peak = max(peak, rss_anon_bytes(child.pid))
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"convert failed with status {child.returncode}")
    largest = max(int(np.prod(shape)) for shape in hf_shapes().values()) * 4
    bound = (2 << 30) + 2 * largest
    print(f"converted {sum(p.stat().st_size for p in folder.glob('*.safetensors')) / 1e9:.1f} GB of bf16 "
          f"to {out.stat().st_size / 1e9:.1f} GB of Q8_0 in {seconds:.0f} s; peak RssAnon "
          f"{peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB (2 GiB + 2 x {largest / 2**20:.0f} MiB)")  # fmt: skip
    if not args.keep_output:
        out.unlink()


if __name__ == "__main__":
    main()
