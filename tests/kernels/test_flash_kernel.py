"""The Triton FlashAttention kernel against the library, forward and all three gradients.

Without a GPU the kernel runs in Triton's interpreter (chosen by the ``kernels`` package itself), so
sizes stay small. Tolerances follow FlashAttention's tests: the kernel's error against a float64
reference may be at most a small multiple of the error of plain PyTorch at the same precision.
"""

import os

import pytest
import torch

import kernels
from attnlib import attention
from kernels import flash_attention

from ..helpers import DTYPES, assert_kernel_within_tolerance, make_qkv, max_err, plain_torch_attention

DEVICE = kernels.expected_device()
NAMES = ["out", "dq", "dk", "dv"]

CASES = [  # (b, hq, hkv, lq, lk, d, causal, dtype)
    pytest.param((1, 2, 2, 128, 128, 64, False, "fp32"), id="mha-L128-d64"),
    pytest.param((1, 2, 2, 128, 128, 64, True, "fp32"), id="mha-L128-d64-causal"),
    pytest.param((2, 1, 1, 100, 130, 32, False, "fp32"), id="ragged-lq100-lk130"),
    pytest.param((1, 2, 2, 130, 100, 32, True, "fp32"), id="causal-lq>lk-empty-rows"),
    pytest.param((1, 2, 2, 70, 150, 32, True, "fp32"), id="causal-lq<lk"),
    pytest.param((1, 4, 2, 96, 96, 32, True, "fp16"), id="gqa-4q-2kv-fp16"),
    pytest.param((1, 4, 1, 80, 80, 16, False, "fp16"), id="mqa-d16-fp16"),
    pytest.param((1, 1, 1, 65, 65, 80, True, "bf16"), id="d80-padded-bf16"),
    pytest.param((1, 1, 1, 64, 64, 128, False, "fp32"), id="d128"),
]


def run_kernel_and_reference(shape, seed=0, **kernel_options):
    b, hq, hkv, lq, lk, d, causal, dtype_name = shape
    dtype = DTYPES[dtype_name]
    q, k, v = [x.to(DEVICE).requires_grad_() for x in make_qkv(b, hq, hkv, lq, lk, d, dtype=dtype, seed=seed)]
    grad_out = torch.randn(b, hq, lq, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    results = {}
    for name, fn in (
        ("kernel", lambda *t: flash_attention(*t, causal=causal, **kernel_options)),
        ("float64", lambda *t: attention(*(x.double() for x in t), causal=causal)),
        ("plain", lambda *t: plain_torch_attention(*t, causal=causal)),
    ):
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
        results[name] = (out, *grads)
    return dtype, results


@pytest.mark.parametrize("shape", CASES)
def test_forward_and_gradients_match_library(shape):
    assert_kernel_within_tolerance(NAMES, *run_kernel_and_reference(shape), floor_scales_with_size=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_small_tiles(causal):
    # 16x16 tiles: many diagonal and ragged blocks, exercising both loop phases at a small size
    shape = (1, 2, 1, 45, 61, 16, causal, "fp32")
    assert_kernel_within_tolerance(NAMES, *run_kernel_and_reference(shape, block_m=16, block_n=16),
                                   floor_scales_with_size=False)


def test_rows_with_no_visible_key_are_zero_with_zero_gradient():
    q, k, v = [x.to(DEVICE).requires_grad_() for x in make_qkv(1, 1, 1, 40, 16, 16)]
    out = flash_attention(q, k, v, causal=True, block_m=16, block_n=16)
    assert torch.equal(out[0, 0, :24], torch.zeros(24, 16))  # rows 0-23 sit before every key
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, :24], torch.zeros(24, 16))
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_non_contiguous_inputs_and_custom_scale():
    # (batch, seq, heads, dim) storage viewed as (batch, heads, seq, dim)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE) for x in make_qkv(1, 2, 2, 50, 50, 32))
    assert not q.is_contiguous()
    got = flash_attention(q, k, v, scale=0.3)
    assert max_err(got, attention(q, k, v, scale=0.3)) < 1e-5


def test_fp16_large_logits_do_not_overflow():
    q, k, v = (x.to(DEVICE) for x in make_qkv(1, 1, 1, 64, 64, 64, dtype=torch.float16, scale=30.0))
    out = flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    assert max_err(out, attention(q.double(), k.double(), v.double())) < 2e-2


def test_interpreter_is_chosen_by_the_package():
    # without a GPU the package switches the interpreter on by itself
    if not torch.cuda.is_available():
        assert kernels.INTERPRETED and os.environ["TRITON_INTERPRET"] == "1"
    assert kernels.expected_device() == ("cpu" if kernels.INTERPRETED else "cuda")


def _qkv(**override):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args = {n: x.to(DEVICE) for n, x in args.items()}
    args.update(override)
    return args


BAD = [
    pytest.param(dict(q=torch.randn(2, 8, 16)), {}, ValueError, "q: expected a 4-d", id="rank"),
    pytest.param(dict(k=torch.randn(1, 2, 8, 32)), {}, ValueError, "head_dim 16", id="head-dim-mismatch"),
    pytest.param(dict(q=torch.randn(1, 3, 8, 16)), {}, ValueError, "must divide", id="heads"),
    pytest.param(dict(q=torch.ones(1, 2, 8, 16, dtype=torch.int32)), {}, TypeError, "floating", id="int-dtype"),
    pytest.param({n: torch.randn(1, 2, 8, 16, dtype=torch.float64) for n in "qkv"}, {}, TypeError, "float16, bfloat16 or float32", id="float64"),
    pytest.param(dict(q=torch.randn(1, 2, 8, 8), k=torch.randn(1, 2, 8, 8), v=torch.randn(1, 2, 8, 8)), {}, ValueError, "head_dim 16 to 128", id="head-dim-8"),
    pytest.param(dict(v=torch.randn(1, 2, 8, 32)), {}, ValueError, "v: expected head_dim", id="value-dim"),
    pytest.param({}, dict(block_m=24), ValueError, "block_m", id="block-not-power-of-two"),
    pytest.param({}, dict(block_n=8), ValueError, "block_n", id="block-below-16"),
    pytest.param({}, dict(causal=1), TypeError, "causal", id="causal-not-bool"),
    pytest.param({}, dict(scale=0.0), ValueError, "scale", id="zero-scale"),
]


@pytest.mark.parametrize("override, options, error, words", BAD)
def test_bad_input_is_rejected_before_launch(override, options, error, words):
    args = _qkv(**{n: x.to(DEVICE) for n, x in override.items()})
    with pytest.raises(error, match=words):
        flash_attention(args["q"], args["k"], args["v"], **options)


IMPORT_ORDER_SCRIPT = """
import torch
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
optimizer.step()  # may import Triton, with its interpreter off
{first}
import kernels
q = torch.randn(1, 1, 32, 16)
print(tuple(kernels.flash_attention(q, q, q).shape))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU there is no interpreter to switch on")
def test_kernels_work_after_training_when_attnlib_came_first_and_say_why_otherwise():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ok = subprocess.run([sys.executable, "-c", "import attnlib\n" + IMPORT_ORDER_SCRIPT.format(first="")],
                        capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0 and "(1, 1, 32, 16)" in ok.stdout, ok.stderr[-2000:]
    late = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT.format(first="")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert late.returncode != 0 and "import attnlib or kernels first" in late.stderr, late.stderr[-2000:]
