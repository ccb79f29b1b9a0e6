"""Processes: one run across several (torchrun, accelerate launch), one device each.

A plain `python` start is a team of one, and then every method is the plain computation. Work
is dealt out item by item (process r takes items r, r + N, ...) and gathered back in order, so
every process holds every record and takes the same decisions; training splits each global
batch. Only the main process (rank 0) writes, prints and draws.

The rest may call: Team (share, spread, everyone, sum, sum_gradients, wait, together), PeerFailed,
team_from_environment, join_team, leave_team.
"""
import contextlib
import os
import signal
import sys
import warnings
from dataclasses import dataclass

from support import UsageError


class PeerFailed(Exception):
    """Another process of the run stopped (it has said why): this one stops too."""


@dataclass(frozen=True)
class Team:
    """The processes of one run, one device each; a plain `python` start is a team of one.
    Work is dealt out item by item (process r takes items r, r + N, ...) and gathered back in
    order, so every process holds every record and takes the same decisions; training splits
    each global batch. Only the main process (rank 0) writes, prints and draws."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # its device on its machine
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        return items[self.rank::self.size]

    def everyone(self, value) -> list:
        """`value` from every process, by rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist
        values = [None] * self.size
        with peers_failing_as_one():
            dist.all_gather_object(values, value)
        return values

    def spread(self, function, *columns: list) -> list:
        """function(this process's share of each column) on each process (columns of one length,
        one result per item); the results, in item order, on every process. With one process:
        function(*columns), exactly."""
        if self.size == 1:
            return function(*columns)
        gathered = [None] * len(columns[0])
        for rank, results in enumerate(self.everyone(function(*map(self.share, columns)))):
            gathered[rank::self.size] = results
        return gathered

    def sum(self, tensor) -> None:
        """Sum a tensor over the processes, in place."""
        if self.size > 1:
            import torch.distributed as dist
            with peers_failing_as_one():
                dist.all_reduce(tensor)

    def sum_gradients(self, params: list) -> None:
        """Gradients summed over the processes (one all-reduce of them all, flattened); a process
        with no example in a batch adds zeros."""
        if self.size == 1:
            return
        import torch
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        self.sum(flat)
        for p, part in zip(params, flat.split([p.numel() for p in params])):
            p.grad = part.view_as(p).clone()

    def wait(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            with peers_failing_as_one():
                dist.barrier()

    def together(self, step, failures=(UsageError,)):
        """Run a step that may fail on some processes only (loading a model, opening a sandbox);
        if it fails on any, every process raises the first failure, so all stop as one, and the
        main process reports it. The step itself must not wait for the other processes."""
        if self.size == 1:
            return step()
        try:
            result, failure = step(), None
        except failures as err:
            result, failure = None, err
        raised = [f for f in self.everyone(failure) if f is not None]
        if raised:
            raise raised[0]
        return result


@contextlib.contextmanager
def peers_failing_as_one():
    """A collective that breaks because a peer died raises PeerFailed, not the backend's error."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed's errors (DistError and its kind) are RuntimeErrors
        raise PeerFailed(str(err)) from err


def team_from_environment() -> Team:
    """Who this process is, from the variables torchrun and accelerate launch set (none: alone)."""
    env = os.environ
    try:
        return Team(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                    int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK must be numbers (they are set by torchrun or "
                         "accelerate launch)") from None


def leave_team(team: Team) -> None:
    if team.size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def join_team(cfg) -> Team:
    """Start the process group (NCCL on GPUs, gloo on the CPU), one device per process; quiet
    every process but the main one."""
    team = team_from_environment()
    if team.size == 1:
        return team
    import torch
    import torch.distributed as dist
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(team.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if "OMP_NUM_THREADS" not in os.environ:  # the launchers set it; share the cores otherwise
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // team.local_size))

    def stopped_by_launcher(signum, frame):  # the launcher ends the others when one process fails
        raise PeerFailed("stopped by the launcher")
    signal.signal(signal.SIGTERM, stopped_by_launcher)
    if not team.main:
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    return team
