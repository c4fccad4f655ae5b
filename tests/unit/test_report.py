"""`stable-megatron report`: the Markdown page and the figures of two short real runs, what each
figure drew, skipped figures and the run table on synthetic logs, and the one-line errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stable_megatron.analysis.plotting import plot_sweep
from stable_megatron.report import build_report, main
from tests.distributed.launch import cpu_env

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
TINY_RUN = [
    str(ROOT / "recipes" / "tiny.yaml"), "model.num_layers=2", "model.hidden_size=64",
    "model.seq_length=64", "data.vocab_size=1024", "train.steps=6", "train.micro_batch_size=4",
    "train.global_batch_size=4", "metrics.interval=2", "train.eval_interval=3",
    "train.eval_iters=1", "train.log_interval=1", "logging.tensorboard=false",
    "checkpoint.interval=0",
]
RUNS = {"baseline": [], "sigma_reparam": ["model.sigma_reparam.enabled=true", "train.lr=1e-2"]}


def layers(fmt: str) -> set[str]:
    return {fmt.format(layer=f"layer_{n:02d}") for n in (1, 2)}


def slots(fmt: str) -> set[str]:
    return {fmt.format(slot=s) for s in ("qkv", "proj", "fc1", "fc2")}


@pytest.fixture(scope="module")
def real_report(tmp_path_factory, data_cache):
    """Two 6-step runs (trained side by side), and the report built from them."""
    tmp = tmp_path_factory.mktemp("report")
    procs = {}
    for label, extra in RUNS.items():
        cmd = [sys.executable, "-m", "stable_megatron.train", *TINY_RUN, *extra,
               f"data.cache_dir={data_cache}", f"train.run_dir={tmp / label}"]
        procs[label] = subprocess.Popen(cmd, env=cpu_env(), cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for label, proc in procs.items():
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{label}:\n{out[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run_dirs = [tmp / label for label in RUNS]
    drawn = build_report(run_dirs, tmp / "out", labels=list(RUNS), title="two tiny runs")
    return tmp, drawn


def test_report_of_two_real_runs(real_report):
    tmp, drawn = real_report
    page = (tmp / "out" / "report.md").read_text()
    assert page.startswith("# two tiny runs\n")
    for label in RUNS:
        assert re.search(rf"^\| {label} \| `{re.escape(str(tmp / label))}` \| 6 \|", page, re.M)
    assert "Skipped" not in page
    for name in ("loss", "tev", "attn_entropy", "attn_logit", "out_norms", "grad_norms",
                 "sigma_gamma"):
        png = tmp / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5_000, name
        assert f"]({name}.png)" in page


def test_each_figure_drew_the_series_of_the_runs(real_report):
    tmp, drawn = real_report
    both = list(RUNS)
    expected = {
        "loss.png": {"loss", "val_ppl"},
        "tev.png": {"tev/mean"},  # tied embeddings: no tev_out
        "attn_entropy.png": layers("attn_entropy_norm/{layer}/min"),
        "attn_logit.png": layers("attn_logit_max/{layer}"),
        "out_norms.png": {k for f in slots("out_norm/{{layer}}/{slot}") for k in layers(f)},
        "grad_norms.png": {"grad_norm/total"} | layers("grad_norm/{layer}"),
    }
    for figure, keys in expected.items():
        assert sorted(drawn[figure]) == sorted((r, k) for r in both for k in keys), figure
    sigma_gamma = {k for name in ("sigma", "gamma")
                   for f in slots(name + "/{{layer}}/{slot}") for k in layers(f)}
    assert sorted(drawn["sigma_gamma.png"]) == sorted(("sigma_reparam", k) for k in sigma_gamma)
    # and each series drawn is one the run logged
    for label in RUNS:
        records = [json.loads(line) for line in (tmp / label / "metrics.jsonl").open()]
        logged = {k for r in records for k in r}
        assert {k for pairs in drawn.values() for r, k in pairs if r == label} <= logged


def write_log(run_dir: Path, losses: list[float], events: list[dict] | None = None) -> None:
    """Loss every step; a max attention logit every 2 steps."""
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, 1):
        record = {"step": step, "loss": loss}
        if step % 2 == 0:
            record["attn_logit_max/layer_01"] = 10.0 + step
        lines.append(json.dumps(record))
        lines += [json.dumps(e) for e in events or [] if e["step"] == step]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def table_row(page: str, label: str) -> dict[str, str]:
    header = next(line for line in page.splitlines() if line.startswith("| run |"))
    row = next(line for line in page.splitlines() if line.startswith(f"| {label} |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    return dict(zip(names, (c.strip() for c in row.strip("|").split("|")), strict=True))


def test_skipped_figures_and_the_run_table(tmp_path, capsys):
    falling = [9.0 - 0.1 * i for i in range(40)]
    write_log(tmp_path / "healthy", falling)
    # climbs from step 21: the loss rule alone would say step 26; the logged event wins
    climbing = falling[:20] + [7.0 + 0.2 * i for i in range(20)]
    write_log(tmp_path / "divergent", climbing, [
        {"step": 12, "event": "spike", "action": "log", "reasons": ["loss"]},
        {"step": 30, "event": "diverged", "reason": "loss above its first-step value"},
    ])
    write_log(tmp_path / "nan", falling[:10] + [math.nan])
    out = tmp_path / "out"
    assert main([str(tmp_path / d) for d in ("healthy", "divergent", "nan")]
                + ["--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (out / "report.md").read_text()
    assert table_row(page, "divergent")["spikes"] == "1 (first: step 12)"
    assert table_row(page, "divergent")["diverged at"] == "30"
    assert table_row(page, "nan")["diverged at"] == "11"  # the rule: a non-finite loss
    healthy = table_row(page, "healthy")
    assert (healthy["spikes"], healthy["diverged at"], healthy["steps"]) == ("0", "-", "40")
    assert healthy["final loss"] == "5.1"
    for figure, heading in (("tev.png", "Token embedding variability"),
                            ("sigma_gamma.png", "sigma-reparam"),
                            ("out_norms.png", "Output norms")):
        assert not (out / figure).exists()
        section = page.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert section.strip().startswith("Skipped: no run logged"), section
        assert f"({figure})" not in page
    assert (out / "loss.png").read_bytes()[:8] == PNG
    assert (out / "attn_logit.png").read_bytes()[:8] == PNG


def test_missing_run_dir_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stable_megatron", "report", str(tmp_path / "nope"), "--out",
         str(tmp_path / "out")], env=cpu_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "nope/metrics.jsonl: no such file" in lines[0]


def test_label_count_and_missing_matplotlib_are_one_line(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "run", [9.0, 8.0])
    args = [str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    assert main([*args, "--labels", "a", "b"]) == 2
    assert capsys.readouterr().err == "error: --labels: 2 labels for 1 run directories\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: matplotlib is not installed")


def test_plot_sweep_writes_a_png(tmp_path):
    rows = [{"method": m, "lr": lr, "loss": None if div else 5.0 + lr, "diverged": div,
             "initial_loss": 9.0}
            for m in ("baseline", "qk_norm")
            for lr, div in ((1e-3, False), (1e-2, False), (1e-1, m == "baseline"))]
    plot_sweep(rows, tmp_path / "sweep" / "lr.png", title="sweep")
    assert (tmp_path / "sweep" / "lr.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("flag, text, message", [
    ("--seeds", "2,x", "--seeds 2,x: expected comma-separated integers, e.g. 1,2,3"),
    ("--tune-seeds", "1,1", "--tune-seeds 1,1: a seed is listed twice"),
])
def test_bad_seed_lists_of_the_warning_score_are_one_line_naming_the_flag(tmp_path, capsys,
                                                                          flag, text, message):
    assert main(["--warnings", str(tmp_path), flag, text]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
