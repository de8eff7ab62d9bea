"""Runs one command as N JAX processes on this machine, as on the workers of a TPU pod.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python -m flamingo_jax.main --gin_file=runs/smoke_cpu.gin --workdir=/tmp/run

Each process gets ``--coordinator_address --num_processes --process_id --num_cpu_devices``
appended (the flags ``flamingo_jax.main`` reads for ``jax.distributed.initialize``); output is
prefixed with the process index. If one process fails the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream(process: subprocess.Popen, index: int) -> None:
    for line in process.stdout:
        sys.stdout.write(f"[process {index}] {line}")
        sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int, timeout_s: float | None = None) -> int:
    """Starts the processes, waits for all, returns the first non-zero exit code (or 0)."""
    port = free_port()
    env = dict(os.environ)
    # Each process sets its own device count; a forced count from the parent would conflict.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    processes = []
    for index in range(num_processes):
        args = command + [
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
            f"--num_cpu_devices={devices_per_process}",
        ]
        process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_stream, args=(process, index), daemon=True).start()
        processes.append(process)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = 0
    while any(process.poll() is None for process in processes):
        failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
        expired = deadline is not None and time.monotonic() > deadline
        if failed or expired:
            status = failed[0] if failed else 124
            for process in processes:
                if process.poll() is None:
                    process.kill()  # a peer of a dead process would wait on collectives forever
            break
        time.sleep(0.2)
    for process in processes:
        process.wait()
    return status or next((p.returncode for p in processes if p.returncode), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout_s", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(launch(command, args.num_processes, args.devices_per_process, args.timeout_s))


if __name__ == "__main__":
    main()
