"""Config: the example file parses with the real loader; errors name the key path."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from nexusd.config import MESH_NODE_KEYS, Config, MeshConfig, config_to_toml, load_config
from nexusd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


def test_example_parses_and_equals_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


def test_example_documents_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    for section in dataclasses.fields(Config):
        factory = section.default_factory
        assert callable(factory), section.name  # every section is a default_factory field
        keys = {f.name for f in dataclasses.fields(factory())}
        assert set(data[section.name]) == keys, section.name


def test_init_rendering_round_trips() -> None:
    cfg = load_config(None, overrides={"mesh.bootstrap": ("/ip4/127.0.0.1/tcp/1/p2p/x",)})
    path_text = config_to_toml(cfg)
    assert tomllib.loads(path_text)["mesh"]["bootstrap"] == ["/ip4/127.0.0.1/tcp/1/p2p/x"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key mesh\.gosip_fanout"):
        load_config(write(tmp_path, "[mesh]\ngosip_fanout = 3\n"))


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key meshh"):
        load_config(write(tmp_path, "[meshh]\nx = 1\n"))


def test_wrong_type_names_key_and_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mesh\.listen_port: expected int, got str 'abc'"):
        load_config(write(tmp_path, '[mesh]\nlisten_port = "abc"\n'))


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.torch_threads: expected int, got bool"):
        load_config(write(tmp_path, "[node]\ntorch_threads = true\n"))


def test_list_item_type_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mesh\.bootstrap\[1\]: expected str"):
        load_config(write(tmp_path, '[mesh]\nbootstrap = ["a", 3]\n'))


def test_range_checks_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mesh\.listen_port: expected 0\.\.65535, got 70000"):
        load_config(write(tmp_path, "[mesh]\nlisten_port = 70000\n"))
    with pytest.raises(ConfigError, match=r"mesh\.advert_lease_s: expected at least 2 x"):
        load_config(write(tmp_path, "[mesh]\nadvert_lease_s = 5.0\n"))
    with pytest.raises(ConfigError, match=r"train\.distill_token_weight: expected 0\.\.100"):
        load_config(write(tmp_path, "[train]\ndistill_token_weight = -1.0\n"))
    assert (
        load_config(
            write(tmp_path, "[train]\ndistill_token_weight = 0.0\n")
        ).train.distill_token_weight
        == 0.0
    )


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.toml"):
        load_config(write(tmp_path, "[mesh\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[mesh]\nlisten_port = 1000\nping_interval_s = 2\n[log]\nlevel = 'debug'\n"
    )
    env = {"NEXUSD_MESH__LISTEN_PORT": "2000", "NEXUSD_LOG__LEVEL": "warning", "OTHER": "x"}
    cfg = load_config(path, env=env, overrides={"mesh.listen_port": 3000, "node.name": None})
    assert cfg.mesh.listen_port == 3000  # flag beats env beats file
    assert cfg.log.level == "warning"  # env beats file
    assert cfg.mesh.ping_interval_s == 2.0  # file beats default (int accepted for float)
    assert cfg.node.name == ""  # a None flag means "not given"


def test_env_values_are_typed(tmp_path: Path) -> None:
    env = {
        "NEXUSD_MESH__BOOTSTRAP": "a,b",
        "NEXUSD_ATOMS__HOST": '["m:0-2"]',
        "NEXUSD_NODE__NAME": "42",
    }
    cfg = load_config(None, env=env)
    assert cfg.mesh.bootstrap == ("a", "b")
    assert cfg.atoms.host == ("m:0-2",)
    assert cfg.node.name == "42"  # a string field keeps the raw text
    with pytest.raises(ConfigError, match=r"unknown key mesh\.nope"):
        load_config(None, env={"NEXUSD_MESH__NOPE": "1"})
    with pytest.raises(ConfigError, match=r"mesh\.listen_port \(from NEXUSD_MESH__LISTEN_PORT\)"):
        load_config(None, env={"NEXUSD_MESH__LISTEN_PORT": "12x"})


def test_mesh_keys_reach_the_mesh_node_by_name() -> None:
    from mesh.node_config import MeshNodeConfig

    assert len(MESH_NODE_KEYS) == 13  # join_window_s included
    assert Config().mesh.node_config() == MeshNodeConfig()  # one set of defaults
    for name in MESH_NODE_KEYS:
        doubled = 2 * getattr(MeshConfig(), name)
        cfg = MeshConfig(**{name: doubled, "advert_lease_s": 2 * MeshConfig().advert_lease_s})
        assert getattr(cfg.node_config(), name) == doubled, name
    assert MeshConfig(advert_lease_s=900.0).node_config().max_lease_s == 900.0
