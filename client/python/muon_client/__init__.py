"""muon_client: the Python client of muon-server."""
from .client import (CancelToken, MuonClient, MuonServerError, ParamSpec, Session, StepResult,
                     Timeouts)

__all__ = ["CancelToken", "MuonClient", "MuonServerError", "ParamSpec", "Session", "StepResult",
           "Timeouts", "RemoteMuon", "muon_param_groups"]


def __getattr__(name):
    # torch is optional: import RemoteMuon only when asked for.
    if name in ("RemoteMuon", "muon_param_groups"):
        from . import optim
        return getattr(optim, name)
    raise AttributeError(name)
