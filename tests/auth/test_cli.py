"""``mesh token`` and ``mesh sts`` as real subprocesses (through mesh.auth.cli.add_parsers)."""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from mesh.auth.interceptors import server_interceptors
from mesh.auth.jwt import unverified_claims
from mesh.auth.sts import TokenService
from mesh.config import MeshConfig
from tests.auth.conftest import SUBPROCESS_OUTPUT, bearer, mesh_dict, seen, serve

RUNNER = (
    "import argparse, sys\n"
    "from mesh.auth.cli import add_parsers\n"
    "parser = argparse.ArgumentParser(prog='mesh')\n"
    "add_parsers(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.func(args))\n"
)


async def _mesh(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    SUBPROCESS_OUTPUT.append(err.decode())
    return proc.returncode or 0, out.decode(), err.decode()


def _write_config(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


class StsRun:
    """A running ``mesh sts`` (see :func:`sts_process`); ``code`` and ``err`` are set once
    it has stopped."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc, self.url = proc, url
        self.port = int(url.rsplit(":", 1)[1])
        self.code: int | None = None
        self.err = ""


@asynccontextmanager
async def sts_process(file: Path) -> AsyncIterator[StsRun]:
    """``mesh sts --config FILE --port 0`` until it prints its URL; SIGTERM on the way out
    (its stderr goes to the suite's log check)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        "sts",
        "--config",
        str(file),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run: StsRun | None = None
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode().strip()
        assert line.startswith("sts: https://127.0.0.1:"), line
        run = StsRun(proc, line.removeprefix("sts: "))
        yield run
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        SUBPROCESS_OUTPUT.append(err)
        if run is not None:
            run.code, run.err = code, err


async def test_mesh_token_prints_only_a_token_the_router_accepts(
    config: MeshConfig, sts: TokenService, tmp_path: Path
) -> None:
    file = _write_config(tmp_path / "mesh.yaml", mesh_dict(Path(config.data_dir)))
    code, out, err = await _mesh(
        "token",
        "--config",
        str(file),
        "--sub",
        "alice",
        "--scope",
        "mesh.chat",
        "--scope",
        "mesh.admin",
        "--ttl",
        "120",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    token = lines[0]
    claims = unverified_claims(token)
    assert claims["sub"] == "alice" and claims["aud"] == "mesh-router"
    assert claims["scp"] == "mesh.chat mesh.admin"
    assert claims["exp"] - claims["iat"] == 120
    async with serve(server_interceptors(config, "router")) as addr:
        got = await seen(addr, bearer(token))
    assert got.subject == "alice"


async def test_mesh_token_bad_arguments(tmp_path: Path) -> None:
    code, out, err = await _mesh(
        "token", "--config", str(tmp_path / "missing.yaml"), "--sub", "alice"
    )
    assert code == 2 and out == "" and "no such file" in err
    code, out, _ = await _mesh(
        "token", "--sub", "alice", "--ttl", "0", "--config", str(tmp_path / "missing.yaml")
    )
    assert code == 2 and out == ""


async def test_mesh_sts_serves_prints_url_rotates_and_stops(tmp_path: Path) -> None:
    body = mesh_dict(tmp_path / "data")
    file = _write_config(tmp_path / "mesh.yaml", body)
    async with sts_process(file) as sts:
        url = sts.url
        ca = tmp_path / "data" / "sts" / "tls" / "ca.pem"
        tls = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=10) as client:
            doc = (await client.get(f"{url}/.well-known/openid-configuration")).json()
            assert doc["issuer"] == url
            kids = {k["kid"] for k in (await client.get(doc["jwks_uri"])).json()["keys"]}
            code, out, err = await _mesh("sts", "--config", str(file), "--rotate")
            assert code == 0, err
            new_kid = out.strip().rsplit(" ", 1)[-1]
            after = {k["kid"] for k in (await client.get(doc["jwks_uri"])).json()["keys"]}
            assert kids < after and new_kid in after  # old key still published
            stats = (await client.get(f"{url}/_stats")).json()
            assert stats["jwks"] == 2
        assert (tmp_path / "data" / "sts" / "url").read_text().strip() == url
    assert sts.code == 0
