"""SamplingParams validation and the pure sampling functions (greedy, top-k/top-p masking, seeded sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.engine.sampler import apply_top_k_top_p, sample
from loraplex.errors import InvalidRequestError
from loraplex.sampling import SamplingParams

# ---- SamplingParams validation ----------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids"),
])
def test_invalid_sampling_params_raise_naming_the_parameter(kwargs: dict, name: str) -> None:
    """Each out-of-range parameter raises InvalidRequestError whose message names that parameter."""
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**kwargs)


def test_valid_sampling_params_are_normalised() -> None:
    """top_k=-1 means off (0), a single stop string becomes a list, empty stop strings are dropped."""
    p = SamplingParams(top_k=-1, stop="END")  # type: ignore[arg-type]
    assert p.top_k == 0 and p.stop == ["END"]
    assert SamplingParams(stop=["", "x", ""]).stop == ["x"]
    assert SamplingParams(max_tokens=1, min_tokens=1, top_p=1.0, temperature=0.0).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams.greedy_params(5).max_tokens == 5 and SamplingParams.greedy_params().greedy


# ---- greedy and degenerate filters -------------------------------------------------------------------


def random_logits(n: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    """temperature=0 picks the argmax of each row."""
    logits = random_logits(16, 50)
    params = [SamplingParams(temperature=0.0)] * 16
    assert sample(logits, params, [None] * 16) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    """Greedy rows return the argmax even when other rows of the batch sample with top-k/top-p."""
    logits = random_logits(8, 50, seed=1)
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(top_k=5, top_p=0.9) for i in range(8)]
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    out = sample(logits, params, gens)
    assert [out[i] for i in range(1, 8, 2)] == logits.argmax(-1)[1::2].tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                                    SamplingParams(top_k=1, temperature=5.0), SamplingParams(top_p=1e-6, top_k=7)])
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    """top_k=1 or a tiny top_p leaves only the most likely token, so sampling equals greedy for any seed."""
    logits = random_logits(32, 100, seed=2)
    greedy = logits.argmax(-1).tolist()
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(32)]
        assert sample(logits, [params] * 32, gens) == greedy


# ---- apply_top_k_top_p ---------------------------------------------------------------------------------


def kept(masked: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]


def test_top_k_top_p_masks_exactly_the_expected_tokens() -> None:
    """Hand-made example: top-k keeps the k largest, top-p keeps the smallest prefix reaching p (renormalised
    after top-k), kept logits are unchanged and in their original positions."""
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])  # ranks: 1, 3, 4, 2, 0
    row = probs.log()
    logits = row.repeat(6, 1)
    top_k = torch.tensor([0, 2, 0, 0, 2, 3])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.35, 0.5, 0.75])
    out = apply_top_k_top_p(logits.clone(), top_k, top_p)
    assert kept(out) == [
        [0, 1, 2, 3, 4],  # nothing
        [1, 3],  # top-2
        [1, 3],  # 0.40 < 0.6, 0.40 + 0.30 >= 0.6
        [1],  # the first token alone already reaches 0.35 (and always stays)
        [1],  # top-2 renormalised: 4/7 >= 0.5 -> only token 1 (without renormalising 0.40 < 0.5 would keep 3)
        [1, 3],  # top-3 renormalised: 0.47, 0.35, 0.18 -> 0.47 < 0.75 <= 0.82
    ]
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])
    assert torch.all(out[~finite] == float("-inf"))


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_p_exactly() -> None:
    """Uniform 4-token row (probabilities exactly 0.25): top_p=0.5 keeps exactly 2 tokens, top_p=0.51 keeps 3."""
    out = apply_top_k_top_p(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.tensor([0.5, 0.51]))
    assert [len(k) for k in kept(out)] == [2, 3]


def test_top_k_top_p_is_a_no_op_when_disabled() -> None:
    """top_k=0 and top_p=1 keep every logit unchanged."""
    logits = random_logits(4, 30, seed=3)
    out = apply_top_k_top_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert torch.equal(out, logits)


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    """top_k >= vocab size masks nothing."""
    logits = random_logits(2, 6, seed=4)
    out = apply_top_k_top_p(logits, torch.tensor([6, 100]), torch.ones(2))
    assert torch.equal(out, logits)


# ---- seeded sampling ------------------------------------------------------------------------------


def test_seeded_sampling_is_independent_of_the_rest_of_the_batch() -> None:
    """Same seed and generator state give the same tokens whether the row is sampled alone or among other rows."""
    row = torch.zeros(1, 40)  # flat: the noise alone decides, so a wrong generator would show
    p = SamplingParams(temperature=1.0, seed=1234)
    alone_gen = torch.Generator().manual_seed(1234)
    alone = [sample(row, [p], [alone_gen])[0] for _ in range(20)]
    assert len(set(alone)) > 5  # really random across steps

    batch_gen = torch.Generator().manual_seed(1234)
    others = random_logits(5, 40, seed=5)
    in_batch = []
    with torch.random.fork_rng():
        torch.manual_seed(999)  # unseeded rows draw from the global generator
        for i in range(20):
            logits = torch.cat([others[:2], row, others[2:]])
            params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0), p,
                      SamplingParams(top_p=0.5, temperature=0.3), SamplingParams(seed=7), SamplingParams()]
            gens = [None, None, batch_gen, None, torch.Generator().manual_seed(7 + i), None]
            in_batch.append(sample(logits, params, gens)[2])
    assert in_batch == alone


def test_different_seeds_give_different_samples() -> None:
    """Sampling really depends on the generator: different seeds disagree on a flat distribution."""
    row = torch.zeros(1, 1000)
    tokens = {sample(row, [SamplingParams(seed=s)], [torch.Generator().manual_seed(s)])[0] for s in range(10)}
    assert len(tokens) > 5


def test_empirical_distribution_matches_softmax() -> None:
    """Sampled frequencies over a 3-token vocab match softmax(logits / temperature), also after top-k."""
    probs = torch.tensor([0.2, 0.3, 0.5])
    n = 30000
    logits = probs.log().repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    cases = [
        (SamplingParams(temperature=1.0), probs),
        (SamplingParams(temperature=2.0), (probs.log() / 2).softmax(-1)),
        (SamplingParams(temperature=0.5), (probs.log() / 0.5).softmax(-1)),
        (SamplingParams(top_k=2), torch.tensor([0.0, 0.375, 0.625])),
    ]
    for params, expected in cases:
        out = torch.tensor(sample(logits, [params] * n, [g] * n))
        freq = torch.bincount(out, minlength=3).float() / n
        # std of a frequency <= sqrt(0.25 / n) ~ 0.003: 0.015 is 5 sigma, and the seed is fixed anyway.
        assert torch.allclose(freq, expected, atol=0.015), (params, freq, expected)
