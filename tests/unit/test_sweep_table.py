"""The LR sweep's arithmetic on hand-made tables with known answers, the divergence stop rule,
and how `stable-megatron sweep` resolves methods and rejects bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stable_megatron.analysis.sweep_table import (
    SweepRun,
    largest_stable_lr,
    lr_sensitivity,
    read_csv,
    summarise,
    write_csv,
)
from stable_megatron.stability.divergence import DivergenceRule
from stable_megatron.sweep import (
    SweepError,
    main,
    parse_lrs,
    resolve_method,
    split_methods,
)

L0 = 7.0
REPRO = Path(__file__).resolve().parents[2] / "recipes" / "repro" / "base.yaml"


def run(method: str, lr: float, loss: float | None, status: str = "done") -> SweepRun:
    return SweepRun(method=method, lr=lr, status=status, initial_loss=L0,
                    val_loss=loss if status == "done" else None)


def table() -> list[SweepRun]:
    return [
        # A: best at 1e-2, diverges only at the top of the grid
        run("A", 1e-3, 5.0), run("A", 1e-2, 4.0), run("A", 1e-1, 4.5),
        run("A", 1.0, None, "diverged"),
        # B: diverges at 1e-1 but trains again at 1 (the stable range stops at the first
        # divergence)
        run("B", 1e-3, 6.0), run("B", 1e-2, 4.2), run("B", 1e-1, None, "diverged"),
        run("B", 1.0, 4.3),
        # C: a run worse than the untrained model counts as L0; one run failed (crashed)
        run("C", 1e-3, 4.0), run("C", 1e-2, 8.0), run("C", 1e-1, None, "failed"),
    ]


def test_lr_sensitivity_formula():
    # mean of min(L, L0) - L*: (1 + 0 + 0.5 + 3) / 4
    assert lr_sensitivity([5.0, 4.0, 4.5, None], L0) == pytest.approx(1.125)
    assert lr_sensitivity([4.0, 4.0], L0) == 0.0
    assert lr_sensitivity([4.0, 9.0, float("nan")], L0) == pytest.approx((0 + 3 + 3) / 3)
    with pytest.raises(ValueError):
        lr_sensitivity([], L0)


def test_method_summaries_from_a_hand_made_sweep():
    by_method = {s.method: s for s in summarise(table(), ["A", "B", "C"])}
    a, b, c = by_method["A"], by_method["B"], by_method["C"]
    assert (a.diverges_at, a.largest_stable_lr, a.best_lr, a.best_loss) == (1.0, 0.1, 0.01, 4.0)
    assert a.lr_sensitivity == pytest.approx(1.125)
    assert a.best_ppl == pytest.approx(math.exp(4.0))
    assert a.diverged == 1 and a.complete
    # B: 1.0 trained, but the largest stable LR is below the first divergence
    assert (b.diverges_at, b.largest_stable_lr, b.best_lr) == (0.1, 0.01, 0.01)
    assert b.lr_sensitivity == pytest.approx((1.8 + 0 + 2.8 + 0.1) / 4)
    # C: the failed run is left out of the sensitivity and marks the method incomplete
    assert c.diverges_at is None and c.largest_stable_lr == 0.01
    assert c.lr_sensitivity == pytest.approx((0 + 3.0) / 2)
    assert not c.complete


def test_largest_stable_lr_none_when_the_smallest_lr_diverges():
    runs = [run("A", 1e-3, None, "diverged"), run("A", 1e-2, 4.0)]
    assert largest_stable_lr(runs) is None


def test_csv_round_trip(tmp_path):
    rows = table()
    rows[0].diverged_step, rows[0].max_attn_logit, rows[0].seconds = 12, 55.5, 31.2
    write_csv(rows, tmp_path / "sweep.csv")
    assert read_csv(tmp_path / "sweep.csv") == rows


# ------------------------------------------------------------------------------ divergence


def test_divergence_rule_non_finite_and_patience():
    rule = DivergenceRule(patience=3)
    assert rule.update(1, 9.0) is None  # the first loss is the reference
    assert rule.update(2, 9.5) is None and rule.update(3, 9.6) is None
    assert rule.update(4, 8.0) is None  # back below: the count restarts
    assert rule.update(5, 9.1) is None and rule.update(6, 9.2) is None
    reason = rule.update(7, 9.3)
    assert reason and "since step 5" in reason
    assert "nan" in DivergenceRule(5).update(1, float("nan"))


def test_divergence_rule_state_round_trip():
    rule = DivergenceRule(patience=2)
    rule.update(1, 9.0)
    rule.update(2, 9.5)
    restored = DivergenceRule(patience=2)
    restored.load_state_dict(rule.state_dict())
    assert restored.update(3, 9.7) is not None


# ------------------------------------------------------------------------------ methods, flags


def test_methods_resolve_to_recipe_overrides(tmp_path):
    assert resolve_method("baseline").overrides == []
    assert resolve_method("qk_norm_cap").overrides == ["model.norm_placement=qk_norm",
                                                       "model.softmax_cap=50"]
    assert resolve_method("sigma_reparam").overrides == ["model.sigma_reparam.enabled=true"]
    custom = resolve_method("m:model.mlra.targets=[q,k,v,o],model.attention=mlra")
    assert (custom.name, custom.overrides) == ("m", ["model.mlra.targets=[q,k,v,o]",
                                                     "model.attention=mlra"])
    path = tmp_path / "mine.yaml"
    path.write_text("base: ../tiny.yaml\nmodel: {softmax_cap: 30}\ntrain: {run_dir: x}\n")
    assert resolve_method(str(path)).overrides == ["model.softmax_cap=30"]
    with pytest.raises(SweepError, match="unknown method 'qk_nrom'; known: .*qk_norm"):
        resolve_method("qk_nrom")


def test_split_methods_keeps_custom_methods_whole():
    text = "baseline,pi4:model.sigma_reparam.enabled=true,model.sigma_reparam.power_iters=4,mlra"
    assert split_methods(text) == [
        "baseline", "pi4:model.sigma_reparam.enabled=true,model.sigma_reparam.power_iters=4",
        "mlra"]


def test_parse_lrs():
    assert parse_lrs("3e-3,1e-3") == [1e-3, 3e-3]
    for bad in ("", "1e-3,x", "1e-3,-1", "1e-3,1e-3"):
        with pytest.raises(SweepError):
            parse_lrs(bad)


@pytest.mark.parametrize("args, message", [
    (["--methods", "baseline,qk_nrom", "--lrs", "1e-3"], "unknown method 'qk_nrom'"),
    (["--methods", "baseline", "--lrs", "1e-3,oops"], "--lrs 1e-3,oops"),
    (["--methods", "baseline", "--lrs", "1e-3", "model.num_attention_heads=3"],
     "method baseline at lr 0.001: model.hidden_size=128 is not divisible"),
    (["--methods", "baseline", "--lrs", "1e-3", "--nproc", "2", "parallel.tp=4"],
     "world size 2 is not divisible"),
    (["--methods", "baseline", "--lrs", "1e-3", "--seeds", "1,one"], "--seeds 1,one"),
    (["--methods", "baseline", "--lrs", "1e-3", "--seeds", "2,2"], "a seed is listed twice"),
    (["--methods", "baseline", "--lrs", "1e-3,1e-2", "--headline-lrs", "1e-3,3e-3"],
     "headline LRs 0.003 are not in the grid"),
    (["--methods", "baseline", "--lrs", "1e-3", "--seeds", "1,2", "model.num_attention_heads=3"],
     "method baseline seed 1 at lr 0.001"),
])
def test_bad_sweeps_stop_with_one_line_before_running(args, message, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main([str(REPRO), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def seeded(method: str, seed: int, losses: dict[float, float | None]) -> list[SweepRun]:
    return [SweepRun(method=method, lr=lr, status="done" if loss is not None else "diverged",
                     seed=seed, initial_loss=L0, val_loss=loss) for lr, loss in losses.items()]


def test_seeded_summary_means_stds_headline_grid_and_resolution():
    from stable_megatron.analysis.sweep_table import (
        Spread,
        resolved,
        seeded_loss_grid,
        seeded_table,
        summarise_seeds,
    )

    rows = [
        # A: per seed, headline grid (1e-3, 1e-2) sensitivities 0.5, 0.7, 0.6; best 4.0-4.2;
        # lr 1 diverges in every seed (adds (7 - best) / 3 to every full-grid sensitivity)
        *seeded("A", 1, {1e-3: 4.5, 1e-2: 4.0, 1.0: None}),
        *seeded("A", 2, {1e-3: 4.8, 1e-2: 4.1, 1.0: None}),
        *seeded("A", 3, {1e-3: 4.8, 1e-2: 4.2, 1.0: None}),
        # B: sensitivities 0.05 in every seed (resolved against A); best 4.2 in every seed
        *seeded("B", 1, {1e-3: 4.3, 1e-2: 4.2, 1.0: None}),
        *seeded("B", 2, {1e-3: 4.3, 1e-2: 4.2, 1.0: None}),
        *seeded("B", 3, {1e-3: 4.3, 1e-2: 4.2, 1.0: None}),
    ]
    a, b = summarise_seeds(rows, ["A", "B"], headline_lrs=[1e-3, 1e-2])
    assert a.seeds == [1, 2, 3] and a.complete and a.complete_seeds == 3
    assert a.headline_sensitivity == pytest.approx([0.25, 0.35, 0.3])
    assert a.sensitivity.mean == pytest.approx(0.3) and a.sensitivity.std == pytest.approx(0.05)
    assert a.best_loss.mean == pytest.approx(4.1) and a.best_loss.std == pytest.approx(0.1)
    # the full grid adds lr 1 (a diverged run: L0 - best) to each seed's mean
    full = [(0.5 + 0 + 3.0) / 3, (0.7 + 0 + 2.9) / 3, (0.6 + 0 + 2.8) / 3]
    assert a.full_sensitivity.mean == pytest.approx(sum(full) / 3)
    assert b.sensitivity.mean == pytest.approx(0.05) and b.sensitivity.std == pytest.approx(0.0)
    assert resolved(b.sensitivity, a.sensitivity) is True  # 0.25 > 2 x 0.05
    assert resolved(b.best_loss, a.best_loss) is False  # 0.1 < 2 x 0.1
    assert resolved(Spread(1.0, None, 1), a.sensitivity) is None
    table = "\n".join(seeded_table([a, b], "A"))
    assert "| A | 3/3 | 3/9 | 0.300 ± 0.050 | - | 4.100 ± 0.100 | - |" in table
    assert "| B | 3/3 | 3/9 | 0.050 ± 0.000 | -0.250 (resolved) | 4.200 ± 0.000 | " \
           "+0.100 (within noise) |" in table
    from stable_megatron.analysis.sweep_table import resolution_matrix

    matrix = resolution_matrix([a, b], lambda s: s.sensitivity)
    assert matrix[2:] == ["| A | - | > |", "| B | < | - |"]
    assert resolution_matrix([a, b], lambda s: s.best_loss)[2:] == ["| A | - | ~ |",
                                                                      "| B | ~ | - |"]
    grid = "\n".join(seeded_loss_grid(rows, ["A", "B"]))
    assert "| A | 4.700 ± 0.173 | 4.100 ± 0.100 | 7.000 ± 0.000 (3 div) |" in grid


def test_a_seed_with_a_pending_run_counts_in_no_spread():
    from stable_megatron.analysis.sweep_table import summarise_seeds

    rows = [*seeded("A", 1, {1e-3: 4.5, 1e-2: 4.0}), *seeded("A", 2, {1e-3: 4.8})]
    rows.append(SweepRun(method="A", lr=1e-2, status="pending", seed=2))
    (a,) = summarise_seeds(rows, ["A"])
    assert not a.complete and a.complete_seeds == 1
    assert a.headline_sensitivity[1] is None
    assert a.sensitivity.n == 1 and a.sensitivity.std is None and a.best_loss.mean == 4.0


def test_seeded_csv_round_trip_and_plot(tmp_path):
    rows = [*seeded("A", 1, {1e-3: 4.5, 1e-2: 4.0, 1.0: None}),
            *seeded("A", 2, {1e-3: 4.8, 1e-2: 4.1, 1.0: None})]
    write_csv(rows, tmp_path / "sweep.csv")
    back = read_csv(tmp_path / "sweep.csv")
    assert [(r.seed, r.lr, r.final_loss) for r in back] == \
        [(r.seed, r.lr, r.final_loss) for r in rows]
    from stable_megatron.report import main as report_main

    assert report_main(["--sweep-csv", str(tmp_path / "sweep.csv"), "--out",
                        str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report_main(["--sweep-csv", str(tmp_path / "nope.csv"), "--out", "x"]) == 2
