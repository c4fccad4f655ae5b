"""On a GPU: SDPA and FlexAttention with the cap and the causal block mask, and the math
kernel, against the exact path (`exact_attention`, autograd, fp32), forward and backward, in
fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from stable_megatron.model.attention import KERNELS, causal_block_mask, exact_attention

pytestmark = pytest.mark.gpu

# Relative error ||kernel - exact|| / ||exact|| of the output and each gradient. fp32: the
# kernels sum in other orders (and Flex uses an online softmax), ~1e-6; TF32 matmuls would show
# as ~1e-3 and fail. bf16: inputs, probabilities and outputs rounded to 8 bits of mantissa
# (unit roundoff 2^-9 ~ 2e-3), accumulated over the keys and the backward's products.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
CASES = [("sdpa", None), ("flex", 2.0), ("flex", 50.0), ("math", 50.0), ("math", None)]


def _inputs(dtype, seq=320, batch=2, heads=4, head_dim=64, scale=3.0):
    # seq 320: two full 128-blocks and a partial one, so the block mask has skipped blocks,
    # full blocks and cut (diagonal) blocks
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (scale * torch.randn(*shape, device="cuda", generator=g) for _ in range(3))
    grad = torch.randn(*shape, device="cuda", generator=g)
    return [t.to(dtype) for t in (q, k, v)], grad


def _run(fn, inputs, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.float().backward(grad)
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("kernel", "cap"), CASES, ids=[f"{k}-cap{c}" for k, c in CASES])
def test_kernel_matches_the_exact_path(kernel, cap, dtype):
    inputs, grad = _inputs(dtype)
    # the reference: the same (rounded) inputs, exact path, fp32 throughout
    expected = _run(lambda q, k, v: exact_attention(q, k, v, cap), inputs, grad, torch.float32)
    module = KERNELS[kernel](softmax_cap=cap)
    got = _run(module, inputs, grad, dtype)
    names = ["output", "grad q", "grad k", "grad v"]
    errors = {n: _rel(a, b) for n, a, b in zip(names, got, expected, strict=True)}
    assert all(torch.isfinite(t).all() for t in got)
    assert max(errors.values()) < TOLERANCE[dtype], errors


def test_flex_block_mask_skips_the_blocks_above_the_diagonal():
    mask = causal_block_mask(512, torch.device("cuda", torch.cuda.current_device()))
    assert mask is causal_block_mask(512, torch.device("cuda", torch.cuda.current_device()))
    blocks = mask.to_dense()[0, 0].bool().cpu()  # [query block, key block]: computed at all
    assert torch.equal(blocks, torch.ones_like(blocks).tril())
    assert mask.sparsity() > 30.0  # percent of blocks skipped (37.5 at 4 x 4 blocks)


def test_flex_is_compiled_once_for_every_layer():
    """Layers share the compiled kernel: a second module with the same cap and shape does not
    recompile (one score_mod object per cap, one block mask per shape)."""
    import torch._dynamo.utils as dynamo_utils

    inputs, grad = _inputs(torch.bfloat16, seq=256)
    _run(KERNELS["flex"](softmax_cap=50.0), inputs, grad, torch.bfloat16)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        _run(KERNELS["flex"](softmax_cap=50.0), inputs, grad, torch.bfloat16)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before
