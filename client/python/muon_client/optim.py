"""RemoteMuon: a torch.optim.Optimizer whose state lives on a muon-server.

    opt = RemoteMuon(model.parameters(), server="127.0.0.1:50051", lr=0.02, adamw_lr=3e-4)
    loss.backward(); opt.step(); opt.zero_grad()

Parameters of 2 or more dimensions get Muon, the others AdamW; a param group
may say kind="muon" or kind="adamw" and override any hyper-parameter.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from .client import MuonClient, ParamSpec, Session, pb, place

_GROUP_HP = ("lr", "weight_decay", "momentum", "nesterov", "momentum_form", "ns_schedule",
             "ns_steps", "shape_scale", "betas", "eps")
_MUON_ONLY = ("momentum", "nesterov", "momentum_form", "ns_schedule", "ns_steps", "shape_scale")
_ADAMW_ONLY = ("betas", "eps")


class RemoteMuon(torch.optim.Optimizer):
    """Muon (and AdamW for non-matrix parameters) computed by muon-server(s).

    step() sends the gradients of parameters whose .grad is set, waits for the
    server's commit and only then updates them in place (W <- decay*W + update).
    A broken stream is retried with the same step number; the server applies
    each step exactly once. Server errors raise MuonServerError.

    `server` may be a list of servers: each parameter then lives on one of
    them, chosen by rendezvous hashing of its name (pass model.named_parameters()
    for stable names), and each step fans out to all of them in parallel. The
    weights change only when every server has committed; after an error,
    calling step() again with the same gradients completes the step exactly
    once everywhere (servers that had committed replay their updates).

    TLS: root_certificates, and for mutual TLS certificate_chain and
    private_key (PEM bytes or file paths), go to every server's MuonClient;
    tls_server_name overrides the name checked in their certificates.

    LR schedulers work: each step sends every group's current lr as a ratio to
    the lr the session was created with, which must be the same for all groups
    (true of the schedulers that scale every group by one factor).

    mode="parameter_server": the server holds the weights and `workers`
    processes train one model together (docs/parameter-server.md). One
    server only. Worker 0 without session_id/token creates the session and
    pushes its parameters as the initial weights; hand `opt.session_id` and
    `opt.token` to the other workers, which attach with them and start from
    the server's weights and step (pulled into their parameters; so does a
    restarted worker). step() sends every parameter's gradient as this
    `worker` (a parameter whose .grad is None sends zeros, which still moves
    its momentum), waits until all workers' gradients are averaged and
    applied, and copies the new weights (fp32, exact) into the parameters.
    """

    def __init__(self, params, server, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_schedule: str = "jordan",
                 ns_steps: int = 5, shape_scale: str = "spectral", momentum_form: str = "ema",
                 adamw_lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 wire_dtype: str = "float32", measure_orthogonality: bool = False,
                 root_certificates=None, certificate_chain=None, private_key=None,
                 tls_server_name: Optional[str] = None, mode: str = "updates",
                 worker: int = 0, workers: int = 1, session_id: Optional[str] = None,
                 token: Optional[str] = None):
        if mode not in ("updates", "parameter_server"):
            raise ValueError(f"unknown mode {mode!r}; expected 'updates' or 'parameter_server'")
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
        params = list(params)
        names = {}
        if params and not isinstance(params[0], dict):
            if isinstance(params[0], tuple):
                names = {id(p): n for n, p in params}
                params = [p for _, p in params]
            params = [{"params": [p for p in params if p.ndim >= 2], "kind": "muon"},
                      {"params": [p for p in params if p.ndim < 2], "kind": "adamw", "lr": adamw_lr}]
            params = [g for g in params if g["params"]]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_schedule=ns_schedule, ns_steps=ns_steps, shape_scale=shape_scale,
                        momentum_form=momentum_form, betas=tuple(betas), eps=eps,
                        wire_dtype=wire_dtype, kind=None)
        super().__init__(params, defaults)
        self._measure = measure_orthogonality
        self._servers = [server] if isinstance(server, str) else list(server)
        if not self._servers:
            raise ValueError("RemoteMuon needs at least one server")
        self._clients = [MuonClient(s, root_certificates=root_certificates,
                                    certificate_chain=certificate_chain, private_key=private_key,
                                    server_name=tls_server_name)
                         for s in self._servers]
        self._order: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        specs = self._specs(names)
        # _shards[k]: the global indices of the parameters on server k.
        self._shards = [[] for _ in self._servers]
        for index, spec in enumerate(specs):
            self._shards[place(self._servers, spec.name)].append(index)
        self._step = 0
        if self._ps:
            self._sessions = [self._parameter_server_session(specs, workers, session_id, token)]
        else:
            # A server that holds no parameter gets no session (None).
            self._sessions = [client.create_session([specs[i] for i in shard]) if shard else None
                              for client, shard in zip(self._clients, self._shards)]
        self._base_lr = [g["lr"] for g in self.param_groups]
        self._pool = ThreadPoolExecutor(max_workers=len(self._servers))
        self.last_summaries = []

    @torch.no_grad()
    def _parameter_server_session(self, specs, workers, session_id, token) -> Session:
        client = self._clients[0]
        if session_id is None:
            session = client.create_session(specs, mode="parameter_server", num_workers=workers)
            session.push_weights({i: p.detach().to("cpu", torch.float32).numpy()
                                  for i, p in enumerate(self._order)})
            return session
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
        return session

    def _specs(self, names) -> List[ParamSpec]:
        specs = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                kind = group["kind"] or ("muon" if p.ndim >= 2 else "adamw")
                if kind == "muon" and p.ndim < 2:
                    raise ValueError(f"param group {gi} parameter {pi}: Muon needs 2 or more "
                                     f"dimensions, got shape {tuple(p.shape)}")
                skip = _ADAMW_ONLY if kind == "muon" else _MUON_ONLY
                overrides = {k: group[k] for k in _GROUP_HP if k not in skip}
                specs.append(ParamSpec(name=names.get(id(p), f"group{gi}.param{pi}"),
                                       shape=tuple(p.shape), dtype=group["wire_dtype"],
                                       kind=kind, overrides=overrides))
        return specs

    @property
    def sessions(self) -> List[Session]:
        """The sessions, one per server that holds parameters."""
        return [s for s in self._sessions if s is not None]

    @property
    def session(self) -> Session:
        if len(self._sessions) != 1:
            raise AttributeError("RemoteMuon is sharded over several servers: use .sessions")
        return self._sessions[0]

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
    def last_summary(self):
        return self.last_summaries[0] if len(self.last_summaries) == 1 else None

    def delete_sessions(self) -> None:
        """Frees the optimizer state on the server(s)."""
        for session in self.sessions:
            session.delete()

    def _lr_scale(self) -> Optional[float]:
        ratios = {g["lr"] / base if base else 1.0
                  for g, base in zip(self.param_groups, self._base_lr)}
        if len(ratios) > 1 and max(ratios) - min(ratios) > 1e-12 * max(ratios):
            raise ValueError("RemoteMuon: param groups' learning rates changed by different "
                             "factors; the server takes one lr scale per step")
        ratio = ratios.pop() if ratios else 1.0
        return None if ratio == 1.0 else ratio

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr_scale = self._lr_scale()
        if self._ps:
            self._parameter_server_step(lr_scale)
            return loss
        calls = []
        for session, shard in zip(self._sessions, self._shards):
            if session is None:
                continue
            grads = {}
            for local, index in enumerate(shard):
                g = self._order[index].grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("RemoteMuon does not support sparse gradients")
                grads[local] = g.detach().to("cpu", torch.float32).numpy()
            calls.append(self._pool.submit(session.step, grads, lr_scale=lr_scale,
                                           measure_orthogonality=self._measure,
                                           step_number=self._step + 1))
        errors = [c.exception() for c in calls]
        for error in errors:
            if error is not None:
                raise error
        results = [c.result() for c in calls]
        shards = [shard for session, shard in zip(self._sessions, self._shards) if session]
        for result, shard in zip(results, shards):
            for local, update in result.updates.items():
                p = self._order[shard[local]]
                decay = result.decay[local]
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(torch.from_numpy(update).to(device=p.device, dtype=p.dtype))
        self._step += 1
        self.last_summaries = [r.summary for r in results]
        return loss

    def _parameter_server_step(self, lr_scale):
        grads = {}
        for index, p in enumerate(self._order):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("RemoteMuon does not support sparse gradients")
            # The server needs every parameter from every worker.
            g = torch.zeros_like(p) if p.grad is None else p.grad
            grads[index] = g.detach().to("cpu", torch.float32).numpy()
        # Weights come back in fp32 whatever the gradients' wire dtype, so
        # every worker's parameters equal the server's exactly.
        result = self.session.step(grads, lr_scale=lr_scale, measure_orthogonality=self._measure,
                                   step_number=self._step + 1, worker_id=self._worker,
                                   update_content="weights", update_dtype="float32")
        for index, w in result.weights.items():
            p = self._order[index]
            p.copy_(torch.from_numpy(w).to(device=p.device, dtype=p.dtype))
        self._step = result.step
        self.last_summaries = [result.summary]

    def state_dict(self):
        # The optimizer state (momentum, moments) lives on the server(s): the
        # state dict names the sessions that hold it.
        state = super().state_dict()
        state["remote"] = {
            "step": self._step,
            "sessions": [{"server": server, "session_id": s.session_id, "token": s.token}
                         if s is not None else {"server": server}
                         for server, s in zip(self._servers, self._sessions)],
        }
        return state

    def load_state_dict(self, state_dict):
        if self._ps:
            raise ValueError("parameter_server mode: construct RemoteMuon with session_id and "
                             "token to attach; the server holds the weights and the step")
        remote = state_dict.get("remote")
        if remote is None:
            raise ValueError("not a RemoteMuon state dict (no 'remote' entry)")
        servers = [s["server"] for s in remote["sessions"]]
        if servers != self._servers:
            raise ValueError(f"state dict is for servers {servers}, this optimizer has "
                             f"{self._servers}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "remote"})
        sessions = []
        for client, saved, own in zip(self._clients, remote["sessions"], self._sessions):
            if own is None:
                sessions.append(None)
                continue
            session = client.attach(saved["session_id"], saved["token"], own.params)
            if session.step_number != remote["step"]:
                raise ValueError(f"session {saved['session_id']} is at step "
                                 f"{session.step_number}, the state dict at step {remote['step']}")
            sessions.append(session)
        for own in self.sessions:
            own.delete()
        self._sessions = sessions
        self._step = remote["step"]
