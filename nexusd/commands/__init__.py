"""All `nexusd` subcommands, one module per area; `COMMANDS` is the ordered list."""

from __future__ import annotations

from .base import CommandSpec as CommandSpec
from .doctor import DOCTOR_COMMANDS
from .jobs import JOB_COMMANDS
from .mesh import MESH_COMMANDS
from .models import MODEL_COMMANDS
from .node import NODE_COMMANDS

COMMANDS: tuple[CommandSpec, ...] = (*NODE_COMMANDS, *MESH_COMMANDS, *JOB_COMMANDS, *MODEL_COMMANDS, *DOCTOR_COMMANDS)
