"""Config loading, overrides, validation and the CLI's error path: fast, no process groups."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from itertools import pairwise
from pathlib import Path

import pytest

from stable_megatron import train as train_mod
from stable_megatron.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    validate,
)
from stable_megatron.train import lr_at, main, strip_launcher_args

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

RECIPE = """\
# a small recipe
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  position_embedding: rope
parallel:
  tp: 2
train:
  steps: 20
  lr: 0.002
  min_lr: 0.0002
  precision: bf16
logging:
  wandb: false
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(recipe=None, overrides=None) -> str:
    """The message of the ConfigError that load_config raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def validate_error(cfg: Config, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def make(**sections) -> Config:
    """A config from per-section dicts, e.g. make(model={"num_layers": 4})."""
    return config_from_dict({name: dict(values) for name, values in sections.items()})


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def literal_fields() -> list[tuple[str, tuple]]:
    out = []
    for section, cls in SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                out.append((f"{section}.{name}", typing.get_args(tp)))
    return out


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    # main() reads WORLD_SIZE; a launcher's environment must not leak into these tests.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------
# Loading a recipe


def test_defaults_without_recipe():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.vocab_size is None
    assert cfg.model.ffn_size == 4 * cfg.model.hidden_size
    assert cfg.checkpoint_dir == Path(cfg.train.run_dir) / "checkpoints"


def test_load_recipe_from_tmp_path(tmp_path):
    cfg = load_config(write(tmp_path, RECIPE))
    assert cfg.model.num_layers == 4
    assert cfg.model.hidden_size == 64
    assert cfg.model.position_embedding == "rope"
    assert cfg.parallel.tp == 2
    assert cfg.train.steps == 20
    assert cfg.train.lr == 0.002 and isinstance(cfg.train.lr, float)
    assert cfg.train.precision == "bf16"
    assert cfg.logging.wandb is False
    # Keys the recipe does not set keep their defaults, including whole sections.
    assert cfg.model.seq_length == ModelConfig().seq_length
    assert cfg.parallel.pp == 1
    assert cfg.data == DataConfig()
    assert cfg.checkpoint == CheckpointConfig()


def test_load_accepts_str_and_path(tmp_path):
    path = write(tmp_path, RECIPE)
    assert load_config(str(path)) == load_config(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model:\n", "model: {}\ntrain:\n"])
def test_empty_recipe_and_empty_sections_give_defaults(tmp_path, text):
    assert load_config(write(tmp_path, text)) == Config()


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, RECIPE), ["model.vocab_size=300", "train.lr=0.00025"])
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


# --------------------------------------------------------------------------------------------
# Overrides


def test_dotted_overrides_basic(tmp_path):
    cfg = load_config(
        write(tmp_path, RECIPE),
        ["model.num_layers=8", "train.lr=0.0003", "parallel.tp=4", "data.train_prefix=/x"],
    )
    assert cfg.model.num_layers == 8
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tp == 4
    assert cfg.data.train_prefix == "/x"
    # Untouched recipe values survive an override in the same section.
    assert cfg.model.hidden_size == 64
    assert cfg.train.steps == 20


def test_override_model_num_layers_without_recipe():
    assert load_config(None, ["model.num_layers=4"]).model.num_layers == 4


def test_override_parallel_tp_is_int():
    cfg = load_config(None, ["parallel.tp=2"])
    assert cfg.parallel.tp == 2 and type(cfg.parallel.tp) is int


@pytest.mark.parametrize("raw, expected", [("3e-4", 3e-4), ("1E-5", 1e-5), ("2e3", 2000.0)])
def test_override_float_in_exponent_notation(raw, expected):
    cfg = load_config(None, [f"train.lr={raw}"])
    assert cfg.train.lr == pytest.approx(expected) and isinstance(cfg.train.lr, float)


def test_recipe_float_in_exponent_notation(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n  min_lr: 3e-5\n"))
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.min_lr == pytest.approx(3e-5)


def test_override_float_with_a_dot_in_exponent_notation():
    assert load_config(None, ["train.lr=3.0e-4"]).train.lr == pytest.approx(3e-4)


def test_path_override_stays_a_string():
    cfg = load_config(None, ["data.train_prefix=/data/corpus_text_document"])
    assert cfg.data.train_prefix == "/data/corpus_text_document"


@pytest.mark.parametrize(
    "override, section, name, expected",
    [
        ("logging.wandb=true", "logging", "wandb", True),
        ("logging.tensorboard=false", "logging", "tensorboard", False),
        ("checkpoint.resume=False", "checkpoint", "resume", False),
        ("model.tie_embeddings=True", "model", "tie_embeddings", True),
        ("model.add_bias_linear=false", "model", "add_bias_linear", False),
    ],
)
def test_boolean_overrides(override, section, name, expected):
    value = getattr(getattr(load_config(None, [override]), section), name)
    assert value is expected


@pytest.mark.parametrize("override", ["model.vocab_size=null", "model.vocab_size=~",
                                      "model.vocab_size="])
def test_null_overrides_an_optional_field(tmp_path, override):
    recipe = write(tmp_path, "model:\n  vocab_size: 500\n")
    assert load_config(recipe).model.vocab_size == 500
    assert load_config(recipe, [override]).model.vocab_size is None


def test_optional_int_accepts_int():
    cfg = load_config(None, ["model.vocab_size=512", "model.ffn_hidden_size=300"])
    assert cfg.model.vocab_size == 512
    assert cfg.model.ffn_size == 300


@pytest.mark.parametrize(
    "override, section, name",
    [
        ("train.lr=1", "train", "lr"),
        ("train.min_lr=0", "train", "min_lr"),
        ("model.rope_base=500000", "model", "rope_base"),
        ("train.grad_clip=2", "train", "grad_clip"),
    ],
)
def test_ints_are_accepted_for_floats(override, section, name):
    value = getattr(getattr(load_config(None, [override]), section), name)
    assert type(value) is float
    assert value == float(override.split("=")[1])


def test_int_in_recipe_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n  weight_decay: 0\n"))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float


def test_overrides_beat_recipe_and_last_override_wins(tmp_path):
    cfg = load_config(write(tmp_path, RECIPE), ["train.steps=5", "train.steps=7"])
    assert cfg.train.steps == 7


def test_override_value_may_contain_equals():
    cfg = load_config(None, ["train.run_dir=runs/a=b"])
    assert cfg.train.run_dir == "runs/a=b"


def test_parse_overrides_builds_a_tree():
    tree = parse_overrides(["model.num_layers=4", "train.lr=0.5", "model.vocab_size=null",
                            "data.source=indexed"])
    assert tree == {
        "model": {"num_layers": 4, "vocab_size": None},
        "train": {"lr": 0.5},
        "data": {"source": "indexed"},
    }


def test_parse_overrides_empty():
    assert parse_overrides([]) == {}


# --------------------------------------------------------------------------------------------
# Rejected recipes and overrides


@pytest.mark.parametrize(
    "override, field_name",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=true", "train.steps"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("model.num_layers=[1, 2]", "model.num_layers"),
        ("model.vocab_size=big", "model.vocab_size"),
        ("logging.wandb=1", "logging.wandb"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("parallel.tp=2.0", "parallel.tp"),
        ("train.run_dir=[a]", "train.run_dir"),
        ("data.train_prefix={a: 1}", "data.train_prefix"),
    ],
)
def test_wrong_types_are_rejected_naming_the_field(override, field_name):
    message = config_error(None, [override])
    assert message.startswith(f"{field_name}:"), message
    assert "expected" in message


def test_wrong_type_message_says_what_was_expected_and_got():
    message = config_error(None, ["train.steps=abc"])
    assert "int" in message and "'abc'" in message


def test_wrong_type_in_recipe_names_the_field(tmp_path):
    message = config_error(write(tmp_path, "train:\n  micro_batch_size: four\n"))
    assert "train.micro_batch_size" in message and "'four'" in message


@pytest.mark.parametrize("dotted, choices", literal_fields())
def test_literal_fields_reject_invalid_choices_and_list_valid_ones(dotted, choices):
    message = config_error(None, [f"{dotted}=bogus"])
    assert dotted in message and "'bogus'" in message
    for choice in choices:
        assert repr(choice) in message


@pytest.mark.parametrize("dotted, choices", literal_fields())
def test_literal_fields_accept_every_valid_choice(dotted, choices):
    section, name = dotted.split(".")
    for choice in choices:
        assert getattr(getattr(load_config(None, [f"{dotted}={choice}"]), section), name) == choice


def test_unknown_top_level_key_in_yaml(tmp_path):
    message = config_error(write(tmp_path, "model:\n  num_layers: 2\noptimizer:\n  lr: 1\n"))
    assert "unknown key optimizer" in message
    for section in SECTIONS:
        assert section in message


def test_unknown_nested_key_in_yaml(tmp_path):
    message = config_error(write(tmp_path, "model:\n  num_layer: 2\n"))
    assert "unknown key model.num_layer" in message
    for name in field_names(ModelConfig):
        assert name in message


def test_unknown_top_level_key_as_override():
    message = config_error(None, ["modle.num_layers=4"])
    assert "unknown key modle" in message
    for section in SECTIONS:
        assert section in message


@pytest.mark.parametrize("section", list(SECTIONS))
def test_unknown_nested_key_as_override(section):
    message = config_error(None, [f"{section}.nonexistent_key=1"])
    assert f"unknown key {section}.nonexistent_key" in message
    for name in field_names(SECTIONS[section]):
        assert name in message


def test_unknown_key_in_override_is_reported_with_a_recipe(tmp_path):
    message = config_error(write(tmp_path, RECIPE), ["train.learning_rate=0.1"])
    assert "unknown key train.learning_rate" in message and "lr" in message


@pytest.mark.parametrize("item", ["train.steps", "train.steps:5", "model"])
def test_override_without_equals(item):
    message = config_error(None, [item])
    assert repr(item) in message and "key=value" in message


def test_override_into_a_scalar_is_rejected():
    message = config_error(None, ["model.num_layers=4", "model.num_layers.x=1"])
    assert "model.num_layers.x" in message and "not a section" in message


def test_override_below_a_recipe_scalar_is_rejected(tmp_path):
    message = config_error(write(tmp_path, RECIPE), ["train.steps.x=1"])
    assert "train.steps" in message


def test_section_given_a_scalar_is_rejected():
    message = config_error(None, ["model=3"])
    assert message.startswith("model:") and "mapping" in message


@pytest.mark.parametrize("text", ["model: 0\n", "model: false\n", "model: []\n"])
def test_section_given_a_falsy_non_mapping_is_rejected(tmp_path, text):
    message = config_error(write(tmp_path, text))
    assert "model" in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  hidden_size: [64\ntrain:\n  steps: 3\n")
    message = config_error(path)
    assert str(path) in message and "invalid YAML" in message
    assert "line " in message
    line = int(message.split("line ")[1].split(":")[0])
    assert 3 <= line <= 5


def test_invalid_yaml_bad_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n hidden_size: 64\n")
    message = config_error(path)
    assert str(path) in message and "line 3" in message


def test_invalid_yaml_control_character_message_is_one_line(tmp_path):
    config_error(write(tmp_path, "train:\n  steps: 5\x01\n"))


def test_recipe_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"train:\n  steps: \xff\xfe\n")
    assert str(path) in config_error(path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"),
                                        ("42\n", "int")])
def test_recipe_that_is_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message and "mapping" in message and kind in message


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "no such file" in message


def test_recipe_that_is_a_directory(tmp_path):
    assert str(tmp_path) in config_error(tmp_path)


def test_unknown_keys_of_mixed_types(tmp_path):
    message = config_error(write(tmp_path, "train:\n  1: a\n  foo: b\n"))
    assert "unknown key" in message


# --------------------------------------------------------------------------------------------
# validate()


def test_default_config_is_valid():
    validate(Config(), 1)
    validate(Config(), 2)


@pytest.mark.parametrize("world_size", [4, 8, 16, 32])
def test_valid_config_passes_at_several_world_sizes(world_size):
    cfg = make(
        model={"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4},
        parallel={"tp": 2, "pp": 2},
        train={"micro_batch_size": 2, "global_batch_size": 16},
    )
    validate(cfg, world_size)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_valid_tensor_parallel_sizes(tp):
    cfg = make(model={"hidden_size": 64, "num_attention_heads": 8}, parallel={"tp": tp},
               train={"micro_batch_size": 1, "global_batch_size": 8})
    validate(cfg, tp)


def test_heads_not_divisible_by_tp():
    cfg = make(model={"hidden_size": 96, "num_attention_heads": 6}, parallel={"tp": 4})
    message = validate_error(cfg, 4)
    assert "model.num_attention_heads=6" in message and "parallel.tp=4" in message
    assert "valid tp: 1, 2, 3, 6" in message


def test_hidden_not_divisible_by_heads():
    cfg = make(model={"hidden_size": 100, "num_attention_heads": 8})
    message = validate_error(cfg)
    assert "model.hidden_size=100" in message and "model.num_attention_heads=8" in message


def test_ffn_not_divisible_by_tp():
    cfg = make(model={"ffn_hidden_size": 301}, parallel={"tp": 2})
    assert "model.ffn_hidden_size=301" in validate_error(cfg, 2)


def test_rope_needs_even_head_dim():
    cfg = make(model={"hidden_size": 12, "num_attention_heads": 4, "position_embedding": "rope"})
    assert "model.position_embedding" in validate_error(cfg)


def test_layers_not_divisible_by_pp():
    cfg = make(model={"num_layers": 6}, parallel={"pp": 4})
    message = validate_error(cfg, 4)
    assert "model.num_layers=6" in message and "parallel.pp=4" in message
    assert "valid pp: 1, 2, 3, 6" in message


@pytest.mark.parametrize("world_size, tp, pp", [(1, 2, 1), (3, 2, 1), (6, 2, 2), (2, 1, 4)])
def test_world_size_not_divisible_by_tp_times_pp(world_size, tp, pp):
    cfg = make(model={"num_layers": 4}, parallel={"tp": tp, "pp": pp})
    message = validate_error(cfg, world_size)
    assert f"world size {world_size}" in message and str(tp * pp) in message


def test_global_batch_not_multiple_of_micro_batch_times_dp():
    # world 8 / (tp 2 * pp 2) -> dp 2; 4 * 2 = 8 does not divide 12.
    cfg = make(
        model={"num_layers": 4},
        parallel={"tp": 2, "pp": 2},
        train={"micro_batch_size": 4, "global_batch_size": 12},
    )
    message = validate_error(cfg, 8)
    assert "train.global_batch_size=12" in message
    assert "4 * 2 = 8" in message
    # The same batch sizes are fine when dp is 1 (world 4) ...
    validate(cfg, 4)
    # ... and with dp 3 (world 12): 4 * 3 = 12.
    validate(cfg, 12)


def test_dp_is_world_over_tp_times_pp():
    cfg = make(parallel={"tp": 2}, train={"micro_batch_size": 1, "global_batch_size": 6})
    validate(cfg, 2)   # dp 1
    validate(cfg, 6)   # dp 3
    message = validate_error(cfg, 8)  # dp 4
    assert "1 * 4 = 4" in message


def test_min_lr_above_lr():
    cfg = make(train={"lr": 1e-3, "min_lr": 2e-3})
    message = validate_error(cfg)
    assert "train.min_lr" in message and "train.lr" in message


def test_min_lr_equal_to_lr_is_valid():
    validate(make(train={"lr": 1e-3, "min_lr": 1e-3}), 1)


def test_negative_min_lr():
    assert "train.min_lr" in validate_error(make(train={"min_lr": -1e-5}))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_at_pipeline_size_1(stage):
    validate(make(parallel={"zero_stage": stage}), 1)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_2_and_3_refused_with_pipeline_parallelism(stage):
    message = validate_error(make(model={"num_layers": 4},
                                  parallel={"zero_stage": stage, "pp": 2}), 2)
    assert f"parallel.zero_stage={stage}" in message and "parallel.pp=2" in message


def test_zero_stage_0_refuses_bf16():
    message = validate_error(make(parallel={"zero_stage": 0}, train={"precision": "bf16"}))
    assert "parallel.zero_stage=0" in message and "train.precision=bf16" in message


def test_muon_refuses_zero_stage_3():
    message = validate_error(make(parallel={"zero_stage": 3}, train={"optimizer": "muon"}))
    assert "train.optimizer=muon" in message and "parallel.zero_stage=3" in message


def test_zero_stage_out_of_range():
    assert "parallel.zero_stage=7" in validate_error(make(parallel={"zero_stage": 7}))


def test_zero_stage_out_of_range_message_lists_only_accepted_values():
    message = validate_error(make(parallel={"zero_stage": 7}))
    assert "valid values: 0, 1, 2, 3" in message  # each of them at pipeline size 1


@pytest.mark.parametrize(
    "section, name, value",
    [
        ("model", "num_layers", 0),
        ("model", "hidden_size", -64),
        ("model", "num_attention_heads", 0),
        ("model", "seq_length", 0),
        ("model", "vocab_size", 0),
        ("model", "vocab_pad_multiple", 0),
        ("parallel", "tp", 0),
        ("parallel", "pp", 0),
        ("train", "steps", 0),
        ("train", "micro_batch_size", 0),
        ("train", "global_batch_size", 0),
        ("train", "lr", 0),
        ("train", "log_interval", 0),
        ("train", "warmup_steps", -1),
        ("train", "eval_interval", -1),
        ("train", "eval_iters", -1),
    ],
)
def test_non_positive_values(section, name, value):
    message = validate_error(make(**{section: {name: value}}))
    assert f"{section}.{name}" in message


def test_indexed_without_train_prefix(tmp_path):
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    cfg = make(data={"source": "indexed", "tokenizer_model": str(tok)})
    message = validate_error(cfg)
    assert "data.train_prefix" in message and "data.source=indexed" in message


def test_indexed_without_tokenizer_model(tmp_path):
    prefix = tmp_path / "train"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    cfg = make(data={"source": "indexed", "train_prefix": str(prefix)})
    assert "data.tokenizer_model" in validate_error(cfg)


@pytest.mark.parametrize("present, missing", [(".idx", ".bin"), (".bin", ".idx"), (None, ".bin")])
def test_indexed_prefix_with_missing_file(tmp_path, present, missing):
    prefix = tmp_path / "corpus_text_document"
    if present:
        Path(f"{prefix}{present}").write_bytes(b"")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    cfg = make(data={"source": "indexed", "train_prefix": str(prefix),
                     "tokenizer_model": str(tok)})
    message = validate_error(cfg)
    assert "data.train_prefix" in message
    assert f"{prefix}{missing}" in message


def test_indexed_val_prefix_with_missing_file(tmp_path):
    train_prefix, val_prefix = tmp_path / "train", tmp_path / "val"
    for suffix in (".bin", ".idx"):
        Path(f"{train_prefix}{suffix}").write_bytes(b"")
    Path(f"{val_prefix}.bin").write_bytes(b"")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    cfg = make(data={"source": "indexed", "train_prefix": str(train_prefix),
                     "val_prefix": str(val_prefix), "tokenizer_model": str(tok)})
    message = validate_error(cfg)
    assert "data.val_prefix" in message and f"{val_prefix}.idx" in message


def test_indexed_tokenizer_model_missing(tmp_path):
    prefix = tmp_path / "train"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    missing = tmp_path / "missing.model"
    cfg = make(data={"source": "indexed", "train_prefix": str(prefix),
                     "tokenizer_model": str(missing)})
    message = validate_error(cfg)
    assert "data.tokenizer_model" in message and str(missing) in message


def indexed_files(tmp_path, tokenizer: bytes | None = None) -> dict:
    """Empty .bin/.idx files and a real sentencepiece model (or the given bytes)."""
    for name in ("train", "val"):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"{name}{suffix}").write_bytes(b"")
    tok = tmp_path / "tok.model"
    if tokenizer is None:
        from stable_megatron.data.tokenizer import train_tokenizer

        text = tmp_path / "text.txt"
        text.write_text("\n".join(f"line {i} of plain words" for i in range(200)))
        train_tokenizer([text], tmp_path / "tok", vocab_size=300)
    else:
        tok.write_bytes(tokenizer)
    return {"source": "indexed", "train_prefix": str(tmp_path / "train"),
            "val_prefix": str(tmp_path / "val"), "tokenizer_model": str(tok)}


def test_indexed_with_all_files_is_valid_and_takes_the_tokenizers_vocabulary(tmp_path):
    cfg = make(data=indexed_files(tmp_path))
    validate(cfg, 1)
    assert cfg.data.vocab_size == cfg.tokenizer_vocab_size == 300  # not the default 8192
    assert cfg.model.vocab_size == 300


def test_validation_leaves_a_final_config(tmp_path):
    """model.vocab_size is resolved by validation, not later by training; a model smaller
    than the tokenizer is refused there."""
    cfg = make()
    assert cfg.model.vocab_size is None
    validate(cfg, 1)
    assert cfg.model.vocab_size == cfg.data.vocab_size == 8192
    bigger = make(model={"vocab_size": 9000})
    validate(bigger, 1)
    assert (bigger.model.vocab_size, bigger.tokenizer_vocab_size) == (9000, 8192)
    message = validate_error(make(data=indexed_files(tmp_path), model={"vocab_size": 100}))
    assert "model.vocab_size=100" in message and "(300, data.vocab_size)" in message


def test_indexed_tokenizer_that_is_not_a_model_is_rejected(tmp_path):
    message = validate_error(make(data=indexed_files(tmp_path, tokenizer=b"x")))
    assert "data.tokenizer_model=" in message and "not a sentencepiece model" in message


def test_eval_iters_zero_with_eval_interval_is_rejected():
    message = validate_error(make(train={"eval_interval": 10, "eval_iters": 0}))
    assert "train.eval_iters=0" in message and "train.eval_interval" in message
    validate(make(train={"eval_interval": 0, "eval_iters": 0}), 1)  # evaluation off: accepted


# --------------------------------------------------------------------------------------------
# Methods: attention dropout, MLRA rank, defaults from the method dataclasses


@pytest.mark.parametrize("p", [0.1, 1e-6])
def test_attention_dropout_is_rejected(p):
    """No attention kernel applies dropout, so a non-zero probability (which HF exports would
    record as attn_pdrop) is refused rather than silently ignored."""
    message = validate_error(make(model={"attention_dropout": p}))
    assert message.startswith(f"model.attention_dropout={p}: must be 0"), message
    validate(make(model={"attention_dropout": 0.0}), 1)


@pytest.mark.parametrize("rank", [0, 33, 64])
def test_mlra_rank_outside_one_to_head_dim_is_rejected(rank):
    model = {"hidden_size": 128, "num_attention_heads": 4, "attention": "mlra",
             "mlra": {"rank": rank}}  # head dim 32
    message = validate_error(make(model=model))
    assert f"model.mlra.rank={rank}" in message and "between 1 and the head dim" in message
    assert "= 32" in message, message


@pytest.mark.parametrize("rank", [1, 16, 32])
def test_mlra_rank_up_to_head_dim_is_accepted(rank):
    validate(make(model={"hidden_size": 128, "num_attention_heads": 4, "attention": "mlra",
                         "mlra": {"rank": rank}}), 1)


def test_mlra_rank_default_is_half_the_head_dim():
    from stable_megatron.methods.mlra import MLRAConfig
    from stable_megatron.model.mlra import resolve_rank

    assert MLRAConfig().resolved_rank(64) == 32 and MLRAConfig(rank=5).resolved_rank(64) == 5
    assert resolve_rank(None, 64) == 32 and resolve_rank(5, 64) == 5  # the layers' default


# --------------------------------------------------------------------------------------------
# Every ConfigError is one line


BAD_OVERRIDES = [
    ["train.steps=abc"],
    ["train.steps"],
    ["foo=1"],
    ["model.foo=1"],
    ["model.position_embedding=alibi"],
    ["model.num_layers=4", "model.num_layers.x=1"],
    ["model=3"],
    ["train.run_dir=[a, b]"],
    ["train.steps=\"a\\nb\""],
]


@pytest.mark.parametrize("overrides", BAD_OVERRIDES)
def test_override_errors_are_one_line(overrides):
    config_error(None, overrides)


BAD_RECIPES = [
    "model:\n  hidden_size: [64\n",
    "- a\n- b\n",
    "model:\n  nope: 1\n",
    "nope:\n  a: 1\n",
    "train:\n  lr: [1, 2]\n",
    "train: |\n  multi\n  line\n",
    "model:\n  num_layers: 'a\n\n  b'\n",
    "a: b: c\n",
    "key: &a [*a\n",
]


@pytest.mark.parametrize("text", BAD_RECIPES)
def test_recipe_errors_are_one_line(tmp_path, text):
    config_error(write(tmp_path, text))


VALIDATE_CASES = [
    ({"model": {"hidden_size": 100, "num_attention_heads": 8}}, 1),
    ({"model": {"num_attention_heads": 4}, "parallel": {"tp": 3}}, 3),
    ({"model": {"num_layers": 3}, "parallel": {"pp": 2}}, 2),
    ({"parallel": {"tp": 2}}, 3),
    ({"train": {"global_batch_size": 6}}, 1),
    ({"train": {"min_lr": 1.0}}, 1),
    ({"parallel": {"zero_stage": 3, "pp": 2}, "model": {"num_layers": 4}}, 2),
    ({"parallel": {"zero_stage": 9}}, 1),
    ({"data": {"source": "indexed"}}, 1),
    ({"data": {"source": "indexed", "train_prefix": "/nonexistent/x",
               "tokenizer_model": "/nonexistent/t.model"}}, 1),
    ({"train": {"eval_iters": -1}}, 1),
    ({"model": {"vocab_size": -1}}, 1),
]


@pytest.mark.parametrize("sections, world_size", VALIDATE_CASES)
def test_validate_errors_are_one_line(sections, world_size):
    validate_error(make(**sections), world_size)


# --------------------------------------------------------------------------------------------
# train.main: user errors are one `error:` line and exit code 2, before any heavy work


@pytest.fixture
def no_training(monkeypatch):
    def fail(cfg):
        raise AssertionError("main() reached train() for a config that should be rejected")

    monkeypatch.setattr(train_mod, "train", fail)


def assert_one_error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_main_bad_override(tmp_path, capsys, no_training):
    assert main([str(write(tmp_path, RECIPE)), "train.steps=abc"]) == 2
    assert_one_error_line(capsys, "train.steps")


def test_main_unknown_key(tmp_path, capsys, no_training):
    assert main([str(write(tmp_path, RECIPE)), "model.depth=4"]) == 2
    assert_one_error_line(capsys, "unknown key model.depth", "num_layers")


def test_main_unknown_key_in_recipe(tmp_path, capsys, no_training):
    assert main([str(write(tmp_path, "trainer:\n  steps: 1\n"))]) == 2
    assert_one_error_line(capsys, "unknown key trainer")


def test_main_missing_recipe(tmp_path, capsys, no_training):
    path = tmp_path / "missing.yaml"
    assert main([str(path)]) == 2
    assert_one_error_line(capsys, str(path))


def test_main_override_without_equals(tmp_path, capsys, no_training):
    assert main([str(write(tmp_path, RECIPE)), "train.steps"]) == 2
    assert_one_error_line(capsys, "key=value")


def test_main_invalid_combination_uses_world_size(tmp_path, capsys, monkeypatch, no_training):
    recipe = str(write(tmp_path, RECIPE))  # tp 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main([recipe]) == 2
    assert_one_error_line(capsys, "world size 3")


def test_main_strips_launcher_args(tmp_path, capsys, no_training):
    path = tmp_path / "missing.yaml"
    assert main(["--local_rank=0", str(path), "train.steps=3"]) == 2
    assert_one_error_line(capsys, str(path))


def test_main_usage(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_main_valid_config_reaches_train(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train_mod, "train", seen.append)
    assert main([str(write(tmp_path, RECIPE)), "parallel.tp=1", "train.steps=3"]) == 0
    assert len(seen) == 1 and seen[0].train.steps == 3 and seen[0].parallel.tp == 1


def test_module_entry_point_subprocess(tmp_path):
    recipe = write(tmp_path, "- not\n- a mapping\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "stable_megatron.train", str(recipe)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(recipe) in lines[0]


# --------------------------------------------------------------------------------------------
# strip_launcher_args


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--local_rank=3", "r.yaml", "a=1"], ["r.yaml", "a=1"]),
        (["--local_rank", "3", "r.yaml", "a=1"], ["r.yaml", "a=1"]),
        (["r.yaml", "a=1", "--local_rank=3"], ["r.yaml", "a=1"]),
        (["r.yaml", "--local_rank", "3", "a=1"], ["r.yaml", "a=1"]),
        (["r.yaml", "a=1"], ["r.yaml", "a=1"]),
        ([], []),
    ],
)
def test_strip_launcher_args(argv, expected):
    assert strip_launcher_args(argv) == expected


def test_strip_launcher_args_does_not_mutate_input():
    argv = ["--local_rank", "0", "r.yaml"]
    strip_launcher_args(argv)
    assert argv == ["--local_rank", "0", "r.yaml"]


# --------------------------------------------------------------------------------------------
# lr_at


def schedule(**train) -> Config:
    return make(train={"lr": 1e-3, "min_lr": 1e-4, **train})


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(decay):
    cfg = schedule(steps=100, warmup_steps=10, lr_decay=decay)
    lrs = [lr_at(cfg, s) for s in range(10)]
    assert lrs[0] == pytest.approx(1e-3 / 10)
    assert lrs[-1] == pytest.approx(1e-3)
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-3 * (s + 1) / 10)
    diffs = [b - a for a, b in pairwise(lrs)]
    assert all(d == pytest.approx(1e-4) for d in diffs)


def test_cosine_reaches_min_lr_at_final_step():
    cfg = schedule(steps=100, warmup_steps=10, lr_decay="cosine")
    assert lr_at(cfg, 10) == pytest.approx(1e-3)  # first post-warmup step: peak
    assert lr_at(cfg, 55) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 150) == pytest.approx(1e-4)  # clamped past the end
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(b <= a + 1e-15 for a, b in pairwise(lrs))
    assert min(lrs) >= 1e-4 - 1e-15


def test_cosine_without_warmup():
    cfg = schedule(steps=20, warmup_steps=0, lr_decay="cosine")
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 20) == pytest.approx(1e-4)


def test_linear_decay():
    cfg = schedule(steps=30, warmup_steps=10, lr_decay="linear")
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 20) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(cfg, 30) == pytest.approx(1e-4)


@pytest.mark.parametrize("warmup", [0, 5])
def test_constant_stays_at_lr(warmup):
    cfg = schedule(steps=50, warmup_steps=warmup, lr_decay="constant")
    for step in range(warmup, 60):
        assert lr_at(cfg, step) == 1e-3


def test_warmup_longer_than_run():
    cfg = schedule(steps=5, warmup_steps=10, lr_decay="cosine")
    assert lr_at(cfg, 4) == pytest.approx(5e-4)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)


def test_train_recompute_defaults_to_none_and_reads_from_yaml(tmp_path):
    assert load_config(None).train.recompute == "none"
    recipe = write(tmp_path, "train:\n  recompute: none\n")  # YAML "none" is a string
    assert load_config(recipe).train.recompute == "none"
    assert load_config(recipe, ["train.recompute=full"]).train.recompute == "full"
    message = config_error(recipe, ["train.recompute=true"])
    assert message.startswith("train.recompute: expected 'none' | 'selective' | 'full'")


def test_validate_rejects_a_recompute_mode_set_in_code():
    cfg = make()
    cfg.train.recompute = "attention"
    assert validate_error(cfg) == (
        "train.recompute='attention': valid values: none, selective, full")
