"""The committed generated code is exactly what the .proto produces; the contract stays documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moemesh.protos import generate

PROTOS = Path(generate.__file__).resolve().parent


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"moemesh_pb2.py", "moemesh_pb2.pyi", "moemesh_pb2_grpc.py"}
    for fresh in written:
        committed = PROTOS / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `python -m moemesh.protos.generate`"
        )


def test_every_rpc_and_field_has_a_comment():
    lines = (PROTOS / "moemesh.proto").read_text().splitlines()
    declaration = re.compile(
        r"^\s*(rpc \w+|\w[\w.]* \w+ = \d+;|repeated [\w.]+ \w+ = \d+;|[A-Z_0-9]+ = \d+;)"
    )
    undocumented = [
        line.strip()
        for prev, line in zip(lines, lines[1:])
        if declaration.match(line) and not prev.strip().startswith("//")
    ]
    assert undocumented == []
