"""Regenerates the committed Python code of `splitserve.proto` (a development tool).

    python -m splitserve.router.protogen   # rewrites router/splitserve_pb2*.py

Run it with grpcio-tools 1.66 (see below). It needs nothing of splitserve, so a scratch venv
holding only that works too: ``python -m venv /tmp/gen && /tmp/gen/bin/pip install
grpcio-tools==1.66.2 && /tmp/gen/bin/python router/protogen.py``.

The proto is compiled as ``splitserve/router/splitserve.proto`` so the generated gRPC module
imports its messages as ``splitserve.router.splitserve_pb2`` (protoc writes bare
``import splitserve_pb2`` for a file at the include root, which breaks inside a package), and
the descriptor's file name is unique in the process-wide protobuf pool.

Generated code checks the protobuf and grpcio it runs on against the versions of the
generator: the committed files come from grpcio-tools 1.66 (protobuf gencode 5.27), so they
import with every protobuf >= 5.28 and grpcio >= 1.66 that pyproject.toml allows. A newer
grpcio-tools would raise those floors; `versionless` drops the version lines so a test can
compare what any grpcio-tools generates with what is committed.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "splitserve.proto"
OUTPUTS = ("splitserve_pb2.py", "splitserve_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto with grpc_tools into ``out_dir``; the two generated files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "splitserve" / "router"
        src.mkdir(parents=True)
        shutil.copy(PROTO, src / PROTO.name)
        rc = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          str(src / PROTO.name)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(src / name, out_dir / name)) for name in OUTPUTS]


_GENERATOR_NOISE = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), ""),
    # The runtime check call spans several lines: `ValidateProtobufRuntimeVersion(` to `)`.
    (re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", re.M), ""),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), ""),
    # Cosmetics that changed between grpcio-tools releases.
    (re.compile(r"^(class \w+)\(object\):", re.M), r"\1:"),
    (re.compile(r"\bf'([^'{}]*)'"), r"'\1'"),
]


def versionless(code: str) -> str:
    """Generated code without what differs between generator versions (the version lines and
    a few cosmetics), so any grpcio-tools can check that the committed files are current."""
    for pattern, repl in _GENERATOR_NOISE:
        code = pattern.sub(repl, code)
    return code


def main() -> int:
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
