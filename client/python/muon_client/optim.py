"""RemoteMuon: a torch.optim.Optimizer whose state lives on a muon-server.

    opt = RemoteMuon(model.parameters(), server="127.0.0.1:50051", lr=0.02, adamw_lr=3e-4)
    loss.backward(); opt.step(); opt.zero_grad()

Parameters of 2 or more dimensions get Muon, the others AdamW; a param group
may say kind="muon" or kind="adamw" and override any hyper-parameter.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import numpy as np
import torch

from .client import MuonClient, ParamSpec, Session

_GROUP_HP = ("lr", "weight_decay", "momentum", "nesterov", "momentum_form", "ns_schedule",
             "ns_steps", "shape_scale", "betas", "eps")
_MUON_ONLY = ("momentum", "nesterov", "momentum_form", "ns_schedule", "ns_steps", "shape_scale")
_ADAMW_ONLY = ("betas", "eps")


class RemoteMuon(torch.optim.Optimizer):
    """Muon (and AdamW for non-matrix parameters) computed by a muon-server.

    step() sends the gradients of parameters whose .grad is set, waits for the
    server's commit and only then updates them in place (W <- decay*W + update).
    A broken stream is retried with the same step number; the server applies
    each step exactly once. Server errors raise MuonServerError.

    LR schedulers work: each step sends every group's current lr as a ratio to
    the lr the session was created with, which must be the same for all groups
    (true of the schedulers that scale every group by one factor).
    """

    def __init__(self, params, server: str, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_schedule: str = "jordan",
                 ns_steps: int = 5, shape_scale: str = "spectral", momentum_form: str = "ema",
                 adamw_lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 wire_dtype: str = "float32", measure_orthogonality: bool = False,
                 client: Optional[MuonClient] = None):
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": [p for p in params if p.ndim >= 2], "kind": "muon"},
                      {"params": [p for p in params if p.ndim < 2], "kind": "adamw", "lr": adamw_lr}]
            params = [g for g in params if g["params"]]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_schedule=ns_schedule, ns_steps=ns_steps, shape_scale=shape_scale,
                        momentum_form=momentum_form, betas=tuple(betas), eps=eps,
                        wire_dtype=wire_dtype, kind=None)
        super().__init__(params, defaults)
        self._adamw_lr = adamw_lr
        self._measure = measure_orthogonality
        self._client = client or MuonClient(server)
        self._order: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._session = self._client.create_session(self._specs())
        self._base_lr = [g["lr"] for g in self.param_groups]
        self.last_summary = None

    def _specs(self) -> List[ParamSpec]:
        specs = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                kind = group["kind"] or ("muon" if p.ndim >= 2 else "adamw")
                if kind == "muon" and p.ndim < 2:
                    raise ValueError(f"param group {gi} parameter {pi}: Muon needs 2 or more "
                                     f"dimensions, got shape {tuple(p.shape)}")
                skip = _ADAMW_ONLY if kind == "muon" else _MUON_ONLY
                overrides = {k: group[k] for k in _GROUP_HP if k not in skip}
                specs.append(ParamSpec(name=f"group{gi}.param{pi}", shape=tuple(p.shape),
                                       dtype=group["wire_dtype"], kind=kind, overrides=overrides))
        return specs

    @property
    def session(self) -> Session:
        return self._session

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
        grads = {}
        for index, p in enumerate(self._order):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RemoteMuon does not support sparse gradients")
            grads[index] = p.grad.detach().to("cpu", torch.float32).numpy()
        result = self._session.step(grads, lr_scale=self._lr_scale(),
                                    measure_orthogonality=self._measure)
        for index, update in result.updates.items():
            p = self._order[index]
            delta = torch.from_numpy(update).to(device=p.device, dtype=p.dtype)
            decay = result.decay[index]
            if decay != 1.0:
                p.mul_(decay)
            p.add_(delta)
        self.last_summary = result.summary
        return loss

    def state_dict(self):
        # The optimizer state (momentum, moments) lives on the server: the
        # state dict names the session that holds it.
        state = super().state_dict()
        state["remote"] = {"session_id": self._session.session_id,
                           "token": self._session.token,
                           "step": self._session.step_number}
        return state

    def load_state_dict(self, state_dict):
        remote = state_dict.get("remote")
        if remote is None:
            raise ValueError("not a RemoteMuon state dict (no 'remote' entry)")
        local = {k: v for k, v in state_dict.items() if k != "remote"}
        super().load_state_dict(local)
        session = self._client.attach(remote["session_id"], remote["token"], self._specs())
        if session.step_number != remote["step"]:
            raise ValueError(f"session {remote['session_id']} is at step {session.step_number}, "
                             f"the state dict at step {remote['step']}")
        self._session = session
