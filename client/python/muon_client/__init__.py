"""muon_client: the Python client of muon-server."""
from .client import MuonClient, MuonServerError, ParamSpec, Session, StepResult

__all__ = ["MuonClient", "MuonServerError", "ParamSpec", "Session", "StepResult", "RemoteMuon"]


def __getattr__(name):
    # torch is optional: import RemoteMuon only when asked for.
    if name == "RemoteMuon":
        from .optim import RemoteMuon
        return RemoteMuon
    raise AttributeError(name)
