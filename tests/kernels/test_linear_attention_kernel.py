"""The chunked causal linear attention kernel (kernels.linear_attention) against the recurrence, forward and
every gradient, and the library's kernel backends.

Without a GPU the kernels run in Triton's interpreter, so sizes stay small. Tolerances as in
tests/kernels/test_flash_kernel.py: the kernel's error against the float64 recurrence may be at most a small multiple
of the error of plain PyTorch (the quadratic causal form) at the same precision, plus a floor.
"""


import pytest
import torch

import kernels
from attnlib.linear.linear_attention import (
    causal_product_quadratic,
    causal_product_recurrent,
    flow_attention,
    linear_attention,
)
from kernels.linear_attention import chunked_linear_attention

from ..helpers import DTYPES, assert_kernel_within_tolerance, max_err

DEVICE = kernels.expected_device()
NAMES = ["out", "dq", "dk", "dv"]

CASES = [  # (b, h, length, d, dv, chunk, dtype)
    pytest.param((1, 2, 64, 16, 16, None, "fp32"), id="L64-d16"),
    pytest.param((1, 2, 77, 16, 32, None, "fp32"), id="odd-L77"),
    pytest.param((2, 1, 100, 8, 20, 16, "fp32"), id="d8-dv20-chunk16-L100"),
    pytest.param((1, 1, 50, 32, 160, 32, "fp32"), id="two-value-blocks"),
    pytest.param((1, 2, 65, 32, 32, None, "fp16"), id="fp16-L65"),
    pytest.param((1, 1, 33, 16, 16, 16, "bf16"), id="bf16-L33"),
]


def features(shape, generator):
    # positive features, as phi(q) and phi(k) are in linear attention (elu + 1)
    return torch.nn.functional.elu(torch.randn(*shape, generator=generator)) + 1


def run_all(shape, seed=0):
    b, h, length, d, dv, chunk, dtype_name = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    q, k = features((b, h, length, d), g), features((b, h, length, d), g)
    v = torch.randn(b, h, length, dv, generator=g)
    inputs = [x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn(b, h, length, dv, generator=g).to(dtype).to(DEVICE)
    results = {}
    for name, fn in (
        ("kernel", lambda *t: chunked_linear_attention(*t, chunk_size=chunk)),
        ("float64", lambda *t: causal_product_recurrent(*(x.double() for x in t))),
        ("plain", causal_product_quadratic),
    ):
        out = fn(*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))
    return dtype, results


def assert_within_tolerance(dtype, results):
    for what, got, plain in zip(NAMES, results["kernel"], results["plain"]):
        assert got.dtype == plain.dtype, f"{what}: dtype {got.dtype}, plain torch gives {plain.dtype}"
    assert_kernel_within_tolerance(NAMES, dtype, results)


@pytest.mark.parametrize("shape", CASES)
def test_forward_and_all_gradients_match_the_recurrence(shape):
    assert_within_tolerance(*run_all(shape))


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_the_result_does_not_depend_on_the_chunk_size(chunk):
    g = torch.Generator().manual_seed(1)
    q, k, v = (features((1, 1, 70, 16), g).to(DEVICE) for _ in range(3))
    want = causal_product_recurrent(q.double(), k.double(), v.double())
    assert max_err(chunked_linear_attention(q, k, v, chunk_size=chunk), want) < 1e-6 * want.abs().max().item()


def test_kernel_is_causal():
    g = torch.Generator().manual_seed(2)
    q, k, v = (features((1, 1, 48, 16), g).to(DEVICE) for _ in range(3))
    out = chunked_linear_attention(q, k, v, chunk_size=16)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 3.0
    out2 = chunked_linear_attention(q, k2, v2, chunk_size=16)
    assert torch.equal(out[:, :, :20], out2[:, :, :20]) and not torch.allclose(out[:, :, 20:], out2[:, :, 20:])


@pytest.mark.parametrize("fn", [linear_attention, flow_attention], ids=["linear", "flow"])
def test_library_kernel_backend_matches_reference_forward_and_gradients(fn):
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    grad = torch.randn(1, 2, 40, 16, generator=g).to(DEVICE)
    results = []
    for backend in ("reference", "kernel"):
        out = fn(*inputs, causal=True, backend=backend)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for what, a, b in zip(NAMES, *results):
        assert max_err(a, b) < 1e-4 * max(1.0, b.abs().max().item()), what


def test_float16_inputs_give_float32_sums_when_asked_and_the_library_uses_them():
    """At L = 1024 the unnormalised sums pass float16's 65,504: stored in float16 they overflow; the library asks
    the kernel for float32 sums and returns a finite float16 output."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 1024, 16, generator=g) for _ in range(3))
    v = v.abs() + 4.0  # values of one sign, so that the sums grow with the length
    fq, fk = (torch.nn.functional.elu(x) + 1 for x in (q, k))
    sums = chunked_linear_attention(*(x.half().to(DEVICE) for x in (fq, fk, v)), out_dtype=torch.float32)
    assert sums.dtype == torch.float32 and sums.abs().max() > 65504
    want = linear_attention(q.double(), k.double(), v.double(), causal=True)
    got = linear_attention(*(x.half().to(DEVICE) for x in (q, k, v)), causal=True, backend="kernel")
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.double().cpu() - want).abs().max() < 2e-2 * want.abs().max()


def test_library_kernel_backend_takes_the_chunk_size():
    q = torch.randn(1, 1, 32, 16).to(DEVICE)
    with pytest.raises(ValueError, match="chunk_size: expected a power of two"):
        linear_attention(q, q, q, causal=True, backend="kernel", chunk_size=24)


BAD = [
    pytest.param({n: torch.randn(1, 1, 8, 16, dtype=torch.float64) for n in "qkv"}, TypeError, "float16, bfloat16 or float32",
                 id="float64"),
    pytest.param(dict(q=torch.randn(1, 1, 8, 256), k=torch.randn(1, 1, 8, 256)), ValueError, "head_dim 1 to 128",
                 id="head-dim"),
    pytest.param(dict(k=torch.randn(1, 1, 9, 16), v=torch.randn(1, 1, 9, 16)), ValueError, "causal self-attention",
                 id="lengths"),
    pytest.param(dict(chunk_size=24), ValueError, "chunk_size: expected a power of two", id="chunk-24"),
    pytest.param(dict(chunk_size=8), ValueError, "chunk_size: expected a power of two >= 16", id="chunk-8"),
    pytest.param(dict(v=torch.randn(1, 1, 8)), ValueError, "v: expected a 4-d tensor", id="rank"),
    pytest.param(dict(out_dtype=torch.float64), TypeError, "out_dtype: expected None", id="out-dtype"),
]


@pytest.mark.parametrize("override, error, words", BAD)
def test_bad_input_is_rejected_before_launch(override, error, words):
    args = dict(q=torch.randn(1, 1, 8, 16), k=torch.randn(1, 1, 8, 16), v=torch.randn(1, 1, 8, 16))
    args.update(override)
    args = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
    options = {name: args.pop(name) for name in ("chunk_size", "out_dtype") if name in args}
    with pytest.raises(error, match=words):
        chunked_linear_attention(args["q"], args["k"], args["v"], **options)
