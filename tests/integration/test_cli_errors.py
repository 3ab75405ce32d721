"""The CLI answers a user's mistake in one line (exit 1), not with a traceback."""

from __future__ import annotations

import pytest

from moemesh.deploy import cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "argv, says",
    [
        (["status", "--router", "127.0.0.1:1"], "moemesh status: UNAVAILABLE"),
        (["up", "--backend", "processes", "--model", "/nonexistent"], "is neither a preset"),
        (
            ["serve-expert", "--model", "tiny-mixtral", "--host-id", "h", "--experts", "0:9-x"],
            "bad expert range",
        ),
    ],
)
def test_user_errors_are_one_line(capsys, argv, says):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
