"""What a subcommand is: a name, its flags, and a function of (args, config, paths); and how
it reaches the local daemon."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..api.client import OnEvent, call
from ..config import Config
from ..paths import NodePaths

R = TypeVar("R")


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


def call_daemon(
    paths: NodePaths,
    request: object,
    *,
    expect: type[R],
    timeout_s: float | None = 30.0,
    on_event: OnEvent | None = None,
) -> R:
    """Send one request to the local daemon and return its `expect` reply (blocking; the CLI
    has nothing else to do). See `nexusd.api.client.call`."""
    return trio.run(
        lambda: call(paths.socket, request, expect=expect, timeout_s=timeout_s, on_event=on_event)
    )
