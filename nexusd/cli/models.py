"""Model commands: list the models this node can use, import a local checkpoint, cut a
smaller student from a Nexus model (for `train distill`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import Config
from ..paths import NodePaths
from .base import CommandSpec, no_flags
from .output import emit, table


def _models_dir(cfg: Config, paths: NodePaths) -> Path:
    return Path(cfg.atoms.models_dir) if cfg.atoms.models_dir else paths.models_dir


def _list(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..model_registry import BUILTINS, ModelRegistry
    from .mesh_models import MODEL_HEADERS, daemon_models, model_table_rows, where

    mesh = daemon_models(paths)  # a running daemon lists the mesh's models with ours
    if mesh is not None:
        listed = [{"id": r.model_id, **dataclasses.asdict(r), "where": where(r)} for r in mesh]
        emit(args, listed, lambda: table(MODEL_HEADERS, model_table_rows(mesh)))
        return 0
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
    from .mesh_models import settle_new_model

    model_id = args.model_id or args.folder.resolve().name
    folder = import_model(args.folder, model_id, _models_dir(cfg, paths), dtype=args.dtype)
    info = ModelRegistry(_models_dir(cfg, paths)).info(model_id)
    note = settle_new_model(cfg, paths, model_id, folder)  # sealed, published
    emit(
        args,
        {"id": model_id, "folder": str(folder), "atoms": info.n_atoms, "digest": info.digest},
        lambda: (
            f"imported {model_id}: {info.n_atoms} atoms ({info.family}) into {folder}"
            f"{note}; serve with `nexusd host {model_id}`"
        ),
    )
    return 0


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated indices, got {text!r}"
        ) from None


def _student_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "teacher", help="a Nexus 1.1 model (e.g. nexus-1.1) or a BERT embedding model (minilm)"
    )
    p.add_argument(
        "--base-layers",
        type=_indices,
        default=None,
        metavar="I,J,..",
        help="0-based base (BERT) layers the student keeps, e.g. 0,2,4 (default: all); "
        "for an embedding model, its encoder layers",
    )
    p.add_argument(
        "--blocks",
        type=_indices,
        default=None,
        metavar="I,J,..",
        help="0-based Nexus blocks the student keeps (default: all)",
    )
    p.add_argument("--id", dest="model_id", required=True, help="id of the student model")


def _student(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from atoms.compress import atom_bytes, atom_params
    from atoms.distill import student_of
    from atoms.distill_embed import encoder_student_of, ends_in_pooling
    from atoms.errors import ModelFormatError

    from ..errors import ApiError
    from ..model_files import node_registry

    registry = node_registry(_models_dir(cfg, paths), paths, own=not cfg.atoms.models_dir)
    teacher = registry.load_model(args.teacher)
    try:
        if ends_in_pooling(teacher):  # an embedding model: its encoder layers
            if args.blocks is not None:
                raise ModelFormatError(f"student: {args.teacher} has no Nexus blocks (--blocks)")
            layers = args.base_layers or range(len(teacher) - 2)
            student = encoder_student_of(teacher, args.model_id, layers=layers)
        else:
            student = student_of(
                teacher, args.model_id, base_layers=args.base_layers, blocks=args.blocks
            )
    except ModelFormatError as exc:
        raise ApiError("bad_request", str(exc)) from None
    folder = registry.save(student)
    from .mesh_models import settle_new_model

    note = settle_new_model(cfg, paths, args.model_id, folder)  # sealed, published
    sizes = {
        m.model_id: (sum(atom_bytes(a) for a in m.atoms), sum(atom_params(a) for a in m.atoms))
        for m in (teacher, student)
    }
    data = {
        "id": args.model_id,
        "teacher": args.teacher,
        "folder": str(folder),
        "atoms": len(student),
        "teacher_atoms": len(teacher),
        "bytes": sizes[args.model_id][0],
        "teacher_bytes": sizes[args.teacher][0],
        "params": sizes[args.model_id][1],
        "teacher_params": sizes[args.teacher][1],
    }
    emit(
        args,
        data,
        lambda: (
            f"student {args.model_id}: {len(student)} atoms of {args.teacher}'s "
            f"{len(teacher)}, {data['params']:,} parameters ({data['teacher_params']:,}); "
            f"saved in {folder}{note}; host it (`nexusd host {args.model_id}`), then "
            f"`nexusd train distill --model {args.model_id} --teacher {args.teacher} "
            "--output ID`"
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
    CommandSpec(
        "make-student",
        "cut a smaller student from a Nexus model (fewer base layers and/or blocks) or a "
        "MiniLM-style embedding model (fewer encoder layers), with the teacher's weights, "
        "to train with `train distill`",
        _student_flags,
        _student,
    ),
)
