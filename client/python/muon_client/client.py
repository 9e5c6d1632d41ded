"""A plain muon-server client: numpy arrays in, numpy arrays out.

    client = MuonClient("127.0.0.1:50051")
    session = client.create_session([ParamSpec("w", (256, 128))], lr=0.02)
    result = session.step({0: grad})          # {index: np.ndarray}
    w = result.decay[0] * w + result.updates[0]

A step's updates are returned only after the server's summary, which is the
commit: if the stream breaks first, nothing was applied on either side and the
step is retried with the same step number (the server applies it exactly
once).

Parameter-server sessions (mode="parameter_server") hold the weights on the
server: push_weights uploads them, each of num_workers workers sends every
parameter's gradient with its worker_id, and each committed step returns the
new weights (StepResult.weights). docs/parameter-server.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import grpc
import numpy as np

from ._stubs import pb, pb_grpc

try:  # torch's bf16 conversion is vectorised; the numpy one below is the fallback
    import torch as _torch
except ImportError:  # the numpy client needs no torch
    _torch = None

CHUNK_BYTES = 1 << 20
_MASK64 = (1 << 64) - 1


def rendezvous_score(server: str, name: str) -> int:
    """The weight of `server` for parameter `name` in rendezvous hashing: FNV-1a
    (64-bit) of server, a zero byte and name, then the splitmix64 finalizer.
    Each parameter goes to the server with the highest score, so adding or
    removing a server moves only the parameters it wins or held. The C++
    client computes the same function."""
    h = 0xCBF29CE484222325
    for byte in server.encode() + b"\0" + name.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
    return h ^ (h >> 31)


def place(servers: Sequence[str], name: str) -> int:
    """Index of the server that holds parameter `name`."""
    return max(range(len(servers)), key=lambda i: (rendezvous_score(servers[i], name), -i))

_DTYPES = {
    "float32": pb.DTYPE_FLOAT32,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float16": pb.DTYPE_FLOAT16,
}
_ELEMENT_BYTES = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT16: 2}
_KINDS = {"muon": pb.OPTIMIZER_KIND_MUON, "adamw": pb.OPTIMIZER_KIND_ADAMW}
_SCHEDULES = {
    "jordan": pb.NS_SCHEDULE_JORDAN,
    "dion": pb.NS_SCHEDULE_DION,
    "polar_express": pb.NS_SCHEDULE_POLAR_EXPRESS,
    "aol": pb.NS_SCHEDULE_AOL,
    "aol_dion": pb.NS_SCHEDULE_AOL_DION,
    "svd": pb.NS_SCHEDULE_SVD,
}
_SHAPE_SCALES = {
    "spectral": pb.SHAPE_SCALE_SPECTRAL,
    "rms_match": pb.SHAPE_SCALE_RMS_MATCH,
    "none": pb.SHAPE_SCALE_NONE,
}
_MOMENTUM_FORMS = {"ema": pb.MOMENTUM_FORM_EMA, "sum": pb.MOMENTUM_FORM_SUM}
_MODES = {"updates": pb.SESSION_MODE_UPDATES,
          "parameter_server": pb.SESSION_MODE_PARAMETER_SERVER}
_CONTENTS = {"update": pb.UPDATE_CONTENT_UPDATE, "weights": pb.UPDATE_CONTENT_WEIGHTS}
_STATE_NAMES = {pb.STATE_TENSOR_MOMENTUM: "momentum", pb.STATE_TENSOR_EXP_AVG: "exp_avg",
                pb.STATE_TENSOR_EXP_AVG_SQ: "exp_avg_sq"}

# Failures after which resending the same step is safe and may succeed: the
# step number makes a resent step apply exactly once, and a step that ran out
# of its deadline changed nothing or is answered from the server's cache.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
              grpc.StatusCode.DEADLINE_EXCEEDED}
# Retries wait retry_backoff, doubling, but never longer than this, so a
# server that is back is found within about a second.
_MAX_RETRY_SLEEP = 1.0


@dataclasses.dataclass
class Timeouts:
    """How long calls may take and how long failures are retried, in seconds.

    step: the deadline of one Step attempt (a generous default: a slow step
      must not hit it by accident; a server that stops answering is found by
      the keepalive long before).
    retry_window: how long a step keeps being retried after failures that are
      safe to retry (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED), counted from
      the first failure; long enough for a server restart that restores its
      sessions from checkpoints.
    connect: how long session calls (create, attach, push, pull) wait for a
      server that is not up yet.
    keepalive_time / keepalive_timeout: the channel pings the server after
      keepalive_time without traffic and drops the connection when no answer
      comes within keepalive_timeout. muon-server accepts pings every 10 s or
      more (and pings its clients every 30 s, dropping them after 20 s).
    """

    step: float = 600.0
    retry_window: float = 120.0
    connect: float = 60.0
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0


class CancelToken:
    """Cancels a step in flight from another thread (RemoteMuon uses it on
    KeyboardInterrupt): the open Step calls are cancelled and no retry starts."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._calls = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()

    def wait(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True when cancelled meanwhile."""
        return self._event.wait(seconds)

    def _register(self, call) -> None:
        with self._lock:
            if not self._event.is_set():
                self._calls.append(call)
                return
        call.cancel()

    def _unregister(self, call) -> None:
        with self._lock:
            if call in self._calls:
                self._calls.remove(call)


class MuonServerError(RuntimeError):
    """The server answered with an error; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"muon-server: {code.name}: {message}")
        self.code = code
        self.details = message


def _lookup(table: Mapping[str, int], what: str, name: str) -> int:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(table)}") from None


def _error(e: grpc.RpcError) -> MuonServerError:
    return MuonServerError(e.code(), e.details() or "")


def _bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bits, rounded to nearest with ties to even; every NaN
    becomes 0x7FC0 (torch's vectorised conversion gives 0xFFFF, its scalar
    one 0x7FC0: the fix-up keeps one answer)."""
    if _torch is not None:
        bits = _torch.from_numpy(a).to(_torch.bfloat16).view(_torch.int16).numpy().view(np.uint16)
    else:
        # In uint32: only NaNs (replaced below) overflow the rounding add.
        wide = a.view(np.uint32)
        rounded = wide >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += wide
        rounded >>= 16
        bits = rounded.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def to_wire(array: np.ndarray, dtype: str,
            out: Optional[bytearray] = None) -> Union[bytes, bytearray]:
    """Encodes a float array as little-endian bytes of the wire dtype: into
    `out` when given and of the encoding's size (a buffer kept from an
    earlier step), else into new bytes."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "float32":
        encoded = a.astype("<f4", copy=False)
    elif dtype == "float16":
        encoded = a.astype("<f2")
    elif dtype == "bfloat16":
        encoded = _bfloat16_bits(a).astype("<u2", copy=False)
    else:
        raise ValueError(f"unknown wire dtype {dtype!r}")
    if out is None or len(out) != encoded.nbytes:
        return encoded.tobytes()
    np.copyto(np.frombuffer(out, dtype=encoded.dtype), encoded.reshape(-1))
    return out


def _buffer(buffers: dict, key, total_bytes: int,
            kept: Optional[Dict[int, bytearray]] = None) -> bytearray:
    """The receive buffer of `key`, made at its first chunk: made anew for
    every chunk (as `setdefault(key, bytearray(n))` would), a tensor of k
    chunks costs k zero-filled buffers of its whole size. A buffer of that
    size in `kept` (Session.recycle) is used instead of a new one."""
    buf = buffers.get(key)
    if buf is None:
        old = kept.pop(key, None) if kept is not None else None
        buf = buffers[key] = old if old is not None and len(old) == total_bytes else bytearray(
            total_bytes)
    return buf


def from_wire(data: Union[bytes, bytearray], dtype: int, shape: Sequence[int]) -> np.ndarray:
    """Decodes little-endian wire bytes into a float32 array of `shape`; fp32
    in a bytearray (a buffer the caller hands over) is used in place."""
    if dtype == pb.DTYPE_FLOAT32:
        out = np.frombuffer(data, dtype="<f4").astype(np.float32,
                                                    copy=not isinstance(data, bytearray))
    elif dtype == pb.DTYPE_FLOAT16:
        out = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == pb.DTYPE_BFLOAT16:
        out = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise MuonServerError(grpc.StatusCode.INTERNAL, f"update in unknown dtype {dtype}")
    return out.reshape(tuple(shape))


@dataclasses.dataclass
class ParamSpec:
    """One parameter: its name, shape, wire dtype, optimizer and overrides."""

    name: str
    shape: Sequence[int]
    dtype: str = "float32"
    kind: Optional[str] = None  # "muon" | "adamw"; default by ndim (>= 2: muon)
    overrides: Dict[str, object] = dataclasses.field(default_factory=dict)


def hyper_params(**hp) -> "pb.HyperParams":
    """Builds a HyperParams message from keyword arguments; None leaves a field unset.

    Keys: lr, weight_decay, momentum, nesterov, momentum_form, ns_schedule,
    ns_steps, shape_scale, betas, eps (AdamW's), ns_coefficients (a list of
    (a, b, c) triples: a custom Newton–Schulz schedule), ns_eps.
    """
    msg = pb.HyperParams()
    for key, value in hp.items():
        if value is None:
            continue
        if key in ("lr", "weight_decay", "momentum"):
            setattr(msg, key, float(value))
        elif key == "nesterov":
            msg.nesterov = bool(value)
        elif key == "ns_steps":
            msg.ns_steps = int(value)
        elif key == "momentum_form":
            msg.momentum_form = _lookup(_MOMENTUM_FORMS, "momentum form", value)
        elif key == "ns_schedule":
            msg.ns_schedule = _lookup(_SCHEDULES, "Newton-Schulz schedule", value)
        elif key == "shape_scale":
            msg.shape_scale = _lookup(_SHAPE_SCALES, "shape scale", value)
        elif key == "betas":
            msg.adam_beta1, msg.adam_beta2 = (float(b) for b in value)
        elif key == "eps":
            msg.adam_eps = float(value)
        elif key == "ns_coefficients":
            for a, b, c in value:
                msg.ns_coefficients.add(a=float(a), b=float(b), c=float(c))
        elif key == "ns_eps":
            msg.ns_eps = float(value)
        else:
            raise ValueError(f"unknown hyper-parameter {key!r}")
    return msg


@dataclasses.dataclass
class StepResult:
    """What a committed step returned: per parameter index, the update (fp32)
    and the decay factor; apply W <- decay * W + update. A parameter-server
    step asked for weights (the default there) fills `weights`, the new
    weights (fp32), instead of `updates` and `decay`."""

    step: int
    updates: Dict[int, np.ndarray]
    decay: Dict[int, float]
    summary: "pb.StepSummary"
    weights: Dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    # The receive buffers (fp32 updates and weights are views of them), for
    # Session.recycle.
    buffers: Dict[int, bytearray] = dataclasses.field(default_factory=dict, repr=False,
                                                       compare=False)


class Session:
    """A session on the server. Not thread-safe: one step at a time."""

    def __init__(self, client: "MuonClient", session_id: str, token: str, step: int,
                 params: List[ParamSpec]):
        self._client = client
        self.session_id = session_id
        self.token = token
        self.step_number = step  # last committed step
        self.params = params
        # Buffers handed back by recycle(), by parameter index.
        self._kept_updates: Dict[int, bytearray] = {}
        self._kept_wire: Dict[int, bytearray] = {}

    def step(self, grads: Mapping[int, np.ndarray], *, lr_scale: Optional[float] = None,
             lr: Optional[float] = None, update_dtype: Optional[str] = None,
             measure_orthogonality: bool = False, retries: Optional[int] = None,
             step_number: Optional[int] = None, worker_id: int = 0,
             update_content: Optional[str] = None,
             cancel: Optional[CancelToken] = None) -> StepResult:
        """Runs the next step with these gradients (parameters left out keep
        their state). Retries a broken stream, a step past its deadline (and,
        in a parameter-server session, a step that timed out waiting for other
        workers: ABORTED) until the client's retry window has passed, or at
        most `retries` times when given; raises MuonServerError on a server
        error or when the retries ran out. `cancel` stops it from another
        thread (MuonServerError CANCELLED).
        `step_number` (default: the next) may name the last committed step to
        have its updates replayed.

        Parameter-server sessions: `grads` must hold every parameter,
        `worker_id` is this worker's id in [0, num_workers), and
        `update_content` ("weights", the server's default there, or "update")
        says what comes back. Leave `update_content` unset otherwise."""
        return self.step_wire(self.encode(grads), lr_scale=lr_scale, lr=lr,
                              update_dtype=update_dtype,
                              measure_orthogonality=measure_orthogonality, retries=retries,
                              step_number=step_number, worker_id=worker_id,
                              update_content=update_content, cancel=cancel)

    def encode(self, grads: Mapping[int, np.ndarray]) -> Dict[int, bytes]:
        """The gradients as wire bytes (a copy: later changes to `grads` do
        not reach a step sent, or resent, from them)."""
        unknown = sorted(set(grads) - set(range(len(self.params))))
        if unknown:
            raise ValueError(f"parameter indices {unknown} are not in this session "
                             f"({len(self.params)} parameters)")
        return {i: self._encode_one(i, g) for i, g in grads.items()}

    def _encode_one(self, index: int, array: np.ndarray) -> Union[bytes, bytearray]:
        return to_wire(array, self.params[index].dtype, self._kept_wire.pop(index, None))

    def recycle(self, result: Optional[StepResult] = None,
                wire: Optional[Mapping[int, Union[bytes, bytearray]]] = None) -> None:
        """Hands buffers back for the next steps to fill instead of new ones:
        a result's receive buffers (its update and weight arrays must not be
        used afterwards) and the wire bytes of a step that committed (encode()'s
        output; not to be sent again). A new buffer of a tensor's size is pages
        the kernel zero-fills on first touch, a third of the client's time on a
        GPT-2-small step (docs/performance.md). Optional: buffers not handed
        back are freed as usual; the session keeps one of each kind per
        parameter, as much memory as a step's updates and gradients."""
        if result is not None:
            for i, buf in result.buffers.items():
                self._kept_updates[i] = buf
        for i, data in (wire or {}).items():
            if isinstance(data, bytearray):
                self._kept_wire[i] = data
            elif len(data) > 0:  # bytes: a bytearray of its size serves the next encoding
                self._kept_wire.setdefault(i, bytearray(len(data)))

    def step_wire(self, wire: Mapping[int, bytes], *, lr_scale: Optional[float] = None,
                  lr: Optional[float] = None, update_dtype: Optional[str] = None,
                  measure_orthogonality: bool = False, retries: Optional[int] = None,
                  step_number: Optional[int] = None, worker_id: int = 0,
                  update_content: Optional[str] = None,
                  cancel: Optional[CancelToken] = None,
                  param_options: Optional[Mapping[int, Mapping[str, object]]] = None,
                  grad_scale: Optional[float] = None,
                  stream: Optional["StepStream"] = None) -> StepResult:
        """step() with gradients already encoded (encode()). `param_options`:
        {index: hyper-parameters for this step} (hyper_params keys lr,
        weight_decay, momentum, nesterov, betas, eps), replacing the
        configured ones (updates sessions). `grad_scale` (updates sessions):
        the server multiplies every gradient by it before the optimizer uses
        them (global-norm clipping; StepEnd.grad_scale), finite and > 0.
        `stream`: a StepStream of this step (open_stream) to finish first;
        `wire` is then ignored, and a retry resends the stream's gradients."""
        number = self.step_number + 1 if step_number is None else step_number
        if stream is not None:
            number = stream.step
        result = self._client._run_step(self, number, wire, lr=lr, lr_scale=lr_scale,
                                        update_dtype=update_dtype,
                                        measure_orthogonality=measure_orthogonality,
                                        retries=retries, worker_id=worker_id,
                                        update_content=update_content, cancel=cancel,
                                        param_options=param_options, grad_scale=grad_scale,
                                        stream=stream)
        self.step_number = result.step
        return result

    def open_stream(self, *, lr: Optional[float] = None,
                    param_options: Optional[Mapping[int, Mapping[str, object]]] = None,
                    measure_orthogonality: bool = False, defer_compute: bool = False,
                    step_number: Optional[int] = None) -> "StepStream":
        """Updates sessions: opens the next step's Step stream now, to be fed
        gradient by gradient (StepStream.add) while they are produced and
        finished with step_wire(stream=...). `defer_compute`: the server
        computes only at StepEnd, so the step may carry a grad_scale."""
        number = self.step_number + 1 if step_number is None else step_number
        header = self._client._header_fields(
            lr=lr, lr_scale=None, update_dtype=None, measure_orthogonality=measure_orthogonality,
            worker_id=0, update_content=None, param_options=param_options,
            defer_compute=defer_compute)
        return StepStream(self, number, header)

    def info(self) -> "pb.SessionInfo":
        return self._client.get_session(self.session_id, self.token)

    def push_weights(self, weights: Mapping[int, np.ndarray], dtype: str = "float32") -> int:
        """Parameter-server sessions: MuonClient.push_weights for this session."""
        return self._client.push_weights(self, weights, dtype=dtype)

    def pull_weights(self, indices: Iterable[int] = (), dtype: str = "float32"):
        """Parameter-server sessions: MuonClient.pull_weights for this session."""
        return self._client.pull_weights(self, indices, dtype=dtype)

    def export_state(self):
        """MuonClient.export_state for this session."""
        return self._client.export_state(self)

    def import_state(self, param_steps: Sequence[int],
                     tensors: Mapping[int, Mapping[str, np.ndarray]]) -> int:
        """MuonClient.import_state for this session."""
        return self._client.import_state(self, param_steps, tensors)

    def add_params(self, params: Sequence[ParamSpec]) -> int:
        """MuonClient.add_parameters for this session."""
        return self._client.add_parameters(self, params)

    def delete(self) -> None:
        self._client.delete_session(self.session_id, self.token)


_CANCEL = object()


class StepStream:
    """One Step call fed while its gradients are being produced (RemoteMuon
    streams them during backward). add() queues a gradient and returns at
    once; gRPC's request thread encodes and sends it; a reader thread keeps
    the updates. Session.step_wire(stream=...) sends StepEnd and waits for
    the commit. cancel() abandons the step: StepEnd was never sent, so the
    server applies nothing. The encoded gradients stay for a retry.
    add() and cancel() may be called from any thread."""

    def __init__(self, session: Session, step: int, header: Mapping[str, object]):
        self.session = session
        self.step = step
        self.defer_compute = bool(header.get("defer_compute", False))
        self._header = dict(header)
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sources: Dict[int, object] = {}
        self._wire: Dict[int, bytes] = {}
        self._closed = False  # StepEnd queued or cancelled: add() refused
        self._done = threading.Event()
        self._result: Optional[StepResult] = None
        self._error: Optional[BaseException] = None
        client = session._client
        self.call = client._step_call(self._requests(), timeout=client.timeouts.step)
        threading.Thread(target=self._read, name="muon-step-reader", daemon=True).start()

    @property
    def indices(self) -> List[int]:
        """The parameters added so far, in order."""
        with self._lock:
            return list(self._sources)

    def add(self, index: int, source) -> None:
        """Queues parameter `index`'s gradient: a float array, or a callable
        returning one, read once when it is encoded (so it must not change
        until the step ends: RemoteMuon checks that)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"step {self.step}'s stream is closed; nothing more is added")
            if index in self._sources:
                raise ValueError(f"parameter {index} is already in step {self.step}'s stream")
            self._sources[index] = source
        self._queue.put(index)

    def cancel(self) -> None:
        """Abandons the step; nothing of it is applied."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CANCEL)
        self.call.cancel()

    def complete_wire(self) -> Dict[int, bytes]:
        """Every added gradient, encoded (those the sender did not reach are
        encoded now): what a retry of this step sends."""
        return {i: self._encoded(i) for i in self.indices}

    def _encoded(self, index: int) -> bytes:
        with self._lock:
            if index not in self._wire:
                source = self._sources[index]
                array = source() if callable(source) else source
                self._wire[index] = self.session._encode_one(index, array)
                self._sources[index] = None  # the encoding is the copy a retry needs
            return self._wire[index]

    def _end(self, grad_scale: Optional[float]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"step {self.step}'s stream was cancelled")
            self._closed = True
            indices = list(self._sources)
        end = pb.StepEnd(param_indices=indices)
        if grad_scale is not None:
            end.grad_scale = float(grad_scale)
        self._queue.put(end)

    def _requests(self):
        yield pb.StepRequest(header=pb.StepHeader(session_id=self.session.session_id,
                                                  token=self.session.token, step=self.step,
                                                  **self._header)).SerializeToString()
        while True:
            item = self._queue.get()
            if item is _CANCEL:
                return
            if isinstance(item, pb.StepEnd):
                yield pb.StepRequest(end=item).SerializeToString()
                return
            yield from _gradient_requests(self.session, item, self._encoded(item))

    def _read(self) -> None:
        try:
            self._result = self.session._client._read_step(self.session, self.call)
        except (grpc.RpcError, MuonServerError) as e:
            self._error = e
        finally:
            self._done.set()

    def _finish(self, grad_scale: Optional[float]) -> StepResult:
        """Sends StepEnd and waits for the summary; raises what the call
        raised (grpc.RpcError for a broken stream)."""
        self._end(grad_scale)
        while not self._done.wait(0.25):  # in slices: a KeyboardInterrupt gets through
            pass
        if self._error is not None:
            raise self._error
        return self._result


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Protobuf's tags of StepRequest.gradient (field 2) and TensorChunk.data
# (field 3), both length-delimited.
_GRADIENT_TAG = b"\x12"
_DATA_TAG = b"\x1a"


def _chunk_request(index: int, offset: int, dtype: int, data: memoryview) -> bytes:
    """StepRequest{gradient: TensorChunk{index, offset, dtype, data}}, serialized.

    Python's protobuf takes `bytes` only (no memoryview), so a message per
    chunk costs a slice copy, a copy into the message and one to serialize
    it. Instead protobuf serializes the small fields and the data follows
    them, with its tag and length, inside the one `gradient` field: the
    bytes are copied once, from the view, and the message is in the plain
    encoding the server reads in place (docs/architecture.md)."""
    fields = pb.TensorChunk(param_index=index, offset=offset, dtype=dtype).SerializeToString()
    data_prefix = _DATA_TAG + _varint(len(data))
    return b"".join((_GRADIENT_TAG, _varint(len(fields) + len(data_prefix) + len(data)), fields,
                     data_prefix, data))


def _gradient_requests(session: Session, index: int, data: bytes):
    """One gradient's chunks, in order, serialized."""
    # An index the session lacks is sent as is: the server names it (NOT_FOUND).
    dtype = (_DTYPES[session.params[index].dtype] if index < len(session.params)
             else pb.DTYPE_UNSPECIFIED)
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK_BYTES):
        yield _chunk_request(index, offset, dtype, view[offset:offset + CHUNK_BYTES])


def _pem(value: Union[None, bytes, str, "os.PathLike[str]"]) -> Optional[bytes]:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _add_specs(out, params: Sequence[ParamSpec]) -> None:
    """Appends `params` as ParameterSpec messages to the repeated field `out`."""
    for p in params:
        spec = out.add(name=p.name, shape=list(p.shape), dtype=_lookup(_DTYPES, "dtype", p.dtype))
        if p.kind is not None:
            spec.kind = _lookup(_KINDS, "optimizer kind", p.kind)
        spec.overrides.CopyFrom(hyper_params(**p.overrides))


class MuonClient:
    """Connection to one muon-server. Thread-safe; sessions are not.

    TLS: pass root_certificates (the CA that signed the server's certificate;
    omit it with tls=True for gRPC's default roots) and, for mutual TLS,
    certificate_chain and private_key. Each is PEM bytes or a path to a PEM
    file. server_name overrides the name the server's certificate must carry.
    admin_token is sent by list_sessions unless one is passed there.
    timeouts (Timeouts): step deadline, retry window, connect wait, keepalive.
    """

    def __init__(self, server: str, *, channel: Optional[grpc.Channel] = None,
                 retry_backoff: float = 0.05, tls: bool = False,
                 root_certificates=None, certificate_chain=None, private_key=None,
                 server_name: Optional[str] = None, admin_token: str = "",
                 timeouts: Optional[Timeouts] = None):
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")
        self.server = server
        self.timeouts = timeouts or Timeouts()
        for field in dataclasses.fields(self.timeouts):
            value = getattr(self.timeouts, field.name)
            if not value > 0:
                raise ValueError(f"timeout {field.name} must be > 0 seconds, got {value!r}")
        # gRPC waits 1 s before reconnecting after a failed connect, then
        # longer and longer (up to 2 min), failing every call meanwhile; the
        # step retries (retry_backoff, doubling, at most 1 s apart) must meet
        # a fresh attempt, so a restarted server is found at once.
        reconnect_ms = max(1, int(retry_backoff * 1000))
        options = [("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
                   ("grpc.max_reconnect_backoff_ms",
                    max(reconnect_ms, int(_MAX_RETRY_SLEEP * 1000))),
                   ("grpc.keepalive_time_ms", int(self.timeouts.keepalive_time * 1000)),
                   ("grpc.keepalive_timeout_ms", int(self.timeouts.keepalive_timeout * 1000)),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if channel is None and (tls or root_certificates is not None
                                or certificate_chain is not None):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates), private_key=_pem(private_key),
                certificate_chain=_pem(certificate_chain))
            channel = grpc.secure_channel(server, credentials, options=options)
        self._channel = channel or grpc.insecure_channel(server, options=options)
        self._stub = pb_grpc.OptimizerStub(self._channel)
        # Step with requests serialized by _requests (see _chunk_request).
        self._step_call = self._channel.stream_stream(
            "/muon.v1.Optimizer/Step", request_serializer=None,
            response_deserializer=pb.StepResponse.FromString)
        self._backoff = retry_backoff
        self._admin_token = admin_token

    def close(self) -> None:
        self._channel.close()

    def _unreachable(self, e: grpc.RpcError, what: str) -> MuonServerError:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return MuonServerError(e.code(), f"{what}: muon-server at {self.server} did not "
                                   f"answer in time (is it running and reachable?): "
                                   f"{e.details() or ''}")
        return _error(e)

    def _wait_ready(self, seconds: float, cancel: Optional[CancelToken] = None) -> None:
        """Waits up to `seconds` for the channel to connect. Asking for the
        connection makes gRPC try at once: a failed call alone leaves the
        channel in its reconnect back-off, which took 6-10 s to notice a
        restarted server (gRPC 1.51, loopback)."""
        ready = grpc.channel_ready_future(self._channel)
        if cancel is not None:
            cancel._register(ready)
        try:
            ready.result(timeout=max(seconds, 0.001))
        except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
            pass
        finally:
            if cancel is not None:
                cancel._unregister(ready)
            ready.cancel()

    def _unary(self, method, request, what: str):
        """Calls `method`, waiting up to the connect timeout for a server that
        is not up yet (UNAVAILABLE: nothing reached it)."""
        start = time.monotonic()
        remaining = self.timeouts.connect
        while True:
            try:
                # Not less than half a second: time for a refused handshake
                # to say so rather than run out of the deadline.
                return method(request, timeout=max(remaining, 0.5))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._unreachable(e, what) from None
                details = e.details() or ""
            # At most a second per wait, so a refused handshake is retried
            # and its error reported once the connect timeout has passed.
            self._wait_ready(min(self.timeouts.connect - (time.monotonic() - start),
                                 _MAX_RETRY_SLEEP))
            remaining = self.timeouts.connect - (time.monotonic() - start)
            if remaining <= 0:
                raise MuonServerError(
                    grpc.StatusCode.UNAVAILABLE, f"{what}: muon-server at {self.server} not "
                    f"reachable for {self.timeouts.connect:g} s (connect timeout): {details}")

    def create_session(self, params: Sequence[ParamSpec], *, name: str = "",
                       adamw: Optional[Mapping[str, object]] = None, mode: str = "updates",
                       num_workers: int = 1, **hp) -> Session:
        """Registers `params` with session-wide hyper-parameters `hp` (see
        hyper_params) and AdamW-only ones `adamw`. `mode` "parameter_server"
        makes the server hold the weights (push them with push_weights), with
        `num_workers` workers sending gradients each step."""
        request = pb.CreateSessionRequest(name=name, hyper_params=hyper_params(**hp),
                                          adamw_hyper_params=hyper_params(**(adamw or {})),
                                          mode=_lookup(_MODES, "session mode", mode),
                                          num_workers=num_workers)
        _add_specs(request.params, params)
        response = self._unary(self._stub.CreateSession, request, "CreateSession")
        return Session(self, response.session_id, response.token, response.step, list(params))

    def add_parameters(self, session: Session, params: Sequence[ParamSpec]) -> int:
        """Updates sessions, between steps: adds `params` (zeroed state; the
        session's hyper-parameters apply under their overrides), all or none,
        and appends them to session.params. Returns the index of the first.
        Retried only while the server is unreachable: a repeat of a call that
        did succeed is refused, since the names are then taken."""
        request = pb.AddParametersRequest(session_id=session.session_id, token=session.token)
        _add_specs(request.params, params)
        response = self._unary(self._stub.AddParameters, request, "AddParameters")
        session.params = session.params + list(params)
        return response.first_index

    def attach(self, session_id: str, token: str, params: Sequence[ParamSpec]) -> Session:
        """Reattaches to an existing session (e.g. from a saved state_dict)."""
        info = self.get_session(session_id, token)
        if info.num_params != len(params):
            raise ValueError(f"session {session_id} has {info.num_params} parameters, "
                             f"this model {len(params)}")
        return Session(self, session_id, token, info.step, list(params))

    def get_session(self, session_id: str, token: str = "") -> "pb.SessionInfo":
        return self._unary(self._stub.GetSession,
                           pb.GetSessionRequest(session_id=session_id, token=token), "GetSession")

    def list_sessions(self, admin_token: str = "") -> List["pb.SessionInfo"]:
        """Every session, without parameters. Needs the server's admin token
        when it has one (this argument, else the client's admin_token)."""
        return list(self._unary(
            self._stub.ListSessions,
            pb.ListSessionsRequest(admin_token=admin_token or self._admin_token),
            "ListSessions").sessions)

    def delete_session(self, session_id: str, token: str = "",
                       timeout: Optional[float] = None) -> None:
        """Deletes a session; `timeout` (default: the connect timeout) bounds the wait."""
        try:
            self._stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id, token=token),
                                     timeout=self.timeouts.connect if timeout is None else timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def push_weights(self, session: Session, weights: Mapping[int, np.ndarray],
                     dtype: str = "float32") -> int:
        """Parameter-server sessions: replaces the weights the server holds for
        the parameters in `weights` ({index: array}), all at once and only if
        every one is valid. Sent as `dtype`; the server keeps fp32. Returns the
        session's step, which a push does not change."""
        wire_dtype = _lookup(_DTYPES, "dtype", dtype)

        def requests():
            yield pb.PushWeightsRequest(header=pb.PushWeightsHeader(
                session_id=session.session_id, token=session.token, dtype=wire_dtype))
            for index, array in weights.items():
                data = to_wire(array, dtype)
                for offset in range(0, len(data), CHUNK_BYTES):
                    yield pb.PushWeightsRequest(weights=pb.TensorChunk(
                        param_index=index, offset=offset, dtype=wire_dtype,
                        data=data[offset:offset + CHUNK_BYTES]))

        try:
            return self._stub.PushWeights(requests(), timeout=self.timeouts.step,
                                          wait_for_ready=True).step
        except grpc.RpcError as e:
            raise self._unreachable(e, "PushWeights") from None

    def pull_weights(self, session: Session, indices: Iterable[int] = (),
                     dtype: str = "float32"):
        """Parameter-server sessions: the weights the server holds as of its
        last committed step, as (step, {index: fp32 array}); `indices` empty:
        every parameter. "float32" (the default) is exact: the server keeps fp32."""
        request = pb.PullWeightsRequest(session_id=session.session_id, token=session.token,
                                        param_indices=list(indices),
                                        dtype=_lookup(_DTYPES, "dtype", dtype))
        buffers: Dict[int, bytearray] = {}
        dtypes: Dict[int, int] = {}
        step = session.step_number
        try:
            for response in self._stub.PullWeights(request, timeout=self.timeouts.step,
                                                   wait_for_ready=True):
                chunk = response.weights
                buf = _buffer(buffers, chunk.param_index, response.total_bytes)
                buf[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
                dtypes[chunk.param_index] = response.dtype
                step = response.step
        except grpc.RpcError as e:
            raise self._unreachable(e, "PullWeights") from None
        return step, {i: from_wire(bytes(buf), dtypes[i], session.params[i].shape)
                      for i, buf in buffers.items()}

    def export_state(self, session: Session):
        """Updates-mode sessions: a copy of the optimizer state as of the last
        committed step, as (step, param_steps, {index: {name: fp32 array}}),
        names "momentum" (Muon) or "exp_avg" and "exp_avg_sq" (AdamW);
        param_steps[i]: the steps parameter i has applied. Exact (fp32)."""
        request = pb.ExportStateRequest(session_id=session.session_id, token=session.token)
        buffers: Dict[tuple, bytearray] = {}
        step, param_steps = session.step_number, []
        try:
            for response in self._stub.ExportState(request, timeout=self.timeouts.step,
                                                   wait_for_ready=True):
                step = response.step
                if response.param_steps:
                    param_steps = list(response.param_steps)
                chunk = response.chunk
                key = (chunk.param_index, chunk.tensor)
                buf = _buffer(buffers, key, chunk.total_bytes)
                buf[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
        except grpc.RpcError as e:
            raise self._unreachable(e, "ExportState") from None
        tensors: Dict[int, Dict[str, np.ndarray]] = {}
        for (index, tensor), buf in buffers.items():
            tensors.setdefault(index, {})[_STATE_NAMES[tensor]] = from_wire(
                bytes(buf), pb.DTYPE_FLOAT32, session.params[index].shape)
        return step, param_steps, tensors

    def import_state(self, session: Session, param_steps: Sequence[int],
                     tensors: Mapping[int, Mapping[str, np.ndarray]]) -> int:
        """Updates-mode sessions that have not stepped: sets every parameter's
        state (what export_state returned, from any server), all at once and
        only if all of it is valid. Returns the session's step (unchanged)."""
        codes = {name: code for code, name in _STATE_NAMES.items()}

        def requests():
            yield pb.ImportStateRequest(header=pb.ImportStateHeader(
                session_id=session.session_id, token=session.token,
                param_steps=[int(n) for n in param_steps]))
            for index, named in tensors.items():
                for name, array in named.items():
                    data = to_wire(array, "float32")
                    for offset in range(0, len(data), CHUNK_BYTES):
                        yield pb.ImportStateRequest(chunk=pb.StateChunk(
                            param_index=index, tensor=_lookup(codes, "state tensor", name),
                            offset=offset, data=data[offset:offset + CHUNK_BYTES],
                            total_bytes=len(data)))

        try:
            return self._stub.ImportState(requests(), timeout=self.timeouts.step,
                                          wait_for_ready=True).step
        except grpc.RpcError as e:
            raise self._unreachable(e, "ImportState") from None

    def _requests(self, session: Session, step: int, wire: Mapping[int, bytes],
                  grad_scale: Optional[float], **header):
        yield pb.StepRequest(header=pb.StepHeader(session_id=session.session_id,
                                                  token=session.token, step=step,
                                                  **header)).SerializeToString()
        for index, data in wire.items():
            yield from _gradient_requests(session, index, data)
        end = pb.StepEnd(param_indices=list(wire))
        if grad_scale is not None:
            end.grad_scale = float(grad_scale)
        yield pb.StepRequest(end=end).SerializeToString()

    @staticmethod
    def _header_fields(*, lr, lr_scale, update_dtype, measure_orthogonality, worker_id,
                       update_content, param_options, defer_compute) -> dict:
        """StepHeader's fields past session, token and step."""
        header = {"measure_orthogonality": measure_orthogonality, "worker_id": worker_id}
        if param_options:
            header["param_options"] = [
                pb.ParamStepOptions(param_index=i, hyper_params=hyper_params(**hp))
                for i, hp in sorted(param_options.items())]
        if lr is not None:
            header["lr"] = float(lr)
        if lr_scale is not None:
            header["lr_scale"] = float(lr_scale)
        if update_dtype is not None:
            header["update_dtype"] = _lookup(_DTYPES, "dtype", update_dtype)
        if update_content is not None:
            header["update_content"] = _lookup(_CONTENTS, "update content", update_content)
        if defer_compute:
            header["defer_compute"] = True
        return header

    def _run_step(self, session: Session, step: int, wire: Mapping[int, bytes], *, lr, lr_scale,
                  update_dtype, measure_orthogonality, retries=None, worker_id=0,
                  update_content=None, cancel: Optional[CancelToken] = None,
                  param_options=None, grad_scale: Optional[float] = None,
                  stream: Optional[StepStream] = None) -> StepResult:
        """The step's attempts: the open `stream` first when given, then
        (after a failure that is safe to retry) whole resends of its
        gradients with the same step number, answered exactly once."""
        if grad_scale is not None and not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale {grad_scale!r} must be finite and > 0")
        if stream is not None and grad_scale is not None and not stream.defer_compute:
            raise ValueError("a grad_scale needs a stream opened with defer_compute=True")
        header = self._header_fields(
            lr=lr, lr_scale=lr_scale, update_dtype=update_dtype,
            measure_orthogonality=measure_orthogonality, worker_id=worker_id,
            update_content=update_content, param_options=param_options,
            defer_compute=grad_scale is not None or (stream is not None and stream.defer_compute))
        cancel = cancel or CancelToken()
        attempt = 0
        first_failure = None
        while True:
            try:
                if stream is not None and attempt == 0:
                    cancel._register(stream.call)
                    try:
                        return stream._finish(grad_scale)
                    finally:
                        cancel._unregister(stream.call)
                if stream is not None:
                    wire = stream.complete_wire()
                return self._step_once(session, step, wire, header, cancel, grad_scale)
            except grpc.RpcError as e:
                if cancel.cancelled:
                    raise MuonServerError(grpc.StatusCode.CANCELLED,
                                          f"step {step} cancelled (interrupted)") from None
                code = e.code()
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                out_of_window = now - first_failure >= self.timeouts.retry_window
                if (e.code() not in _RETRYABLE or out_of_window
                        or (retries is not None and attempt >= retries)):
                    if attempt == 0 or e.code() not in _RETRYABLE:
                        raise _error(e) from None
                    raise MuonServerError(
                        e.code(), f"step {step} failed {attempt + 1} times over "
                        f"{now - first_failure:.1f} s (retry window "
                        f"{self.timeouts.retry_window:g} s) against {self.server}; last: "
                        f"{e.details() or ''}") from None
            attempt += 1
            if cancel.wait(min(self._backoff * (2 ** attempt), _MAX_RETRY_SLEEP)):
                raise MuonServerError(grpc.StatusCode.CANCELLED,
                                      f"step {step} cancelled (interrupted)")
            if code == grpc.StatusCode.UNAVAILABLE:
                self._wait_ready(self.timeouts.retry_window - (time.monotonic() - first_failure),
                                 cancel)

    def _step_once(self, session: Session, step: int, wire: Mapping[int, bytes],
                   header: dict, cancel: CancelToken,
                   grad_scale: Optional[float] = None) -> StepResult:
        call = self._step_call(self._requests(session, step, wire, grad_scale, **header),
                               timeout=self.timeouts.step)
        cancel._register(call)
        try:
            return self._read_step(session, call)
        finally:
            cancel._unregister(call)

    def _read_step(self, session: Session, call) -> StepResult:
        # Buffered until the summary: a stream that breaks first changed nothing.
        buffers: Dict[int, bytearray] = {}
        dtypes: Dict[int, int] = {}
        decay: Dict[int, float] = {}
        weights = set()
        for response in call:
            if response.HasField("update"):
                chunk = response.update
                buf = _buffer(buffers, chunk.param_index, chunk.total_bytes,
                              session._kept_updates)
                buf[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
                dtypes[chunk.param_index] = chunk.dtype
                if chunk.content == pb.UPDATE_CONTENT_WEIGHTS:
                    weights.add(chunk.param_index)
                else:
                    decay[chunk.param_index] = chunk.decay
            elif response.HasField("summary"):
                summary = response.summary
                tensors = {i: from_wire(buf, dtypes[i], session.params[i].shape)
                           for i, buf in buffers.items()}
                return StepResult(summary.step,
                                  {i: t for i, t in tensors.items() if i not in weights},
                                  decay, summary,
                                  {i: t for i, t in tensors.items() if i in weights}, buffers)
        raise MuonServerError(grpc.StatusCode.INTERNAL, "step stream ended without a summary")
