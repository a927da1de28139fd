"""The fused differential kernel (kernels.differential) against the library, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter, so sizes stay small. Tolerances as in
tests/kernels/test_flash_kernel.py: the kernel's error against a float64 reference may be at most a small
multiple of the error of plain PyTorch at the same precision, plus a floor.
"""

import pytest
import torch

import kernels
from attnlib.heads.differential import DifferentialAttention, GroupedDifferentialAttention, differential_attention
from kernels import differential_flash_attention

from ..helpers import DTYPES, assert_kernel_within_tolerance, max_err, plain_torch_attention

DEVICE = kernels.expected_device()
NAMES = ["out", "dq1", "dk1", "dq2", "dk2", "dv", "dlam"]

CASES = [  # (b, h1, h2, hkv, lq, lk, d, dv, causal, dtype)
    pytest.param((1, 2, 2, 2, 64, 64, 16, 32, False, "fp32"), id="diff-L64"),
    pytest.param((1, 2, 2, 2, 64, 64, 16, 32, True, "fp32"), id="diff-L64-causal"),
    pytest.param((1, 2, 2, 1, 77, 77, 32, 64, True, "fp32"), id="diff-gqa-odd-L77-causal"),
    pytest.param((1, 4, 2, 1, 50, 83, 16, 32, False, "fp32"), id="gda-r2-ragged-lq<lk"),
    pytest.param((1, 3, 1, 1, 90, 40, 16, 32, True, "fp32"), id="gda-r3-causal-empty-rows"),
    pytest.param((1, 2, 1, 1, 65, 65, 32, 64, True, "fp16"), id="gda-r2-fp16-causal"),
    pytest.param((1, 2, 2, 2, 45, 45, 16, 32, False, "fp16"), id="diff-fp16-odd"),
    pytest.param((1, 2, 2, 1, 33, 33, 16, 32, True, "bf16"), id="diff-bf16-causal"),
]


def plain_differential(q1, k1, q2, k2, v, lam, *, causal):
    """Differential attention with ordinary PyTorch ops in the inputs' dtype (the tolerance baseline)."""
    q2 = q2.repeat_interleave(q1.shape[1] // q2.shape[1], dim=1)
    return plain_torch_attention(q1, k1, v, causal=causal) - lam * plain_torch_attention(q2, k2, v, causal=causal)


def run_all(shape, seed=0, **options):
    b, h1, h2, hkv, lq, lk, d, dv, causal, dtype_name = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    sizes = [(b, h1, lq, d), (b, hkv, lk, d), (b, h2, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)]
    inputs = [torch.randn(*s, generator=g).to(dtype).to(DEVICE).requires_grad_() for s in sizes]
    lam = torch.tensor(0.45, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(b, h1, lq, dv, generator=g).to(dtype).to(DEVICE)
    results = {}
    for name, fn in (
        ("kernel", lambda *t: differential_flash_attention(*t, causal=causal, **options)),
        ("float64", lambda *t: differential_attention(*(x.double() for x in t), causal=causal)),
        ("plain", lambda *t: plain_differential(*t[:5], t[5].to(dtype), causal=causal)),
    ):
        out = fn(*inputs, lam)
        grads = torch.autograd.grad(out, (*inputs, lam), grad_out.to(out.dtype))
        results[name] = (out, *grads)
    return dtype, results


@pytest.mark.parametrize("shape", CASES)
def test_forward_and_all_gradients_match_the_library(shape):
    assert_kernel_within_tolerance(NAMES, *run_all(shape))


def test_small_tiles_exercise_both_loop_phases():
    assert_kernel_within_tolerance(NAMES, *run_all((1, 2, 1, 1, 37, 45, 16, 32, True, "fp32"), block_m=16, block_n=16))


def test_value_width_equal_to_head_dim_and_float_lambda():
    g = torch.Generator().manual_seed(3)
    q1, k1, q2, k2, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) for _ in range(5))
    got = differential_flash_attention(q1, k1, q2, k2, v, 0.7, causal=True)
    assert max_err(got, differential_attention(q1, k1, q2, k2, v, 0.7, causal=True)) < 1e-5


def test_rows_with_no_visible_key_are_zero():
    g = torch.Generator().manual_seed(4)
    q1, k1, q2, k2 = (torch.randn(1, 1, n, 16, generator=g).to(DEVICE) for n in (40, 16, 40, 16))
    v = torch.randn(1, 1, 16, 32, generator=g).to(DEVICE)
    out = differential_flash_attention(q1, k1, q2, k2, v, 0.5, causal=True, block_m=16, block_n=16)
    assert torch.equal(out[0, 0, :24], torch.zeros(24, 32))


@pytest.mark.parametrize("module", ["diff", "gda"])
def test_module_kernel_backend_matches_reference(module):
    torch.manual_seed(0)
    if module == "diff":
        ref = DifferentialAttention(64, 2, causal=True, layer_index=1)
        fast = DifferentialAttention(64, 2, causal=True, layer_index=1, backend="kernel")
    else:
        ref = GroupedDifferentialAttention(64, 4, ratio=3, num_kv_heads=2, causal=True)
        fast = GroupedDifferentialAttention(64, 4, ratio=3, num_kv_heads=2, causal=True, backend="kernel")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 30, 64)
    assert max_err(fast(x), ref(x)) < 1e-5
    fast(x).sum().backward()
    ref(x).sum().backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert max_err(p_fast.grad, p_ref.grad) < 1e-4 * max(1.0, p_ref.grad.abs().max().item()), name


def _args(**override):
    args = dict(q1=torch.randn(1, 2, 8, 16), k1=torch.randn(1, 2, 8, 16), q2=torch.randn(1, 2, 8, 16),
                k2=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 32))
    args = {n: x.to(DEVICE) for n, x in args.items()}
    args.update({n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in override.items()})
    return args


BAD = [
    pytest.param(dict(q2=torch.randn(1, 3, 8, 16)), {}, ValueError, "q2: its heads", id="noise-heads"),
    pytest.param({n: torch.randn(1, 2, 8, 8) for n in ("q1", "k1", "q2", "k2")}, {}, ValueError, "head_dim 16 to 128", id="head-dim-8"),
    pytest.param(dict(v=torch.randn(1, 2, 8, 512)), {}, ValueError, "value width of 16 to 256", id="value-too-wide"),
    pytest.param({n: torch.randn(1, 2, 8, 16 if n != "v" else 32, dtype=torch.float64) for n in ("q1", "k1", "q2", "k2", "v")},
                 {}, TypeError, "float16, bfloat16 or float32", id="float64"),
    pytest.param({}, dict(block_m=24), ValueError, "block_m", id="block-not-power-of-two"),
    pytest.param({}, dict(causal=1), TypeError, "causal", id="causal-not-bool"),
    pytest.param({}, dict(lam=torch.ones(3)), ValueError, "lam: expected a scalar", id="lam-vector"),
]


@pytest.mark.parametrize("override, options, error, words", BAD)
def test_bad_input_is_rejected_before_launch(override, options, error, words):
    args = _args(**override)
    lam = options.pop("lam", 0.5)
    with pytest.raises(error, match=words):
        differential_flash_attention(args["q1"], args["k1"], args["q2"], args["k2"], args["v"], lam, **options)
