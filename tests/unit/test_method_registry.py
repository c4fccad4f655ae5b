"""One home per stability method: each method's config key is named in its own module of
stable_megatron/methods/ and in at most two other modules, each of which says in a docstring
why; the rest of the package reaches the methods through the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stable_megatron import methods

PACKAGE = Path(__file__).resolve().parents[2] / "stable_megatron"

# config key -> (its method's module, {other module: why it names the key})
HOMES = {
    "sigma_reparam": ("methods/sigma_reparam.py", {
        "model/sigma_reparam.py": "the tensor-parallel layers and their power iteration",
        "config/rules.py": "the rules between two methods (with MLRA, with QK-clip)",
    }),
    "mlra": ("methods/mlra.py", {
        "model/mlra.py": "the low-rank layers and their tensor-parallel sharding",
        "config/rules.py": "the rule with sigma-reparam (the slots MLRA replaces)",
    }),
    "qk_clip": ("methods/qk_clip.py", {
        "model/qk_clip.py": "the per-head maxima and the scaling of q and k",
        "config/rules.py": "the rules with the head norms and with sigma-reparam on qkv",
    }),
    "norm_placement": ("methods/norms.py", {
        "config/rules.py": "QK-clip cannot bound logits that head norms normalise",
        "methods/softmax_cap.py": "[B]'s QK-norm + cap variant",
    }),
    "softmax_cap": ("methods/softmax_cap.py", {
        "model/attention.py": "the attention kernels apply the cap",
        "metrics/attention.py": "the logits are measured before and after the cap",
    }),
    "z_loss": ("methods/z_loss.py", {
        "model/loss.py": "the term over vocabulary-parallel logits",
        "metrics/logits.py": "the logged term, reduced over ranks",
    }),
    "attention_gate": ("methods/gated_attention.py", {
        "checkpoint/format.py": "the example of a key added with a model-preserving default",
    }),
    "embedding_norm": ("methods/embedding.py", {
        "model/gpt.py": "the embedding block applies it",
        "model/size.py": "the embedding block's parameter count",
    }),
    "scale_embeddings": ("methods/embedding.py", {
        "model/gpt.py": "the embedding block applies it",
    }),
}


def modules_naming(key: str) -> set[str]:
    """What `git grep -l <key> -- stable_megatron` lists, without needing git."""
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if key in p.read_text()}


def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def test_every_method_key_is_listed():
    keys = {f.name for m in methods.methods() for f in m.fields}
    assert keys >= set(HOMES) and {"attention", "mlra"} <= keys
    assert keys - set(HOMES) == {"attention"}  # MLRA's switch: a word used everywhere


@pytest.mark.parametrize("key", sorted(HOMES))
def test_a_method_key_lives_in_its_module_and_at_most_two_others(key):
    own, others = HOMES[key]
    assert len(others) <= 2
    assert modules_naming(key) == {own, *others}


@pytest.mark.parametrize("key,other", [(k, o) for k, (_, others) in sorted(HOMES.items())
                                       for o in others])
def test_each_other_module_says_in_a_docstring_why_it_names_the_key(key, other):
    assert key in docstrings(PACKAGE / other), f"{other} names {key} in code only"


def test_the_check_sees_a_new_mention(tmp_path, monkeypatch):
    """The lists can fail: a module that names a key is found."""
    fake = tmp_path / "stable_megatron"
    (fake / "methods").mkdir(parents=True)
    (fake / "methods" / "z_loss.py").write_text("z_loss = 1\n")
    (fake / "train.py").write_text("x = cfg.model.z_loss\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert modules_naming("z_loss") == {"methods/z_loss.py", "train.py"}


def test_every_built_in_module_registers_one_method():
    names = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base",
                                                                    "registry"}
    homes = {m.name: type(m).__module__.rsplit(".", 1)[-1] for m in methods.methods()}
    assert sorted(homes.values()) == sorted(names)


def test_registering_a_taken_name_or_key_is_refused():
    class Again(methods.Method):
        name = "z_loss"

    class TakesKey(methods.Method):
        name = "another_z_loss"
        fields = (methods.Field("z_loss", float, 0.0),)

    class TakesModelKey(methods.Method):
        name = "hidden"
        fields = (methods.Field("hidden_size", int, 1),)

    with pytest.raises(ValueError, match="registered already"):
        methods.register(Again())
    with pytest.raises(ValueError, match="model.z_loss belongs to z_loss"):
        methods.register(TakesKey())
    with pytest.raises(ValueError, match="model.hidden_size belongs to the model config"):
        methods.register(TakesModelKey())


def test_layer_edits_replace_linears_before_wrapping_them():
    """sigma-reparam and MLRA replace linears; the Proj/FC2 output norm wraps what is there."""
    order = [m.name for m in methods.methods()]
    assert order.index("sigma_reparam") < order.index("norm_placement")
    assert order.index("mlra") < order.index("norm_placement")


def test_the_plugin_variable_names_the_module_it_cannot_import(monkeypatch):
    from stable_megatron.methods import registry

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_methods", {})
    monkeypatch.setenv(methods.PLUGINS_ENV, "no_such_package.method")
    with pytest.raises(ImportError, match="STABLE_MEGATRON_METHODS.*no_such_package.method"):
        registry.methods()


def test_the_readme_methods_table_covers_every_registered_method():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Stability methods"):readme.index("## Results at CPU scale")]
    missing = [f"model.{f.name}" for m in methods.methods() for f in m.fields
               if f"`model.{f.name}" not in table and f.name != "mlra"]
    assert not missing  # model.mlra.* are MLRA's options, switched on by model.attention=mlra
