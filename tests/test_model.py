"""The forward pass against Hugging Face transformers' logits for the same weights."""

import numpy as np
import pytest

from conftest import shared_path
from llamette import Transformer


@pytest.mark.parametrize("exact", [True, False])
def test_logits_match_transformers(exact):
    """hf-mha.v0.bin is hf-mha/ exported by llama2.c; the npz holds LlamaForCausalLM's logits."""
    reference = np.load(shared_path("expected", "hf-mha.logits.npz"))
    model = Transformer.load(shared_path("models", "hf-mha.v0.bin"), exact=exact)
    for pos, token in enumerate(reference["input_ids"].ravel()):
        logits = model.forward(int(token), pos)
        expected = reference["logits"].reshape(-1, 32000)[pos]
        error = np.abs(logits - expected).max() / np.abs(expected).max()
        assert error < 1e-4, f"position {pos}: relative error {error:.2e}"


def test_default_path_on_partial_q8_groups_stays_close_to_fp32():
    """runq.c miscomputes stories260K_q80.bin; llamette's default path keeps it near the fp32 model."""
    fp32 = Transformer.load(shared_path("models", "stories260K.bin"), exact=True)
    q80 = Transformer.load(shared_path("models", "stories260K_q80.bin"))
    runq = Transformer.load(shared_path("models", "stories260K_q80.bin"), exact=True)
    token, errors, runq_errors = 1, [], []
    for pos in range(64):
        expected = fp32.forward(token, pos).copy()
        scale = np.abs(expected).max()
        errors.append(np.abs(q80.forward(token, pos) - expected).max() / scale)
        runq_errors.append(np.abs(runq.forward(token, pos) - expected).max() / scale)
        token = int(np.argmax(expected))
    assert max(errors) < 0.05
    assert max(runq_errors) > 0.2  # what runq.c's arithmetic does to this file
