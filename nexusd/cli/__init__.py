"""The `nexusd` command line: `app` (parser, config precedence, `main`), `base` and `output`
(what every command uses), and one module of subcommands per area."""

from __future__ import annotations

from .app import main as main
