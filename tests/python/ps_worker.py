#!/usr/bin/env python3
"""One parameter-server worker training examples/train_tiny.py's model on its
shard of the data, for parameter_server_test.py.

    ps_worker.py --server=H:P --worker=0 --workers=3 --steps=20 --session_file=F --out=O
    ps_worker.py --server=H:P --worker=1 --workers=3 --steps=20 --session_file=F --out=O

Worker 0 creates the session and writes "session_id token" to --session_file;
the others (and a restarted worker 0) read it and attach. Each prints
"attached at step N" and "sending step N" before each step, and saves its
final parameters to --out. --wait_file/--wait_step: before sending that step,
wait until the file exists (the test holds a worker back with it).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.environ["MUON_EXAMPLES"])
from train_tiny import make_data, make_model  # noqa: E402

from muon_client import RemoteMuon  # noqa: E402

SEED = 0
LR, ADAMW_LR, WEIGHT_DECAY = 0.02, 3e-3, 0.01


def shard(worker, workers):
    x, y = make_data(SEED)
    return x[worker::workers], y[worker::workers]


def backward(model, x, y):
    """Sets .grad to the gradient of the mean loss over (x, y)."""
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--session_file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--wait_file")
    parser.add_argument("--wait_step", type=int)
    args = parser.parse_args()
    model = make_model(SEED)
    hp = dict(server=args.server, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WEIGHT_DECAY,
              mode="parameter_server", worker=args.worker, workers=args.workers)
    if os.path.exists(args.session_file):
        with open(args.session_file) as f:
            session_id, token = f.read().split()
        opt = RemoteMuon(model.named_parameters(), session_id=session_id, token=token, **hp)
    else:
        opt = RemoteMuon(model.named_parameters(), **hp)
        # Renamed into place so a reader never sees half a file.
        with open(args.session_file + ".tmp", "w") as f:
            f.write(f"{opt.session_id} {opt.token}")
        os.rename(args.session_file + ".tmp", args.session_file)
    print(f"attached at step {opt.step_number}", flush=True)
    x, y = shard(args.worker, args.workers)
    while opt.step_number < args.steps:
        step = opt.step_number + 1
        if step == args.wait_step:
            while not os.path.exists(args.wait_file):
                time.sleep(0.05)
        backward(model, x, y)
        print(f"sending step {step}", flush=True)
        opt.step()
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
