"""Checkpoints: one format (`format`), saving and loading at the same layout (`save`), loading
at another layout (`reshape`), the read-only tools' merged view and exports (`export`), and
the one routine that merges and splits tensor-parallel shards (`shards`).

Every reader finds a checkpoint the same way, `newest_complete` / `resolve`: resume, rollback,
reshape, inspect and export name the same checkpoint of a directory. The submodules `reshape`,
`export` and `shards` are imported where they are used (training never loads `export`).
"""

from stable_megatron.checkpoint.format import (
    ENGINE_FILE,
    LATEST,
    META_FILE,
    CheckpointError,
    check_compatible,
    complete_checkpoints,
    corrupt_reason,
    file_checksum,
    layout_of,
    mark_corrupt,
    newest_complete,
    read_meta,
    resolve,
    safe_load,
    scan,
    tag_for,
    verify,
)
from stable_megatron.checkpoint.save import (
    SaveResult,
    install_safe_loading,
    load,
    prune,
    save,
)

__all__ = [
    "ENGINE_FILE", "LATEST", "META_FILE", "CheckpointError", "SaveResult", "check_compatible",
    "complete_checkpoints", "corrupt_reason", "file_checksum", "install_safe_loading",
    "layout_of", "load", "mark_corrupt", "newest_complete", "prune", "read_meta", "resolve",
    "safe_load", "save", "scan", "tag_for", "verify",
]
