"""Regenerate the Python code for proto/ into clients/python (messages, .pyi stubs, gRPC stubs).

    python proto/generate.py                      # regenerate (the committed code)
    python proto/generate.py --check              # exit 1 when the committed code drifted from proto/
    python proto/generate.py --prepare-includes   # only copy third-party protos into .build/include
    python proto/generate.py --descriptor-set F   # also write a FileDescriptorSet (for Envoy)

Third-party protos (google/api/*.proto) come from the installed googleapis-common-protos wheel and
google/protobuf/*.proto from grpcio-tools; they are copied into the ignored .build/include folder,
never into the repo. The toolchain is pinned in pyproject.toml so the output is byte-for-byte stable.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "clients" / "python"
INCLUDE = ROOT / ".build" / "include"
THIRD_PARTY = ["google/api/annotations.proto", "google/api/http.proto", "google/api/httpbody.proto"]


def prepare_includes() -> Path:
    from google.api import annotations_pb2  # from googleapis-common-protos (a namespace package)

    src = Path(annotations_pb2.__file__).parent
    dst = INCLUDE / "google" / "api"
    dst.mkdir(parents=True, exist_ok=True)
    for rel in THIRD_PARTY:
        shutil.copyfile(src / Path(rel).name, INCLUDE / rel)
    return INCLUDE


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO)) for p in (PROTO / "everything").rglob("*.proto"))


def run_protoc(out: Path, descriptor_set: Path | None = None) -> None:
    from grpc_tools import protoc

    wkt = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{prepare_includes()}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
    ]
    if descriptor_set is not None:
        descriptor_set.parent.mkdir(parents=True, exist_ok=True)
        args += [f"--descriptor_set_out={descriptor_set}", "--include_imports", "--include_source_info"]
    if protoc.main(args + proto_files()) != 0:
        sys.exit("protoc failed")
    # Make every generated folder a regular package so `import everything.chat.v1` is unambiguous.
    for d in [out / "everything", *[p for p in (out / "everything").rglob("*") if p.is_dir()]]:
        if any(d.glob("*_pb2.py")) or d.name in {
            "everything",
            "auth",
            "chat",
            "search",
            "image",
            "preferences",
            "errors",
        }:
            (d / "__init__.py").touch()


def generated_files(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for p in (base / "everything").rglob("*")
        if p.is_file()
        and (
            p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
            or (p.name == "__init__.py" and p.stat().st_size == 0)
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed code differs")
    parser.add_argument("--prepare-includes", action="store_true")
    parser.add_argument("--descriptor-set", type=Path)
    args = parser.parse_args()

    if args.prepare_includes:
        prepare_includes()
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp)
        run_protoc(tmp_out, args.descriptor_set)
        fresh = generated_files(tmp_out)
        current = generated_files(OUT) if (OUT / "everything").exists() else set()
        if args.check:
            drift = sorted(
                (fresh ^ current)
                | {f for f in fresh & current if not filecmp.cmp(tmp_out / f, OUT / f, shallow=False)}
            )
            if drift:
                print("generated code is out of date; run `make generate`:", *drift, sep="\n  ")
                sys.exit(1)
            print(f"generated code is up to date ({len(fresh)} files)")
            return
        for stale in current - fresh:
            (OUT / stale).unlink()
        for f in sorted(fresh):
            (OUT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_out / f, OUT / f)
        print(f"generated {len(fresh)} files into {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
