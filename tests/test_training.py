"""Training the demo model: the corpus, the tokenizer, determinism, and PyTorch-llamette parity."""

import numpy as np
import pytest

from llamette import Tokenizer, Transformer
from llamette.training.corpus import make_corpus

torch = pytest.importorskip("torch", reason="training needs PyTorch (pip install -e .[train])")
from llamette.training.train import TrainConfig, build_model, train  # noqa: E402

TINY = TrainConfig(train_stories=150, heldout_stories=10, steps=4, eval_every=2, batch_size=4,
                   seq_len=64, vocab_size=400, dim=32, hidden_dim=64, n_layers=2)  # fmt: skip


def test_corpus_is_reproducible_from_its_seed():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)
    stories = make_corpus(200, seed=1)
    assert len(set(stories)) == 200 and all(s.startswith(("Once", "One", "There")) for s in stories)


def test_same_seed_same_model(tmp_path):
    first = train(str(tmp_path / "a"), TINY, progress=False)
    second = train(str(tmp_path / "b"), TINY, progress=False)
    assert [s["heldout_loss"] for s in first["steps"]] == [
        s["heldout_loss"] for s in second["steps"]
    ]
    assert (tmp_path / "a" / "model.bin").read_bytes() == (
        tmp_path / "b" / "model.bin"
    ).read_bytes()
    assert (tmp_path / "a" / "tokenizer.bin").read_bytes() == (
        tmp_path / "b" / "tokenizer.bin"
    ).read_bytes()


def test_exported_model_computes_what_pytorch_computes(tmp_path):
    """The training model's logits against llamette's forward on the exported llama2.c file."""
    out = tmp_path / "model"
    log = train(str(out), TINY, progress=False)
    model = build_model(TINY)
    state = {name: torch.from_numpy(np.array(tensor)) for name, tensor in
             Transformer.load(out / "model.bin").weights.tensors.items()}  # fmt: skip
    model.load_state_dict(state)
    ours = Transformer.load(out / "model.bin")
    tokens = Tokenizer.load(out / "tokenizer.bin").encode("Once upon a time, there was a dog.")
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].numpy()
    for pos, token in enumerate(tokens):
        logits = ours.forward(token, pos)
        assert np.abs(logits - expected[pos]).max() < 1e-4 * np.abs(expected[pos]).max()
    assert log["greedy"]["prompt_ids"] == Tokenizer.load(out / "tokenizer.bin").encode(
        "Once upon a time"
    )
