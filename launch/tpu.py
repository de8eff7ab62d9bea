"""TPU VM lifecycle for flamingo_jax runs: create, set up, run on all workers, logs, stop, delete.

  python launch/tpu.py create --name=flamingo --zone=us-east5-a --accelerator_type=v5p-64 [--spot] [--queued]
  python launch/tpu.py setup  --name=flamingo --zone=us-east5-a
  python launch/tpu.py run    --name=flamingo --zone=us-east5-a --workdir=gs://BUCKET/run -- \\
      --gin_file=runs/smoke_cpu.gin --gin.TRAIN_STEPS=1000
  python launch/tpu.py logs   --name=flamingo --zone=us-east5-a [--collect=./logs]
  python launch/tpu.py stop|delete --name=flamingo --zone=us-east5-a [--queued]

Every subcommand takes ``--dry_run``: it prints the exact ``gcloud`` commands and runs nothing.
``run`` starts the same ``python -m flamingo_jax.main --distributed ...`` on every worker
(``--worker=all``); ``jax.distributed.initialize()`` finds the other workers itself. The
workdir is a bucket path (``gs://BUCKET/run``, written through etils.epath and orbax) or a path
every worker sees (an NFS mount). Locally, ``launch/local.py``
runs the same command as N processes through ``jax.distributed``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = "~/flamingo_jax"
REMOTE_LOG = "~/flamingo_run.log"
ARCHIVE = "/tmp/flamingo_jax.tar.gz"
# The environment every worker's training process gets.
RUN_ENV = {"PYTHONUNBUFFERED": "1", "TPU_STDERR_LOG_LEVEL": "0", "TPU_MIN_LOG_LEVEL": "0"}
DEFAULT_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def _runtime(accelerator_type: str) -> str:
    family = accelerator_type.rsplit("-", 1)[0]
    if family not in DEFAULT_RUNTIME:
        raise ValueError(f"unknown TPU family in {accelerator_type!r}; pass --runtime_version")
    return DEFAULT_RUNTIME[family]


def _where(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _ssh(args, remote: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        args.name,
        *_where(args),
        "--worker=all",
        f"--command={remote}",
    ]


def create_commands(args) -> list[list[str]]:
    runtime = args.runtime_version or _runtime(args.accelerator_type)
    if args.queued:
        command = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}"]
        command += [*_where(args), f"--accelerator-type={args.accelerator_type}", f"--runtime-version={runtime}"]
    else:
        command = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args)]
        command += [f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
    if args.spot:
        command.append("--spot")
    return [command]


def setup_commands(args) -> list[list[str]]:
    extras = f"[{args.extras}]" if args.extras else ""
    install = (
        f"mkdir -p {REMOTE_DIR} && tar -xzf ~/flamingo_jax.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
        f"python3 -m venv .venv && .venv/bin/pip install -q -e '.{extras}' 'jax[tpu]'"
    )
    if args.pip:
        install += " && .venv/bin/pip install -q " + " ".join(shlex.quote(package) for package in args.pip)
    return [
        ["git", "-C", args.repo_dir, "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            ARCHIVE,
            f"{args.name}:~/flamingo_jax.tar.gz",
            *_where(args),
            "--worker=all",
        ],
        _ssh(args, install),
    ]


def run_command(args, main_args: list[str]) -> list[str]:
    if not args.workdir:
        raise ValueError("run needs --workdir (gs://BUCKET/run, or a path every worker sees)")
    env = " ".join(f"{key}={value}" for key, value in RUN_ENV.items())
    main = ["python", "-m", "flamingo_jax.main", "--distributed", f"--workdir={args.workdir}", *main_args]
    remote = f"cd {REMOTE_DIR} && nohup env {env} .venv/bin/{shlex.join(main)} > {REMOTE_LOG} 2>&1 &"
    return _ssh(args, remote)


def logs_commands(args) -> list[list[str]]:
    if args.collect:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                f"{args.name}:{REMOTE_LOG}",
                args.collect,
                *_where(args),
                "--worker=all",
            ]
        ]
    return [_ssh(args, f"tail -n 200 -f {REMOTE_LOG}")]


def stop_commands(args) -> list[list[str]]:
    return [["gcloud", "compute", "tpus", "tpu-vm", "stop", args.name, *_where(args)]]


def delete_commands(args) -> list[list[str]]:
    if args.queued:
        return [
            ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force", "--quiet"]
        ]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


def parse(argv: list[str]):
    main_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, main_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="TPU VM lifecycle for flamingo_jax runs")
    parser.add_argument("action", choices=["create", "setup", "run", "logs", "stop", "delete"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator_type", default="v5p-8")
    parser.add_argument("--runtime_version", default=None)
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--queued", action="store_true", help="use queued resources")
    parser.add_argument("--repo_dir", default=".")
    parser.add_argument("--extras", default=None, help="setup: the package's extras to install, e.g. 'notebook'")
    parser.add_argument("--pip", action="append", default=[], help="setup: a further pip package (repeatable)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--collect", default=None, help="logs: copy every worker's log into this folder")
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
    return parser.parse_args(argv), main_args


def commands_for(args, main_args: list[str]) -> list[list[str]]:
    if args.action == "run":
        return [run_command(args, main_args)]
    return {
        "create": create_commands,
        "setup": setup_commands,
        "logs": logs_commands,
        "stop": stop_commands,
        "delete": delete_commands,
    }[args.action](args)


def main(argv: list[str]) -> int:
    args, main_args = parse(argv)
    try:
        commands = commands_for(args, main_args)
    except ValueError as error:
        print(f"launch/tpu.py: {error}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            status = subprocess.call(command)
            if status:
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
