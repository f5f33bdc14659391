"""Start the processes of a distributed run on this machine, keeping every server on 127.0.0.1.

- :func:`launch_local` runs a function in N spawned processes that share one process group,
  like ``torchrun --standalone`` does for a script.
- :func:`run_module_in_subprocess` runs ``python -m MODULE`` in a child process (for example
  from a notebook) and stops the child and every process it started on a timeout.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

from course_utils import paths

LOOPBACK_ADDRESS = "127.0.0.1"


def loopback_interface() -> str | None:
    """Return the name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    for name in names:
        if name in ("lo", "lo0"):
            return name
    return None


def pin_collectives_to_loopback() -> None:
    """Make gloo and NCCL open their sockets on the loopback interface unless the user chose one."""
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


def _local_worker(
    local_rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    function: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """Body of every process started by :func:`launch_local`: join the group, run, leave."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=LOOPBACK_ADDRESS,
        MASTER_PORT=str(port),
    )
    pin_collectives_to_loopback()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(LOOPBACK_ADDRESS, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=local_rank, world_size=world_size, timeout=timeout)
    try:
        function(local_rank, world_size, *args)
        dist.barrier()  # no rank leaves while another still works (rank 0 may be saving)
    finally:
        dist.destroy_process_group()
    exit_finished_worker()


def exit_finished_worker() -> None:
    """End a worker process that finished its work and left its process group, with status 0.

    The worker skips the interpreter's and C++'s exit-time destructors. After DDP on gloo,
    those sometimes abort a worker that has already finished (SIGABRT, "terminate called
    without an active exception"), and the launcher then reports a good run as failed.
    Standard output and error are flushed first; the exit status is 0.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_local(
    function: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    timeout_s: float | None = None,
    collective_timeout_s: float = 300.0,
) -> None:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` new processes on this machine.

    Each process joins a process group of ``backend`` before ``function`` runs and leaves it
    afterwards. The rendezvous ``TCPStore`` runs in this process on a free port of 127.0.0.1:
    it is handed a socket already bound there, because a ``TCPStore`` that opens its own socket
    listens on every interface. ``function`` must be importable (defined at module level),
    because the processes are started with ``spawn``.

    ``collective_timeout_s`` bounds how long a rank waits for the others in the rendezvous and
    in each collective. Raises ``TimeoutError`` when the processes are still running after
    ``timeout_s`` seconds (None = no limit), and ``torch.multiprocessing.ProcessRaisedException``
    (with the worker's traceback) when one fails. Either way, every process still alive is
    terminated before this function returns.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK_ADDRESS, 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        LOOPBACK_ADDRESS,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
        # The store takes over the socket and closes it when it is destroyed.
        master_listen_fd=listener.detach(),
    )

    context = mp.start_processes(
        _local_worker,
        args=(world_size, port, backend, collective_timeout_s, function, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not context.join(timeout=0.5):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{world_size} worker process(es) were still running after {timeout_s:.0f} s; they were "
                    f"stopped. Raise the timeout, or look for a rank that waits in a collective the others skipped."
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        del store


def run_module_in_subprocess(
    module: str, argv: Sequence[str], timeout_s: float = 600.0, echo: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGV`` in a child process and wait for it.

    The output (stdout and stderr together) is echoed line by line while it arrives when
    ``echo`` is True, and returned in ``.stdout``. The child runs in its own process group, so
    on a timeout (or an interrupt of the caller) it is killed together with the worker processes
    it started, and then ``TimeoutError`` is raised. A non-zero exit status is returned, not
    raised, so the caller can show the message.

    NOTE: process groups and ``os.killpg`` are POSIX features, so this helper does not run on
    Windows; start the command in a terminal there.
    """
    command = [sys.executable, "-m", module, *map(str, argv)]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(paths.REPO_DIR), environment.get("PYTHONPATH")]))
    environment["PYTHONUNBUFFERED"] = "1"

    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill_group() -> None:
        timed_out.set()
        _kill_process_group(process)

    timer = threading.Timer(timeout_s, kill_group)
    timer.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        process.wait()
    except BaseException:
        _kill_process_group(process)
        raise
    finally:
        timer.cancel()
    # A worker that outlived the launcher would keep the group alive; it goes with the rest.
    if _group_alive(process.pid):
        _kill_process_group(process)
    if timed_out.is_set():
        raise TimeoutError(f"{' '.join(command)} did not finish within {timeout_s:.0f} s and was stopped.")
    return subprocess.CompletedProcess(command, process.returncode, stdout="".join(lines), stderr=None)


def _kill_process_group(process: subprocess.Popen) -> None:
    """Kill the child started by :func:`run_module_in_subprocess` and everything in its process group."""
    if process.poll() is None or _group_alive(process.pid):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


def _group_alive(group_id: int) -> bool:
    try:
        os.killpg(group_id, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
