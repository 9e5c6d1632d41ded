#!/usr/bin/python3
"""What the Python client does with one 32 MiB fp32 gradient before gRPC
takes the bytes: encode to the wire dtype, cut into chunks, serialize each
StepRequest (docs/performance.md, "Python client: encoding a gradient").

    PYTHONPATH=build/python:client/python bench/python_encode.py
    # another client.py (e.g. `git show REV:client/python/muon_client/client.py > /tmp/c.py`):
    PYTHONPATH=build/python:client/python bench/python_encode.py --client=/tmp/c.py

Prints the best of --repeats, in ms.
"""
import argparse
import importlib.util
import sys
import time

import numpy as np

import muon_client.client as current


def load(path):
    spec = importlib.util.spec_from_file_location("muon_client._bench_client", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "muon_client"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def requests(mod, data, dtype):
    """The serialized chunk requests of one gradient, however `mod` builds them."""
    if hasattr(mod, "_gradient_requests"):
        session = type("S", (), {"params": [mod.ParamSpec("w", (1,), dtype)]})()
        for r in mod._gradient_requests(session, 0, data):
            yield r if isinstance(r, bytes) else r.SerializeToString()
        return
    for off in range(0, len(data), mod.CHUNK_BYTES):
        yield mod.pb.StepRequest(gradient=mod.pb.TensorChunk(
            param_index=0, offset=off, dtype=1,
            data=data[off:off + mod.CHUNK_BYTES])).SerializeToString()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", default="", help="a client.py to time instead")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    mod = load(args.client) if args.client else current
    a = np.random.default_rng(0).standard_normal(8 << 20, dtype=np.float32)
    for dtype in ("float32", "bfloat16"):
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            data = mod.to_wire(a, dtype)
            t1 = time.perf_counter()
            sum(len(r) for r in requests(mod, data, dtype))
            t2 = time.perf_counter()
            best = min(best or (t1 - t0, t2 - t0), (t1 - t0, t2 - t0))
        print(f"{dtype:9} encode {best[0] * 1e3:6.1f} ms  encode+chunk+serialize "
              f"{best[1] * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
