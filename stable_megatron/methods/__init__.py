"""Stability methods, one module each: its config keys and their validation, how it changes a
transformer layer, its step hooks and metrics, and what an export must refuse. The rest of the
package loops over the registry instead of naming methods (docs/architecture.md)."""

from stable_megatron.methods.base import Field, LayerSlots, Method
from stable_megatron.methods.registry import (
    PLUGINS_ENV,
    enabled,
    export_blockers,
    get,
    hooks,
    methods,
    model_fields,
    register,
    unregister,
    variants,
)

__all__ = ["Field", "LayerSlots", "Method", "PLUGINS_ENV", "enabled", "export_blockers", "get",
           "hooks", "methods", "model_fields", "register", "unregister", "variants"]
