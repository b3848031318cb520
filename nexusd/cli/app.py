"""The `nexusd` command line.

Rule 1: `main(argv) -> int` never calls sys.exit and is tested in-process.
Rule 2: flags that set config keys are declared with `dest="section.key"` and merged by one
generic function (`_flag_overrides`), so each flag is one line and precedence is uniform:
defaults < file < NEXUSD_* environment < flags.
Rule 3: every command that prints data accepts `--json`; errors go to stderr as one line
`nexusd: error: ...` with exit code 1 (2 for usage errors, argparse's included: flag values
are range-checked by their `type=` functions, e.g. `seed_value`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .. import __version__
from ..config import Config, load_config
from ..errors import NEXUS_ERRORS, ApiError
from ..logging import configure_logging
from ..paths import NodePaths, resolve_paths
from .base import CommandSpec
from .compress import COMPRESS_COMMANDS
from .doctor import DOCTOR_COMMANDS
from .jobs import JOB_COMMANDS
from .mesh import MESH_COMMANDS
from .models import MODEL_COMMANDS
from .node import NODE_COMMANDS
from .train import TRAIN_COMMANDS

Command = Callable[[argparse.Namespace, Config, NodePaths], int]
# every subcommand, one module per area, in the order `--help` lists them
COMMANDS: tuple[CommandSpec, ...] = (
    *NODE_COMMANDS,
    *MESH_COMMANDS,
    *JOB_COMMANDS,
    *TRAIN_COMMANDS,
    *MODEL_COMMANDS,
    *COMPRESS_COMMANDS,
    *DOCTOR_COMMANDS,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `nexusd` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        cfg = _load(args)
        paths = resolve_paths(
            cfg.node.data_dir, cfg.node.runtime_dir, os.environ, cfg.api.socket_path
        )
        stream = sys.stdout if args.command == "run" else sys.stderr
        configure_logging(args.log_level or cfg.log.level, cfg.log.format, stream)
        handler: Command = args.handler
        return handler(args, cfg, paths)
    except ApiError as exc:
        print(f"nexusd: error: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1
    except NEXUS_ERRORS as exc:
        print(f"nexusd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nexusd: interrupted", file=sys.stderr)
        return 130


def _load(args: argparse.Namespace) -> Config:
    """Config from the file, then env, then flags.

    The file: --config, else $NEXUSD_CONFIG, else $CONFIGURATION_DIRECTORY/config.toml
    (systemd) if it exists, else DATA_DIR/config.toml if it exists, else none.
    """
    overrides = _flag_overrides(args)
    explicit = args.config or os.environ.get("NEXUSD_CONFIG")
    systemd_conf = Path(os.environ.get("CONFIGURATION_DIRECTORY", "/nonexistent")) / "config.toml"
    if explicit:
        path: Path | None = Path(explicit)
    elif systemd_conf.exists():
        path = systemd_conf
    else:
        data_dir = overrides.get("node.data_dir") or os.environ.get("NEXUSD_NODE__DATA_DIR", "")
        probe = resolve_paths(str(data_dir), "", os.environ)
        path = probe.config_file if probe.config_file.exists() else None
    return load_config(path, env=os.environ, overrides=overrides)


def reload_config(args: argparse.Namespace) -> Config:
    """The config as `main` built it, read again (`nexusd run` on SIGHUP): the same file
    lookup, environment and flags, `--log-level` included."""
    cfg = _load(args)
    if args.log_level:
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, level=args.log_level))
    return cfg


def _flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(args).items() if "." in k and v is not None}


# ---- parser -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with Rule 3's error format: one line `nexusd: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"nexusd: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nexusd",
        description=(
            "NEXUS mesh node: run neural networks across the devices you own. "
            "Every device runs `nexusd run`; the other commands talk to the local daemon "
            "through its Unix socket."
        ),
        epilog="Quick start: nexusd demo   (a local 3-node mesh with real jobs)",
    )
    parser.add_argument("--version", action="version", version=f"nexusd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for spec in COMMANDS:
        p = sub.add_parser(spec.name, help=spec.help, description=spec.description or spec.help)
        _common(p, json_flag=spec.json)
        spec.configure(p)
        p.set_defaults(handler=spec.run)
    return parser


def _common(p: argparse.ArgumentParser, *, json_flag: bool) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--data-dir",
        dest="node.data_dir",
        metavar="DIR",
        help="node data directory (default: $XDG_DATA_HOME/nexusd)",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $NEXUSD_CONFIG, else DATA_DIR/config.toml)",
    )
    g.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (config: log.level)",
    )
    if json_flag:
        g.add_argument("--json", action="store_true", help="print machine-readable JSON")
