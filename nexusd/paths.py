"""Where a node keeps its files.

Rule 1: all paths of a node derive from one `NodePaths`, resolved once from config and the
environment (systemd's StateDirectory/RuntimeDirectory/ConfigurationDirectory win over XDG).
Rule 2: secrets (node key, mesh secret) are files of mode 0600 inside a 0700 directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class NodePaths:
    """The files of one node."""

    data_dir: Path
    runtime_dir: Path
    socket_override: Path | None = None

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.toml"

    @property
    def node_key(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def mesh_file(self) -> Path:
        return self.data_dir / "mesh.toml"

    @property
    def mesh_secret(self) -> Path:
        return self.data_dir / "mesh.secret"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "nexusd.lock"

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def socket(self) -> Path:
        return self.socket_override or self.runtime_dir / "nexusd.sock"


def default_data_dir(env: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_DATA_HOME/nexusd, else ~/.local/share/nexusd."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local/share")
    return Path(base) / "nexusd"


def resolve_paths(
    data_dir: str, runtime_dir: str, env: Mapping[str, str], socket_path: str = ""
) -> NodePaths:
    """Resolve the node's directories; empty strings mean "the default"."""
    data = Path(data_dir).expanduser() if data_dir else default_data_dir(env)
    if runtime_dir:
        run = Path(runtime_dir).expanduser()
    elif env.get("RUNTIME_DIRECTORY"):
        run = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    else:
        run = data / "run"
    sock = Path(socket_path).expanduser().absolute() if socket_path else None
    return NodePaths(data_dir=data.absolute(), runtime_dir=run.absolute(), socket_override=sock)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private_file(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write `data` to a new 0600 file atomically; refuse to replace one unless `force`.

    Raises:
        FileExistsError: when `path` exists and `force` is false.
    """
    if path.exists() and not force:
        raise FileExistsError(str(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # cleanup, then re-raise: not a boundary
        tmp.unlink(missing_ok=True)
        raise
