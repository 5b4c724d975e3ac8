"""The compiled-kernel cache: a warm start compiles nothing, and the cache follows the source."""

import subprocess
import sys
import textwrap

import pytest

from llamette.errors import LlametteError
from llamette.kernels import cache

RUN_ONE_STEP = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llamette import Transformer
    from llamette.model import forward
    from llamette.weights import ModelConfig, Weights

    config = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=16)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in config.tensor_shapes().items()}
    model = Transformer(Weights(config, tensors))
    model.forward(1, 0)
    print(json.dumps({"misses": len(forward.stats.cache_misses), "hits": len(forward.stats.cache_hits)}))
""")


def run_step(cache_dir) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONE_STEP], capture_output=True, text=True, check=True,
        env={"LLAMETTE_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    import json

    return json.loads(done.stdout)


def test_a_warm_start_compiles_nothing(tmp_path):
    assert run_step(tmp_path) == {"misses": 1, "hits": 0}  # cold: compiled, then saved
    assert run_step(tmp_path) == {"misses": 0, "hits": 1}  # warm: loaded
    stamped = tmp_path / f"kernels-{cache.source_hash()}"
    assert any(stamped.glob("model.forward-*.nbi"))


def test_an_unwritable_cache_says_it_is_the_kernel_cache_and_how_to_move_it(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    locator = cache.PackageCacheLocator(cache.__file__, 1)
    locator.path = blocked / "kernels"  # under a file: cannot be created
    with pytest.raises(LlametteError, match="kernel cache .*LLAMETTE_CACHE_DIR"):
        locator.ensure_cache_path()


def test_the_stamp_covers_every_file_with_compiled_code():
    files = {
        p.relative_to(cache.PACKAGE_DIR).as_posix()
        for pattern in cache.COMPILED_SOURCES
        for p in cache.PACKAGE_DIR.glob(pattern)
    }
    for path in cache.PACKAGE_DIR.rglob("*.py"):
        text = path.read_text()
        if any(mark in text for mark in ("@kernel", "@parallel_kernel", "njit(", "@overload")):
            assert path.relative_to(cache.PACKAGE_DIR).as_posix() in files, path
