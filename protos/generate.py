"""Regenerate the Python code for `protos/moemesh.proto`.

Run: ``python -m moemesh.protos.generate`` (or ``python protos/generate.py``).

protoc derives Python import paths from the .proto path relative to the include root, so the
file is staged as ``moemesh/protos/moemesh.proto`` in a temporary root; the generated modules then
import each other as ``moemesh.protos.*`` with no hand edits. ``generate(out_dir)`` is also used by
the test that checks the committed code is current.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_FILES = ("moemesh.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every file in PROTO_FILES into `out_dir`; return their paths."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        staged = root / "moemesh" / "protos"
        staged.mkdir(parents=True)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        for name in PROTO_FILES:
            shutil.copyfile(HERE / name, staged / name)
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            *(f"moemesh/protos/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for path in sorted((gen / "moemesh" / "protos").iterdir()):
            if path.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / path.name
                shutil.copyfile(path, target)
                written.append(target)
    return written


def main() -> int:
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
