"""The sampler against run.c's own sample(), recorded on fixed logits (no forward pass)."""

import base64

import numpy as np
import pytest

from conftest import expected_rows, shared_path
from llamette import Sampler
from llamette.kernels.sampling import _sorted_descending
from llamette.sampler import Adjustments, adjusted_logits


def _name(row):
    return f"{row['kind']}-t{row['temperature']}-p{row['topp']}-s{row['seed']}"


@pytest.mark.parametrize("row", expected_rows("sampler.jsonl"))
def test_same_tokens_as_run_c(row):
    logits = np.frombuffer(base64.b64decode(row["logits_f32_b64"]), np.float32).copy()
    sampler = Sampler(len(logits), row["temperature"], row["topp"], seed=row["seed"])
    sampled = [sampler.sample(logits) for _ in range(row["draws"])]
    assert sampled == row["sampled"], _name(row)


def test_leaves_the_callers_logits_alone():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    before = logits.copy()
    for topp, topk in [(0.9, 0), (0.0, 0), (0.9, 20), (0.0, 20)]:
        Sampler(1000, temperature=0.7, topp=topp, topk=topk, seed=3).sample(logits)
    assert np.array_equal(logits, before)


def test_greedy_takes_the_first_maximum():
    logits = np.array([0.5, 2.0, -1.0, 2.0], np.float32)
    assert Sampler(4, temperature=0.0).sample(logits) == 1


def test_top_k_only_ever_returns_the_k_most_likely_tokens():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(500).astype(np.float32)
    allowed = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(500, temperature=1.5, topp=0.0, topk=5, seed=11)
    drawn = {sampler.sample(logits) for _ in range(400)}
    assert drawn == allowed  # 400 draws at high temperature reach all five


def test_top_k_frequencies_follow_the_renormalized_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    sampler = Sampler(4, temperature=1.0, topp=0.0, topk=2, seed=5)
    draws = np.array([sampler.sample(logits) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03


def test_top_k_with_top_p_cuts_inside_the_top_k():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    sampler = Sampler(4, temperature=1.0, topp=0.5, topk=3, seed=9)
    # top-3 mass 0.9; the first prefix over 0.5 * 0.9 is tokens {0, 1}
    assert {sampler.sample(logits) for _ in range(300)} == {0, 1}


def test_ties_at_the_top_k_boundary_go_to_lower_ids():
    logits = np.array([1.0, 3.0, 1.0, 1.0, 3.0], np.float32)
    sampler = Sampler(5, temperature=1.0, topp=0.0, topk=3, seed=2)
    assert {sampler.sample(logits) for _ in range(300)} == {0, 1, 4}


def test_same_seed_same_tokens_and_skip_advances_like_sampling():
    logits = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    a, b = Sampler(64, seed=77), Sampler(64, seed=77)
    for _ in range(3):
        a.sample(logits)
    b.skip(3)
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]


def test_xorshift_matches_run_c():
    # run.c: s ^= s >> 12; s ^= s << 25; s ^= s >> 27; (s * 0x2545F4914F6CDD1D) >> 32, by hand:
    s = 42
    s ^= s >> 12
    s = (s ^ (s << 25)) % 2**64
    s ^= s >> 27
    assert Sampler(2, seed=42).random_u32() == (s * 0x2545F4914F6CDD1D) % 2**64 >> 32


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(topp=1.5), dict(topp=-0.1), dict(topk=-1)],
)
def test_rejects_settings_out_of_range(kwargs):
    with pytest.raises(ValueError):
        Sampler(10, **kwargs)


def test_top_p_sorts_candidates_as_a_stable_sort_by_probability_would():
    """Largest first, ties in index order, zeros last: NumPy's stable argsort as the reference."""
    rng = np.random.default_rng(1)
    probs = rng.random(5000).astype(np.float32)
    probs[rng.random(5000) < 0.3] = probs[0]  # many ties
    probs[rng.random(5000) < 0.1] = 0.0
    candidates = np.sort(rng.choice(5000, 3000, replace=False)).astype(np.int64)
    expected = candidates[np.argsort(-probs[candidates], kind="stable")]
    np.testing.assert_array_equal(_sorted_descending(probs, candidates), expected)


def test_warm_up_leaves_the_draws_to_come_as_they_were():
    logits = np.random.default_rng(2).standard_normal(500).astype(np.float32)
    warmed, fresh = (Sampler(500, temperature=0.8, topp=0.9, seed=11) for _ in range(2))
    warmed.warm_up()
    assert [warmed.sample(logits) for _ in range(20)] == [fresh.sample(logits) for _ in range(20)]


def test_any_integer_seeds_the_rng_and_zero_does_not_stall_it():
    """OpenAI's API takes any integer seed: 0 and negative seeds draw as well as positive ones."""
    for seed in (0, -1, -3, 2**64):
        sampler = Sampler(10, temperature=1.0, topp=0.0, seed=seed)
        draws = {sampler.random_u32() for _ in range(100)}
        assert len(draws) > 90, seed
    assert Sampler(10, seed=5).rng_state == 5  # run.c's positive seeds are unchanged


def transcribed(logits, recent, bias=None, repeat=1.0, last_n=64, frequency=0.0, presence=0.0,
                min_p=0.0):  # fmt: skip
    """Adjustments' documented order, in float64 NumPy, token by token."""
    z = np.array(logits, np.float64)
    for token, value in (bias or {}).items():
        z[token] += value
    window = list(recent) if last_n == -1 else list(recent)[-last_n:] if last_n else []
    for token in set(window):
        z[token] = z[token] / repeat if z[token] > 0 else z[token] * repeat
        z[token] -= window.count(token) * frequency + presence
    if min_p:
        p = np.exp(z - z.max())
        z[p / p.max() < min_p] = -np.inf
    return z


SETTINGS = [
    dict(bias={17: 5.0, 2: -100.0, 30000: 2.5}),
    dict(repeat=1.3, last_n=16),
    dict(repeat=0.7, last_n=-1, frequency=0.4, presence=0.6),
    dict(frequency=-0.5, presence=1.5, last_n=8),
    dict(min_p=0.05),
    dict(bias={5: 3.0}, repeat=1.1, frequency=0.2, presence=0.1, min_p=0.1, last_n=32),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_adjustments_follow_their_numpy_transcription_on_recorded_logits(settings):
    recorded = np.load(shared_path("expected", "hf-mha.logits.npz"))
    rng = np.random.default_rng(1)
    names = {"bias": "logit_bias", "repeat": "repeat_penalty", "last_n": "repeat_last_n",
             "frequency": "frequency_penalty", "presence": "presence_penalty", "min_p": "min_p"}  # fmt: skip
    adjust = Adjustments(**{names[k]: v for k, v in settings.items()})
    for logits in recorded["logits"].reshape(-1, 32000):
        recent = rng.integers(0, 32000, 40).tolist() + [int(np.argmax(logits))] * 3
        expected = transcribed(logits, recent, **settings)
        last_n = adjust.repeat_last_n
        window = recent if last_n == -1 else recent[len(recent) - last_n :] if last_n else []
        ours = adjusted_logits(logits, window, adjust)  # the Sampler keeps the window
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-5)
        greedy = Sampler(32000, temperature=0.0, adjust=adjust)
        greedy.accept(recent)
        assert greedy.sample(logits) == int(np.argmax(expected))
        for seed in range(1, 30):  # draws never take a token min_p took out
            drawn = Sampler(32000, temperature=1.0, topp=0.0, seed=seed, adjust=adjust)
            drawn.accept(recent)
            assert np.isfinite(expected[drawn.sample(logits)])


def test_no_adjustment_is_run_cs_sampling_to_the_bit():
    logits = np.random.default_rng(2).standard_normal(500).astype(np.float32)
    plain, adjusted = (
        Sampler(500, 0.8, 0.9, seed=7),
        Sampler(500, 0.8, 0.9, seed=7, adjust=Adjustments()),
    )
    assert [plain.sample(logits) for _ in range(100)] == [
        adjusted.sample(logits) for _ in range(100)
    ]


@pytest.mark.parametrize(
    "settings",
    [dict(min_p=1.5), dict(repeat_penalty=0.0), dict(repeat_last_n=-2), dict(presence_penalty=3.0)],
)
def test_adjustments_out_of_range_are_value_errors(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        Adjustments(**settings)
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(10, adjust=Adjustments(logit_bias={10: 1.0}))


def test_warming_up_leaves_the_penalties_history_alone():
    sampler = Sampler(50, temperature=0.0, adjust=Adjustments(repeat_penalty=1.2))
    sampler.accept([3, 4, 5])
    sampler.warm_up()
    assert list(sampler.recent) == [3, 4, 5]
