"""`llamette warm-up`: a model of a warmed-up file type, as llama.cpp writes it, starts as on a warm
kernel cache."""

import json
import os
import subprocess
import sys

from conftest import FIRST_DRAW, quantized_by_llama_cpp, random_model_of_whole_k_blocks
from llamette.cli import main


def test_a_q4_k_m_file_from_llama_cpp_starts_without_a_compile_after_warm_up(tmp_path):
    f32 = random_model_of_whole_k_blocks(tmp_path / "f32.gguf", n_layers=8)
    downloaded = quantized_by_llama_cpp(f32, tmp_path / "q4_k_m.gguf", "Q4_K_M")
    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path / "kernels")}
    warmed = subprocess.run([sys.executable, "-m", "llamette", "warm-up", "q4_k_m"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert warmed.returncode == 0, warmed.stderr
    assert "q4_k_m ready (1 of 1" in warmed.stderr
    first_run = subprocess.run([sys.executable, "-c", FIRST_DRAW, str(downloaded)],
                               capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert json.loads(first_run.stdout) == []


def test_warm_up_names_a_type_it_does_not_know_before_compiling_any(capsys):
    assert main(["warm-up", "q8_0", "q3_k_xl"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("llamette: error: q3_k_xl: not a file type; one of f32,")
    assert error.count("\n") == 1
