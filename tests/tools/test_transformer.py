"""The tiny transformer: shapes, causality, every registered mechanism plugs in, gradients, bad inputs."""

import pytest
import torch

from attnlib import list_mechanisms
from attnlib.tools.tasks import AssociativeRecall, InContextRegression, make_generator
from attnlib.tools.transformer import Block, TinyTransformer

CAUSAL_MECHANISMS = [m.name for m in list_mechanisms() if m.supports_causal and m.name != "mha-flash"]


def tiny(mechanism="mha", **kwargs):
    torch.manual_seed(0)
    options = dict(vocab_size=11, max_len=12, dim=16, depth=2, num_heads=2, mechanism=mechanism)
    options.update(kwargs)
    return TinyTransformer(**options)


def tokens(batch=2, length=10, seed=0):
    return torch.randint(0, 11, (batch, length), generator=make_generator(seed))


def test_shapes_for_tokens_and_for_vectors():
    assert tiny()(tokens()).shape == (2, 10, 11)
    task = InContextRegression(dim=3, num_points=4)
    model = TinyTransformer.for_task(task, dim=16, depth=1, num_heads=2)
    assert model(task.sample(2, make_generator(0)).inputs).shape == (2, task.seq_len, 1)


@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
def test_every_causal_mechanism_builds_and_stays_causal(mechanism):
    model = tiny(mechanism).eval()
    x = tokens()
    with torch.no_grad():
        y = model(x)
        for t in range(x.shape[1] - 1):
            changed = x.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 11  # change every token after t
            y2 = model(changed)
            # changing the future changes no output at positions <= t ...
            assert torch.allclose(y2[:, :t + 1], y[:, :t + 1], atol=1e-6), f"position {t} saw the future"
        # ... and the test can see a change when there is one
        assert not torch.allclose(y2[:, -1], y[:, -1])


def test_non_causal_model_sees_the_future():
    model = tiny(causal=False).eval()
    x = tokens()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, 0], model(x)[:, 0])


def test_mechanism_options_reach_the_mixer():
    model = tiny(mechanism_options={"num_kv_heads": 1})
    assert all(block.mixer.num_kv_heads == 1 for block in model.blocks)
    assert model(tokens()).shape == (2, 10, 11)


def test_layer_options_reach_each_layer_on_top_of_the_shared_options():
    model = tiny(depth=3, num_heads=4, mechanism_options={"num_kv_heads": 2},
                 layer_options=[{"num_kv_heads": 1}, {}, {"num_kv_heads": 4}])
    assert [block.mixer.num_kv_heads for block in model.blocks] == [1, 2, 4]
    assert model(tokens()).shape == (2, 10, 11)


def test_flash_mechanism_matches_the_reference():
    # importing attnlib switched Triton to its interpreter when no GPU is visible, so this works even
    # after other tests ran optimizers (which import Triton)
    torch.manual_seed(0)
    options = dict(vocab_size=11, max_len=8, dim=32, depth=1, num_heads=2)  # head_dim 16
    reference = TinyTransformer(mechanism="mha", **options)
    flash = TinyTransformer(mechanism="mha-flash", **options)
    flash.load_state_dict(reference.state_dict())
    x = torch.randint(0, 11, (1, 8), generator=make_generator(0))
    with torch.no_grad():
        assert (flash(x) - reference(x)).abs().max().item() < 1e-4


def test_block_is_pre_norm_with_residuals():
    torch.manual_seed(0)
    block = Block(torch.nn.Linear(8, 8), dim=8, mlp_ratio=2)
    h = torch.randn(2, 5, 8)
    u = h + block.mixer(block.norm1(h))
    assert torch.allclose(block(h), u + block.mlp(block.norm2(u)))


def test_gradients_reach_every_parameter():
    model = tiny()
    model(tokens()).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_attention_maps_one_per_layer_rows_sum_to_one_and_causal():
    model = tiny(depth=3)
    maps = model.attention_maps(tokens())
    assert len(maps) == 3
    for weights in maps:
        assert weights.shape == (2, 2, 10, 10)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 10))
        assert torch.all(weights.triu(diagonal=1) == 0)
    assert model.training  # the mode is restored


def test_attention_maps_need_a_mechanism_that_keeps_weights():
    model = tiny(mechanism_options={"backend": "blockwise"})
    with pytest.raises(ValueError, match="keeps no attention weights"):
        model.attention_maps(tokens())


def test_for_task_reads_the_task():
    task = AssociativeRecall(num_pairs=3, num_keys=5, num_values=4)
    model = TinyTransformer.for_task(task, dim=16, depth=1, num_heads=2)
    assert (model.vocab_size, model.output_dim, model.max_len) == (9, 9, task.seq_len)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: TinyTransformer(max_len=8), ValueError, ["vocab_size, input_dim", "exactly one", "None"]),
        (lambda: TinyTransformer(vocab_size=5, input_dim=3, max_len=8), ValueError, ["exactly one", "5", "3"]),
        (lambda: TinyTransformer(input_dim=3, max_len=8), ValueError, ["output_dim", "vector inputs"]),
        (lambda: tiny(dim=0), ValueError, ["dim", "positive int", "0"]),
        (lambda: tiny(mechanism="no-such"), KeyError, ["no-such", "registered"]),
        (lambda: tiny(mechanism=3), TypeError, ["mechanism", "str", "int"]),
        (lambda: tiny(mechanism_options=[1]), TypeError, ["mechanism_options", "dict", "list"]),
        (lambda: tiny(layer_options=[{}]), ValueError, ["layer_options", "2 dicts", "depth=2"]),
        (lambda: tiny()(tokens().float()), TypeError, ["x", "token ids", "float32"]),
        (lambda: tiny()(tokens(length=13)), ValueError, ["x", "max_len=12", "13"]),
        (lambda: tiny()(tokens()[0]), ValueError, ["x", "2-d", "(10,)"]),
    ],
    ids=["no-input-kind", "two-input-kinds", "vectors-without-output-dim", "zero-dim", "unknown-mechanism",
         "mechanism-not-a-name", "options-not-a-dict", "layer-options-wrong-length", "float-tokens", "too-long", "one-dim-input"],
)
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)
