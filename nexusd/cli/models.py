"""Model commands: list the models this node can use, import a local checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..paths import NodePaths
from .base import CommandSpec, no_flags
from .output import emit, table


def _models_dir(cfg: Config, paths: NodePaths) -> Path:
    return Path(cfg.atoms.models_dir) if cfg.atoms.models_dir else paths.models_dir


def _list(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..model_registry import BUILTINS, ModelRegistry

    registry = ModelRegistry(_models_dir(cfg, paths))
    built = set(registry.available())
    infos = {m: registry.info(m) for m in sorted(built)}
    rows = [
        [m, i.family, str(i.n_atoms), "decoder" if i.causal else "encoder", i.digest[:12]]
        for m, i in infos.items()
    ] + [[m, "built-in", "(built on first use)", "-", "-"] for m in sorted(set(BUILTINS) - built)]
    data = [
        {
            "id": r[0],
            "family": r[1],
            "atoms": infos[r[0]].n_atoms if r[0] in infos else 0,
            "kind": r[3],
            "digest": infos[r[0]].digest if r[0] in infos else "",
            "built": r[0] in infos,
        }
        for r in rows
    ]
    emit(args, data, lambda: table(["id", "family", "atoms", "kind", "digest"], rows))
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder",
        type=Path,
        help="a Hugging Face folder: config.json, *.safetensors, tokenizer.json",
    )
    p.add_argument("--id", dest="model_id", help="model id (default: the folder's name)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of the stored atoms (default float32)",
    )


def _import(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..model_registry import ModelRegistry, import_model

    model_id = args.model_id or args.folder.resolve().name
    folder = import_model(args.folder, model_id, _models_dir(cfg, paths), dtype=args.dtype)
    info = ModelRegistry(_models_dir(cfg, paths)).info(model_id)
    emit(
        args,
        {"id": model_id, "folder": str(folder), "atoms": info.n_atoms, "digest": info.digest},
        lambda: (
            f"imported {model_id}: {info.n_atoms} atoms ({info.family}) into {folder}; "
            f"serve with `nexusd host {model_id}`"
        ),
    )
    return 0


MODEL_COMMANDS = (
    CommandSpec("models", "list the models this node can host or use", no_flags, _list),
    CommandSpec(
        "import-model",
        "import a local Llama or BERT checkpoint as a hostable model",
        _import_flags,
        _import,
    ),
)
