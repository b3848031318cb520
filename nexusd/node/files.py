"""A node's files on disk: `nexusd init` creates them, the daemon reads them.

Rule 1: the node key and the mesh secret are 0600 files that are never overwritten without
`force`; a second `init` on the same directory is refused with the path it would clobber.
Rule 2: `mesh.toml` holds only public facts (mesh id, founder); secrets live in their own files.
"""

from __future__ import annotations

import secrets
import socket
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mesh.identity import MeshSecret, NodeKey

from ..config import Config, config_to_toml
from ..errors import SetupError
from ..paths import NodePaths, ensure_private_dir, write_private_file


@dataclass(frozen=True, slots=True)
class MeshInfo:
    """The public identity of the mesh this node belongs to."""

    mesh_id: str  # 32 hex chars
    founder: str  # hex node id of the founder (the first admin)
    created_ms: int

    def __post_init__(self) -> None:
        if len(self.mesh_id) != 32 or not _is_hex(self.mesh_id):
            raise SetupError(f"mesh_id: expected 32 hex chars, got {self.mesh_id!r}")
        if len(self.founder) != 64 or not _is_hex(self.founder):
            raise SetupError(f"founder: expected 64 hex chars, got {self.founder!r}")

    def to_toml(self) -> str:
        return (
            f'mesh_id = "{self.mesh_id}"\nfounder = "{self.founder}"\n'
            f"created_ms = {self.created_ms}\n"
        )

    @classmethod
    def load(cls, path: Path) -> MeshInfo | None:
        if not path.exists():
            return None
        try:
            data = tomllib.loads(path.read_text())
            return cls(str(data["mesh_id"]), str(data["founder"]), int(data["created_ms"]))
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SetupError(f"{path}: not a valid mesh file ({exc})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class InitResult:
    """What `init` created."""

    data_dir: Path
    node_id: str
    name: str
    config_file: Path
    mesh_id: str


def init_node(
    paths: NodePaths, cfg: Config, *, name: str, new_mesh: bool, force: bool
) -> InitResult:
    """Create the data dir, the node key, a config file and, with `new_mesh`, a mesh.

    Raises:
        SetupError: when a key or mesh already exists and `force` is not given.
    """
    ensure_private_dir(paths.data_dir)
    if paths.node_key.exists() and not force:
        raise SetupError(
            f"{paths.node_key} already exists: this node is set up "
            "(use --force to replace its identity, which makes it a new node)"
        )
    key = NodeKey.generate()
    key.save(paths.node_key, force=force)
    node_name = name or cfg.node.name or socket.gethostname()
    write_private_file(paths.config_file, config_to_toml(cfg).encode(), force=True)
    mesh_id = ""
    if new_mesh:
        if paths.mesh_file.exists() and not force:
            raise SetupError(f"{paths.mesh_file} already exists: this node is in a mesh")
        info = MeshInfo(secrets.token_hex(16), key.node_id.hex(), int(time.time() * 1000))
        write_private_file(paths.mesh_secret, MeshSecret.generate().raw, force=force)
        write_private_file(paths.mesh_file, info.to_toml().encode(), force=force)
        mesh_id = info.mesh_id
    (paths.data_dir / "name").write_text(node_name + "\n")
    return InitResult(
        data_dir=paths.data_dir,
        node_id=key.node_id.hex(),
        name=node_name,
        config_file=paths.config_file,
        mesh_id=mesh_id,
    )


def write_mesh_files(paths: NodePaths, mesh_id: str, founder: str, secret: bytes) -> MeshInfo:
    """Persist the mesh this node joined (public facts + the 0600 secret)."""
    info = MeshInfo(mesh_id, founder, int(time.time() * 1000))
    write_private_file(paths.mesh_secret, secret, force=True)
    write_private_file(paths.mesh_file, info.to_toml().encode(), force=True)
    return info


def load_node_key(paths: NodePaths) -> NodeKey:
    """The node's key, or a SetupError that says how to create one."""
    if not paths.node_key.exists():
        raise SetupError(f"no node key at {paths.node_key}: run `nexusd init` first")
    return NodeKey.load(paths.node_key)


def load_name(paths: NodePaths, cfg: Config) -> str:
    if cfg.node.name:
        return cfg.node.name
    try:
        return (paths.data_dir / "name").read_text().strip() or socket.gethostname()
    except FileNotFoundError:
        return socket.gethostname()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
