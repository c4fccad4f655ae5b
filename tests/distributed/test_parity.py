"""The same model, weights and batches give the same losses, gradients and updated weights at
every tensor x pipeline x data parallel layout (fp32, gloo, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stable_megatron.checkpoint.shards import merge
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("parity_worker.py")
BASE = {
    "data": {"vocab_size": 200},
    "model": {
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 32,
    },
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 0},
    "steps": 3,
}
LAYOUTS = {
    "tp2": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "dp2": (2, {}),
    "tp2_pp2": (4, {"tp": 2, "pp": 2}),
    "tp2_dp2": (4, {"tp": 2}),
    "pp2_dp2": (4, {"pp": 2}),
    "pp4": (4, {"pp": 4}),  # one layer per stage: the middle stages hold no embedding
    # ZeRO stages other than 1 (DeepSpeed's plain engine, pp=1): stage 0 all-reduces whole
    # gradients and steps the parameters themselves, 2 reduce-scatters the gradients during
    # the backward, 3 also partitions the weights (gathered for each block's forward)
    "tp2_dp2_zero0": (4, {"tp": 2, "zero_stage": 0}),
    "tp2_dp2_zero2": (4, {"tp": 2, "zero_stage": 2}),
    "tp2_dp2_zero3": (4, {"tp": 2, "zero_stage": 3}),
    "dp2_zero3": (2, {"zero_stage": 3}),
}


METHODS = {
    "qk_norm_cap": {"norm_placement": "qk_norm", "softmax_cap": 5.0},
    "qk_fc_norm": {"norm_placement": "qk_fc_norm"},
    "qkv_norm_rope": {"norm_placement": "qkv_norm", "position_embedding": "rope",
                      "tie_embeddings": False},
    "mlra_qkvo": {"attention": "mlra", "mlra": {"targets": ["q", "k", "v", "o"], "rank": 4}},
    "sigma_reparam": {"sigma_reparam": {"enabled": True}},
    # large enough that the z term moves the gradients well beyond the tolerances
    "z_loss": {"z_loss": 0.05},
    # the norm lives in the first stage's embedding copy only (the tied copy on the last stage
    # is the output layer); `train` entries go to the train section
    "embedding_options": {"embedding_norm": True, "scale_embeddings": True,
                          "train": {"embedding_weight_decay": False, "weight_decay": 0.5}},
    # tau inside the range of the heads' maxima, so that every step clips some heads and
    # leaves others (3-7 of 16 in the reference); on MLRA (q low rank, k full rank) the
    # logits are ~15x smaller (the "paper" factor init)
    "qk_clip": {"qk_clip": {"enabled": True, "tau": 0.1}},
    "gated_attention": {"attention_gate": True},
    # Llama-style blocks (FC1 = [gate; up] split over TP with stride 2), alone and under
    # RMS head norms, RMS output norms and sigma-reparam (its power iteration over that FC1)
    "llama_style": {"normalization": "rmsnorm", "activation": "swiglu", "ffn_hidden_size": 96,
                    "position_embedding": "rope", "tie_embeddings": False,
                    "add_bias_linear": False},
    "llama_qk_fc_norm_sigma": {"normalization": "rmsnorm", "activation": "swiglu",
                               "position_embedding": "rope", "norm_placement": "qk_fc_norm",
                               "sigma_reparam": {"enabled": True}},
    "qk_clip_mlra": {"qk_clip": {"enabled": True, "tau": 0.006}, "attention": "mlra",
                     "mlra": {"targets": ["q", "v"], "rank": 4}},
}

# Muon (train.optimizer=muon; stable_megatron/muon.py), alone and with QK-clip and sigma-reparam,
# at TP2, PP2, DP2 and TP2 x PP2, and alone at TP2 x DP2 and PP4: the orthogonalised update of
# the whole matrices (gathered over TP, and over DP from ZeRO's partitions) must be TP1's
MUON = {"train": {"optimizer": "muon", "muon_lr": 0.02}}
MUON_CASES = {
    "muon": MUON,
    "muon_qk_clip": {**METHODS["qk_clip"], **MUON},
    "muon_sigma_reparam": {**METHODS["sigma_reparam"], **MUON},
}
MUON_LAYOUTS = {"tp2": MUON_CASES, "pp2": MUON_CASES, "dp2": MUON_CASES,
                "tp2_pp2": MUON_CASES, "tp2_dp2": {"muon": MUON}, "pp4": {"muon": MUON},
                # Muon steps ZeRO-1's flat partitions at stage 2 (plain parameters at stage 0:
                # the slow target)
                "tp2_dp2_zero2": {"muon": MUON}}
MUON_SLOW_LAYOUTS = {"tp2_dp2_zero0": {"muon": MUON}}


def case(parallel: dict, model: dict | None = None) -> dict:
    overrides = json.loads(json.dumps(BASE))
    overrides["parallel"] = parallel
    model = dict(model or {})
    overrides["train"].update(model.pop("train", {}))
    overrides["model"].update(model)
    return overrides


def run_cases(tmp: Path, nproc: int, cases: dict[str, dict]) -> dict[str, list[dict]]:
    """Run every case in one launch of `nproc` processes; results per case and rank."""
    tmp.mkdir(parents=True, exist_ok=True)
    torchrun(WORKER, nproc, [str(tmp), json.dumps(cases)])
    return {name: [torch.load(tmp / name / f"rank{r}.pt") for r in range(nproc)]
            for name in cases}


def assemble(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Whole tensors by name from data-parallel rank 0's TP shards on every pipeline stage;
    checks that TP-replicated tensors agree across TP ranks and tied copies across stages."""
    by_stage: dict[int, list[dict]] = {}
    for r in ranks:
        if r["layout"]["dp_rank"] == 0:
            by_stage.setdefault(r["layout"]["pp_rank"], []).append(r)
    whole: dict[str, torch.Tensor] = {}
    for stage_ranks in by_stage.values():
        stage_ranks.sort(key=lambda r: r["layout"]["tp_rank"])
        for name, first in stage_ranks[0][key].items():
            shards = [r[key][name]["value"] for r in stage_ranks]
            if first["partition_dim"] is None:
                for other in shards[1:]:
                    torch.testing.assert_close(other, shards[0], rtol=0, atol=0)
                tensor = shards[0]
            else:  # SwiGLU's FC1 is split with stride 2 ([gate; up] per rank)
                tensor = merge(shards, first["partition_dim"], first.get("stride", 1))
            if name in whole:  # a tied weight present on two stages
                torch.testing.assert_close(tensor, whole[name], rtol=1e-6, atol=1e-7)
            whole[name] = tensor
    return whole


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process results: the baseline, every method in METHODS and BF16_MODEL (fp32)."""
    cases = {"baseline": case({})} | {n: case({}, m) for n, m in METHODS.items()}
    cases["bf16_model"] = case({}, BF16_MODEL)  # in fp32
    cases.update({n: case({}, m) for n, m in MUON_CASES.items()})
    cases["muon_one_step"] = {**case({}, MUON), "steps": 1}
    return run_cases(tmp_path_factory.mktemp("ref"), 1, cases)


def check_against(reference: list[dict], ranks: list[dict]) -> None:
    """First step: loss, grad norm and every gradient to fp32 tolerance. Later steps follow
    Adam updates, which divide by sqrt(v) + eps and so turn fp32 rounding in near-zero
    gradients (the key bias and key-norm bias have exact gradient 0) into small weight
    differences: losses stay within 5e-5 and grad norms within 0.5% there."""
    ref = reference[0]
    for r in ranks:  # every rank reports the same (DP-averaged, stage-broadcast) loss
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=5e-5, atol=1e-6
        )
        assert r["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6)
        assert r["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=1e-5)
        torch.testing.assert_close(
            torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=5e-3, atol=1e-6
        )
    ref_grads, ref_params = assemble(reference, "grads"), assemble(reference, "params")
    grads, params = assemble(ranks, "grads"), assemble(ranks, "params")
    initial = assemble(reference, "initial")
    # Drawn weights are bit-identical; computed ones (sigma-reparam's gamma = sigma(W0), a sum
    # over TP shards) may differ in the last bit.
    torch.testing.assert_close(assemble(ranks, "initial"), initial, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
        if ref_grads[name].abs().max() < 1e-7:
            # The loss does not depend on this tensor (the key-norm bias shifts every logit of
            # a query equally): Adam turns its rounding-noise gradient into arbitrary updates.
            continue
        # Adam divides by sqrt(v) + eps, so fp32 rounding in a rarely-used row (a rare token's
        # embedding) can move single elements by a fraction of a step: compare each tensor's
        # whole update. A wrong gradient or a flipped update is far outside 1%.
        update, ref_update = params[name] - initial[name], ref_params[name] - initial[name]
        error = (update - ref_update).norm() / ref_update.norm()
        assert error < 1e-2, f"update of {name} over {BASE['steps']} steps: rel. error {error:.1e}"


# The default target runs every case of one process count in one launch (a launch costs
# ~5-10 s of imports on a 2-core machine, more than the cases' own steps): the baselines at
# every layout, every method at TP2, at PP2 the methods whose code sees the split into stages
# (PP2_METHODS), and QK-norm + cap with full recompute at TP2 x PP2; under ZeRO-3 QK-clip,
# which rescales partitioned weights and their master copy after the step (at TP2 x DP2, and
# at DP2 on MLRA's factors; sigma-reparam's power step on
# partitioned weights runs in test_metrics_parity.py's ZeRO-3 cases). Every method at TP2 x PP2
# and at TP2 x DP2 under ZeRO 0, 2 and 3, and the other methods at PP2, are in the slow target.
DEFAULT_METHOD_LAYOUTS = ("tp2", "pp2")
# the tied embedding and its options on the first stage, an untied head on the last, the
# z-term on the last stage's logits, the power step's and QK-clip's per-stage hooks and the
# max-logit table reduced over stages; the rest change a layer from inside it
PP2_METHODS = ("qkv_norm_rope", "sigma_reparam", "z_loss", "embedding_options", "qk_clip",
               "llama_style")


def default_methods(layout: str) -> tuple[str, ...]:
    """The methods the default target runs at `layout` (one of DEFAULT_METHOD_LAYOUTS)."""
    return PP2_METHODS if layout == "pp2" else tuple(METHODS)
ZERO3_METHODS = {"tp2_dp2_zero3": ("qk_clip",), "dp2_zero3": ("qk_clip_mlra",)}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`launched(nproc)`: the results of the default cases with `nproc` processes, by
    "<layout>/<case>" (one launch per process count, on first use)."""
    done: dict[int, dict[str, list[dict]]] = {}

    def results(nproc: int) -> dict[str, list[dict]]:
        if nproc not in done:
            cases = {}
            for layout, (n, parallel) in LAYOUTS.items():
                if n != nproc:
                    continue
                cases[f"{layout}/baseline"] = case(parallel)
                if layout in DEFAULT_METHOD_LAYOUTS:
                    cases.update({f"{layout}/{m}": case(parallel, METHODS[m])
                                  for m in default_methods(layout)})
                cases.update({f"{layout}/{m}": case(parallel, METHODS[m])
                              for m in ZERO3_METHODS.get(layout, ())})
                if layout == "tp2_pp2":
                    cases[f"{layout}/qk_norm_cap_recompute"] = recompute_case(parallel)
                if layout == "tp2":
                    cases[f"{layout}/bf16"] = bf16_case(parallel)
                if layout == "dp2_zero3":  # built split (zero.Init) and whole, then cast
                    cases[f"{layout}/bf16"] = bf16_case(parallel)
                    cases[f"{layout}/bf16_built_whole"] = bf16_case({**parallel,
                                                                     "zero_init": False})
                cases.update({f"{layout}/{m}": case(parallel, o)
                              for m, o in MUON_LAYOUTS.get(layout, {}).items()})
            done[nproc] = run_cases(tmp_path_factory.mktemp(f"nproc{nproc}"), nproc, cases)
        return done[nproc]

    return results


def recompute_case(parallel: dict) -> dict:
    """QK-norm + cap with full activation recompute (the recompute re-runs the layers' TP
    all-reduces inside the pipeline engine's backward)."""
    out = case(parallel, METHODS["qk_norm_cap"])
    out["train"]["recompute"] = "full"
    return out


# run in bf16 at TP2 against its fp32 single-process reference (`reference["bf16_model"]`)
BF16_MODEL = {"sigma_reparam": {"enabled": True}, "norm_placement": "qk_norm", "softmax_cap": 5.0}


def bf16_case(parallel: dict) -> dict:
    """DeepSpeed's bf16 engine (bf16 weights and activations, fp32 master weights in ZeRO's
    optimizer) with sigma-reparam and QK-norm + cap."""
    out = case(parallel, BF16_MODEL)
    out["train"]["precision"] = "bf16"
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, launched):
    nproc, parallel = LAYOUTS[name]
    ranks = launched(nproc)[f"{name}/baseline"]
    check_against(reference["baseline"], ranks)
    partitioned, total = ranks[0]["partitioned"]  # not vacuous: ZeRO-3 split every weight
    assert partitioned == (total if parallel.get("zero_stage") == 3 else 0)
    if parallel.get("zero_stage") == 3:  # zero.Init (the default): no rank built a weight whole
        dp = nproc // parallel.get("tp", 1)
        for rank in ranks:
            assert rank["built_split"], "the worker built no probe model"
            for placeholder, local, whole in rank["built_split"]:
                assert placeholder == 0 and local == -(-whole // dp), (local, whole)


@pytest.mark.parametrize("layout", [
    *DEFAULT_METHOD_LAYOUTS,
    *(pytest.param(name, marks=pytest.mark.slow)
      for name in ("pp2_rest", "tp2_pp2", "tp2_dp2_zero0", "tp2_dp2_zero2", "tp2_dp2_zero3")),
])
def test_methods_match_single_process(reference, launched, tmp_path, layout):
    """The norm placements, softmax capping, MLRA, sigma-reparam, z-loss, the embedding options,
    QK-clip (standard and on MLRA), gated attention, Llama-style blocks, RoPE and an untied
    head at TP2, at PP2 (PP2_METHODS; "pp2_rest", the others: slow target), and (slow target)
    TP2 x PP2 and TP2 x DP2 under ZeRO 0, 2 and 3; the single-process reference runs ZeRO
    stage 1."""
    if layout in DEFAULT_METHOD_LAYOUTS:
        nproc = LAYOUTS[layout][0]
        results = {m: launched(nproc)[f"{layout}/{m}"] for m in default_methods(layout)}
    else:
        names = [m for m in METHODS if m not in PP2_METHODS] if layout == "pp2_rest" else METHODS
        nproc, parallel = LAYOUTS["pp2" if layout == "pp2_rest" else layout]
        results = run_cases(tmp_path, nproc, {m: case(parallel, METHODS[m]) for m in names})
    for name, ranks in results.items():
        check_against(reference[name], ranks)


@pytest.mark.parametrize("layout", list(ZERO3_METHODS))
def test_zero3_methods_match_single_process(reference, launched, layout):
    """The methods that touch weights outside the forward (ZERO3_METHODS) under ZeRO-3, in
    the default target."""
    nproc, _ = LAYOUTS[layout]
    for name in ZERO3_METHODS[layout]:
        check_against(reference[name], launched(nproc)[f"{layout}/{name}"])


@pytest.mark.parametrize("layout", [*MUON_LAYOUTS, *(pytest.param(name, marks=pytest.mark.slow)
                                                     for name in MUON_SLOW_LAYOUTS)])
def test_muon_matches_single_process(reference, launched, tmp_path, layout):
    """Muon alone, with QK-clip and with sigma-reparam: losses, gradients and every weight
    after 3 steps as one process computes them."""
    nproc, parallel = LAYOUTS[layout]
    if layout in MUON_LAYOUTS:
        results = {n: launched(nproc)[f"{layout}/{n}"] for n in MUON_LAYOUTS[layout]}
    else:
        results = run_cases(tmp_path, nproc, {n: case(parallel, o)
                                              for n, o in MUON_SLOW_LAYOUTS[layout].items()})
    for name, ranks in results.items():
        check_against(reference[name], ranks)


def test_muon_takes_orthogonal_steps(reference):
    """Guards the Muon parity against a silent fall-back to AdamW: after one step, a layer's
    FC2 update less its weight decay, divided by lr * 0.2 sqrt(max(rows, cols)), has the
    singular values Newton-Schulz leaves (tests/unit/test_muon.py) in every direction the
    gradient has (one it has not: FC2's output gradient is orthogonal to the all-ones vector
    once it has passed the next LayerNorm, and Newton-Schulz maps a zero singular value to
    zero); an AdamW step's spread far wider."""
    from stable_megatron.muon import update_scale

    ref = reference["muon_one_step"][0]
    lr, wd = MUON["train"]["muon_lr"], 0.1  # train.weight_decay's default
    for name in [n for n in ref["params"] if n.endswith("linear_fc2.weight")]:
        w0, w1 = ref["initial"][name]["value"], ref["params"][name]["value"]
        step = (w0 * (1 - lr * wd) - w1) / (lr * update_scale(*w0.shape))
        sv = torch.linalg.svdvals(step.double())
        assert (sv < 1e-3).sum() <= 1, (name, sv)
        sv = sv[sv >= 1e-3]
        assert 0.6 < sv.min() and sv.max() < 1.25, (name, sv.min(), sv.max())


def test_full_recompute_matches_single_process_at_tp2_pp2(reference, launched):
    """QK-norm + cap with full activation recompute at TP2 x PP2 against the single-process
    reference without it."""
    check_against(reference["qk_norm_cap"], launched(4)["tp2_pp2/qk_norm_cap_recompute"])


def test_bf16_follows_fp32_at_tp2(reference, launched):
    """The default target's bf16 training (the slow target trains it longer: e2e
    test_methods_train.py): at TP2, every rank's losses follow the fp32 single-process run of
    the same model to bf16's precision (8 bits of mantissa: ~0.4% per rounding, a few percent
    over a forward pass), and the updates are applied (the loss falls)."""
    ranks = launched(2)["tp2/bf16"]
    fp32 = reference["bf16_model"][0]["losses"]
    for r in ranks:
        assert r["losses"] == ranks[0]["losses"]
        assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"])
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(fp32), rtol=2e-2,
                                   atol=0)
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


def test_zero3_bf16_built_split_trains_as_built_whole(reference, launched):
    """ZeRO-3 in bf16 at DP2: the model built inside zero.Init (in fp32, its partitions then
    cast to bf16: `ds_adapter.cast_partitions`) takes the same steps as the model built whole
    and cast by DeepSpeed, bit for bit, and follows the fp32 run to bf16's precision."""
    split, whole = launched(2)["dp2_zero3/bf16"], launched(2)["dp2_zero3/bf16_built_whole"]
    fp32 = reference["bf16_model"][0]["losses"]
    for a, b in zip(split, whole, strict=True):
        assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
        for name, record in a["params"].items():
            value = record["value"]  # (saved as fp32) bf16 weights: exact in bf16
            assert torch.equal(value.bfloat16().float(), value), name
            assert torch.equal(record["value"], b["params"][name]["value"]), name
        torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(fp32), rtol=2e-2,
                                   atol=0)
    assert split[0]["losses"][-1] < split[0]["losses"][0]


def test_reference_learns_and_gradients_are_nonzero(reference):
    """Guards the comparisons above against vacuous passes (e.g. all-zero gradients)."""
    for name, ranks in reference.items():
        ref = ranks[0]
        assert all(g["value"].abs().sum() > 0 for g in ref["grads"].values()), name
        if len(ref["losses"]) > 1:  # (not the one-step case)
            assert min(ref["losses"][1:]) < ref["losses"][0], name  # the updates do something


def test_qk_clip_cases_clip_some_heads_on_every_step(reference):
    """QK-clip's parity is not vacuous: every step clipped some heads but not all."""
    heads = BASE["model"]["num_layers"] * BASE["model"]["num_attention_heads"]
    for name in ("qk_clip", "qk_clip_mlra", "muon_qk_clip"):
        counts = [r["qk_clip/clipped_heads"] for r in reference[name][0]["records"]]
        assert len(counts) == BASE["steps"] and all(0 < c < heads for c in counts), counts
