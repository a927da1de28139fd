"""MultiHeadAttention and the mechanism registry."""

import pytest
import torch
from torch import nn

from attnlib import MultiHeadAttention, build_mechanism, get_mechanism, list_mechanisms, register_mechanism
from attnlib.registry import _REGISTRY


def manual_mha(module: MultiHeadAttention, x, causal):
    """Multi-head attention written out head by head from the module's weights."""
    b, length, _ = x.shape
    d, h, hkv = module.head_dim, module.num_heads, module.num_kv_heads
    q = module.q_proj(x).view(b, length, h, d)
    k = module.k_proj(x).view(b, length, hkv, d)
    v = module.v_proj(x).view(b, length, hkv, d)
    heads = []
    for i in range(h):
        j = i // (h // hkv)
        scores = q[:, :, i] @ k[:, :, j].transpose(1, 2) / d ** 0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, :, j])
    return module.out_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_matches_head_by_head(kv_heads, causal):
    torch.manual_seed(0)
    module = MultiHeadAttention(32, 4, num_kv_heads=kv_heads, causal=causal)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(module(x), manual_mha(module, x, causal))
    assert module.last_weights.shape == (2, 4, 7, 7)


def test_backends_agree():
    torch.manual_seed(0)
    ref = MultiHeadAttention(32, 2, causal=True)
    blockwise = MultiHeadAttention(32, 2, causal=True, backend="blockwise")
    blockwise.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ref(x), blockwise(x))


@pytest.mark.parametrize("kwargs, words", [
    pytest.param(dict(dim=30, num_heads=4), "dim", id="dim-not-multiple"),
    pytest.param(dict(dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads", id="kv-heads"),
    pytest.param(dict(dim=32, num_heads=4, backend="cuda"), "backend", id="backend"),
    pytest.param(dict(dim=0, num_heads=4), "dim", id="zero-dim"),
    pytest.param(dict(dim=32, num_heads=4, backend="kernel"), "head dim", id="kernel-head-dim-8"),
])
def test_module_bad_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MultiHeadAttention(**kwargs)


def test_module_bad_input():
    module = MultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match="x: expected last dim 16"):
        module(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="x: expected a 3-d"):
        module(torch.randn(3, 16))
    with pytest.raises(ValueError, match="backend"):
        MultiHeadAttention(16, 2, backend="blockwise")(torch.randn(1, 3, 16), return_weights=True)


def test_registry_lists_and_builds():
    names = [m.name for m in list_mechanisms()]
    assert "mha" in names and "mha-flash" in names
    mixer = build_mechanism("mha", 16, 2, causal=True, num_kv_heads=1)
    assert isinstance(mixer, nn.Module) and mixer(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    assert get_mechanism("mha").supports_causal


def test_registry_errors():
    with pytest.raises(KeyError, match="no mechanism called 'nope'"):
        get_mechanism("nope")

    @register_mechanism("test-bidirectional", paper="P00", lesson="99", supports_causal=False, summary="test")
    def build(dim, num_heads, *, causal):
        return nn.Identity()

    try:
        with pytest.raises(ValueError, match="cannot run causally"):
            build_mechanism("test-bidirectional", 8, 1, causal=True)
        with pytest.raises(ValueError, match="already registered"):
            register_mechanism("test-bidirectional", paper=None, lesson="99", supports_causal=True,
                               summary="x")(lambda dim, num_heads, *, causal: nn.Identity())
    finally:
        _REGISTRY.pop("test-bidirectional")


def test_an_empty_sequence_is_named_also_without_the_registry():
    with pytest.raises(ValueError, match=r"x: expected at least one token, got shape \(2, 0, 16\)"):
        MultiHeadAttention(16, 2)(torch.randn(2, 0, 16))
