#!/usr/bin/python3
"""Writes the seed corpus of step_reader_fuzz (tests/fuzz/corpus/), with the
real protobuf classes. Run once after changing the input format:

    PYTHONPATH=build/python /usr/bin/python3 tests/fuzz/make_corpus.py tests/fuzz/corpus

Input format (step_reader_fuzz.cc): a mode byte, then records of a 2-byte
little-endian length and a serialized message.
"""
import os
import struct
import sys

from muon.v1 import optimizer_pb2 as pb

# The fuzz target's session: (name, bytes, element size).
PARAMS = [("w", 48, 4), ("h", 10, 2), ("f", 24, 2), ("one", 4, 4)]


def header(step=1):
    r = pb.StepRequest()
    r.header.session_id = "fuzz"
    r.header.step = step
    return r


def chunk(index, offset, data, dtype=pb.DTYPE_UNSPECIFIED):
    r = pb.StepRequest()
    r.gradient.param_index = index
    r.gradient.offset = offset
    r.gradient.data = data
    r.gradient.dtype = dtype
    return r


def end(indices):
    r = pb.StepRequest()
    r.end.param_indices.extend(indices)
    return r


def whole(index, piece):
    size = PARAMS[index][1]
    return [chunk(index, off, bytes(range(off, off + min(piece, size - off))))
            for off in range(0, size, piece)]


def encode(mode, messages):
    out = bytes([mode])
    for m in messages:
        data = m.SerializeToString()
        out += struct.pack("<H", len(data)) + data
    return out


def seeds():
    everything = [c for i in range(len(PARAMS)) for c in whole(i, PARAMS[i][2] * 2)]
    # A half-close without StepEnd is refused, however complete the step.
    yield "no_step_end", encode(0, [header()] + everything)
    yield "full_step_end", encode(0, [header()] + everything + [end([0, 1, 2, 3])])
    # The same through StepMachine (mode bit 2) and its fake backend.
    yield "machine_step_end", encode(4, [header()] + everything + [end([0, 1, 2, 3])])
    yield "machine_no_step_end", encode(4, [header()] + everything)
    yield "machine_replay", encode(6, [header()] + everything + [end([0])])
    yield "subset_reversed", encode(0, [header()] + whole(2, 4)[::-1] + [end([2])])
    yield "one_chunk_each", encode(0, [header()] + [c for i in range(4) for c in whole(i, 64)]
                                   + [end([0, 1, 2, 3])])
    yield "missing_chunk", encode(0, [header()] + whole(0, 8)[1:] + [end([0])])
    yield "overlap", encode(0, [header(), chunk(0, 0, bytes(8)), chunk(0, 4, bytes(8))])
    yield "out_of_bounds", encode(0, [header(), chunk(1, 8, bytes(4))])
    yield "misaligned", encode(0, [header(), chunk(0, 2, bytes(4))])
    yield "bad_index", encode(0, [header(), chunk(7, 0, bytes(4)), end([9])])
    yield "dtype_mismatch", encode(0, [header(), chunk(1, 0, bytes(10), pb.DTYPE_FLOAT32)])
    yield "dtype_match", encode(0, [header(), chunk(2, 0, bytes(24), pb.DTYPE_FLOAT16),
                                    end([2])])
    yield "end_twice_listed", encode(0, [header()] + whole(3, 4) + [end([3, 3])])
    yield "not_listed", encode(0, [header()] + whole(3, 4) + whole(1, 10) + [end([3])])
    yield "no_header", encode(0, everything[:2])
    yield "two_headers", encode(0, [header(), header()])
    yield "empty_request", encode(0, [header(), pb.StepRequest()])
    yield "replay", encode(2, [header()] + everything + [end([0])])
    yield "replay_no_step_end", encode(2, [header()] + everything)
    create = pb.CreateSessionRequest(name="seed")
    p = create.params.add(name="w", shape=[4, 3], dtype=pb.DTYPE_BFLOAT16)
    p.overrides.lr = 0.01
    create.params.add(name="b", shape=[3], kind=pb.OPTIMIZER_KIND_ADAMW)
    create.params.add(name="conv", shape=[2, 3, 3, 3], dtype=pb.DTYPE_FLOAT16)
    create.hyper_params.ns_schedule = pb.NS_SCHEDULE_POLAR_EXPRESS
    create.adamw_hyper_params.adam_beta2 = 0.99
    yield "create_session", encode(1, [create])
    bad = pb.CreateSessionRequest()
    bad.params.add(name="x", shape=[1 << 30, 1 << 30])
    bad.params.add(name="x", shape=[0])
    yield "create_session_bad", encode(1, [bad])


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
