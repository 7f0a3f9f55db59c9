"""Several `mt-train` runs in one `torchrun` launch (see test_ddp.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_harness.py RUNS

RUNS is a JSON list of override lists. Each rank calls the `mt-train` entry point with each list in
turn, as `torchrun scripts/train.py OVERRIDES` would, and the process group is set up and torn down
by each run as usual. The launcher and the ranks start (and import torch) once for all the runs.
The harness exits with the first run's non-zero status, if any.

A process group set up again on the launcher's key-value store would read the keys the last run
left there (a rank that reaches the next run first takes the other's old address and waits
forever), so each run gets a store of its own: rank 0 serves a new one on a free port, names the
port on the launcher's store, and every rank points MASTER_PORT at it. The ranks wait for each
other between runs, so none leaves a store that another still uses.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from torch.distributed import TCPStore

from transformer_mt.cli import train as train_cli


def run_once(overrides: list[str]) -> int:
    """One `mt-train` run; its exit status. Hydra's logging set-up is undone afterwards."""
    sys.argv = ["train.py", *overrides]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        train_cli.main()
        return 0
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def wait_for_all(store: TCPStore, key: str, world_size: int) -> None:
    store.add(key, 1)
    while store.add(key, 0) < world_size:
        time.sleep(0.05)


def main() -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host = os.environ["MASTER_ADDR"]
    launcher = TCPStore(host, int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    for index, overrides in enumerate(json.loads(sys.argv[1])):
        own = None
        if rank == 0:
            own = TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False)
            launcher.set(f"ddp_harness/{index}/port", str(own.port))
        os.environ["MASTER_PORT"] = launcher.get(f"ddp_harness/{index}/port").decode()
        code = run_once(overrides)
        if code:
            sys.exit(code)
        wait_for_all(launcher, f"ddp_harness/{index}/done", world_size)
        del own


if __name__ == "__main__":
    main()
