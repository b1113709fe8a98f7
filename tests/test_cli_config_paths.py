"""Relative paths in a mesh file mean the same files from any current directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.config import load_config

from .meshtest import write_config


def test_relative_paths_resolve_against_the_mesh_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    config_file = write_config(
        folder,
        {
            "data_dir": "state",
            "auth": {
                "ca_file": "ca/idp.pem",
                "tls": {
                    "cert_file": "tls/cert.pem",
                    "key_file": "tls/key.pem",
                    "ca_file": "/abs/ca.pem",
                },
            },
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MESH_DATA_DIR", raising=False)
    config = load_config(os.path.relpath(config_file))
    assert config.data_dir == folder / "state"
    assert config.auth.ca_file == str(folder / "ca" / "idp.pem")
    assert config.auth.tls.cert_file == str(folder / "tls" / "cert.pem")
    assert config.auth.tls.key_file == str(folder / "tls" / "key.pem")
    assert config.auth.tls.ca_file == "/abs/ca.pem"  # absolute paths stay as they are


def test_default_data_dir_is_beside_the_file_and_env_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = write_config(tmp_path, {})
    monkeypatch.delenv("MESH_DATA_DIR", raising=False)
    assert load_config(config_file).data_dir == tmp_path / ".mesh"
    # The environment is the caller's shell: its relative paths are the caller's.
    monkeypatch.setenv("MESH_DATA_DIR", "mine")
    assert load_config(config_file).data_dir == Path("mine")
