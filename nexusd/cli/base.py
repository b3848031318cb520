"""What a subcommand is: a name, its flags, and a function of (args, config, paths); and how
it reaches the local daemon."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..config import Config
from ..paths import NodePaths


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config, NodePaths], int]
    json: bool = True
    description: str = ""


def no_flags(_p: argparse.ArgumentParser) -> None:
    """For commands with only the common options."""


def call_daemon(paths: NodePaths, request: object, **kwargs: object) -> object:
    """Send one request to the local daemon (blocking; the CLI has nothing else to do)."""
    from ..api.client import call

    return trio.run(lambda: call(paths.socket, request, **kwargs))  # type: ignore[arg-type]
