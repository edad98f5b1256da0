"""Generate the MIP Python code (``memfed.mip.v1``) from ``proto/`` with grpcio-tools.

The generated ``_pb2``/``_pb2_grpc`` modules and ``.pyi`` stubs are committed so that installing memfed
needs no protoc. ``python -m memfed.mip.codegen`` rewrites them; ``--check`` regenerates into a temporary
folder and exits 1 if the committed files differ (the drift test runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_DIR = Path("memfed") / "mip" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources of MIP v1, sorted for a reproducible protoc invocation."""
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every MIP v1 file into ``out_root`` (which mirrors the repo root)."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency; imported here so runtime code never needs it

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {sources}")
    return sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def drift(repo_root: Path = REPO_ROOT) -> list[str]:
    """Names of generated files that differ from (or are missing in) ``repo_root``'s committed copy."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_dir = repo_root / PACKAGE_DIR
        stale = []
        fresh_names = {p.name for p in fresh}
        for path in fresh:
            target = committed_dir / path.name
            if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                stale.append(path.name)
        for target in committed_dir.iterdir():
            if target.name.endswith(GENERATED_SUFFIXES) and target.name not in fresh_names:
                stale.append(target.name)
        return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code drifts from proto/")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        if stale:
            print("generated MIP code is stale; run `make proto`: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("generated MIP code matches proto/")
        return 0
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
