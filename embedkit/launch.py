"""Run a command in several processes: `--nproc N` re-launches it under torch.distributed.run.

    code = relaunch(["eval", "-m", "minilm", "-t", "stsb"], nproc=2)
    # runs: python -m torch.distributed.run --nproc_per_node=2 --master_port=<free> -m embedkit.cli eval -m minilm ...
    # (through `python -m embedkit.launch`, which is torch.distributed.run without its failure traceback)

A command supports `--nproc` with `processes(nproc, device)`:

    with processes(nproc, device, ctx=ctx) as procs:  # in the parent with nproc > 1: relaunches, then exits
        encoder = load_model(model, device=procs.device)
        with procs.shard(encoder):                   # encode spreads over the processes (every rank: full result)
            vectors = encoder.encode(texts)
        if procs.is_main:                            # rank 0 alone writes files and prints
            ...

Across nodes, `relaunch(..., nodes=Nodes(nnodes=2, node_rank=R, rdzv_endpoint="node0:29500"))` runs the same
torch.distributed.run on every node with its own rank (`embedkit train --nnodes 2 --node-rank R --rdzv-endpoint
node0:29500`). A process started by any launcher (torchrun, the DeepSpeed launcher, srun + torchrun) is recognised
by its environment (`launched()`) and is not relaunched: its global RANK decides the data shard and who writes
(rank 0 alone), its LOCAL_RANK only which GPU of its node it takes.

Inside a launched process the process group is initialised (nccl on GPUs, gloo on the CPU) and torn down at the
end; each process resolves its own `--device` (auto: its own GPU, cuda:LOCAL_RANK). On the CPU each process gets
cores / N threads (OMP_NUM_THREADS, unless set): N processes help only when one process leaves cores idle.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Sequence

import typer

from embedkit import logs
from embedkit.device import resolve_device, validate_device
from embedkit.errors import ConfigError

ERRORS_ENV = "EMBEDKIT_LAUNCH_ERRORS"  # a folder where launched processes leave their one-line error
NPROC_HELP = ("Processes to spread the encoding over (torch.distributed; one GPU each with --device auto). On the "
              "CPU it mostly helps when the machine has more cores than one process keeps busy.")


NODES_HELP = ("Nodes (machines) to run on, --nproc processes on each (torchrun --nnodes): run the same command on "
              "every node with its --node-rank and the same --rdzv-endpoint.")
NODE_RANK_HELP = "This node's rank, 0 to --nnodes - 1 (the static rendezvous: node 0 holds global rank 0)."
RDZV_ENDPOINT_HELP = ("HOST:PORT where the nodes meet (torchrun --rdzv-endpoint): node 0's address and a free port "
                      "on it. Needed with --nnodes above 1.")
RDZV_BACKEND_HELP = ("static (default: node ranks as given, node 0 holds global rank 0) or c10d (torchrun's "
                     "elastic rendezvous: it numbers the nodes itself, --node-rank is ignored).")
RDZV_ID_HELP = "The job's id for the c10d rendezvous (e.g. $SLURM_JOB_ID); the same on every node."
# The node options of every command that takes --nproc (typer reads these as defaults; Nodes.from_context reads the
# values back from the command's context).
NNODES_OPTION = typer.Option(1, "--nnodes", min=1, help=NODES_HELP)
NODE_RANK_OPTION = typer.Option(0, "--node-rank", min=0, help=NODE_RANK_HELP)
RDZV_ENDPOINT_OPTION = typer.Option(None, "--rdzv-endpoint", help=RDZV_ENDPOINT_HELP)
RDZV_BACKEND_OPTION = typer.Option("static", "--rdzv-backend", help=RDZV_BACKEND_HELP)
RDZV_ID_OPTION = typer.Option("embedkit", "--rdzv-id", help=RDZV_ID_HELP)

# Ray Data encoding (embedkit.models.ray_encode): `--ray` = a local Ray; `--ray-address ADDRESS` = a cluster. (Not
# `--ray [ADDRESS]`: typer has no option whose value is optional.)
RAY_HELP = ("Encode the corpus on Ray Data into resumable vector shards, on a local Ray (all the machine's CPUs) "
            "unless --ray-address is given. An interrupted run resumes from its finished shards. Needs pip install "
            "'embedkit\\[ray]'.")
RAY_OPTION = typer.Option(False, "--ray", help=RAY_HELP)
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                  help="Encode on this Ray cluster (implies --ray): auto, HOST:6379, "
                                       "ray://HOST:10001.")
RAY_WORKERS_OPTION = typer.Option(None, "--ray-workers", min=1,
                                  help="With --ray: model actors (default: one per GPU of the cluster, else 2).")
SHARD_SIZE_OPTION = typer.Option(16384, "--shard-size", min=1,
                                 help="With --ray: texts per shard (the unit of work and of resume). Multiples of "
                                      "16384 give vectors bit-equal to one process; others agree to float rounding.")
# What command_argv leaves out by default: the launch options, which the launched processes know from their
# environment (torchrun would also reject --nproc as an ambiguous abbreviation of its own --nproc-per-node).
LAUNCH_PARAMS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id")


@dataclass
class Nodes:
    """Where this node stands in a multi-node launch: torch.distributed.run's --nnodes, --node-rank and rendezvous."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "static"
    rdzv_id: str = "embedkit"

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, not {self.nnodes}", field="--nnodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be 0 to {self.nnodes - 1} (--nnodes {self.nnodes}), not "
                              f"{self.node_rank}", field="--node-rank")
        if self.rdzv_backend not in ("static", "c10d"):
            raise ConfigError(f"--rdzv-backend is static or c10d, not {self.rdzv_backend!r}", field="--rdzv-backend")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a "
                                  f"free port on it), not {self.rdzv_endpoint!r}", field="--rdzv-endpoint")

    @classmethod
    def from_context(cls, ctx: Any) -> "Nodes":
        """The node options of a command (its typer.Context); one node when it has none."""
        params = ctx.params if ctx is not None else {}
        return cls(params.get("nnodes") or 1, params.get("node_rank") or 0, params.get("rdzv_endpoint"),
                   params.get("rdzv_backend") or "static", params.get("rdzv_id") or "embedkit")

    @property
    def many(self) -> bool:
        return self.nnodes > 1

    def torchrun_args(self) -> list[str]:
        """torch.distributed.run's rendezvous arguments for this node."""
        if not self.many:
            return [f"--master_port={free_port()}"]  # one machine: any free port of its own
        args = [f"--nnodes={self.nnodes}", f"--rdzv-backend={self.rdzv_backend}",
                f"--rdzv-endpoint={self.rdzv_endpoint}"]
        if self.rdzv_backend == "static":
            return [*args, f"--node-rank={self.node_rank}"]
        return [*args, f"--rdzv-id={self.rdzv_id}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched() -> bool:
    """True inside a process started by torch.distributed.run (or torchrun) with more than one process."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def relaunch(argv: Sequence[str], nproc: int, *, module: str = "embedkit.cli", cpu: bool | None = None,
             env: dict[str, str] | None = None, nodes: Nodes | None = None) -> int:
    """Run `python -m MODULE ARGV` in `nproc` processes under torch.distributed.run; return its exit code.

    `nodes`: this node's part of a multi-node launch (every node runs the same relaunch with its own node_rank);
    its exit code is this node's processes'.

    `cpu`: the processes run on the CPU (default: when CUDA is unavailable): DeepSpeed is pointed at its CPU
    accelerator and each process gets cores / nproc threads unless OMP_NUM_THREADS is set.
    """
    import torch

    environment = dict(os.environ if env is None else env)
    environment.update(logs.child_environment())  # -v / -q / --log-json came before the sub-command: not in argv
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        environment.setdefault("DS_ACCELERATOR", "cpu")
    # torchrun would set 1 thread per process; cores / nproc keeps the machine busy without oversubscribing it.
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # `python -m embedkit.launch` is torch.distributed.run (same arguments) with a short failure report: the
    # one-line error of the process that failed first (see report_error), not the launcher's traceback.
    cmd = [sys.executable, "-m", "embedkit.launch", f"--nproc_per_node={nproc}",
           *(nodes or Nodes()).torchrun_args(), "-m", module, *argv]
    with tempfile.TemporaryDirectory(prefix="embedkit-launch-") as errors:
        environment[ERRORS_ENV] = errors
        return subprocess.call(cmd, env=environment)


def end_launched_process(code: int | str | None) -> NoReturn:
    """End a process started by `relaunch` once its work is done and its process group closed: without the C++
    static destructors, which can abort the interpreter's teardown ("terminate called without an active exception",
    exit 134: DeepSpeed's CPU communication op after a resumed ZeRO-3 run; gloo now and then after a sharded encode
    on a busy machine), which torchrun would report as a failed run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def report_error(line: str) -> None:
    """Say a one-line error: on stderr, or, in a process started by `relaunch`, to the launcher, which prints the
    line of the process that failed first (all N processes usually meet the same error: it is said once)."""
    folder = os.environ.get(ERRORS_ENV)
    if folder and "RANK" in os.environ and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank{os.environ['RANK']}.txt"), "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return
    _write_error(line)


def _write_error(line: str) -> None:
    """The one-line error on stderr; under --log-json a JSON line like the others, for the machine reading them."""
    if logs.json_lines_on():
        logging.getLogger(__name__).error(line.removeprefix("error: "))
    else:
        print(line, file=sys.stderr, flush=True)


def _torchrun(args: Sequence[str]) -> int:
    """torch.distributed.run with ARGS; returns the exit code of the first process that failed (0: none did)
    after printing its one-line error, instead of the launcher's traceback and failure table."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logs.configure_logging("embedkit")  # as the command was: relaunch passed its level and format on
    try:
        run(parse_args(list(args)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        said = os.path.join(os.environ.get(ERRORS_ENV, ""), f"rank{rank}.txt")
        if os.environ.get(ERRORS_ENV) and os.path.isfile(said):
            with open(said, encoding="utf-8") as handle:
                for line in handle.read().splitlines():
                    _write_error(line)
        elif code < 0:
            _write_error(f"error: process {rank} was killed by signal {-code}")
        # (otherwise the process printed its own traceback)
        return 128 - code if code < 0 else code or 1
    return 0


def init_process_group(device) -> bool:
    """Initialise the default process group for `device` (nccl for a GPU, gloo otherwise) from torchrun's
    environment; False when one already exists (then it is left alone)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return True


def command_argv(ctx: Any, *, leave_out: Sequence[str] = LAUNCH_PARAMS) -> list[str]:
    """The running typer/click command as arguments of `python -m embedkit.cli` (`rag index --model m ...`),
    rebuilt from `ctx` (the command's `typer.Context`): the options given on the command line, with their parsed
    values, and the positional arguments. Defaults and environment values are left out (the relaunched processes
    see the same ones), and so are the parameters named in `leave_out`: the launch options (LAUNCH_PARAMS)."""
    names = []
    node = ctx
    while node.parent is not None:
        names.append(node.info_name)
        node = node.parent
    argv = list(reversed(names))

    def text(value: Any) -> str:
        return str(value.value if isinstance(value, enum.Enum) else value)

    positional: list[str] = []
    for param in ctx.command.params:
        if param.name in leave_out:
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            if value is not None:
                positional.extend(text(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            continue
        source = ctx.get_parameter_source(param.name)
        if param.param_type_name != "option" or source is None or source.name in (
                "DEFAULT", "DEFAULT_MAP", "ENVIRONMENT"):
            continue  # the relaunched processes get the same defaults and environment
        name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_flag and param.secondary_opts:
            argv.append(name if value else next((o for o in param.secondary_opts if o.startswith("--")),
                                                param.secondary_opts[0]))
        elif param.is_flag:
            if value:
                argv.append(name)
        elif param.multiple:
            for item in value or ():
                argv += [name, *(map(text, item) if isinstance(item, tuple) else [text(item)])]
        elif isinstance(value, tuple):
            argv += [name, *map(text, value)]
        elif value is not None:
            argv += [name, text(value)]
    if positional:
        argv += ["--", *positional]
    return argv


@dataclass
class Processes:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int
    world: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, encoder: Any):
        """Sharded encoding for `encoder` when there are several processes; nothing otherwise (any encoder)."""
        if self.world == 1:
            return contextlib.nullcontext(encoder)
        return encoder.sharded()


@contextlib.contextmanager
def processes(nproc: int, device: str = "auto", *, ctx: Any = None, argv: Sequence[str] | None = None,
              module: str = "embedkit.cli", nodes: Nodes | None = None) -> Iterator[Processes]:
    """See the module docstring. The device is checked first (a one-line error before anything starts); with
    nproc > 1 (or several nodes) outside a launched process the command is re-run under torch.distributed.run and
    this process exits with its exit code (SystemExit). What is re-run: `argv`, else the command of `ctx` (its
    typer.Context) as typed. `nodes`: this node's part of a multi-node run, else the command's node options
    (`--nnodes`, `--node-rank`, `--rdzv-*`, read from `ctx`)."""
    import torch

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, not {nproc}", field="--nproc")
    if nodes is None:
        nodes = Nodes.from_context(ctx)
    spec = validate_device(device)
    resolved = resolve_device(spec, field="--device")
    many = nproc > 1 or nodes.many or launched()
    if many and ":" in spec:
        raise ConfigError(f"--device {spec} names one GPU for several processes; use --device auto (or cuda) to "
                          "give each process its own", field="--device")
    if nproc > 1 and resolved.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible; use fewer "
                          "processes or --device cpu", field="--nproc")
    if (nproc > 1 or nodes.many) and not launched():
        if argv is None and ctx is None:
            raise ValueError("processes(nproc > 1) needs the command's context (ctx) or its argv")
        code = relaunch(list(argv) if argv is not None else command_argv(ctx), nproc, module=module,
                        cpu=resolved.type == "cpu", nodes=nodes)
        raise SystemExit(code)
    if not launched():
        yield Processes(0, 1, resolved)
        return
    import torch.distributed as dist

    created = init_process_group(resolved)
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), resolved)
        dist.barrier()  # rank 0 may still be writing; nobody tears the group down under it
    finally:
        if created:
            # Free what reference cycles still hold (a caught error's frames keep the tensors of the collectives
            # they ran) while the group and the interpreter are whole. Left to interpreter shutdown, a 2-process
            # sharded encode that had caught an error aborted at exit 2 times in 27 on a busy machine ("terminate
            # called without an active exception", exit 134, all work done); 0 in 50 with this collect.
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(_torchrun(sys.argv[1:]))
