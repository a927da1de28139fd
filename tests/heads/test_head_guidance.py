"""Lesson 14 (P08): per-head perturbed attention (SoftPAG), perturbation guidance, HeadHunter's greedy search."""

import itertools

import pytest
import torch

from attnlib import MultiHeadAttention, TinyTransformer, attention, attention_naive, build_mechanism
from attnlib.heads.head_guidance import (
    CachedDecoder,
    PerturbedMultiHeadAttention,
    all_heads,
    allowed_keys,
    digit_tokens,
    greedy_head_search,
    guided_prediction,
    perturb_heads,
    perturbed_attention,
    perturbed_attention_naive,
    sample_guided,
    target_map,
    target_times_values,
    tokens_to_images,
)

from ..helpers import make_qkv


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(vocab_size=13, max_len=12, dim=16, depth=2, num_heads=2, mechanism="mha-perturbed")
    options.update(kwargs)
    return TinyTransformer(**options).eval()


# --- the oracle and the vectorised form -----------------------------------------------------------------


def test_oracle_at_u0_is_plain_attention():
    q, k, v = make_qkv(b=2, hq=3, lq=5, d=4, dtype=torch.float64, seed=1)
    for causal in (False, True):
        torch.testing.assert_close(perturbed_attention_naive(q, k, v, 0.0, causal=causal),
                                   attention_naive(q, k, v, causal=causal))


@pytest.mark.parametrize("target", ["identity", "uniform"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hkv", [3, 1], ids=["mha", "mqa"])
def test_matches_naive_loops(target, causal, hkv):
    q, k, v = make_qkv(b=2, hq=3, hkv=hkv, lq=6, d=4, dtype=torch.float64, seed=2)
    u = [0.0, 0.35, 1.0]
    got = perturbed_attention(q, k, v, u, target=target, causal=causal)
    torch.testing.assert_close(got, perturbed_attention_naive(q, k, v, u, target=target, causal=causal))


@pytest.mark.parametrize("target", ["identity", "uniform"])
def test_effective_weights_are_the_interpolated_map(target):
    q, k, v = make_qkv(b=1, hq=2, lq=5, d=4, dtype=torch.float64, seed=3)
    u = torch.tensor([0.25, 0.8], dtype=torch.float64)
    out, weights = perturbed_attention(q, k, v, u, target=target, causal=True, return_weights=True)
    _, plain = attention(q, k, v, causal=True, return_weights=True)
    t = target_map(target, 5, 5, allowed=torch.ones(5, 5, dtype=torch.bool).tril(), dtype=torch.float64)
    want = (1 - u.view(1, 2, 1, 1)) * plain + u.view(1, 2, 1, 1) * t
    torch.testing.assert_close(weights, want)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64))  # rows still sum to 1
    torch.testing.assert_close(out, weights @ v)  # the output never built T, yet equals A' V
    assert (weights.triu(1) == 0).all()  # the perturbed map is causal


def test_identity_at_u1_returns_v():
    q, k, v = make_qkv(b=2, hq=2, lq=7, d=4, seed=4)
    for causal in (False, True):
        assert torch.equal(perturbed_attention(q, k, v, 1.0, causal=causal), v)


def test_uniform_is_mean_of_visible_values():
    q, k, v = make_qkv(b=1, hq=2, lq=6, d=3, dtype=torch.float64, seed=5)
    running_mean = v.cumsum(dim=2) / torch.arange(1, 7, dtype=torch.float64).view(1, 1, 6, 1)
    torch.testing.assert_close(perturbed_attention(q, k, v, 1.0, target="uniform", causal=True), running_mean)
    full = perturbed_attention(q, k, v, 1.0, target="uniform")
    torch.testing.assert_close(full, v.mean(dim=2, keepdim=True).expand_as(v))


def test_uniform_respects_a_mask_and_fully_masked_rows_give_zero():
    q, k, v = make_qkv(b=1, hq=1, lq=4, d=3, dtype=torch.float64, seed=6)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    out = perturbed_attention(q, k, v, 1.0, target="uniform", mask=mask)
    torch.testing.assert_close(out[0, 0, 0], (v[0, 0, 0] + v[0, 0, 2]) / 2)
    assert torch.equal(out[0, 0, 1], torch.zeros(3, dtype=torch.float64))
    ident = perturbed_attention(q, k, v, 0.5, target="identity", mask=mask)
    assert not torch.isnan(ident).any() and torch.equal(ident[0, 0, 1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("target", ["identity", "uniform"])
def test_output_is_linear_in_u(target):
    q, k, v = make_qkv(b=1, hq=2, lq=5, d=4, dtype=torch.float64, seed=7)
    at0 = perturbed_attention(q, k, v, 0.0, target=target, causal=True)
    at1 = perturbed_attention(q, k, v, 1.0, target=target, causal=True)
    for u in (0.1, 0.5, 0.9):
        torch.testing.assert_close(perturbed_attention(q, k, v, u, target=target, causal=True), (1 - u) * at0 + u * at1)
    assert not torch.allclose(at0, at1)


def test_heads_are_perturbed_independently():
    q, k, v = make_qkv(b=1, hq=3, lq=5, d=4, seed=8)
    plain = attention(q, k, v, causal=True)
    out = perturbed_attention(q, k, v, [0.0, 1.0, 0.0], causal=True)
    assert torch.equal(out[:, 0], plain[:, 0]) and torch.equal(out[:, 2], plain[:, 2])
    assert torch.equal(out[:, 1], v[:, 1])


def test_gradients():
    q, k, v = make_qkv(b=1, hq=2, lq=4, d=3, dtype=torch.float64, seed=9, requires_grad=True)
    for target in ("identity", "uniform"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: perturbed_attention(q, k, v, [0.3, 0.7], target=target, causal=True), (q, k, v))


# --- the module and the registry -------------------------------------------------------------------------


def test_module_unperturbed_is_exactly_plain_mha():
    torch.manual_seed(0)
    plain = MultiHeadAttention(16, 4, causal=True)
    mixer = PerturbedMultiHeadAttention(16, 4, causal=True)
    mixer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 16)
    assert torch.equal(mixer(x), plain(x))
    with mixer.perturbed([0.0, 0.0, 0.0, 0.0]):
        assert torch.equal(mixer(x), plain(x))


def test_module_identity_heads_output_v_through_the_output_projection():
    torch.manual_seed(0)
    mixer = PerturbedMultiHeadAttention(16, 4, causal=True)
    x = torch.randn(2, 6, 16)
    with mixer.perturbed(1.0):
        torch.testing.assert_close(mixer(x), mixer.out_proj(mixer.v_proj(x)))
    with mixer.perturbed([1.0, 0.0, 0.0, 0.0]):
        out = mixer(x)
    # heads 1..3 unchanged, head 0 is its values: compare the concatenated heads before W^O
    heads = mixer.split_heads(mixer.q_proj(x), 4), mixer.split_heads(mixer.k_proj(x), 4), mixer.split_heads(mixer.v_proj(x), 4)
    mixed = attention(*heads, causal=True)
    mixed[:, 0] = heads[2][:, 0]
    torch.testing.assert_close(out, mixer.out_proj(mixed.transpose(1, 2).reshape(2, 6, 16)))
    assert mixer.perturbation.sum() == 0  # the context manager restored the state


def test_module_returns_the_perturbed_map():
    torch.manual_seed(0)
    mixer = PerturbedMultiHeadAttention(8, 2, causal=True, perturbation=[0.5, 0.0], target="uniform")
    _, weights = mixer(torch.randn(1, 4, 8), return_weights=True)
    plain = mixer.last_weights
    want0 = 0.5 * plain[0, 0] + 0.5 * target_map("uniform", 4, 4, allowed=torch.ones(4, 4, dtype=torch.bool).tril())
    torch.testing.assert_close(weights[0, 0], want0)
    torch.testing.assert_close(weights[0, 1], plain[0, 1])


@pytest.mark.parametrize("target", ["identity", "uniform"])
def test_perturbed_model_stays_causal(target):
    model = tiny_model()
    x = torch.randint(0, 13, (2, 10), generator=torch.Generator().manual_seed(0))
    with perturb_heads(model, [(0, 1), (1, 0)], u=0.6, target=target), torch.no_grad():
        y = model(x)
        changed = x.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % 13
        y2 = model(changed)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-6) and not torch.allclose(y[:, 6:], y2[:, 6:])


def test_registry_defaults_are_unperturbed():
    mixer = build_mechanism("mha-perturbed", 16, 2, causal=True)
    assert isinstance(mixer, PerturbedMultiHeadAttention) and mixer.perturbation.sum() == 0
    assert mixer.target == "identity"


def test_perturb_heads_touches_only_the_chosen_heads():
    model = tiny_model()
    assert all_heads(model) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with perturb_heads(model, [(1, 0)], u=0.4):
        assert model.blocks[0].mixer.perturbation.tolist() == [0.0, 0.0]
        assert model.blocks[1].mixer.perturbation.tolist() == pytest.approx([0.4, 0.0])
    assert all(block.mixer.perturbation.sum() == 0 for block in model.blocks)


@pytest.mark.parametrize("heads, target", [((), "identity"), (((0, 1), (1, 0)), "identity"),
                                           (((0, 0),), "uniform")])
def test_cached_decoder_matches_the_full_forward(heads, target):
    model = tiny_model()
    x = torch.randint(0, 13, (3, 11), generator=torch.Generator().manual_seed(1))
    with perturb_heads(model, heads, u=0.7, target=target), torch.no_grad():
        full = model(x)
        decoder = CachedDecoder(model)
        steps = torch.stack([decoder.step(x[:, t]) for t in range(11)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


# --- guidance ------------------------------------------------------------------------------------------------


def test_guidance_formula_and_special_cases():
    g = torch.Generator().manual_seed(0)
    cond, weak, uncond = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    assert torch.equal(guided_prediction(cond, weak, 0.0), cond)  # s = 0: the conditional prediction
    torch.testing.assert_close(guided_prediction(cond, weak, 2.5), cond + 2.5 * (cond - weak))
    torch.testing.assert_close(guided_prediction(cond, weak, 1.0), 2 * cond - weak)
    with_cfg = guided_prediction(cond, weak, 2.0, uncond=uncond, cfg_scale=3.0)
    torch.testing.assert_close(with_cfg, uncond + 3.0 * (cond - uncond) + 2.0 * (cond - weak))
    # w = 1 turns classifier-free guidance off: back to the PAG-only form
    torch.testing.assert_close(guided_prediction(cond, weak, 2.0, uncond=uncond, cfg_scale=1.0),
                               guided_prediction(cond, weak, 2.0))


def test_guidance_on_logits_equals_guidance_on_log_probabilities():
    g = torch.Generator().manual_seed(1)
    cond, weak = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    on_logits = torch.softmax(guided_prediction(cond, weak, 1.5), -1)
    on_logprobs = torch.softmax(guided_prediction(cond.log_softmax(-1), weak.log_softmax(-1), 1.5), -1)
    torch.testing.assert_close(on_logits, on_logprobs)


# --- the greedy search -----------------------------------------------------------------------------------------


def synergy_objective(calls):
    """A toy objective: additive head values plus a bonus for a pair that is weak alone."""
    values = {"a": 3.0, "b": 1.0, "c": 0.5, "d": -1.0, "e": 0.0}

    def objective(heads):
        calls.append(list(heads))
        score = sum(values[h] for h in heads)
        if "c" in heads and "e" in heads:
            score += 5.0
        if len(set(heads)) != len(heads):
            score += 100.0  # a repeated head would look great: the search must never try one
        return score

    return objective


def test_greedy_finds_the_known_best_set():
    calls = []
    objective = synergy_objective(calls)
    selected, history = greedy_head_search(list("abcde"), objective, rounds=3, per_round=1)
    # round 1 picks a; round 2 picks b (a+c: 3.5, a+e: 3, a+b: 4); round 3: c completes the synergy
    assert selected == ["a", "b", "c"]
    assert [h["added"] for h in history] == [["a"], ["b"], ["c"]]
    assert len(calls) == 5 + 4 + 3  # every remaining head, once per round
    best = max(itertools.combinations("abcde", 3), key=lambda s: objective(list(s)))
    assert set(best) == {"a", "c", "e"}  # greedy is greedy: the exhaustive best differs, as it may

    calls.clear()
    selected, _ = greedy_head_search(list("abcde"), objective, rounds=2, per_round=2)
    assert selected == ["a", "b", "c", "e"]  # round 2: {a, b} + c scores 4.5, + e 4, + d 3
    assert all(len(set(c)) == len(c) for c in calls)


def test_greedy_scores_the_set_not_the_head_alone():
    seen = []
    greedy_head_search(list("abc"), lambda heads: seen.append(tuple(heads)) or len(heads), rounds=2, per_round=1)
    assert seen[:3] == [("a",), ("b",), ("c",)] and seen[3:] == [("a", "b"), ("a", "c")]


# --- the toy generative model ----------------------------------------------------------------------------------


def test_digit_tokens_round_trip():
    sequences, labels = digit_tokens(levels=4, pixels_per_token=2)
    assert sequences.shape == (1797, 33) and labels.shape == (1797,)
    assert sequences[:, 1:].max() < 16 and torch.equal(sequences[:, 0], 16 + labels)
    images = tokens_to_images(sequences[:, 1:])
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32)
    assert torch.equal(images * 3, torch.clamp((raw * 4 / 17).floor(), max=3))


def test_sampling_is_deterministic_with_a_seed():
    model = tiny_model()
    prompts = torch.tensor([[10], [11], [12]])
    kwargs = dict(heads=[(0, 1)], u=0.5, scale=1.0, allowed_tokens=10)
    a = sample_guided(model, prompts, 8, seed=3, **kwargs)
    assert torch.equal(a, sample_guided(model, prompts, 8, seed=3, **kwargs))
    assert not torch.equal(a, sample_guided(model, prompts, 8, seed=4, **kwargs))
    assert a.shape == (3, 9) and torch.equal(a[:, 0], prompts[:, 0]) and a[:, 1:].max() < 10
    assert all(block.mixer.perturbation.sum() == 0 for block in model.blocks)


def test_guidance_changes_samples_only_when_on():
    model = tiny_model()
    prompts = torch.tensor([[10], [11], [12], [10]])
    plain = sample_guided(model, prompts, 8, seed=0)
    assert torch.equal(plain, sample_guided(model, prompts, 8, heads=[(0, 0)], scale=0.0, seed=0))
    assert not torch.equal(plain, sample_guided(model, prompts, 8, heads=[(0, 0), (1, 1)], scale=4.0, seed=0))


# --- bad inputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param(dict(u=1.5), ValueError, r"u: expected every weight in \[0, 1\]", id="u-above-1"),
    pytest.param(dict(u=[0.5]), ValueError, "u: expected 2 weights", id="u-length"),
    pytest.param(dict(u=torch.zeros(3)), ValueError, r"u: expected shape \(2,\)", id="u-shape"),
    pytest.param(dict(u="strong"), TypeError, "u: expected a number", id="u-type"),
    pytest.param(dict(u=True), TypeError, "got a bool", id="u-bool"),
    pytest.param(dict(u=0.5, target="zero"), ValueError, "target: expected one of", id="target"),
])
def test_bad_perturbation_arguments(kwargs, error, words):
    q, k, v = make_qkv(b=1, hq=2, lq=3, d=4)
    with pytest.raises(error, match=words):
        perturbed_attention(q, k, v, **kwargs)


def test_bad_inputs_elsewhere():
    q, k, v = make_qkv(b=1, hq=2, lq=3, lk=5, d=4)
    with pytest.raises(ValueError, match="identity target needs self-attention"):
        perturbed_attention(q, k, v, 1.0)
    with pytest.raises(ValueError, match="target: expected one of"):
        PerturbedMultiHeadAttention(8, 2, target="blur")
    with pytest.raises(ValueError, match="perturbed: expected shape"):
        guided_prediction(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)
    with pytest.raises(TypeError, match="scale: expected a finite number"):
        guided_prediction(torch.zeros(2), torch.zeros(2), float("nan"))
    with pytest.raises(ValueError, match="uncond, cfg_scale: expected both"):
        guided_prediction(torch.zeros(2), torch.zeros(2), 1.0, uncond=torch.zeros(2))
    with pytest.raises(ValueError, match="heads: expected"):
        with perturb_heads(tiny_model(), [(5, 0)]):
            pass
    with pytest.raises(ValueError, match="model: expected at least one PerturbedMultiHeadAttention"):
        all_heads(TinyTransformer(vocab_size=5, max_len=4, dim=8, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="candidates: expected distinct"):
        greedy_head_search(["a", "a"], len, rounds=1, per_round=1)
    with pytest.raises(ValueError, match="the pool has 3"):
        greedy_head_search("abc", len, rounds=2, per_round=2)
    with pytest.raises(ValueError, match="per_round: expected a positive int"):
        greedy_head_search("abc", len, rounds=1, per_round=0)
    with pytest.raises(TypeError, match="objective: expected a number"):
        greedy_head_search("abc", lambda heads: "good", rounds=1, per_round=1)
    with pytest.raises(ValueError, match="length: prompts of 1 tokens plus 20"):
        sample_guided(tiny_model(), torch.tensor([[10]]), 20)


@pytest.mark.parametrize("lq, lk", [(6, 6), (4, 6), (6, 4)], ids=["square", "fewer-queries", "more-queries"])
def test_the_causal_uniform_target_is_a_running_mean_without_an_l_by_l_product(lq, lk):
    v = torch.randn(2, 3, lk, 5, dtype=torch.float64)
    allowed = allowed_keys(lq, lk, mask=None, causal=True, device=v.device)
    want = target_times_values(v, "uniform", allowed=allowed, lq=lq)  # the masked L x L product
    got = target_times_values(v, "uniform", allowed=allowed, lq=lq, causal_only=True)
    assert torch.allclose(got, want, atol=1e-12)
