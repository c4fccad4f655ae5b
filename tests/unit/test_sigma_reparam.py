"""sigma-reparam linear layers on one process (TP=1, gloo), against plain-torch computations on
the full matrix."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

torch_linalg_norm = torch.linalg.matrix_norm


@pytest.fixture(scope="module")
def mp(world_of_one):
    """A world-1 gloo group and megatron-core's TP=1 groups (tests/conftest.py)."""
    yield


def config(dtype=torch.float32, **kw):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(use_cpu_initialization=True, params_dtype=dtype, **kw)


def column(n_in=12, n_out=16, seed=0, dtype=torch.float32, **kw):
    from stable_megatron.model.sigma_reparam import SigmaReparamColumnParallelLinear

    torch.manual_seed(seed)
    kw.setdefault("bias", True)
    return SigmaReparamColumnParallelLinear(
        n_in, n_out, config=config(dtype), init_method=torch.nn.init.normal_, **kw
    )


def row(n_in=16, n_out=12, seed=0, dtype=torch.float32, skip_bias_add=True, **kw):
    from stable_megatron.model.sigma_reparam import SigmaReparamRowParallelLinear

    torch.manual_seed(seed)
    return SigmaReparamRowParallelLinear(
        n_in, n_out, config=config(dtype), init_method=torch.nn.init.normal_, bias=True,
        input_is_parallel=True, skip_bias_add=skip_bias_add, **kw,
    )


def gapped(n_out: int, n_in: int, seed: int = 1) -> torch.Tensor:
    """A matrix with singular values 3, 1.5, 1.4, ...: power iteration converges fast."""
    g = torch.Generator().manual_seed(seed)
    k = min(n_out, n_in)
    left, _ = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n_in, k, generator=g, dtype=torch.float64))
    values = torch.cat([torch.tensor([3.0]), torch.linspace(1.5, 0.1, k - 1)]).double()
    return (left * values) @ right.T


def set_weight(layer, weight: torch.Tensor, bias_seed: int = 5) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        g = torch.Generator().manual_seed(bias_seed)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


def full_forward(layer, x, weight, gamma, bias):
    """y = gamma / (v^T W u) * x W^T + b on the full matrix, in plain torch."""
    sigma = layer.v @ weight @ layer.u
    return gamma / sigma * (x @ weight.T) + bias


def test_constructor_signatures_and_validation(mp):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from stable_megatron.methods.sigma_reparam import SigmaReparamConfig
    from stable_megatron.model.sigma_reparam import (
        SigmaReparamColumnParallelLinear,
        SigmaReparamRowParallelLinear,
    )

    # the defaults are the config's (one source): 1 power step, 300 init steps, gamma = sigma0
    sr = SigmaReparamConfig()
    extra = {"power_iters": sr.power_iters, "init_iters": sr.init_iters,
             "gamma_init": sr.gamma_init, "seed": 0}
    assert (sr.power_iters, sr.init_iters, sr.gamma_init) == (1, 300, "sigma0")
    for child, parent in ((SigmaReparamColumnParallelLinear, ColumnParallelLinear),
                          (SigmaReparamRowParallelLinear, RowParallelLinear)):
        mine = inspect.signature(child.__init__).parameters
        theirs = inspect.signature(parent.__init__).parameters
        assert list(mine)[: len(theirs)] == list(theirs)
        for name, p in theirs.items():
            assert (mine[name].kind, mine[name].default) == (p.kind, p.default), name
        assert {k: mine[k].default for k in list(mine)[len(theirs):]} == extra
        assert all(mine[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extra)

    with pytest.raises(ValueError, match="gamma_init"):
        column(gamma_init="sigma")
    with pytest.raises(ValueError, match="power_iters"):
        column(power_iters=0)
    with pytest.raises(ValueError, match="init_iters"):
        row(init_iters=0)
    with pytest.raises(NotImplementedError, match="skip_weight_param_allocation"):
        column(skip_weight_param_allocation=True)
    layer = column()
    with pytest.raises(ValueError, match="external weight"):
        layer(torch.randn(2, 1, 12), weight=layer.weight.detach().clone())


def test_init_is_identity_reparam_and_bias_is_not_scaled(mp):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    x_col, x_row = torch.randn(5, 3, 12), torch.randn(5, 3, 16)
    cases = [
        (column(skip_bias_add=False), ColumnParallelLinear, x_col, {"gather_output": False}),
        (column(skip_bias_add=True), ColumnParallelLinear, x_col, {"gather_output": True}),
        (row(skip_bias_add=True), RowParallelLinear, x_row, {"input_is_parallel": True}),
        (row(skip_bias_add=False), RowParallelLinear, x_row, {"input_is_parallel": True}),
    ]
    for layer, parent, x, kw in cases:
        n_out, n_in = layer.weight.shape
        set_weight(layer, layer.weight.detach())  # a non-zero bias
        plain = parent(n_in, n_out, config=config(), init_method=torch.nn.init.zeros_,
                       bias=True, skip_bias_add=layer.skip_bias_add, **kw)
        plain.load_state_dict(
            {k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")},
            strict=False,
        )
        # gamma = sigma_hat exactly: W_hat == W, so the outputs are bit-identical.
        assert layer.gamma_value == layer.spectral_norm()
        (y, b), (y_ref, b_ref) = layer(x), plain(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        assert (b is None) == (b_ref is None) == (not layer.skip_bias_add)

        # gamma = 2 sigma_hat doubles x W^T but not the bias.
        with torch.no_grad():
            layer.gamma.mul_(2.0)
        y, b = layer(x)
        with torch.no_grad():
            expected = x @ (2 * layer.weight).T + layer.bias
        total = y + b if layer.skip_bias_add else y
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
        if layer.skip_bias_add:
            assert b is layer.bias


def test_convergence_gamma_one_and_bf16(mp):
    # Gaussian weights (small spectral gap) after many steps, column and row.
    for layer in (column(n_in=24, n_out=32), row(n_in=32, n_out=24)):
        layer.power_iteration(2000)
        true = torch_linalg_norm(layer.weight.detach().double(), 2).item()
        assert math.isclose(layer.sigma.item(), true, rel_tol=1e-4)
        assert math.isclose(layer.spectral_norm().item(), true, rel_tol=1e-4)
    # gamma_init="one": the spectral norm of W_hat is 1 after the initial iterations.
    for layer in (column(gamma_init="one"), row(gamma_init="one")):
        set_weight(layer, gapped(*layer.weight.shape))
        layer.init_power_iteration()
        assert layer.gamma_value.item() == 1.0
        w_hat = layer.gamma_value / layer.spectral_norm() * layer.weight.detach().double()
        assert math.isclose(torch_linalg_norm(w_hat, 2).item(), 1.0, rel_tol=1e-4)
    # bf16 weights (built as bf16, or cast like DeepSpeed's bf16 mode does): u, v stay fp32
    # and sigma is computed in fp32.
    for layer in (column(dtype=torch.bfloat16), row().bfloat16()):
        assert layer.weight.dtype == layer.gamma.dtype == torch.bfloat16
        set_weight(layer, gapped(*layer.weight.shape))
        layer.init_power_iteration()
        assert layer.u.dtype == layer.v.dtype == layer.sigma.dtype == torch.float32
        true = torch_linalg_norm(layer.weight.detach().double(), 2).item()
        assert math.isclose(layer.spectral_norm().item(), true, rel_tol=1e-5)
        y, _ = layer(torch.randn(2, 3, layer.weight.shape[1], dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16


def test_converged_sigma_is_exact_and_leaves_the_state_alone(mp):
    """After a strong weight change the one-step estimate lags; converged_sigma(200) gives the
    spectral norm and changes neither u, v nor sigma (bit for bit)."""
    for layer in (column(n_in=24, n_out=32), row(n_in=32, n_out=24)):
        layer.power_iteration(300)
        with torch.no_grad():
            layer.weight.add_(5 * gapped(*layer.weight.shape, seed=4).float())
        layer.power_iteration()  # the training loop's one step per optimizer step
        state = [t.clone() for t in (layer.u, layer.v, layer.sigma)]
        exact = layer.converged_sigma(200)
        assert exact.shape == () and exact.dtype == torch.float32
        true = torch_linalg_norm(layer.weight.detach().double(), 2).item()
        assert math.isclose(exact.item(), true, rel_tol=1e-4)
        assert layer.sigma.item() < 0.95 * true  # lags
        for before, after in zip(state, (layer.u, layer.v, layer.sigma), strict=True):
            assert torch.equal(before, after)
        assert exact is not layer.sigma
        with pytest.raises(ValueError, match="iters"):
            layer.converged_sigma(0)


def test_gradients_match_full_matrix_autograd(mp):
    for layer, n_in in ((column(skip_bias_add=False), 12), (row(skip_bias_add=True), 16)):
        set_weight(layer, gapped(*layer.weight.shape))
        layer.init_power_iteration()
        with torch.no_grad():
            layer.gamma.fill_(1.7 * layer.spectral_norm().item())
        x = torch.randn(4, 3, n_in, requires_grad=True)
        y, b = layer(x)
        if b is not None:
            y = y + b
        g = torch.randn_like(y)
        (y * g).sum().backward()

        w = layer.weight.detach().clone().requires_grad_()
        gamma = layer.gamma.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = full_forward(layer, x_ref, w, gamma, bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y_ref * g).sum().backward()
        for got, want in ((layer.weight.grad, w.grad), (layer.gamma.grad, gamma.grad),
                          (layer.bias.grad, bias.grad), (x.grad, x_ref.grad)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # The scale's own share of the weight gradient is non-trivial (guards the check above).
        assert (layer.weight.grad - 1.7 * (g.reshape(-1, g.shape[-1]).T
                                           @ x.detach().reshape(-1, n_in))).abs().max() > 1e-3

        # Through sigma alone: v u^T, and (converged) the gradient of the spectral norm.
        layer.weight.grad = None
        layer.spectral_norm().backward()
        torch.testing.assert_close(layer.weight.grad, torch.outer(layer.v, layer.u),
                                   rtol=0, atol=1e-7)
        w = layer.weight.detach().clone().requires_grad_()
        torch_linalg_norm(w, 2).backward()
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=1e-5)


def test_state_dict_round_trip(mp):
    for make, n_in in ((column, 12), (row, 16)):
        layer = make(seed=0)
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
            layer.gamma.mul_(1.3)
        layer.power_iteration(3)
        state = layer.state_dict()
        assert {"weight", "bias", "gamma", "u", "v"} <= set(state)
        other = make(seed=7, init_iters=2)
        assert not torch.equal(other.u, layer.u)
        other.load_state_dict(state)
        assert math.isnan(other.sigma.item())  # stale until the next forward or power step
        x = torch.randn(3, 2, n_in)
        (y, _), (y2, _) = layer(x), other(x)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        assert other.sigma.item() == layer.sigma.item()
        assert torch.equal(other.gamma, layer.gamma) and torch.equal(other.v, layer.v)


def test_refresh_counts_and_mlp_spec(mp, monkeypatch):
    """Drop-in through megatron-core's MLP spec; refresh runs power_iters steps, one
    `all_reduce_` each; forward issues one (sigma) per layer and never moves u, v."""
    import torch.nn.functional as F
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from stable_megatron import parallel
    from stable_megatron.model.sigma_reparam import (
        SigmaReparamColumnParallelLinear,
        SigmaReparamRowParallelLinear,
        refresh_spectral_norms,
        sigma_reparam_layers,
    )

    cfg = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=20,
        use_cpu_initialization=True, activation_func=F.gelu, bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
    )
    spec = ModuleSpec(module=MLP, params={"ffn_hidden_size": 20}, submodules=MLPSubmodules(
        linear_fc1=ModuleSpec(module=SigmaReparamColumnParallelLinear,
                              params={"power_iters": 2, "gamma_init": "one", "seed": 3}),
        linear_fc2=ModuleSpec(module=SigmaReparamRowParallelLinear, params={"power_iters": 3}),
    ))
    mlp = build_module(spec, config=cfg)
    model = torch.nn.ModuleDict({"mlp": mlp, "plain": torch.nn.Linear(3, 3)})
    layers = dict(sigma_reparam_layers(model))
    assert list(layers) == ["mlp.linear_fc1", "mlp.linear_fc2"]
    fc1, fc2 = layers.values()
    assert (fc1.power_iters, fc1.gamma_init, fc1.seed, fc2.power_iters) == (2, "one", 3, 3)
    assert fc1.gamma_value.item() == 1.0

    sizes: list[int] = []
    original = parallel.all_reduce_

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(parallel, "all_reduce_", counting)
    assert refresh_spectral_norms(model) == 2
    # fc1 (column) reduces [W^T v; |v|^2]: input_size + 1; fc2 (row) [W u; |u|^2]: output + 1.
    assert sizes == [8 + 1] * 2 + [8 + 1] * 3

    vectors = [t.clone() for layer in (fc1, fc2) for t in (layer.u, layer.v)]
    sizes.clear()
    x = torch.randn(4, 2, 8, requires_grad=True)
    out, bias = mlp(x)
    assert sizes == [1, 1]  # one sigma all-reduce per layer
    sizes.clear()
    (out + bias).square().sum().backward()
    assert sizes == []  # backward adds no collective
    assert all(torch.equal(a, b) for a, b in
               zip(vectors, [t for layer in (fc1, fc2) for t in (layer.u, layer.v)], strict=True))
    assert fc1.gamma.grad is not None and fc2.gamma.grad is not None
