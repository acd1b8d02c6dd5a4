"""Run a test function on several real processes joined in a gloo process group (CPU).

:func:`run_ranks` spawns the ranks, each inside an initialized group that it destroys on the way
out, and fails the calling test instead of hanging when a rank does not finish in time: every rank
then writes its Python stack to stderr (which pytest shows with the failure) and is terminated."""
import faulthandler
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist


def _rank_main(rank: int, world_size: int, init_file: str, timeout: float, worker, args: tuple) -> None:
    """The worker's objects (a DDP reducer, FSDP state) are freed before the group is destroyed: a
    reducer that holds the last reference to a gloo group joins its threads with the GIL held, which
    deadlocks when a thread is still releasing a finished collective (seen with torch 2.13). A rank
    whose worker succeeded leaves without the interpreter's teardown, as ``osft`` does under torchrun
    (:func:`osft.cli.run_command`): with torch 2.13 a gloo/FSDP2 process now and then aborts in C++
    destructors at interpreter exit, after the group is destroyed."""
    faulthandler.dump_traceback_later(timeout, exit=False)  # a stuck rank shows where it is stuck
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the failed worker's objects go too
        raise
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, world_size: int, tmp_path, *args, timeout: float = 180.0) -> None:
    """Call ``worker(rank, world_size, *args)`` on ``world_size`` spawned processes in one gloo group
    (rendezvous through a file in ``tmp_path``). A rank's exception fails the test with its traceback;
    ranks still running after ``timeout`` seconds fail it too."""
    context = torch.multiprocessing.spawn(_rank_main, args=(world_size, str(tmp_path / "gloo-init"), timeout,
                                                            worker, args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout + 10.0  # the ranks dump their stacks first
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            stuck = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5.0)
            pytest.fail(f"ranks {stuck} of {world_size} still running after {timeout:g} s (stacks on stderr)")
