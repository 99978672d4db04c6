"""The checked-in gRPC stubs are what generate.py makes from proto/ now."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLIENT = HERE.parent
CHECKED_IN = CLIENT / "skykit_agent" / "_proto"


def files(root: Path):
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def test_checked_in_stubs_are_not_stale(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is not installed: pip install -r clients/python/requirements-test.txt")
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(CLIENT / "generate.py"), "--out", str(out)], check=True)
    assert files(out) == files(CHECKED_IN), "regenerate: python clients/python/generate.py"
    stale = [
        name for name in files(out) if not filecmp.cmp(out / name, CHECKED_IN / name, shallow=False)
    ]
    assert not stale, f"stale generated files {stale}: run python clients/python/generate.py"


def test_stubs_import_inside_the_package():
    from skykit_agent._proto.skykit.agent.v1 import agent_pb2, agent_pb2_grpc

    assert agent_pb2.DESCRIPTOR.package == "skykit.agent.v1"
    assert agent_pb2_grpc.TokenServiceStub
    text = (CHECKED_IN / "skykit" / "agent" / "v1" / "agent_pb2_grpc.py").read_text()
    assert "from skykit." not in text and "import skykit" not in text
