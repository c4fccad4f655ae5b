"""Every shipped recipe loads and validates; `base:` inheritance in recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from stable_megatron.config import ConfigError, load_config, validate

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    validate(cfg, cfg.parallel.tp * cfg.parallel.pp)


def test_method_recipes_change_only_their_method():
    tiny = load_config(RECIPE_DIR / "tiny.yaml")
    qk_cap = load_config(RECIPE_DIR / "methods" / "qk_norm_cap.yaml")
    assert (qk_cap.model.norm_placement, qk_cap.model.softmax_cap) == ("qk_norm", 50.0)
    assert qk_cap.train.run_dir == "runs/qk_norm_cap"
    assert qk_cap.model.hidden_size == tiny.model.hidden_size
    assert qk_cap.train.steps == tiny.train.steps


def test_base_is_merged_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {num_layers: 6, hidden_size: 64}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {num_layers: 2}\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.num_attention_heads=2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (
        2, 64, 2
    )


def test_base_cycle_and_bad_base_are_one_line_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "c.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="base must be a path"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_config(tmp_path / "d.yaml")
