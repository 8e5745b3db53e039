"""Choosing the tf.distribute strategy, and who writes outputs in multi-worker runs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import tensorflow as tf

from lenet_tf import slurm
from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError


@dataclass
class Placement:
    """Where this process stands in a (possibly multi-worker) run."""

    strategy: tf.distribute.Strategy
    name: str
    devices: tuple[str, ...]
    is_chief: bool = True
    task_index: int = 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def tf_config_from_flags(worker_hosts: tuple[str, ...], task_index: int) -> dict:
    """Builds the TF_CONFIG dict that --worker-hosts/--task-index stand for."""
    return {"cluster": {"worker": list(worker_hosts)}, "task": {"type": "worker", "index": task_index}}


def read_tf_config() -> dict | None:
    """Parses TF_CONFIG from the environment, with a clear error when malformed."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        cluster = tf_config["cluster"]
        task = tf_config["task"]
        task_type, index = task["type"], int(task["index"])
        if not isinstance(cluster, dict) or task_type not in cluster or not 0 <= index < len(cluster[task_type]):
            raise ValueError(f"task {task_type}:{index} is not in the cluster")
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"TF_CONFIG is malformed ({error}); it must be JSON like "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    return tf_config


def is_chief(tf_config: dict | None) -> bool:
    """The chief writes logs, checkpoints, metrics and exports.

    As in the TensorFlow multi-worker guide: the task of type "chief" if the
    cluster has one, otherwise worker 0.
    """
    if not tf_config:
        return True
    task_type, index = tf_config["task"]["type"], int(tf_config["task"]["index"])
    if "chief" in tf_config["cluster"]:
        return task_type == "chief"
    return task_type == "worker" and index == 0


def split_cpu(count: int) -> None:
    """Presents the first physical CPU as `count` logical devices.

    Only possible before TensorFlow initialises its runtime; asking again for
    the same split afterwards is harmless, asking for another is an error.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing and len(existing) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise UsageError(f"cannot split the CPU into {count} logical devices here: {error}") from None


def make_placement(config: TrainConfig) -> Placement:
    """Creates the strategy the config asks for.

    Must run before any other TensorFlow op in the process when the strategy is
    multi-worker, since collective ops have to be configured first.
    """
    name = config.strategy
    if name in ("auto", "multi_worker") and not config.worker_hosts and not os.environ.get("TF_CONFIG"):
        name = _join_slurm_step(name)
    if config.logical_cpus > 1:
        split_cpu(config.logical_cpus)
    if name == "multi_worker" or config.worker_hosts:
        if config.worker_hosts:
            os.environ["TF_CONFIG"] = json.dumps(tf_config_from_flags(config.worker_hosts, config.task_index or 0))
        tf_config = read_tf_config()
        if tf_config is None:
            raise UsageError(
                "--strategy multi_worker needs TF_CONFIG in the environment or --worker-hosts and --task-index"
            )
        # Each worker reads the whole dataset and keeps a shard of every batch
        # (DATA sharding), so no worker needs a file split of its own.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        take_back_sigterm()
        devices = tuple(strategy.extended.worker_devices)
        return Placement(strategy, "multi_worker", devices, is_chief(tf_config), int(tf_config["task"]["index"]))
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
        devices = (gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name,)
    elif name == "one_device":
        device = gpus[0].name if gpus else "/cpu:0"
        strategy = tf.distribute.OneDeviceStrategy(device)
        devices = (device,)
    else:  # mirrored
        # With no GPU, mirror over the logical CPUs (tests split the CPU in two).
        cpus = tf.config.list_logical_devices("CPU")
        targets = [device.name for device in (gpus or cpus)]
        strategy = tf.distribute.MirroredStrategy(targets)
        devices = tuple(targets)
    return Placement(strategy, name, devices)


def take_back_sigterm() -> None:
    """Puts the process's own SIGTERM handler back in place.

    Creating a MultiWorkerMirroredStrategy starts TensorFlow's coordination
    service, whose preemption notifier replaces the SIGTERM handler in C++
    (Python still reports its own): SIGTERM from `kill`, `scancel` or a
    scheduler's time limit was then ignored until SIGKILL came. The CLI's
    handler stops the run at its next safe point instead.
    """
    import signal
    import threading

    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _join_slurm_step(name: str) -> str:
    """Under a SLURM step of several tasks (`srun -n N`), "auto" becomes
    multi_worker over the step's tasks, with the TF_CONFIG they stand for;
    one task trains as on a workstation. Returns the strategy's name."""
    if name == "auto" and os.environ.get("SLURM_STEP_NUM_TASKS", "1").strip() == "1":
        return name
    step = slurm.step_from_environment()
    if step is None:
        return name
    if step.gpus is not None:
        _use_only_gpus(step.gpus)
    os.environ["TF_CONFIG"] = json.dumps(step.tf_config())
    return "multi_worker"


def _use_only_gpus(gpu_ids: tuple[str, ...]) -> None:
    """Restricts this process to the GPUs `gpu_ids` name (CUDA_VISIBLE_DEVICES entries).

    TensorFlow has already listed the GPUs it was started with, so the
    choice goes through tf.config; the variable is set too, for the
    processes this one starts.
    """
    physical = tf.config.list_physical_devices("GPU")
    started_with = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = [part.strip() for part in started_with.split(",")] if started_with is not None else \
        [str(index) for index in range(len(physical))]
    chosen = [physical[order.index(gpu)] for gpu in gpu_ids if gpu in order and order.index(gpu) < len(physical)]
    try:
        tf.config.set_visible_devices(chosen, "GPU")
    except RuntimeError as error:
        raise UsageError(f"cannot restrict this task to GPUs {','.join(gpu_ids)}: {error}") from None
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
