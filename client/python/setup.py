"""Generates the gRPC stubs from proto/ at build time (never committed).

Uses protoc with grpc_python_plugin (Debian: protobuf-compiler,
protobuf-compiler-grpc). Set MUON_PROTO_DIR to the folder holding
muon/v1/optimizer.proto if this package is built outside the repository.
"""
import os
import pathlib
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


def generate_stubs(out_dir: pathlib.Path) -> None:
    proto_dir = pathlib.Path(os.environ.get("MUON_PROTO_DIR", HERE.parent.parent / "proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_out={out_dir}",
            "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin",
            str(proto_dir / "muon" / "v1" / "optimizer.proto"),
        ],
        check=True,
    )


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        generate_stubs(pathlib.Path(self.build_lib) / "muon_client" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})
