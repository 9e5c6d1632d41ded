"""RemoteMuon: a torch.optim.Optimizer whose state lives on a muon-server.

    opt = RemoteMuon(model, server="127.0.0.1:50051", lr=0.02)
    loss.backward(); opt.step(); opt.zero_grad()

It takes torch.optim.Muon's arguments, and KellerJordan's MuonWithAuxAdam
param groups (use_muon=True/False); docs/python.md has the porting table.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import signal
import threading
from typing import Dict, List, Optional

import torch

from .client import (CancelToken, MuonClient, MuonServerError, ParamSpec, Session, StepStream,
                     Timeouts, pb, place)

_LOG = logging.getLogger("muon_client")

JORDAN = (3.4445, -4.7750, 2.0315)
# torch.optim.Muon's default eps: Newton–Schulz normalises X/(‖X‖ + eps).
NS_EPS = 1e-7

# Muon defaults of torch.optim.Muon (PyTorch 2.9), for parameters given
# as a list or a module and for groups with kind="muon".
TORCH_MUON_DEFAULTS = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                           ns_coefficients=JORDAN, eps=NS_EPS, ns_steps=5, adjust_lr_fn=None)
# KellerJordan's MuonWithAuxAdam per-group defaults: use_muon=True groups...
KJ_MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, weight_decay=0)
# ...and use_muon=False groups, which are also the AdamW defaults everywhere
# (torch.optim.Muon has no AdamW side).
KJ_ADAMW_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0)

_MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
              "adjust_lr_fn", "use_addmm", "momentum_form", "ns_schedule", "shape_scale")
_ADAMW_KEYS = ("lr", "weight_decay", "betas", "eps")
# Keys any group may have: schedulers add initial_lr; torch 2.x keeps
# param_names for named parameters.
_COMMON_KEYS = ("params", "param_names", "kind", "use_muon", "wire_dtype", "initial_lr")
# What a step may change: lr goes in the step header, weight decay is
# applied here (W ← (1 − lr·wd)·W + update).
_PER_STEP = ("lr", "weight_decay")
# Sent in the step header's param_options when they differ from the values
# the session was created with (updates mode).
_PER_STEP_OPTIONS = ("momentum", "nesterov", "betas", "eps")

_ADJUST_TO_SCALE = {None: "spectral", "original": "spectral", "match_rms_adamw": "rms_match"}
_WIRE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _wire_dtype(value) -> str:
    if isinstance(value, torch.dtype):
        if value not in _WIRE_DTYPES:
            raise ValueError(f"wire_dtype {value} is not one the server takes: "
                             f"{sorted(str(d) for d in _WIRE_DTYPES)}")
        return _WIRE_DTYPES[value]
    if value not in _WIRE_DTYPES.values():
        raise ValueError(f"wire_dtype {value!r} is not one the server takes: "
                         f"{sorted(_WIRE_DTYPES.values())} or the torch dtypes")
    return value


def muon_param_groups(model: torch.nn.Module, head=None) -> List[dict]:
    """Splits `model`'s parameters the way both references advise: Muon for
    the hidden matrices, AdamW for nn.Embedding weights, the output head and
    every parameter of fewer than 2 dimensions.

    The head is `head` (a module, a parameter, or a list of either) when
    given, else the last nn.Linear that model.modules() yields (the module
    registered last, as lm_head and classifier layers are). Weights tied to
    an embedding stay on AdamW. Returns up to two groups, {"params",
    "param_names", "kind"}, for RemoteMuon or to extend with hyper-parameters.
    """
    adamw = set()
    linears = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            adamw.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            linears.append(module)
    heads = head if isinstance(head, (list, tuple)) else [head] if head is not None else linears[-1:]
    for h in heads:
        params = list(h.parameters()) if isinstance(h, torch.nn.Module) else [h]
        adamw.update(id(p) for p in params)
    groups = {"muon": ([], []), "adamw": ([], [])}
    for name, p in model.named_parameters():
        kind = "adamw" if id(p) in adamw or p.ndim < 2 else "muon"
        groups[kind][0].append(p)
        groups[kind][1].append(name)
    return [{"params": params, "param_names": names, "kind": kind}
            for kind, (params, names) in groups.items() if params]


def _ns_coefficients(coefficients, where: str):
    """torch.optim.Muon's ns_coefficients (one (a, b, c) tuple, or one per
    step) as a list of float triples; the server checks the values."""
    def triple(c):
        try:
            t = tuple(float(x) for x in c)
        except (TypeError, ValueError):
            t = ()
        if len(t) != 3:
            raise ValueError(f"{where}: ns_coefficients {coefficients!r}: expected one (a, b, c) "
                             "tuple of numbers or a list of them, one per Newton-Schulz step")
        return t

    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        return [triple(coefficients)]
    return [triple(c) for c in coefficients]


def _delete_sessions(units) -> None:
    """Deletes each unit's session; a failure is logged, not raised (the
    server's idle expiry removes what is left)."""
    for unit in units:
        try:
            unit.session.delete()
        except MuonServerError as e:
            _LOG.warning("RemoteMuon: session %s not deleted: %s", unit.session.session_id, e)


@dataclasses.dataclass
class _Unit:
    """One session: the parameters of one group (or, parameter-server mode,
    all of them) that live on one server."""

    server: int
    group: Optional[int]
    indices: List[int]  # global indices into _order
    session: Session
    offset: int  # the optimizer's step minus the session's when it was made
    # Per local index, the param group (add_param_group may add groups to
    # the session); empty: every parameter is `group`'s.
    groups: List[int] = dataclasses.field(default_factory=list)

    def group_of(self, local: int) -> int:
        return self.groups[local] if self.groups else self.group


@dataclasses.dataclass
class _Job:
    """A step's calls, kept until applied so an interrupted step can be
    completed with the same gradients and hyper-parameters."""

    number: int
    calls: list  # (unit, step_number, wire-encoded gradients, kwargs)
    decay: Dict[int, float]  # global index -> 1 − lr·wd (updates mode)


@dataclasses.dataclass
class _OpenStream:
    """A unit's step stream opened during backward: what it was opened
    with and, per local index sent, the gradient tensor and its _version
    then, so that step() can tell whether the gradient changed since."""

    stream: StepStream
    kwargs: dict  # the step header's lr and param_options when it opened
    sent: Dict[int, tuple] = dataclasses.field(default_factory=dict)
    sealed: bool = False  # clip_grad_norm_ ran: nothing more may join
    grad_scale: Optional[float] = None


def _host_source(g: torch.Tensor):
    """How the stream reads gradient `g` when it encodes it: a CPU fp32
    gradient as a view (no copy until the encoding); a GPU one copied now,
    asynchronously, into pinned memory, waited for by the sender."""
    g = g.detach()
    if g.device.type == "cpu":
        return lambda: g.to(torch.float32).numpy()
    host = torch.empty(g.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(g, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read():
        done.synchronize()
        return host.numpy()
    return read


class _DeferredInterrupt:
    """Holds SIGINT while the weights are being changed, so an interrupted
    step is either applied to every parameter or to none (main thread only)."""

    def __enter__(self):
        self._signal = None
        self._previous = None
        # A handler installed outside Python (getsignal None) cannot be put back.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not None):
            self._previous = signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame):
        self._signal = (signum, frame)

    def __exit__(self, *exc):
        if self._previous is None:
            return False
        signal.signal(signal.SIGINT, self._previous)
        if self._signal is not None and callable(self._previous):
            self._previous(*self._signal)
        return False


class RemoteMuon(torch.optim.Optimizer):
    """Muon (and AdamW for the other parameters) computed by muon-server(s).

    `params`: a module (split by muon_param_groups), parameters or named
    parameters (split by shape: 2 or more dimensions Muon, others AdamW),
    or param groups. A group is Muon or AdamW by `kind` ("muon"/"adamw"),
    by KellerJordan's `use_muon`, or by its parameters' shapes. Unknown
    group keys are a TypeError naming the valid ones.

    Hyper-parameters take torch.optim.Muon's names, positions and meaning
    (lr, weight_decay, momentum, nesterov, ns_coefficients, eps — the
    Newton–Schulz normalisation's —, ns_steps, adjust_lr_fn, use_addmm) and
    its defaults; `server` (keyword) is the muon-server address or a list; use_muon groups take KellerJordan's per-group defaults.
    AdamW groups: adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, with
    KellerJordan's defaults (3e-4, (0.9, 0.95), 1e-10, 0). The server's own
    choices are there too: ns_schedule, shape_scale, momentum_form.

    step() sends the gradients of parameters whose .grad is set, waits for
    the server's commit and only then updates them in place. Each group's
    lr, weight_decay, momentum, nesterov, betas and eps are read at every
    step (any scheduler works, per group); the Newton–Schulz settings, shape
    scale, momentum form, kind and wire dtype are fixed once the group's
    session exists, and step() raises ValueError naming one that changed.

    state_dict() copies the optimizer state from the server(s) in torch's
    shape; load_state_dict() imports it into new sessions on any server and
    continues bit-identically. handles()/attach() re-attach to live sessions.

    Each group has its own session on each server that holds some of its
    parameters; with several servers each parameter lives on one, chosen by
    rendezvous hashing of its name. A step fans out to all sessions in
    parallel and the weights change only when every one has committed; after
    an error, calling step() again with the same gradients completes the step
    exactly once everywhere. A KeyboardInterrupt during step() cancels the
    calls at once; the next step() first completes the interrupted step
    (with its own gradients) and then runs the new one.

    Timeouts (seconds): step_timeout per step attempt, retry_window for
    retrying a failed step (spans a server restart), connect_timeout for
    waiting for a server that is starting, keepalive_time/keepalive_timeout.

    stream_gradients (default True): each gradient is sent as soon as
    backward has produced it, and step() waits only for the rest and the
    commit; a gradient changed after it was sent (accumulation, an in-place
    clip or unscale_) makes that step go whole, as with False. Accumulating
    micro-batches: run the last backward inside `with opt.final_backward():`.
    Clipping: opt.clip_grad_norm_(max_norm) keeps the streams (the server
    scales). "transfer": stream, but the server computes only at StepEnd.
    docs/python.md, "Gradients stream during backward".

    close() (or `with RemoteMuon(...) as opt:`) deletes the sessions.

    mode="parameter_server": the server holds the weights and `workers`
    processes train one model together (docs/parameter-server.md). One
    server, one session. Worker 0 without session_id/token creates the
    session and pushes its parameters as the initial weights; hand
    `opt.session_id` and `opt.token` to the other workers, which attach with
    them and start from the server's weights and step. step() sends every
    parameter's gradient as this `worker` (zeros where .grad is None), and
    copies the new weights (fp32, exact) into the parameters. Groups' lr may
    change only by one common factor, the other hyper-parameters not at all.
    """

    def __init__(self, params, lr: Optional[float] = None,
                 weight_decay: Optional[float] = None, momentum: Optional[float] = None,
                 nesterov: Optional[bool] = None, ns_coefficients=None,
                 eps: Optional[float] = None, ns_steps: Optional[int] = None,
                 adjust_lr_fn: Optional[str] = None, use_addmm: Optional[bool] = None, *,
                 server, ns_schedule: Optional[str] = None, shape_scale: Optional[str] = None,
                 momentum_form: Optional[str] = None, adamw_lr: Optional[float] = None,
                 adamw_betas=None, adamw_eps: Optional[float] = None,
                 adamw_weight_decay: Optional[float] = None, wire_dtype="float32",
                 measure_orthogonality: bool = False, step_timeout: Optional[float] = None,
                 retry_window: Optional[float] = None, connect_timeout: Optional[float] = None,
                 keepalive_time: Optional[float] = None,
                 keepalive_timeout: Optional[float] = None,
                 root_certificates=None, certificate_chain=None, private_key=None,
                 tls_server_name: Optional[str] = None, mode: str = "updates",
                 worker: int = 0, workers: int = 1, session_id: Optional[str] = None,
                 token: Optional[str] = None, stream_gradients=True):
        if mode not in ("updates", "parameter_server"):
            raise ValueError(f"unknown mode {mode!r}; expected 'updates' or 'parameter_server'")
        if stream_gradients not in (True, False, "transfer"):
            raise ValueError(f"stream_gradients {stream_gradients!r}; expected True, False or "
                             "'transfer'")
        self._ps = mode == "parameter_server"
        if self._ps:
            if not isinstance(server, str) and len(server) != 1:
                raise ValueError("parameter_server mode takes one server, not a list of "
                                 f"{len(server)}")
            if not 0 <= worker < workers:
                raise ValueError(f"worker {worker} is not in [0, {workers})")
            if (session_id is None) != (token is None):
                raise ValueError("pass both session_id and token, or neither")
            if session_id is None and worker != 0:
                raise ValueError(f"worker {worker} needs the session_id and token of the "
                                 "session worker 0 created")
        elif session_id is not None or token is not None or worker != 0 or workers != 1:
            raise ValueError("worker, workers, session_id and token are for "
                             "mode='parameter_server' (updates mode: load_state_dict)")
        self._worker = worker
        self._live = False  # sessions exist: add_param_group registers new groups at once
        self._closed = False
        self._wire = _wire_dtype(wire_dtype)
        given = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                     ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                     adjust_lr_fn=adjust_lr_fn, use_addmm=use_addmm, ns_schedule=ns_schedule,
                     shape_scale=shape_scale, momentum_form=momentum_form)
        self._muon_given = {k: v for k, v in given.items() if v is not None}
        adamw = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                     weight_decay=adamw_weight_decay)
        self._adamw_defaults = dict(KJ_ADAMW_DEFAULTS,
                                    **{k: v for k, v in adamw.items() if v is not None})
        # clip_grad_norm_ sums the norms in the order the parameters came
        # (a model's order, before the split into groups), as torch's does.
        self._given: List[torch.Tensor] = []
        if isinstance(params, torch.nn.Module):
            self._given = list(params.parameters())
            params = muon_param_groups(params)
        params = list(params)
        if not self._given:
            for item in params:
                if isinstance(item, dict):
                    group = item.get("params", [])
                    items = [group] if isinstance(group, torch.Tensor) else list(group)
                else:
                    items = [item]
                self._given += [t[1] if isinstance(t, tuple) else t for t in items]
        if params and not isinstance(params[0], dict):
            names = [None] * len(params)
            if isinstance(params[0], tuple):
                names = [n for n, _ in params]
                params = [p for _, p in params]
            params = [{"params": [p for p in params if p.ndim >= 2],
                       "param_names": [n for n, p in zip(names, params) if p.ndim >= 2],
                       "kind": "muon"},
                      {"params": [p for p in params if p.ndim < 2],
                       "param_names": [n for n, p in zip(names, params) if p.ndim < 2],
                       "kind": "adamw"}]
            params = [g for g in params if g["params"]]
        self._order: List[torch.Tensor] = []
        self._names: List[str] = []
        self._registered: List[dict] = []  # per group: what its session was made with
        # Only lr and weight_decay are common to both kinds; every other key
        # is filled per group by add_param_group, so no AdamW group gets Muon
        # keys or the other way round.
        super().__init__(params, {"lr": self._muon_defaults(False)["lr"],
                                  "weight_decay": self._muon_defaults(False)["weight_decay"]})
        self._measure = measure_orthogonality
        self._servers = [server] if isinstance(server, str) else list(server)
        if not self._servers:
            raise ValueError("RemoteMuon needs at least one server")
        # Unset: Timeouts' defaults (600, 120, 60, 20 and 10 s).
        given_timeouts = dict(step=step_timeout, retry_window=retry_window,
                              connect=connect_timeout, keepalive_time=keepalive_time,
                              keepalive_timeout=keepalive_timeout)
        timeouts = Timeouts(**{k: v for k, v in given_timeouts.items() if v is not None})
        self._clients = [MuonClient(s, root_certificates=root_certificates,
                                    certificate_chain=certificate_chain, private_key=private_key,
                                    server_name=tls_server_name, timeouts=timeouts)
                         for s in self._servers]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                           thread_name_prefix="RemoteMuon")
        self._step = 0
        self._pending: Optional[_Job] = None
        self.last_summaries = []
        # Whether the last step's gradients went in streams opened during backward.
        self.last_step_streamed = False
        self._units: List[_Unit] = []
        self._base_lr = [g["lr"] for g in self.param_groups]
        if self._ps:
            self._units = [self._parameter_server_unit(workers, session_id, token)]
        else:
            for gi in range(len(self.param_groups)):
                self._units += self._create_units(gi)
        self._live = True
        for gi in range(len(self.param_groups)):
            _LOG.info("%s", self._describe(gi))
        # Streaming (docs/python.md, "Gradients stream during backward").
        self._streaming = bool(stream_gradients) and not self._ps
        self._stream_lock = threading.RLock()
        self._streams: Dict[int, _OpenStream] = {}  # position in _units -> its stream
        self._located: Optional[Dict[int, tuple]] = None  # index -> (position, local)
        # Streams open with defer_compute: asked for ("transfer": the server
        # computes at StepEnd, off backward's cores), or clip_grad_norm_ was used.
        self._defer = stream_gradients == "transfer"
        self._final_only = False  # only backward passes inside final_backward() stream
        self._final_depth = 0
        self._hold = False  # this step streams no more (an accumulation was seen)
        self._stale_steps = 0  # consecutive steps whose streams went stale
        self._hooks = []
        self._grad_nodes = []  # torch 1.x: the AccumulateGrad nodes, kept alive
        if self._streaming:
            self._hook_params(range(len(self._order)))

    # ---------------------------------------------------------------- groups

    def _muon_defaults(self, kj: bool) -> dict:
        base = dict(KJ_MUON_DEFAULTS) if kj else dict(TORCH_MUON_DEFAULTS)
        return dict(base, **self._muon_given)

    @staticmethod
    def _kind(group: dict, where: str) -> str:
        kinds = set()
        if "use_muon" in group:
            kinds.add("muon" if group["use_muon"] else "adamw")
        if group.get("kind") is not None:
            if group["kind"] not in ("muon", "adamw"):
                raise ValueError(f"{where}: kind {group['kind']!r}; expected 'muon' or 'adamw'")
            kinds.add(group["kind"])
        if len(kinds) > 1:
            raise TypeError(f"{where}: kind={group['kind']!r} contradicts "
                            f"use_muon={group['use_muon']!r}")
        if kinds:
            return kinds.pop()
        shapes = {p.ndim >= 2 for p in group["params"]}
        if len(shapes) > 1:
            raise TypeError(f"{where} mixes matrices and tensors of fewer than 2 dimensions: "
                            "give it kind='muon'/'adamw' (or use_muon), or split it")
        return "muon" if shapes.pop() else "adamw"

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group, with the same checks and defaults as the constructor.
        Once the optimizer exists its parameters are registered with the
        server(s) at once, from zero state: added to the live session that
        holds groups of the same kind (Muon or AdamW) on each server
        (AddParameters), or in a new session where a server has none. Every
        hyper-parameter stays the group's own: its fixed ones are registered
        per parameter, its per-step ones sent per parameter."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        if self._live and self._ps:
            raise ValueError("parameter_server mode: the session's parameters are fixed; "
                             "add_param_group needs updates mode")
        if self._closed:
            raise RuntimeError("RemoteMuon is closed")
        gi = len(self.param_groups)
        where = f"param group {gi}"
        group = dict(param_group)
        params = group.get("params")
        if params is None:
            raise TypeError(f"{where} has no 'params'")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = list(group.get("param_names") or [])
        if params and isinstance(params[0], tuple):
            names = [n for n, _ in params]
            params = [p for _, p in params]
        if not params:
            raise ValueError(f"{where} has no parameters")
        group["params"] = params
        kind = self._kind(group, where)
        allowed = set(_COMMON_KEYS) | set(_MUON_KEYS if kind == "muon" else _ADAMW_KEYS)
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise TypeError(f"{where} ({kind}): unknown key(s) {unknown}; a {kind} group takes "
                            f"{sorted(allowed)}")
        if kind == "muon":
            defaults = self._muon_defaults("use_muon" in group)
        else:
            defaults = self._adamw_defaults
        for key, value in defaults.items():
            group.setdefault(key, value)
        if "use_muon" not in group:
            group["kind"] = kind
        if len(names) != len(params) or any(n is None for n in names):
            names = [f"group{gi}.param{pi}" for pi in range(len(params))]
        group["param_names"] = names
        for pi, p in enumerate(params):
            if kind == "muon" and p.ndim < 2:
                raise ValueError(f"{where} parameter {pi} ({names[pi]}): Muon needs 2 or more "
                                 f"dimensions, got shape {tuple(p.shape)}")
        hp = self._server_hp(group, kind, where)  # checks every value before anything is sent
        if "wire_dtype" in group:
            group["wire_dtype"] = _wire_dtype(group["wire_dtype"])
        super().add_param_group(group)
        self._order += params
        self._names += names
        self._registered.append(self._fixed(group, kind, hp))
        if self._live:
            self._cancel_streams()  # AddParameters waits for no step
            try:
                self._units += self._extend_units(gi)
            except BaseException:
                # Nothing of a group that could not be registered stays behind.
                self.param_groups.pop()
                del self._order[-len(params):], self._names[-len(params):]
                self._registered.pop()
                raise
            self._located = None
            self._given += params
            if self._streaming:
                self._hook_params(range(len(self._order) - len(params), len(self._order)))
            _LOG.info("%s", self._describe(gi))

    def _server_hp(self, group: dict, kind: str, where: str) -> dict:
        """The group's hyper-parameters as the server names them (hyper_params keys)."""
        if kind == "adamw":
            betas = tuple(float(b) for b in group["betas"])
            if len(betas) != 2:
                raise ValueError(f"{where}: betas must be two numbers, got {group['betas']!r}")
            return dict(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                        betas=betas, eps=float(group["eps"]))
        steps = int(group.get("ns_steps", 5))
        coefficients = _ns_coefficients(group.get("ns_coefficients", JORDAN), where)
        schedule = group.get("ns_schedule")
        if schedule is None:
            schedule = "jordan"
        elif coefficients != [JORDAN]:
            raise TypeError(f"{where}: give ns_schedule or ns_coefficients, not both")
        # The default tuple is the jordan schedule itself; any other goes to
        # the server as given, a custom schedule.
        custom = [] if coefficients == [JORDAN] else coefficients
        adjust = group.get("adjust_lr_fn")
        if adjust not in _ADJUST_TO_SCALE:
            raise ValueError(f"{where}: adjust_lr_fn {adjust!r}; expected None, 'original' or "
                             "'match_rms_adamw'")
        scale = group.get("shape_scale")
        if scale is None:
            scale = _ADJUST_TO_SCALE[adjust]
        elif adjust is not None and _ADJUST_TO_SCALE[adjust] != scale:
            raise TypeError(f"{where}: adjust_lr_fn={adjust!r} contradicts shape_scale={scale!r}")
        hp = dict(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                  momentum=float(group["momentum"]), nesterov=bool(group.get("nesterov", True)),
                  momentum_form=group.get("momentum_form") or "ema", ns_schedule=schedule,
                  ns_steps=steps, shape_scale=scale, ns_coefficients=custom,
                  ns_eps=float(group.get("eps", NS_EPS)))
        for key, table in (("momentum_form", ("ema", "sum")),
                           ("ns_schedule", ("jordan", "dion", "polar_express", "aol", "aol_dion",
                                            "svd")),
                           ("shape_scale", ("spectral", "rms_match", "none"))):
            if hp[key] not in table:
                raise ValueError(f"{where}: {key} {hp[key]!r}; expected one of {list(table)}")
        return hp

    def _fixed(self, group: dict, kind: str, hp: dict) -> dict:
        """What a step cannot change for this group."""
        fixed = {k: v for k, v in hp.items() if k not in _PER_STEP}
        fixed["kind"] = kind
        fixed["wire_dtype"] = group.get("wire_dtype", self._wire)
        if self._ps:
            fixed["weight_decay"] = hp["weight_decay"]
        return fixed

    def _check_fixed(self) -> None:
        for gi, group in enumerate(self.param_groups):
            where = f"param group {gi}"
            kind = self._kind(group, where)
            now = self._fixed(group, kind, self._server_hp(group, kind, where))
            for key, was in self._registered[gi].items():
                if not self._ps and key in _PER_STEP_OPTIONS:
                    continue
                if now.get(key) != was:
                    per_step = ("lr (by one factor for all groups)" if self._ps
                                else "lr, weight_decay, momentum, nesterov, betas and eps")
                    raise ValueError(
                        f"{where}: {key} changed from {was!r} to {now.get(key)!r} after its "
                        f"session was created; muon-server takes only {per_step} per step. "
                        "Set it back, or build a new RemoteMuon (state_dict() is a pointer to "
                        "the session, not a copy of its state)")

    def _specs(self, gi: int) -> List[ParamSpec]:
        group = self.param_groups[gi]
        kind = self._kind(group, f"param group {gi}")
        hp = self._server_hp(group, kind, f"param group {gi}")
        dtype = group.get("wire_dtype", self._wire)
        return [ParamSpec(name=name, shape=tuple(p.shape), dtype=dtype, kind=kind, overrides=hp)
                for p, name in zip(group["params"], group["param_names"])]

    def _group_indices(self, gi: int) -> List[int]:
        start = sum(len(g["params"]) for g in self.param_groups[:gi])
        return list(range(start, start + len(self.param_groups[gi]["params"])))

    def _create_units(self, gi: int) -> List[_Unit]:
        specs = self._specs(gi)
        indices = self._group_indices(gi)
        units = []
        try:
            for k, client in enumerate(self._clients):
                mine = [j for j, spec in enumerate(specs) if place(self._servers, spec.name) == k]
                if not mine:
                    continue
                session = client.create_session([specs[j] for j in mine],
                                                name=f"RemoteMuon group {gi}")
                units.append(_Unit(k, gi, [indices[j] for j in mine], session, self._step))
        except BaseException:
            _delete_sessions(units)
            raise
        return units

    def _extend_units(self, gi: int) -> List[_Unit]:
        """Registers group gi's parameters in the sessions that already hold
        groups of its kind (AddParameters), one per server, and in new
        sessions on the servers with none; returns the new sessions' units.
        All or nothing."""
        kind = self._kind(self.param_groups[gi], f"param group {gi}")
        specs = self._specs(gi)
        indices = self._group_indices(gi)
        hosts = {}
        for unit in self._units:
            # A session holding parameters no group names (a failed
            # add_param_group's, below) takes no more.
            if (unit.server not in hosts and len(unit.session.params) == len(unit.indices)
                    and self._kind(self.param_groups[unit.group],
                                   f"param group {unit.group}") == kind):
                hosts[unit.server] = unit
        added = []  # (unit, how many locals it had)
        units = []
        try:
            for k, client in enumerate(self._clients):
                mine = [j for j, spec in enumerate(specs) if place(self._servers, spec.name) == k]
                if not mine:
                    continue
                host = hosts.get(k)
                if host is None:
                    session = client.create_session([specs[j] for j in mine],
                                                    name=f"RemoteMuon group {gi}")
                    units.append(_Unit(k, gi, [indices[j] for j in mine], session, self._step))
                    continue
                before = len(host.indices)
                host.session.add_params([specs[j] for j in mine])
                added.append((host, before))
                host.groups = [host.group_of(local) for local in range(before)]
                host.groups += [gi] * len(mine)
                host.indices = host.indices + [indices[j] for j in mine]
        except BaseException:
            # The server keeps the parameters it added: no group names them,
            # so no step sends or expects them.
            for host, before in added:
                del host.indices[before:], host.groups[before:]
            _delete_sessions(units)
            raise
        return units

    def _describe(self, gi: int) -> str:
        group = self.param_groups[gi]
        kind = self._kind(group, f"param group {gi}")
        hp = self._server_hp(group, kind, f"param group {gi}")
        if kind == "muon":
            shown = dict(lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                         nesterov=hp["nesterov"], ns=f"{'custom' if hp['ns_coefficients'] else hp['ns_schedule']}x{hp['ns_steps']}",
                         ns_eps=hp["ns_eps"],
                         shape_scale=hp["shape_scale"], momentum_form=hp["momentum_form"])
        else:
            shown = dict(lr=hp["lr"], weight_decay=hp["weight_decay"], betas=hp["betas"],
                         eps=hp["eps"])
        sessions = ", ".join(f"{u.session.session_id}@{self._servers[u.server]}"
                             for u in getattr(self, "_units", [])
                             if u.group in (gi, None) or gi in u.groups)
        return (f"RemoteMuon group {gi}: {kind}, {len(group['params'])} params, "
                + " ".join(f"{k}={v}" for k, v in shown.items())
                + f", wire {group.get('wire_dtype', self._wire)}"
                + (f"; sessions {sessions}" if sessions else ""))

    def __repr__(self) -> str:
        lines = [f"RemoteMuon(servers={self._servers}, mode="
                 f"{'parameter_server' if self._ps else 'updates'}, step={self._step}"
                 f"{', closed' if self._closed else ''})"]
        lines += ["  " + self._describe(gi) for gi in range(len(self.param_groups))]
        return "\n".join(lines)

    # -------------------------------------------------------------- sessions

    @torch.no_grad()
    def _parameter_server_unit(self, workers, session_id, token) -> _Unit:
        client = self._clients[0]
        specs = [s for gi in range(len(self.param_groups)) for s in self._specs(gi)]
        indices = list(range(len(specs)))
        if session_id is None:
            session = client.create_session(specs, mode="parameter_server", num_workers=workers)
            session.push_weights({i: p.detach().to("cpu", torch.float32).numpy()
                                  for i, p in enumerate(self._order)})
            return _Unit(0, None, indices, session, 0)
        session = client.attach(session_id, token, specs)
        info = session.info()
        if info.mode != pb.SESSION_MODE_PARAMETER_SERVER or info.num_workers != workers:
            raise ValueError(f"session {session_id} is not a parameter-server session of "
                             f"{workers} workers (mode {info.mode}, {info.num_workers} workers)")
        step, weights = session.pull_weights()
        for i, w in weights.items():
            self._order[i].copy_(torch.from_numpy(w))
        session.step_number = step
        self._step = step
        return _Unit(0, None, indices, session, 0)

    @property
    def sessions(self) -> List[Session]:
        """The sessions: one per group and server that holds its parameters,
        except that a group add_param_group added joins the first session of
        its kind (Muon or AdamW) on each server that has one."""
        return [u.session for u in self._units]

    @property
    def session(self) -> Session:
        if len(self._units) != 1:
            raise AttributeError(f"RemoteMuon has {len(self._units)} sessions (see .sessions): "
                                 "use .sessions")
        return self._units[0].session

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def token(self) -> str:
        return self.session.token

    @property
    def step_number(self) -> int:
        """The last committed step (in parameter-server mode, the server's)."""
        return self._step

    @property
    def interrupted_step(self) -> Optional[int]:
        """The number of a step interrupted before it was applied here; the
        next step() completes it first. None when there is none."""
        return self._pending.number if self._pending is not None else None

    @property
    def last_summary(self):
        return self.last_summaries[0] if len(self.last_summaries) == 1 else None

    def delete_sessions(self) -> None:
        """Frees the optimizer state on the server(s)."""
        for session in self.sessions:
            session.delete()

    def close(self, delete: Optional[bool] = None) -> None:
        """Deletes the sessions (`delete`; default: in updates mode only, as a
        parameter-server session is shared by the workers) and closes the
        connections. Idempotent; step() afterwards raises."""
        if self._closed:
            return
        with self._stream_lock:
            self._closed = True
        self._cancel_streams()
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._grad_nodes = [], []
        if delete is None:
            delete = not self._ps
        try:
            if delete:
                for unit in self._units:
                    try:
                        unit.session._client.delete_session(
                            unit.session.session_id, unit.session.token,
                            timeout=min(10.0, unit.session._client.timeouts.connect))
                    except MuonServerError as e:
                        _LOG.warning("RemoteMuon.close: session %s on %s not deleted: %s",
                                     unit.session.session_id, self._servers[unit.server], e)
        finally:
            self._pool.shutdown(wait=False)
            for client in self._clients:
                client.close()

    def __enter__(self) -> "RemoteMuon":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __reduce_ex__(self, protocol):
        raise TypeError("RemoteMuon cannot be pickled or copied: its state lives in sessions on "
                        "muon-server. Save opt.state_dict() and call load_state_dict() on a new "
                        "RemoteMuon")

    def __copy__(self):
        self.__reduce_ex__(2)

    def __deepcopy__(self, memo):
        self.__reduce_ex__(2)

    # -------------------------------------------------------------- streaming

    def _hook_params(self, indices) -> None:
        """Calls _on_grad(index) each time backward has accumulated a
        parameter's gradient: torch 2.1+'s post-accumulate-grad hook, else
        a hook on the parameter's AccumulateGrad node (torch 1.x), which
        runs after the node has written .grad."""
        for index in indices:
            p = self._order[index]
            if not p.requires_grad:
                continue
            hook = (lambda *_, i=index: self._on_grad(i))
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))
                continue
            with torch.enable_grad():
                node = p.expand_as(p).grad_fn.next_functions[0][0]
            # The parameter holds its node weakly: a node nobody holds is
            # replaced by a new one, without the hook, at the next backward.
            self._grad_nodes.append(node)
            self._hooks.append(node.register_hook(hook))

    def _locate(self, index: int) -> tuple:
        if self._located is None:
            self._located = {g: (pos, local) for pos, unit in enumerate(self._units)
                             for local, g in enumerate(unit.indices)}
        return self._located[index]

    def _on_grad(self, index: int) -> None:
        """Backward produced parameter `index`'s gradient (autograd's thread):
        sends it in its session's stream for the coming step, opening that
        stream at the first gradient. Never raises into backward: anything
        unexpected cancels the streams and step() sends the step whole."""
        try:
            with self._stream_lock:
                if (self._closed or not self._streaming or self._pending is not None or self._hold
                        or (self._final_only and self._final_depth == 0)):
                    return
                g = self._order[index].grad
                if g is None or g.is_sparse:
                    return
                pos, local = self._locate(index)
                open_ = self._streams.get(pos)
                if open_ is not None and (local in open_.sent or open_.sealed):
                    # A second backward before step(): gradient accumulation.
                    # What was sent is not the step's gradient.
                    self._cancel_streams()
                    open_ = None
                    if not self._final_only:
                        self._final_only = True
                        _LOG.warning("RemoteMuon: gradient accumulation seen (a gradient was "
                                     "accumulated again before step()); from now on only "
                                     "backward passes inside `with opt.final_backward():` "
                                     "stream their gradients")
                    if self._final_depth == 0:
                        self._hold = True
                        return
                    # This is the final pass: its gradients go in new streams.
                if open_ is None:
                    unit = self._units[pos]
                    kwargs, _ = self._unit_kwargs(unit)
                    stream = unit.session.open_stream(
                        step_number=self._step + 1 - unit.offset, lr=kwargs["lr"],
                        param_options=kwargs.get("param_options"),
                        measure_orthogonality=self._measure, defer_compute=self._defer)
                    open_ = self._streams[pos] = _OpenStream(stream, kwargs)
                open_.sent[local] = (g, g._version)
                open_.stream.add(local, _host_source(g))
        except Exception as e:  # pylint: disable=broad-except
            _LOG.warning("RemoteMuon: gradient streaming stopped for this step: %s", e)
            self._cancel_streams()
            self._hold = True

    def _cancel_streams(self) -> None:
        """Abandons the open streams: no StepEnd was sent, nothing applied."""
        with self._stream_lock:
            streams, self._streams = self._streams, {}
        for open_ in streams.values():
            open_.stream.cancel()

    @contextlib.contextmanager
    def final_backward(self):
        """Marks the backward pass whose gradients step() will use, for
        gradient accumulation: once used, only backward passes inside it
        stream their gradients (the micro-batches before it do not send).

            for i, batch in enumerate(micro_batches):
                with opt.final_backward() if i == len(micro_batches) - 1 else nullcontext():
                    loss(batch).backward()
            opt.step()
        """
        with self._stream_lock:
            self._final_only = True
            self._final_depth += 1
            # The pass that ends the accumulation: streams again even where
            # an earlier micro-batch of this step was seen accumulating.
            self._hold = False
        try:
            yield self
        finally:
            with self._stream_lock:
                self._final_depth -= 1

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        """torch's zero_grad; first abandons a step streamed since the last
        step() (a step GradScaler skipped: nothing of it is applied)."""
        with self._stream_lock:
            self._cancel_streams()
            self._hold = False
        if set_to_none is None:
            super().zero_grad()
        else:
            super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's parameters
        in the order it was given them (a module's: model.parameters()),
        with the same math and in-place result, returning the total norm; keeping
        the streams: gradients already sent are scaled by the server instead
        (StepEnd.grad_scale, the same fp32 product). The first call cancels
        streams opened without deferred compute; later steps open them
        deferred, so the server computes only once the factor is in."""
        params = [p for p in self._given if p.grad is not None]
        with self._stream_lock:
            if not self._defer:
                self._defer = True
                self._cancel_streams()
            for pos, open_ in self._streams.items():
                unit = self._units[pos]
                for local, index in enumerate(unit.indices):
                    g = self._order[index].grad
                    if g is not None and local not in open_.sent:
                        open_.sent[local] = (g, g._version)
                        open_.stream.add(local, _host_source(g))
                # The bytes the server scales are these, from before the clip.
                open_.stream.complete_wire()
                open_.sealed = True
            total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                                   error_if_nonfinite=error_if_nonfinite)
            # torch's factor, recomputed the way it computes it.
            factor = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            for open_ in self._streams.values():
                open_.sent = {local: (g, g._version) for local, (g, _) in open_.sent.items()}
                open_.grad_scale = factor
        return total

    def _take_streams(self) -> Dict[int, _OpenStream]:
        with self._stream_lock:
            streams, self._streams = self._streams, {}
            self._hold = False
        return streams

    def _stream_current(self, open_: _OpenStream, unit: _Unit, kwargs: dict) -> bool:
        """Whether what the stream carries is this step's: the same header,
        and every gradient sent unchanged since (the same tensor at the same
        _version: another accumulation, an in-place clip or unscale_ bumps
        it), and after clip_grad_norm_ no gradient that was not sent."""
        if open_.kwargs != kwargs:
            return False
        for local, index in enumerate(unit.indices):
            g = self._order[index].grad
            if local in open_.sent:
                tensor, version = open_.sent[local]
                if g is not tensor or g._version != version:
                    return False
            elif g is not None and open_.sealed:
                return False
        return True

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def step(self, closure=None):
        if self._closed:
            raise RuntimeError("RemoteMuon is closed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending is not None:
            job = self._pending
            _LOG.info("RemoteMuon: completing step %d, interrupted earlier", job.number)
            try:
                self._run(job, keep_on_error=True)
            except MuonServerError as e:
                raise MuonServerError(e.code, f"step {job.number} was interrupted and could not "
                                      f"be completed, so this step was not sent; call step() "
                                      f"again to retry it: {e.details}") from None
        streams = self._take_streams()
        try:
            self._check_fixed()
            job = self._parameter_server_job() if self._ps else self._updates_job(streams)
        except BaseException:
            for open_ in streams.values():
                open_.stream.cancel()
            raise
        self._run(job)
        return loss

    def _unit_kwargs(self, unit: _Unit):
        """A unit's step header arguments (lr, param_options) and its groups' lrs."""
        lrs = {}
        for gi in {unit.group_of(local) for local in range(len(unit.indices))}:
            lrs[gi] = float(self.param_groups[gi]["lr"])
            if not (math.isfinite(lrs[gi]) and lrs[gi] >= 0):
                raise ValueError(f"param group {gi}: lr {lrs[gi]!r} must be finite and >= 0")
        param_options = {}
        for local in range(len(unit.indices)):
            gi = unit.group_of(local)
            # The header's lr is the session's first group's; a parameter of
            # another group sends its own.
            options = self._step_options(gi)
            if lrs[gi] != lrs[unit.group]:
                options["lr"] = lrs[gi]
            if options:
                param_options[local] = options
        kwargs = dict(lr=lrs[unit.group])
        if param_options:
            kwargs["param_options"] = param_options
        return kwargs, lrs

    def _updates_job(self, streams: Dict[int, _OpenStream]) -> _Job:
        number = self._step + 1
        decay = {}
        calls = []
        stale = False
        for pos, unit in enumerate(self._units):
            kwargs, lrs = self._unit_kwargs(unit)
            open_ = streams.get(pos)
            if open_ is not None and not self._stream_current(open_, unit, kwargs):
                open_.stream.cancel()  # stale: the step goes whole, from .grad now
                open_ = None
                stale = True
            grads = {}
            for local, index in enumerate(unit.indices):
                gi = unit.group_of(local)
                g = self._order[index].grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("RemoteMuon does not support sparse gradients")
                decay[index] = 1.0 - lrs[gi] * float(self.param_groups[gi]["weight_decay"])
                if open_ is None:
                    grads[local] = g.detach().to("cpu", torch.float32).numpy()
                elif local not in open_.sent:
                    open_.stream.add(local, _host_source(g))  # what backward did not send
            if open_ is None:
                calls.append((unit, number - unit.offset, unit.session.encode(grads), kwargs))
            else:
                calls.append((unit, number - unit.offset, {},
                              dict(kwargs, stream=open_.stream, grad_scale=open_.grad_scale)))
        self._note_staleness(stale, bool(streams))
        return _Job(number, calls, decay)

    def _note_staleness(self, stale: bool, streamed: bool) -> None:
        """Two steps in a row whose streams went stale (gradients changed
        after backward: torch's clip_grad_norm_, GradScaler.unscale_) turn
        streaming off: each sent its gradients twice for nothing."""
        if not streamed:
            return
        self._stale_steps = self._stale_steps + 1 if stale else 0
        if self._stale_steps >= 2 and self._streaming:
            self._streaming = False
            _LOG.warning("RemoteMuon: streaming off: the gradients changed after backward in "
                         "two steps in a row (an in-place clip or unscale_), so each step was "
                         "sent twice; clip with opt.clip_grad_norm_ to keep streaming")

    def _step_options(self, gi: int) -> dict:
        """The group's hyper-parameters that differ from its session's
        configuration, for this step's header."""
        group = self.param_groups[gi]
        kind = self._kind(group, f"param group {gi}")
        now = self._server_hp(group, kind, f"param group {gi}")
        return {k: now[k] for k in _PER_STEP_OPTIONS
                if k in now and now[k] != self._registered[gi].get(k)}

    def _parameter_server_job(self) -> _Job:
        ratios = {g["lr"] / base if base else 1.0
                  for g, base in zip(self.param_groups, self._base_lr)}
        if len(ratios) > 1 and max(ratios) - min(ratios) > 1e-12 * max(ratios):
            raise ValueError("RemoteMuon: parameter_server mode takes one lr scale per step, "
                             "but the param groups' learning rates changed by different factors")
        ratio = ratios.pop() if ratios else 1.0
        unit = self._units[0]
        grads = {}
        for index, p in enumerate(self._order):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("RemoteMuon does not support sparse gradients")
            # The server needs every parameter from every worker.
            g = torch.zeros_like(p) if p.grad is None else p.grad
            grads[index] = g.detach().to("cpu", torch.float32).numpy()
        # Weights come back in fp32 whatever the gradients' wire dtype, so
        # every worker's parameters equal the server's exactly.
        kwargs = dict(lr_scale=None if ratio == 1.0 else ratio, worker_id=self._worker,
                      update_content="weights", update_dtype="float32")
        return _Job(self._step + 1, [(unit, self._step + 1, unit.session.encode(grads), kwargs)],
                    {})

    def _run(self, job: _Job, keep_on_error: bool = False) -> None:
        """Runs a job's calls in parallel and applies the results once all
        committed. An interrupt cancels the calls and keeps the job for the
        next step(); an error drops it (the caller retries with its
        gradients) unless keep_on_error."""
        self._pending = job
        cancel = CancelToken()
        futures = [self._pool.submit(unit.session.step_wire, wire, step_number=number,
                                     measure_orthogonality=self._measure, cancel=cancel, **kwargs)
                   for unit, number, wire, kwargs in job.calls]
        try:
            waiting = futures
            while waiting:
                _, waiting = concurrent.futures.wait(waiting, timeout=0.25)
        except BaseException:
            cancel.cancel()
            concurrent.futures.wait(futures, timeout=10)
            # The job is resent whole later: its streams' gradients are
            # encoded now, while .grad is still this step's.
            job.calls = [(unit, number, kwargs["stream"].complete_wire(),
                          {k: v for k, v in kwargs.items() if k != "stream"})
                         if "stream" in kwargs else (unit, number, wire, kwargs)
                         for unit, number, wire, kwargs in job.calls]
            raise
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            if not keep_on_error:
                self._pending = None
            raise errors[0]
        results = [f.result() for f in futures]
        with _DeferredInterrupt():
            for (unit, _, _, _), result in zip(job.calls, results):
                for local, update in result.updates.items():
                    p = self._order[unit.indices[local]]
                    decay = job.decay[unit.indices[local]]
                    if decay != 1.0:
                        p.mul_(decay)
                    p.add_(torch.from_numpy(update).to(device=p.device, dtype=p.dtype))
                for local, w in result.weights.items():
                    p = self._order[unit.indices[local]]
                    p.copy_(torch.from_numpy(w).to(device=p.device, dtype=p.dtype))
            # Applied (synchronously: the copies above read host memory before
            # they return), so the next step fills the same buffers.
            for (unit, _, wire, kwargs), result in zip(job.calls, results):
                stream = kwargs.get("stream")
                unit.session.recycle(result, stream.complete_wire() if stream else wire)
            self._step = results[0].step if self._ps else job.number
            self.last_summaries = [r.summary for r in results]
            self.last_step_streamed = any("stream" in kwargs for *_, kwargs in job.calls)
            self._pending = None

    # ------------------------------------------------------------ state dict

    def _registered_now(self) -> List[dict]:
        return [self._fixed(g, self._kind(g, f"param group {gi}"),
                            self._server_hp(g, self._kind(g, f"param group {gi}"),
                                            f"param group {gi}"))
                for gi, g in enumerate(self.param_groups)]

    def state_dict(self):
        """torch's state dict with the optimizer state copied from the
        server(s): per parameter index, "momentum_buffer" (Muon) or
        "exp_avg", "exp_avg_sq" and "step" (AdamW), fp32, exact; parameters
        that never stepped have no entry, as in torch. "remote" holds the
        optimizer's step. No session id or token: handles() gives those."""
        state = super().state_dict()
        state["remote"] = {"step": self._step}
        if self._ps:
            return state  # the server's checkpoints keep a parameter-server session
        snapshot = {}
        for unit in self._units:
            _, param_steps, tensors = unit.session.export_state()
            kind = self._kind(self.param_groups[unit.group], f"param group {unit.group}")
            for local, named in tensors.items():
                if local >= len(unit.indices):
                    continue  # a failed add_param_group's parameter, in no group
                index = unit.indices[local]
                device = self._order[index].device
                if kind == "muon":
                    if not named["momentum"].any():
                        continue
                    entry = {"momentum_buffer": torch.from_numpy(named["momentum"]).to(device)}
                else:
                    if param_steps[local] == 0:
                        continue
                    entry = {"exp_avg": torch.from_numpy(named["exp_avg"]).to(device),
                             "exp_avg_sq": torch.from_numpy(named["exp_avg_sq"]).to(device),
                             "step": torch.tensor(float(param_steps[local]))}
                snapshot[index] = entry
        state["state"] = snapshot
        return state

    def _state_for(self, unit: _Unit, state: dict):
        """The import of one unit: (param_steps, {local: {name: array}}) from
        a torch-shaped state (zeros where a parameter has no entry)."""
        kind = self._kind(self.param_groups[unit.group], f"param group {unit.group}")
        names = ("momentum_buffer",) if kind == "muon" else ("exp_avg", "exp_avg_sq", "step")
        steps, tensors = [], {}
        for local, index in enumerate(unit.indices):
            p = self._order[index]
            entry = state.get(index, {})
            missing = [n for n in names if n not in entry]
            if entry and missing:
                raise ValueError(f"state of parameter {index} ({self._names[index]}, {kind}) "
                                 f"lacks {missing}; it has {sorted(entry)}")
            arrays = {}
            for name in names[:2] if kind == "adamw" else names:
                value = entry.get(name)
                value = torch.zeros(p.shape) if value is None else torch.as_tensor(value)
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"state of parameter {index} ({self._names[index]}): "
                                     f"{name} has shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                arrays["momentum" if name == "momentum_buffer" else name] = (
                    value.detach().to("cpu", torch.float32).numpy())
            steps.append(int(entry["step"]) if kind == "adamw" and entry else 0)
            tensors[local] = arrays
        return steps, tensors

    def load_state_dict(self, state_dict):
        """Restores a state_dict() (or a torch.optim.Muon/KellerJordan state
        dict of the same groups) into new sessions on this optimizer's
        servers, which continue bit-identically; any server works. Nothing
        changes when it fails."""
        if self._ps:
            raise ValueError("parameter_server mode: construct RemoteMuon with session_id and "
                             "token to attach; the server holds the weights and the step")
        if "sessions" in state_dict.get("remote", {}):
            raise ValueError("this state dict points at sessions (an older RemoteMuon's); "
                             "re-attach with attach(), or save a new one with state_dict()")
        saved_groups, saved_state = self.param_groups, self.state
        old = [dict(g) for g in saved_groups]
        try:
            super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
            for group, before in zip(self.param_groups, old):
                group.setdefault("param_names", before["param_names"])
                if "kind" not in group and "use_muon" not in group:
                    group["kind"] = self._kind(before, "param group")
            state = {int(k): v for k, v in state_dict.get("state", {}).items()}
            unknown = sorted(set(state) - set(range(len(self._order))))
            if unknown:
                raise ValueError(f"state for parameter indices {unknown}; this optimizer has "
                                 f"{len(self._order)} parameters")
            registered = self._registered_now()
            units = []
            try:
                for gi in range(len(self.param_groups)):
                    units += self._create_units(gi)
                for unit in units:
                    unit.session.import_state(*self._state_for(unit, state))
            except BaseException:
                _delete_sessions(units)
                raise
        except BaseException:
            self.param_groups, self.state = saved_groups, saved_state
            raise
        self._replace_units(units, int(state_dict.get("remote", {}).get("step", 0)))
        self._registered = registered

    def _replace_units(self, units: List[_Unit], step: int) -> None:
        self._cancel_streams()
        self._located = None
        _delete_sessions(self._units)
        for unit in units:
            unit.offset = step - unit.session.step_number
        self._units = units
        self._step = step
        self._pending = None

    def handles(self) -> dict:
        """The sessions themselves (server, group, id, token, step): the
        cheap way for a restarted trainer to continue on live sessions
        (attach()). Holds the sessions' tokens: keep it private."""
        return {"step": self._step,
                "sessions": [{"server": self._servers[u.server], "group": u.group,
                              "session_id": u.session.session_id, "token": u.session.token,
                              "session_step": u.session.step_number} for u in self._units]}

    def attach(self, handles: dict) -> None:
        """Continues on the live sessions of handles() (same groups and
        servers), checking each is still at the step recorded there; this
        optimizer's own sessions are deleted."""
        if self._ps:
            raise ValueError("parameter_server mode: construct RemoteMuon with session_id and "
                             "token to attach")
        saved = handles["sessions"]
        layout = [(self._servers[u.server], u.group) for u in self._units]
        theirs = [(s["server"], s.get("group")) for s in saved]
        if theirs != layout:
            raise ValueError(f"handles name sessions for (server, group) {theirs}; this "
                             f"optimizer has {layout}")
        units = []
        for unit, s in zip(self._units, saved):
            session = unit.session._client.attach(s["session_id"], s["token"],
                                                  unit.session.params)
            if session.step_number != s["session_step"]:
                raise ValueError(f"session {s['session_id']} is at step "
                                 f"{session.step_number}, the handles at step "
                                 f"{s['session_step']}")
            units.append(_Unit(unit.server, unit.group, unit.indices, session, 0,
                               list(unit.groups)))
        self._replace_units(units, handles["step"])
