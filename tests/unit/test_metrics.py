"""Stability metrics on one process (TP1, PP1, DP1, gloo), each against an independent
computation on the model: TEV from the embedding matrix, attention entropy and max logit from
materialised probabilities, output norms from re-running the linears, gradient norms from a
plain autograd backward of a second copy of the model, sigma from the matrix 2-norm.
(tests/distributed/test_metrics_parity.py checks that other layouts log the same numbers.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stable_megatron.config import config_from_dict, validate
from tests.distributed.parity_worker import RandomTokens

VOCAB, LAYERS, HEADS, HIDDEN, SEQ = 200, 2, 4, 32, 16
MODELS = {
    "baseline": {},
    # model.vocab_size above the tokenizer's VOCAB ids (as the 830M recipes set it): rows no
    # token selects, which TEV must not count
    "methods": {"tie_embeddings": False, "softmax_cap": 2.0, "vocab_size": VOCAB + 60,
                "sigma_reparam": {"enabled": True, "init_iters": 300}},
}
SIGMA_EXACT_ITERS = {"baseline": 0, "methods": 50}  # metrics.sigma_exact_iters per model


def make_config(model: dict, **sections):
    data = {
        "data": {"vocab_size": VOCAB},  # the tokenizer's ids; model.vocab_size follows
        "model": {"num_layers": LAYERS, "hidden_size": HIDDEN,
                  "num_attention_heads": HEADS, "seq_length": SEQ, "init_std": 0.2, **model},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0},
        "metrics": {"interval": 1},
    }
    data.update(sections)
    cfg = config_from_dict(data)
    validate(cfg, 1)
    return cfg


@pytest.fixture(scope="module")
def state(one_process):
    return one_process


class Capture:
    """The inputs of the attention modules and linears during one step (test-side hooks)."""

    def __init__(self, engine):
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self.inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.handles = []
        for module in engine.module.modules():
            if isinstance(module, TransformerLayer):
                n = module.layer_number
                named = {"attn": module.self_attention,
                         "qkv": module.self_attention.linear_qkv,
                         "proj": module.self_attention.linear_proj,
                         "fc1": module.mlp.linear_fc1, "fc2": module.mlp.linear_fc2}
                for name, sub in named.items():
                    self.handles.append(sub.register_forward_pre_hook(self._hook((n, name))))

    def _hook(self, key):
        def hook(module, args):
            self.inputs.setdefault(key, []).append(args[0].detach().double())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def batches(cfg, state, engine, step: int = 0):
    from stable_megatron.train import micro_batches

    data = RandomTokens(VOCAB, SEQ, seed=7)
    accum = engine.gradient_accumulation_steps()
    first = step * cfg.train.global_batch_size
    return list(micro_batches(data, first, cfg, state.layout, state.device, accum))


@pytest.fixture(scope="module", params=list(MODELS))
def run(request, state):
    """One measured step of a fresh engine; what the test-side hooks saw; the weights before
    the update; and an independent autograd backward of a second build of the same model."""
    from stable_megatron.hooks import StepRunner
    from stable_megatron.methods.sigma_reparam import PowerIteration
    from stable_megatron.metrics import StabilityMetrics
    from stable_megatron.model.gpt import build_model, lm_loss
    from stable_megatron.train import build_engine

    cfg = make_config(MODELS[request.param], metrics={
        "interval": 1, "sigma_exact_iters": SIGMA_EXACT_ITERS[request.param]})
    engine = build_engine(cfg, state)
    with torch.no_grad():  # make the padded vocabulary rows stand out: TEV must ignore them
        for name, param in engine.module.named_parameters():
            if "word_embeddings" in name or "output_layer" in name:
                param[VOCAB:] = 5.0 * torch.randn_like(param[VOCAB:])
    before = weights(engine)
    metrics = StabilityMetrics(cfg, state, engine)
    capture = Capture(engine)
    data = batches(cfg, state, engine)
    runner = StepRunner(engine, [PowerIteration(engine.module), metrics])
    logged: dict = {}
    lr = engine.get_lr()[0]  # the LR of the step's update
    runner.step(1, iter(data))
    runner.after_step(1, logged)
    runner.remove()
    capture.remove()
    after = weights(engine)

    plain = build_model(cfg, state.topology, state.device)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            param.copy_(before[name].float())
    from stable_megatron.model.sigma_reparam import refresh_spectral_norms

    refresh_spectral_norms(plain)  # as the PowerIteration hook does before the forwards
    for tokens, labels in data:
        (lm_loss(plain(tokens), labels) / len(data)).backward()
    grads = {n: p.grad.double() for n, p in plain.named_parameters()}
    return {"cfg": cfg, "engine": engine, "metrics": metrics, "logged": logged,
            "inputs": capture.inputs, "before": before, "after": after, "lr": lr,
            "grads": grads, "data": data, "model": request.param}


def close(a: float, b: float, rel: float = 1e-5):
    assert a == pytest.approx(b, rel=rel, abs=1e-9)


def test_tev_from_the_embedding_matrix(run):
    def tev(matrix):
        rows = matrix[:VOCAB].std(dim=1, unbiased=False)  # the tokenizer's ids only
        return rows.mean().item(), rows.std(unbiased=False).item()

    logged, before = run["logged"], run["before"]
    emb = next(v for n, v in before.items() if "word_embeddings" in n)
    mean, std = tev(emb)
    close(logged["tev/mean"], mean)
    close(logged["tev/std"], std)
    if run["model"] == "methods":
        mean, std = tev(next(v for n, v in before.items() if "output_layer" in n))
        close(logged["tev_out/mean"], mean)
        close(logged["tev_out/std"], std)
    else:
        assert not any(k.startswith("tev_out") for k in logged)


def test_attention_entropy_and_max_logit_from_probabilities(run):
    logged, cfg = run["logged"], run["cfg"]
    cap = cfg.model.softmax_cap
    d = HIDDEN // HEADS
    for layer in range(1, LAYERS + 1):
        weight = next(v for n, v in run["before"].items()
                      if n.startswith(f"{layer}.") and "linear_qkv.weight" in n)
        bias = next(v for n, v in run["before"].items()
                    if n.startswith(f"{layer}.") and "linear_qkv.bias" in n)
        scale = 1.0
        if run["model"] == "methods":  # sigma-reparam: W_hat = gamma / sigma * W
            scale = (logged[f"gamma/layer_{layer:02d}/qkv"] /
                     logged[f"sigma/layer_{layer:02d}/qkv"])
        entropy, normalized, maxima, capped_maxima = [], [], [], []
        for x in run["inputs"][(layer, "attn")]:  # [s, b, h]: one micro-batch
            qkv = (F.linear(x, weight) * scale + bias).view(SEQ, -1, HEADS, 3, d)
            q, k = qkv[..., 0, :].permute(1, 2, 0, 3), qkv[..., 1, :].permute(1, 2, 0, 3)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            visible = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
            capped = scores if cap is None else cap * torch.tanh(scores / cap)
            probs = torch.softmax(capped.masked_fill(~visible, -math.inf), dim=-1)
            plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
            h = -plogp.sum(-1)  # [b, heads, s]
            entropy.append(h)
            normalized.append(h[..., 1:] / torch.arange(2, SEQ + 1).double().log())
            maxima.append(scores[..., visible].max())
            capped_maxima.append(capped[..., visible].max())
        entropy, normalized = torch.cat(entropy), torch.cat(normalized)
        name = f"layer_{layer:02d}"
        for head in range(HEADS):
            close(logged[f"attn_entropy/{name}/head_{head:02d}"],
                  entropy[:, head].mean().item(), rel=1e-5)
            close(logged[f"attn_entropy_norm/{name}/head_{head:02d}"],
                  normalized[:, head].mean().item(), rel=1e-5)
        close(logged[f"attn_entropy/{name}/min"], entropy.mean(dim=(0, 2)).min().item())
        close(logged[f"attn_entropy_norm/{name}/min"], normalized.mean(dim=(0, 2)).min().item())
        close(logged[f"attn_logit_max/{name}"], max(maxima).item())
        if cap is not None:
            close(logged[f"attn_logit_max_capped/{name}"], max(capped_maxima).item())
            assert logged[f"attn_logit_max_capped/{name}"] < cap
        else:
            assert f"attn_logit_max_capped/{name}" not in logged
    # not a vacuous pass: the heads differ and attention is not uniform
    heads = [logged[f"attn_entropy_norm/layer_01/head_{h:02d}"] for h in range(HEADS)]
    assert max(heads) - min(heads) > 1e-3 and min(heads) < 0.99


def test_output_norms_from_the_linears(run):
    logged, before = run["logged"], run["before"]
    slot_param = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1",
                  "fc2": "linear_fc2"}
    for layer in range(1, LAYERS + 1):
        for slot, pname in slot_param.items():
            w = before[next(n for n in before if n.startswith(f"{layer}.") and
                            f"{pname}.weight" in n)]
            b = before[next(n for n in before if n.startswith(f"{layer}.") and
                            f"{pname}.bias" in n)]
            scale = 1.0
            if run["model"] == "methods":
                sigma = run["logged"][f"sigma/layer_{layer:02d}/{slot}"]
                gamma = run["logged"][f"gamma/layer_{layer:02d}/{slot}"]
                scale = gamma / sigma  # W_hat = gamma / sigma * W
            norms = [(F.linear(x, w) * scale + b).norm(dim=-1)
                     for x in run["inputs"][(layer, slot)]]
            expected = torch.cat([n.flatten() for n in norms]).mean().item()
            close(logged[f"out_norm/layer_{layer:02d}/{slot}"], expected, rel=1e-5)


def test_grad_and_param_norms_from_autograd(run):
    logged, grads, before = run["logged"], run["grads"], run["before"]

    def norm(names):
        return math.sqrt(sum(grads[n].square().sum().item() for n in names))

    groups = {"grad_norm/total": list(grads)}
    for i in range(1, LAYERS + 1):
        groups[f"grad_norm/layer_{i:02d}"] = [n for n in grads if n.startswith(f"{i}.")]
    groups["grad_norm/final_norm"] = [n for n in grads if n.startswith(f"{LAYERS + 1}.")]
    groups["grad_norm/embedding"] = [n for n in grads if n.startswith(("0.", "tied_modules"))]
    if run["model"] == "methods":
        groups["grad_norm/output"] = [n for n in grads if n.startswith(f"{LAYERS + 2}.")]
    for key, names in groups.items():
        assert names, key
        close(logged[key], norm(names), rel=1e-5)
    assert {k for k in logged if k.startswith("grad_norm/")} == set(groups)
    close(logged["grad_norm/total"], float(run["engine"].get_global_grad_norm()), rel=1e-5)
    param_norm = math.sqrt(sum(v.square().sum().item() for v in before.values()))
    close(logged["param_norm"], param_norm, rel=1e-6)


def test_update_ratio_and_rms_from_the_weights_before_and_after(run):
    """`update_ratio/...` = ||W_after - W_before|| / ||W_before|| and `update_rms/...` =
    RMS(W_after - W_before) / lr, per group and in total, from the engine's weights saved
    around the step (the tied embedding counted once, as in the other norms)."""
    logged, before, after, lr = run["logged"], run["before"], run["after"], run["lr"]
    names = [n for n in before if not n.startswith(f"{LAYERS + 2}.word_embeddings")]  # tied copy
    groups = {f"layer_{i:02d}": [n for n in names if n.startswith(f"{i}.")]
              for i in range(1, LAYERS + 1)}
    groups["final_norm"] = [n for n in names if n.startswith(f"{LAYERS + 1}.")]
    groups["embedding"] = [n for n in names if n.startswith(("0.", "tied_modules"))]
    if run["model"] == "methods":
        groups["output"] = [n for n in names if n.startswith(f"{LAYERS + 2}.")]

    def sq(tensors):
        return sum(t.square().sum().item() for t in tensors)

    moved = False
    for group, members in groups.items():
        assert members, group
        delta = [after[n] - before[n] for n in members]
        ratio = math.sqrt(sq(delta) / sq(before[n] for n in members))
        close(logged[f"update_ratio/{group}"], ratio, rel=1e-5)
        rms = math.sqrt(sq(delta) / sum(d.numel() for d in delta)) / lr
        close(logged[f"update_rms/{group}"], rms, rel=1e-5)
        moved |= ratio > 0
    assert moved
    total = math.sqrt(sq(after[n] - before[n] for n in names) / sq(before[n] for n in names))
    close(logged["update_ratio/total"], total, rel=1e-5)
    assert {k.split("/")[1] for k in logged if k.startswith("update_rms/")} == set(groups)
    assert not any(k.startswith("_upd") for k in logged)


def test_sigma_and_gamma(run):
    if run["model"] != "methods":
        assert not any(k.startswith(("sigma/", "gamma/")) for k in run["logged"])
        return
    before = run["before"]
    slot_param = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1",
                  "fc2": "linear_fc2"}
    for layer in range(1, LAYERS + 1):
        for slot, pname in slot_param.items():
            prefix = next(n for n in before if n.startswith(f"{layer}.") and
                          f"{pname}.weight" in n)[: -len("weight")]
            sigma = torch.linalg.matrix_norm(before[prefix + "weight"], 2).item()
            close(run["logged"][f"sigma/layer_{layer:02d}/{slot}"], sigma, rel=1e-3)
            close(run["logged"][f"gamma/layer_{layer:02d}/{slot}"],
                  before[prefix + "gamma"].item(), rel=1e-6)


def test_sigma_exact_and_lag(run):
    """`sigma_exact/...` is the 2-norm of the weights the step's forward used and `sigma_lag`
    = 1 - sigma / sigma_exact; with metrics.sigma_exact_iters = 0 neither is logged."""
    from stable_megatron.methods.sigma_reparam import add_sigma_reparam
    from stable_megatron.metrics import Contributions

    logged, before = run["logged"], run["before"]
    families = ("sigma_exact/", "sigma_lag/")
    if run["model"] != "methods":
        assert not any(k.startswith(families) for k in logged)
        return
    slot_param = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1",
                  "fc2": "linear_fc2"}
    for layer in range(1, LAYERS + 1):
        for slot, pname in slot_param.items():
            name = f"layer_{layer:02d}/{slot}"
            weight = before[next(n for n in before if n.startswith(f"{layer}.") and
                                 f"{pname}.weight" in n)]
            exact = logged[f"sigma_exact/{name}"]
            close(exact, torch.linalg.matrix_norm(weight, 2).item(), rel=1e-5)
            lag = 1 - logged[f"sigma/{name}"] / exact
            assert logged[f"sigma_lag/{name}"] == pytest.approx(lag, rel=0, abs=1e-12)
    assert len([k for k in logged if k.startswith(families)]) == 2 * 4 * LAYERS

    contrib = Contributions()  # the same layers with the reference off
    add_sigma_reparam(contrib, run["metrics"].parts, LAYERS, 0)
    assert {k.split("/")[0] for k in contrib.entries} == {"sigma", "gamma"}


def test_off_interval_steps_run_the_plain_model(run, state):
    """After a measured step nothing stays registered: no forward hooks, no wrapped optimizer
    methods, no capture (the next, unmeasured step collects no statistics)."""
    from stable_megatron.metrics.attention import attention_modules
    from stable_megatron.metrics.parts import output_slots
    from stable_megatron.train import train_step

    engine, metrics = run["engine"], run["metrics"]
    assert not {"check_overflow", "scaled_global_norm"} & set(engine.optimizer.__dict__)
    for layer in metrics.parts.layers.values():
        for module in output_slots(layer).values():
            assert not module._forward_hooks
    train_step(engine, iter(batches(run["cfg"], state, engine, step=1)), run["cfg"])
    assert all(not m.capture_hooks for m in attention_modules(metrics.parts).values())


def test_due_on_multiples_of_the_interval():
    from stable_megatron.metrics import due

    assert [s for s in range(1, 31) if due(10, s)] == [10, 20, 30]
    assert [s for s in range(1, 31) if due(1, s)] == list(range(1, 31))
    assert not any(due(0, s) for s in range(1, 31))


def test_capture_beside_a_fused_kernel_keeps_its_output(run):
    """With a fused kernel (the baseline's SDPA) or the math kernel (the capped model on CPU)
    the capture hook collects statistics and leaves the module's output exactly as it is
    without capture."""
    from stable_megatron.metrics.attention import StatisticsCollector
    from stable_megatron.model.attention import SelfAttention

    attn = next(m for m in run["engine"].module.modules() if isinstance(m, SelfAttention))
    assert attn.kernel == ("sdpa" if run["model"] == "baseline" else "math")
    hidden = run["inputs"][(attn.layer_number, "attn")][0].float()
    collector = StatisticsCollector()
    with torch.no_grad():
        attn.set_capture_hook("test", collector)
        captured, _ = attn(hidden)
        attn.set_capture_hook("test", None)
        plain, _ = attn(hidden)
    stats = collector.statistics
    assert stats is not None and stats.rows == hidden.size(1) * hidden.size(0)
    assert not attn.capture_hooks
    assert torch.equal(captured, plain)


def test_train_logs_metrics_every_interval(state, tmp_path):
    """The training loop merges the metrics into metrics.jsonl on multiples of
    metrics.interval only."""
    from stable_megatron.data.dataset import write_token_documents
    from stable_megatron.data.tokenizer import train_tokenizer
    from stable_megatron.train import train

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some plain english words here" for i in range(300)))
    tokenizer = train_tokenizer([text], tmp_path / "tok", vocab_size=300)
    docs = [[(i * 7 + j) % tokenizer.vocab_size for j in range(400)] for i in range(4)]
    write_token_documents(docs, tmp_path / "train", tokenizer.vocab_size)
    cfg = make_config(
        {}, data={"source": "indexed", "train_prefix": str(tmp_path / "train"),
                  "tokenizer_model": str(tmp_path / "tok.model")},
        train={"steps": 3, "micro_batch_size": 2, "global_batch_size": 2, "eval_interval": 0,
               "run_dir": str(tmp_path / "run")},
        metrics={"interval": 2}, logging={"tensorboard": False, "progress": False},
        checkpoint={"dir": str(tmp_path / "ckpt")},
    )
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert ["tev/mean" in r for r in records] == [False, True, False]
    assert "attn_entropy/layer_01/head_00" in records[1]
    assert "grad_norm/layer_02" in records[1] and "out_norm/layer_02/fc2" in records[1]


def test_negative_interval_is_rejected():
    from stable_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="metrics.interval=-1"):
        make_config({}, metrics={"interval": -1})
