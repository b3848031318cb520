"""Model commands: list the models this node can use, import a local checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import emit
from ..config import Config
from ..paths import NodePaths
from .base import CommandSpec, no_flags, table


def _models_dir(cfg: Config, paths: NodePaths) -> Path:
    return Path(cfg.atoms.models_dir) if cfg.atoms.models_dir else paths.models_dir


def _list(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..models import BUILTINS, ModelRegistry

    registry = ModelRegistry(_models_dir(cfg, paths))
    rows = []
    for model_id in sorted(set(registry.available()) | set(BUILTINS)):
        if model_id in registry.available():
            info = registry.info(model_id)
            rows.append({"id": model_id, "family": info.family, "atoms": info.n_atoms,
                         "kind": "decoder" if info.causal else "encoder",
                         "digest": info.digest[:12], "built": True})  # fmt: skip
        else:
            rows.append({"id": model_id, "family": "built-in", "atoms": 0, "kind": "-",
                         "digest": "-", "built": False})  # fmt: skip
    emit(args, rows, lambda: table(
        ["id", "family", "atoms", "kind", "digest"],
        [[r["id"], r["family"], str(r["atoms"] or "(built on first use)"), r["kind"], r["digest"]]
         for r in rows]))  # fmt: skip
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a Hugging Face folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--id", dest="model_id", help="model id (default: the folder's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the stored atoms (default float32)")


def _import(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..models import ModelRegistry, import_model

    model_id = args.model_id or args.folder.resolve().name
    folder = import_model(args.folder, model_id, _models_dir(cfg, paths), dtype=args.dtype)
    info = ModelRegistry(_models_dir(cfg, paths)).info(model_id)
    emit(args, {"id": model_id, "folder": str(folder), "atoms": info.n_atoms, "digest": info.digest},
         lambda: f"imported {model_id}: {info.n_atoms} atoms ({info.family}) into {folder}; "
                 f"serve with `nexusd host {model_id}`")  # fmt: skip
    return 0


MODEL_COMMANDS = (
    CommandSpec("models", "list the models this node can host or use", no_flags, _list),
    CommandSpec("import-model", "import a local Llama or BERT checkpoint as a hostable model",
                _import_flags, _import),
)
