"""Training under SLURM: the cluster of a job step, read from the environment SLURM gives each task.

`srun -n N python train.py` starts N tasks; each finds its place from
SLURM's variables (its rank, the step's nodes and tasks per node), and
together they form a multi-worker cluster, the equivalent of TF_CONFIG.

TensorFlow's own SlurmClusterResolver is not used: on a node without GPUs it
runs `nvidia-smi` and fails, and with no GPUs per node it fails dividing by
zero (tensorflow/tensorflow#56894). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from lenet_tf.errors import UsageError

# Sets the port of the step's first task on each node (the next tasks on the
# same node take the ports after it) instead of deriving it from the job.
PORT_VARIABLE = "LENET_TF_SLURM_PORT"
# Derived ports lie in [FIRST_PORT, FIRST_PORT + PORT_SLOTS * PORTS_PER_SLOT),
# below Linux's ephemeral range (32768 and up), where outgoing connections
# take their ports.
FIRST_PORT = 10000
PORTS_PER_SLOT = 64
PORT_SLOTS = 350


@dataclass(frozen=True)
class SlurmStep:
    """This task's place in a SLURM job step of several tasks."""

    job_id: str
    step_id: str
    rank: int  # SLURM_PROCID: the task's index in the step, 0 .. tasks - 1.
    workers: tuple[str, ...]  # host:port of every task, in rank order.
    gpus: tuple[str, ...] | None  # This task's GPUs (CUDA_VISIBLE_DEVICES); None: as SLURM left them.

    @property
    def tasks(self) -> int:
        return len(self.workers)

    def tf_config(self) -> dict:
        """The TF_CONFIG this task would be given by hand; task 0 is the chief."""
        return {"cluster": {"worker": list(self.workers)}, "task": {"type": "worker", "index": self.rank}}


def step_from_environment(environ: Mapping[str, str] = os.environ) -> SlurmStep | None:
    """This task's place, when it runs in a SLURM job step (`srun`); None outside one.

    A batch script itself (sbatch's shell, where SLURM_NTASKS can be above 1
    but only one process runs) is not a step: SLURM_STEP_NUM_TASKS is set by
    `srun` alone.
    """
    if "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    job_id = _required(environ, "SLURM_JOB_ID")
    step_id = _required(environ, "SLURM_STEP_ID")
    tasks = _integer(environ, "SLURM_STEP_NUM_TASKS")
    rank = _integer(environ, "SLURM_PROCID")
    nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST") or _required(environ, "SLURM_JOB_NODELIST"))
    tasks_per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                           or _required(environ, "SLURM_TASKS_PER_NODE"))
    if len(tasks_per_node) != len(nodes) or sum(tasks_per_node) != tasks:
        raise UsageError(f"SLURM's step layout does not add up: {len(nodes)} node(s) {','.join(nodes)}, tasks per "
                         f"node {','.join(map(str, tasks_per_node))}, {tasks} task(s); set TF_CONFIG instead")
    if not 0 <= rank < tasks:
        raise UsageError(f"SLURM_PROCID {rank} is outside the step's {tasks} task(s)")
    distribution = environ.get("SLURM_DISTRIBUTION", "block")
    if distribution.split(":")[0].split(",")[0].strip() == "plane" and "SLURM_DIST_PLANESIZE" in environ:
        # srun passes --distribution=plane=N on as "plane" with N in a variable of its own.
        distribution = f"plane={_integer(environ, 'SLURM_DIST_PLANESIZE')}"
    placement = place_tasks(tasks_per_node, distribution)
    node, local_index = placement[rank]
    _check_own_place(environ, rank, nodes[node], local_index, distribution)
    first_port = _first_port(environ, job_id, step_id, max(tasks_per_node))
    workers = tuple(f"{nodes[node]}:{first_port + local}" for node, local in placement)
    gpus = task_gpus(environ, tasks_per_node[node], local_index)
    return SlurmStep(job_id, step_id, rank, workers, gpus)


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed node list as names: `node[01-03,07]` -> node01, node02, node03, node07;
    `a[1-2],b3` -> a1, a2, b3; `r[1-2]-n[1-2]` -> r1-n1, r1-n2, r2-n1, r2-n2."""
    names = [name for item in _split_top_level(text.strip()) for name in _expand_item(item, text)]
    if not names:
        raise UsageError(f"SLURM's node list {text!r} names no node; set TF_CONFIG instead")
    return names


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM's tasks per node, one count per node: `2(x3),1` -> 2, 2, 2, 1."""
    counts = []
    for item in text.strip().split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match or int(match.group(1)) < 1:
            raise UsageError(f"SLURM's tasks per node {text!r} is not a list like 2(x3),1; set TF_CONFIG instead")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def place_tasks(tasks_per_node: list[int], distribution: str = "block") -> list[tuple[int, int]]:
    """(node index, index among the node's tasks) of each rank, as srun's `--distribution` lays them out.

    block (srun's default) fills each node in turn; cyclic deals the ranks
    round the nodes that still have room; plane=N deals blocks of N.
    """
    kind = distribution.split(":")[0].split(",")[0].strip() or "block"
    block = 1
    if kind == "block":
        return [(node, local) for node, count in enumerate(tasks_per_node) for local in range(count)]
    if kind.startswith("plane"):
        match = re.fullmatch(r"plane=(\d+)", kind)
        if not match or int(match.group(1)) < 1:
            raise UsageError(f"SLURM_DISTRIBUTION {distribution!r} is not a layout this package reads; "
                             "use srun --distribution=block or cyclic, or set TF_CONFIG")
        block = int(match.group(1))
    elif kind != "cyclic":
        raise UsageError(f"SLURM_DISTRIBUTION {distribution!r} is not a layout this package reads; "
                         "use srun --distribution=block or cyclic, or set TF_CONFIG")
    placed = [0] * len(tasks_per_node)
    placement: list[tuple[int, int]] = []
    while len(placement) < sum(tasks_per_node):
        for node, count in enumerate(tasks_per_node):
            for _ in range(min(block, count - placed[node])):
                placement.append((node, placed[node]))
                placed[node] += 1
    return placement


def derived_first_port(job_id: str, step_id: str) -> int:
    """The port of a step's first task on each node, from the job and step ids, so that
    two steps running on one node at the same time (another job, or a second step of
    this job) take different ports."""
    digits = re.sub(r"\D", "", job_id) or "0"  # An array job's id can read 123_4.
    step = int(step_id) if step_id.isdigit() else 0
    return FIRST_PORT + PORTS_PER_SLOT * ((7 * int(digits) + step) % PORT_SLOTS)


def task_gpus(environ: Mapping[str, str], tasks_on_node: int, local_index: int) -> tuple[str, ...] | None:
    """The GPUs this task should use, or None to leave CUDA_VISIBLE_DEVICES as it is.

    SLURM binds GPUs to each task (`--gpus-per-task`, `--gpu-bind`) by
    giving it fewer than the step holds on the node; then its
    CUDA_VISIBLE_DEVICES stands. When every task on a node sees all the
    step's GPUs there, each takes an equal share by its index on the node,
    so that tasks do not train on the same GPU; with fewer GPUs than
    tasks, they are left shared.
    """
    step_gpus = _id_list(environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS"))
    visible = _id_list(environ.get("CUDA_VISIBLE_DEVICES")) if "CUDA_VISIBLE_DEVICES" in environ else None
    shared = visible if visible is not None else step_gpus
    if tasks_on_node < 2 or not shared or len(shared) < tasks_on_node:
        return None if visible is not None or not shared else tuple(shared)
    if visible is not None and step_gpus and len(visible) < len(step_gpus):
        return None  # Bound per task by SLURM already.
    share = len(shared) // tasks_on_node
    return tuple(shared[local_index * share:(local_index + 1) * share])


def _split_top_level(text: str) -> list[str]:
    """Splits on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, whole: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", item)
    if not match:
        if "[" in item or "]" in item:
            raise _bad_hostlist(whole)
        return [item]
    prefix, ranges, rest = match.groups()
    names = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not bounds or (bounds.group(2) is not None and int(bounds.group(2)) < int(bounds.group(1))):
            raise _bad_hostlist(whole)
        first, last = bounds.group(1), bounds.group(2) or bounds.group(1)
        # node[01-10]: the numbers keep the width of the first one's digits.
        names += [f"{prefix}{number:0{len(first)}d}" for number in range(int(first), int(last) + 1)]
    return [name + tail for name in names for tail in _expand_item(rest, whole)] if rest else names


def _bad_hostlist(text: str) -> UsageError:
    return UsageError(f"SLURM's node list {text!r} is not a list like node[01-03,07],gpu5; set TF_CONFIG instead")


def _check_own_place(environ: Mapping[str, str], rank: int, node: str, local_index: int, distribution: str) -> None:
    """The layout computed for this rank must be where SLURM put it: else the
    workers would disagree on each other's addresses and wait for each other forever."""
    actual_node = environ.get("SLURMD_NODENAME", node)
    actual_index = _integer(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else local_index
    if (actual_node, actual_index) != (node, local_index):
        raise UsageError(f"SLURM put task {rank} on {actual_node} as its task {actual_index}, not where the "
                         f"{distribution} layout puts it ({node}, task {local_index}); use srun "
                         "--distribution=block or cyclic, or set TF_CONFIG")


def _first_port(environ: Mapping[str, str], job_id: str, step_id: str, most_tasks_on_a_node: int) -> int:
    if PORT_VARIABLE not in environ:
        return derived_first_port(job_id, step_id)
    text = environ[PORT_VARIABLE]
    if not text.strip().isdigit() or not 1024 <= int(text) <= 65536 - most_tasks_on_a_node:
        raise UsageError(f"{PORT_VARIABLE}={text!r} must be a port from 1024 to {65536 - most_tasks_on_a_node}, "
                         "the first of one port per task on a node")
    return int(text)


def _id_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise UsageError(f"{name} is not set inside this SLURM step; run the training with srun, or set TF_CONFIG")
    return value


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = _required(environ, name)
    if not value.isdigit():
        raise UsageError(f"{name}={value!r} is not a whole number; run the training with srun, or set TF_CONFIG")
    return int(value)
