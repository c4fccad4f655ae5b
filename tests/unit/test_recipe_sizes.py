"""Every recipe's model built on the meta device (shapes only): its parameter count matches the
formulas of model/size.py block by block, the 830M recipes are within 1% of 830M, and each
listed parallel layout divides evenly at its world size."""

from __future__ import annotations

from pathlib import Path

import pytest

from stable_megatron.config import load_config, validate
from stable_megatron.model import size
from stable_megatron.plan import layout_overrides, recipe_layouts

pytestmark = pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning")

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))
CLUSTER = sorted((RECIPE_DIR / "rybakov_830m").glob("*.yaml")) + sorted(
    (RECIPE_DIR / "gpt2_depth").glob("*.yaml")
)




def _config(recipe: Path):
    cfg = load_config(recipe, ["parallel.tp=1", "parallel.pp=1"])
    validate(cfg, 1)  # resolves model.vocab_size
    return cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_meta_build_matches_formula(recipe, world_of_one):
    cfg = _config(recipe)
    m = cfg.model
    built = size.meta_block_params(cfg)
    assert built["embedding"] == size.embedding_params(m)
    assert built["layer"] == size.layer_params(m)
    assert built["layers"] == m.num_layers * size.layer_params(m)
    assert built["final_norm"] == size.final_norm_params(m)
    assert built["head"] == (0 if m.tie_embeddings else size.head_params(m))
    assert sum(v for k, v in built.items() if k != "layer") == size.total_params(cfg)
    (stage,) = size.stage_params(cfg, 1, 1)
    assert stage.per_rank == size.total_params(cfg)


@pytest.mark.parametrize("recipe", sorted((RECIPE_DIR / "rybakov_830m").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_830m_recipes_are_830m(recipe):
    cfg = _config(recipe)
    total = size.total_params(cfg)
    assert abs(total - 830e6) / 830e6 < 0.01, total
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (24, 1024, 16,
                                                                                 4096)
    assert (cfg.train.global_batch_size, cfg.train.grad_clip, cfg.train.precision) == (
        512, 1.0, "bf16")
    assert not m.tie_embeddings and m.vocab_size == 256000


def test_830m_baseline_count_is_the_one_stated():
    cfg = _config(RECIPE_DIR / "rybakov_830m" / "baseline.yaml")
    assert size.total_params(cfg) == 826_599_424
    assert "826,599,424" in (RECIPE_DIR / "rybakov_830m" / "base.yaml").read_text()


def test_830m_methods_are_the_papers_table():
    methods = {p.stem: _config(p).model for p in (RECIPE_DIR / "rybakov_830m").glob("*.yaml")}
    got = {k: (m.norm_placement, m.softmax_cap) for k, m in methods.items() if k != "base"}
    assert got == {
        "baseline": ("pre_ln", None), "qk_norm": ("qk_norm", None),
        "qk_fc_norm": ("qk_fc_norm", None), "qkv_norm": ("qkv_norm", None),
        "soft_cap": ("pre_ln", 50.0), "qk_norm_cap": ("qk_norm", 50.0),
    }


def test_gpt2_depth_recipes():
    got = {}
    for p in (RECIPE_DIR / "gpt2_depth").glob("l*.yaml"):
        m = _config(p).model
        assert (m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size) == (
            768, 12, 1024, 50304)
        got[p.stem] = (m.num_layers, m.attention)
    assert got == {f"l{n}_{kind}": (n, "standard" if kind == "baseline" else "mlra")
                   for n in (12, 24, 48) for kind in ("baseline", "mlra")}
    for p in (RECIPE_DIR / "gpt2_depth").glob("l*.yaml"):  # the count each recipe states
        stated = f"# {size.total_params(_config(p)):,} parameters"
        assert stated in p.read_text(), p.name
    assert size.total_params(_config(RECIPE_DIR / "gpt2_depth" / "l12_baseline.yaml")) == (
        124_475_904)


@pytest.mark.parametrize("recipe", CLUSTER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_layouts_divide_evenly_on_1_2_4_8_nodes(recipe):
    layouts = recipe_layouts(recipe)
    assert sorted(layouts) == [8, 16, 32, 64]  # 1, 2, 4, 8 nodes of 8 GPUs
    for world in layouts:
        cfg = load_config(recipe, layout_overrides(recipe, world))
        validate(cfg, world)
        m, p, t = cfg.model, cfg.parallel, cfg.train
        dp = world // (p.tp * p.pp)
        assert dp * p.tp * p.pp == world
        assert m.num_attention_heads % p.tp == 0 and m.num_layers % p.pp == 0
        assert t.global_batch_size % (t.micro_batch_size * dp) == 0
