"""The package's shape, read from its source: dependencies point down, and DeepSpeed's
internals are reached from one module only (stable_megatron/ds_adapter.py)."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "stable_megatron"
ADAPTER = PACKAGE / "ds_adapter.py"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The stable_megatron modules `path` imports anywhere (top level or inside functions);
    `from pkg import name` counts `pkg.name` when that is a module, else `pkg`."""
    known, out = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                     else node.module for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "tools" and name.split(".")[0] != "stable_megatron":
                continue
            out.add(name)
            parts = name.split(".")  # importing a.b.c runs a/__init__ and a.b/__init__
            out.update(".".join(parts[:i]) for i in range(1, len(parts)) if
                       ".".join(parts[:i]) in known)
    return out


def reachable(start: str) -> set[str]:
    """Every module `start` can end up importing (transitively, lazy imports included)."""
    known, seen, todo = modules(), set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in known:
            todo.extend(imports_of(known[name]))
    return seen - {start}


LOWER = ("stable_megatron.model", "stable_megatron.metrics", "stable_megatron.stability",
         "stable_megatron.data", "stable_megatron.checkpoint", "stable_megatron.methods")
UPPER = ("stable_megatron.train", "stable_megatron.plan", "stable_megatron.cli",
         "stable_megatron.commands", "stable_megatron.bench", "stable_megatron.sweep",
         "stable_megatron.report", "tools")


def under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_never_import_the_loop_the_planner_or_the_tools(layer):
    lower = [name for name in modules() if under(name, (layer,))]
    assert lower, f"no modules under {layer}"
    bad = {name: sorted(n for n in reachable(name) if under(n, UPPER)) for name in lower}
    assert not {k: v for k, v in bad.items() if v}


def test_metrics_only_measure_they_never_import_the_stability_decisions():
    metrics = [name for name in modules() if under(name, ("stable_megatron.metrics",))]
    stability = [name for name in modules() if under(name, ("stable_megatron.stability",))]
    assert len(metrics) > 5 and len(stability) >= 4
    bad = {name: under_any(reachable(name), ("stable_megatron.stability",)) for name in metrics}
    assert not {k: v for k, v in bad.items() if v}


def test_the_plain_python_rules_load_without_torch():
    """The early-warning, spike and divergence rules and the plots replay logs without torch."""
    import subprocess

    names = ("stable_megatron.stability.warning", "stable_megatron.stability.divergence",
             "stable_megatron.stability.spikes", "stable_megatron.analysis.plotting")
    code = ("import sys; " + "; ".join(f"import {n}" for n in names)
            + "; print(sorted(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=120, check=True)  # -c: cwd comes first
    assert proc.stdout.strip() == "[]"


def test_no_sys_path_edits_anywhere_in_the_repository():
    """Scripts, workers and tests import the installed package (and a script its own folder);
    none edits the import path."""
    root = PACKAGE.parent
    needles = ("sys.path." + "insert", "sys.path." + "append")
    found = [f"{path.relative_to(root)}:{n}"
             for folder in ("stable_megatron", "tools", "tests", "launch")
             for path in sorted((root / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if any(needle in line for needle in needles)]
    assert not found, found


def test_reading_a_checkpoint_needs_no_writer():
    """inspect and generate read through the view; the view imports no writer."""
    for name in ("stable_megatron.checkpoint.view", "stable_megatron.generate",
                 "stable_megatron.commands.inspect_checkpoint"):
        assert "stable_megatron.checkpoint.export" not in reachable(name), name
    assert "stable_megatron.checkpoint.view" in reachable("stable_megatron.checkpoint.export")


def test_method_modules_load_without_torch():
    """The config loader reads the registry: the method modules reach the model code only
    inside the functions that build things."""
    import subprocess

    code = ("import sys; from stable_megatron import methods; methods.methods(); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_only_the_registry_wires_methods_into_the_loop_the_spec_and_the_exporters():
    """The Trainer, the layer spec, the metrics and the exporters name no method module."""
    for name in ("stable_megatron.train", "stable_megatron.model.spec",
                 "stable_megatron.metrics", "stable_megatron.checkpoint.export.hf_gpt2",
                 "stable_megatron.checkpoint.export.hf_llama", "stable_megatron.hooks"):
        direct = {n for n in imports_of(modules()[name])
                  if n.startswith("stable_megatron.methods.") and
                  n not in ("stable_megatron.methods.base", "stable_megatron.methods.registry")}
        assert not direct, (name, direct)


def test_the_engine_and_the_batches_sit_below_the_loop():
    for name in ("stable_megatron.engine", "stable_megatron.batches", "stable_megatron.resume",
                 "stable_megatron.watchdog"):
        assert name in modules()
        assert not under_any(reachable(name), UPPER), name


def test_training_imports_neither_the_planner_nor_the_export_code():
    reached = reachable("stable_megatron.train")
    assert "stable_megatron.checkpoint" in reached  # the graph sees lazy imports
    assert not under_any(reached, ("stable_megatron.plan", "stable_megatron.checkpoint.export"))


def under_any(names, roots) -> list[str]:
    return sorted(n for n in names if under(n, roots))


def test_the_import_graph_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a lazy import of the planner inside a function is found."""
    fake = tmp_path / "stable_megatron"
    (fake / "metrics").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "plan.py").write_text("")
    (fake / "metrics" / "__init__.py").write_text(
        "def f():\n    from stable_megatron.plan import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    modules.cache_clear()
    try:
        assert "stable_megatron.plan" in reachable("stable_megatron.metrics")
    finally:
        modules.cache_clear()


# --------------------------------------------------------------------------------------------
# DeepSpeed's private attributes


@cache
def deepspeed_private_names() -> frozenset[str]:
    """Every `_name` DeepSpeed's own source uses as an attribute (`x._name`)."""
    import deepspeed

    root = Path(deepspeed.__file__).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        names.update(re.findall(r"\.(_[A-Za-z]\w*)\b", path.read_text(errors="replace")))
    # torch's own private names (nn.Module's hook dicts, `_apply`, Tensor internals) are
    # used by DeepSpeed too, but are torch's
    import torch

    torch_names = set(vars(torch.nn.Module())) | set(dir(torch.nn.Module)) | set(dir(torch.Tensor))
    return frozenset(n for n in names if not n.endswith("__") and n not in torch_names)


FOREIGN = frozenset({"megatron", "torch", *sys.stdlib_module_names})


def foreign_aliases(tree: ast.AST) -> set[str]:
    """Names bound to modules of other libraries (megatron, torch, Python's own, e.g.
    `os._exit`): their private attributes are not DeepSpeed's."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in FOREIGN:
            out.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                       if alias.name.split(".")[0] in FOREIGN)
    return out


ENGINE_NAMES = re.compile(r"(^|_)(engine|optimizer|opt|pipe)$")


def private_uses(path: Path) -> list[str]:
    """`obj._name` reads or writes of a DeepSpeed private attribute (not on self / cls /
    super() / another library's module), and attribute stores, `setattr` or `__dict__` on
    an engine / optimizer / pipeline object: monkeypatching DeepSpeed."""
    tree = ast.parse(path.read_text())
    private, foreign = deepspeed_private_names(), foreign_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        base_name = base.id if isinstance(base, ast.Name) else (
            base.attr if isinstance(base, ast.Attribute) else None)
        if isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super":
            continue
        if base_name in ("self", "cls") or base_name in foreign:
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        if node.attr in private:
            found.append(f"{where}: .{node.attr}")
        elif base_name and ENGINE_NAMES.search(base_name) and (
                isinstance(node.ctx, ast.Store) or node.attr == "__dict__"):
            found.append(f"{where}: {base_name}.{node.attr} (patched)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and \
                node.args and isinstance(node.args[0], ast.Attribute | ast.Name):
            target = node.args[0]
            name = target.id if isinstance(target, ast.Name) else target.attr
            if ENGINE_NAMES.search(name) or name == "module":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: setattr")
    return found


def test_deepspeed_internals_are_touched_in_the_adapter_only():
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) if path != ADAPTER
            for use in private_uses(path)]
    assert not uses, "DeepSpeed internals outside ds_adapter.py:\n" + "\n".join(uses)


def test_the_scan_finds_the_patterns_it_forbids(tmp_path, monkeypatch):
    """The scan can fail: the patches the adapter replaced are each found in a sample."""
    sample = PACKAGE / "_sample_for_scan.py"
    text = ("def f(engine, pipe, param):\n"
            "    step = engine._take_model_step\n"
            "    engine.optimizer.check_overflow = step\n"
            "    specs = pipe._layer_specs\n"
            "    engine.__dict__.pop('x')\n"
            "    return param._hp_mapping\n")
    deepspeed_private_names()  # read DeepSpeed's source before read_text is replaced
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    uses = private_uses(sample)
    assert any("_take_model_step" in u for u in uses)
    assert any("check_overflow (patched)" in u for u in uses)
    assert any("_layer_specs" in u for u in uses)
    assert any("__dict__" in u for u in uses)
    assert any("_hp_mapping" in u for u in uses)
