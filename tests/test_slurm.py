"""Training under SLURM: the cluster read from SLURM's environment, and real runs on a one-node SLURM cluster."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lenet_tf import slurm
from lenet_tf.errors import UsageError
from lenet_tf.run_dir import RunDir

from conftest import REPO_ROOT, backed_up_epochs, free_ports, run_main, wait_for

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
SBATCH_SCRIPT = REPO_ROOT / "slurm" / "train.sbatch"
# A small run: a few seconds an epoch for two workers sharing two cores.
SMALL_RUN = ["--dataset", "fashion_mnist", "--limit-train", "4096", "--limit-test", "256", "--batch-size", "64",
             "--activation", "relu", "--learning-rate", "0.1", "--image-every-epochs", "0", "--format", ""]


def _step_environment(rank: int, nodes: str, tasks_per_node: str, tasks: int, job_id: str = "4242",
                      step_id: str = "0", **extra: str) -> dict:
    """What srun gives task `rank` of a step (the variables this package reads)."""
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": step_id, "SLURM_PROCID": str(rank),
            "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": nodes,
            "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}


@pytest.mark.parametrize("node_list, names", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("cpu[1,3],login.example.org", ["cpu1", "cpu3", "login.example.org"]),
])
def test_compressed_node_lists_expand_as_slurm_writes_them(node_list, names):
    assert slurm.expand_hostlist(node_list) == names


@pytest.mark.parametrize("node_list", ["node[01-", "node[3-1]", "node[a-b]", "node]1[", ""])
def test_a_node_list_that_is_not_slurms_is_one_clear_error(node_list):
    with pytest.raises(UsageError, match="node list"):
        slurm.expand_hostlist(node_list)


def test_tasks_per_node_expand_repeats():
    assert slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.expand_tasks_per_node("4(x2)") == [4, 4]
    assert slurm.expand_tasks_per_node("1") == [1]
    for text in ("2(x3", "0", "two", ""):
        with pytest.raises(UsageError, match="tasks per node"):
            slurm.expand_tasks_per_node(text)


def test_two_nodes_of_four_tasks_each():
    """srun -N 2 --ntasks-per-node 4: ranks 0-3 on the first node, 4-7 on the second, one port each on a node."""
    steps = [slurm.step_from_environment(_step_environment(rank, "node[01-02]", "4(x2)", 8,
                                                           SLURMD_NODENAME=f"node0{1 + rank // 4}",
                                                           SLURM_LOCALID=str(rank % 4)))
             for rank in range(8)]
    port = slurm.derived_first_port("4242", "0")
    expected = [f"node01:{port + index}" for index in range(4)] + [f"node02:{port + index}" for index in range(4)]
    assert all(step.workers == tuple(expected) for step in steps)
    assert [step.rank for step in steps] == list(range(8))
    assert steps[5].tf_config() == {"cluster": {"worker": expected}, "task": {"type": "worker", "index": 5}}
    assert all(step.gpus is None for step in steps)  # CPU nodes: nothing to choose.


def test_uneven_tasks_per_node_in_block_and_cyclic_layouts():
    environment = _step_environment(6, "c[1-4]", "2(x3),1", 7)
    block = slurm.step_from_environment(environment)
    port = slurm.derived_first_port("4242", "0")
    assert [worker.split(":")[0] for worker in block.workers] == ["c1", "c1", "c2", "c2", "c3", "c3", "c4"]
    assert block.workers[6] == f"c4:{port}" and block.workers[5] == f"c3:{port + 1}"
    cyclic = slurm.step_from_environment(dict(environment, SLURM_DISTRIBUTION="cyclic"))
    assert [worker.split(":")[0] for worker in cyclic.workers] == ["c1", "c2", "c3", "c4", "c1", "c2", "c3"]
    assert cyclic.workers[4] == f"c1:{port + 1}"
    assert slurm.place_tasks([2, 2, 2, 1], "plane=2") == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    assert slurm.place_tasks([3, 3], "plane=2")[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_srun_plane_layout_reads_its_size_from_its_own_variable():
    """srun --distribution=plane=2 gives its tasks SLURM_DISTRIBUTION=plane and SLURM_DIST_PLANESIZE=2."""
    environment = _step_environment(4, "p[1-2]", "3(x2)", 6, SLURM_DISTRIBUTION="plane", SLURM_DIST_PLANESIZE="2",
                                    SLURMD_NODENAME="p1", SLURM_LOCALID="2")
    step = slurm.step_from_environment(environment)
    assert [worker.split(":")[0] for worker in step.workers] == ["p1", "p1", "p2", "p2", "p1", "p2"]
    with pytest.raises(UsageError, match="SLURM_LOCALID='x'"):
        slurm.step_from_environment(dict(environment, SLURM_LOCALID="x"))


def test_a_task_placed_elsewhere_than_its_layout_says_is_one_clear_error():
    """Task 1 of a cyclic step read as block would wait for peers at wrong addresses forever."""
    environment = _step_environment(1, "n[1-2]", "2(x2)", 4, SLURMD_NODENAME="n2", SLURM_LOCALID="0")
    with pytest.raises(UsageError, match="SLURM put task 1 on n2 as its task 0"):
        slurm.step_from_environment(environment)
    assert slurm.step_from_environment(dict(environment, SLURM_DISTRIBUTION="cyclic")).rank == 1
    with pytest.raises(UsageError, match="SLURM_DISTRIBUTION 'arbitrary'"):
        slurm.step_from_environment(dict(environment, SLURM_DISTRIBUTION="arbitrary"))


def test_gpu_nodes_share_the_steps_gpus_between_their_tasks():
    # Two tasks on each of two nodes of 4 GPUs, every task seeing the step's 4 GPUs: 2 each.
    environment = _step_environment(3, "gpu[1-2]", "2(x2)", 4, SLURM_STEP_GPUS="0,1,2,3",
                                    CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert slurm.step_from_environment(environment).gpus == ("2", "3")
    assert slurm.step_from_environment(dict(environment, SLURM_PROCID="2")).gpus == ("0", "1")
    # Without CUDA_VISIBLE_DEVICES, the step's GPUs by SLURM's ids.
    del environment["CUDA_VISIBLE_DEVICES"]
    environment["SLURM_STEP_GPUS"] = "4,5,6,7"
    assert slurm.step_from_environment(environment).gpus == ("6", "7")
    # --gpus-per-task: SLURM bound one GPU to each task already; it stands.
    bound = dict(environment, CUDA_VISIBLE_DEVICES="5")
    assert slurm.step_from_environment(bound).gpus is None
    # One task per node keeps all of the node's GPUs (Mirrored over them within the task).
    one_per_node = _step_environment(1, "gpu[1-2]", "1(x2)", 2, SLURM_STEP_GPUS="0,1,2,3",
                                     CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert slurm.step_from_environment(one_per_node).gpus is None
    # Fewer GPUs than tasks on a node: left shared rather than some tasks getting none.
    assert slurm.task_gpus({"CUDA_VISIBLE_DEVICES": "0"}, tasks_on_node=2, local_index=1) is None


def test_two_jobs_on_one_node_take_different_ports_and_the_port_can_be_chosen():
    ports = {slurm.derived_first_port(str(job), str(step)) for job in range(1000, 1040) for step in range(3)}
    assert len(ports) == 40 * 3  # No two of these steps collide.
    assert all(slurm.FIRST_PORT <= port and port + slurm.PORTS_PER_SLOT <= 32768 for port in ports)
    assert slurm.derived_first_port("77_3", "0") == slurm.derived_first_port("773", "0")  # Array jobs.
    environment = _step_environment(0, "n1", "2", 2, **{slurm.PORT_VARIABLE: "23456"})
    assert slurm.step_from_environment(environment).workers == ("n1:23456", "n1:23457")
    for bad in ("80", "65535", "port"):
        with pytest.raises(UsageError, match=slurm.PORT_VARIABLE):
            slurm.step_from_environment(dict(environment, **{slurm.PORT_VARIABLE: bad}))


def test_a_batch_script_and_a_workstation_are_not_steps():
    """sbatch's shell has SLURM_NTASKS (the job's) but only one process: not a step of several tasks."""
    batch_shell = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1",
                   "SLURM_TASKS_PER_NODE": "2"}
    assert slurm.step_from_environment(batch_shell) is None
    assert slurm.step_from_environment({}) is None


def test_an_inconsistent_step_is_one_clear_error():
    with pytest.raises(UsageError, match="does not add up"):
        slurm.step_from_environment(_step_environment(0, "n[1-2]", "2", 2))
    with pytest.raises(UsageError, match="SLURM_PROCID 5 is outside"):
        slurm.step_from_environment(_step_environment(5, "n1", "2", 2))
    with pytest.raises(UsageError, match="SLURM_JOB_ID is not set"):
        slurm.step_from_environment(_step_environment(0, "n1", "2", 2, job_id=""))


def test_under_a_slurm_step_tf_config_still_wins_and_a_bad_layout_is_one_line(tmp_path):
    """The environment of task 0 of a 2-task step, without srun: TF_CONFIG, when
    given, is read instead of SLURM's layout; a layout that cannot be read is one line."""
    step = _step_environment(0, "n[1-2]", "1(x2)", 2)
    small = ["train", "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"),
             "--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--format", ""]
    completed = run_main(*small, "--strategy", "multi_worker", env={**step, "TF_CONFIG": "{not json"})
    assert completed.returncode == 2 and "TF_CONFIG is malformed" in completed.stderr, completed.stderr[-2000:]
    completed = run_main(*small, env={**step, "SLURM_STEP_NODELIST": "n[1-", "TF_CONFIG": ""})
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines() == [
        "lenet-tf train: error: SLURM's node list 'n[1-' is not a list like node[01-03,07],gpu5; set TF_CONFIG instead"]
    assert not (tmp_path / "run").exists()


def test_a_requeued_job_takes_over_the_lock_of_its_earlier_start_and_nothing_else(tmp_path, monkeypatch):
    """Another process holds the run folder's lock, recorded as SLURM job 42's
    first start (as a shared file system can keep the lock of a node that went
    down): the same job started again takes the folder over; a second
    process of that same start, another job and a workstation are refused."""
    import subprocess
    import sys

    from lenet_tf.run_dir import RunDir, holding

    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, json, os, sys, time
descriptor = os.open({str(run_dir.lock)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, json.dumps({{"pid": os.getpid(), "host": "node07", "purpose": "training",
                                  "since": "2026-01-01T00:00:00", "slurm_job_id": "42",
                                  "slurm_restart_count": 0}}).encode())
print("held", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for environment in ({"SLURM_JOB_ID": "42"}, {"SLURM_JOB_ID": "43", "SLURM_RESTART_COUNT": "1"}, {}):
            for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
                monkeypatch.delenv(name, raising=False)
            for name, value in environment.items():
                monkeypatch.setenv(name, value)
            with pytest.raises(UsageError, match="is in use by training process .* on host node07"):
                with holding(run_dir, "training"):
                    pass
        monkeypatch.setenv("SLURM_JOB_ID", "42")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with holding(run_dir, "training"):
            record = json.loads(run_dir.lock.read_text())
        assert (record["slurm_job_id"], record["slurm_restart_count"]) == ("42", 1)
        # An export beside a training takes a shared lock: never a takeover.
        with pytest.raises(UsageError, match="is in use by"):
            with holding(run_dir, "export", exclusive=False):
                pass
    finally:
        holder.kill()
        holder.wait()


# --- a real one-node SLURM cluster -----------------------------------------------------------------------------


@dataclass
class SlurmCluster:
    directory: Path
    environment: dict  # For SLURM's commands and the jobs they start (sbatch and srun pass it on).

    def run(self, *command: str, timeout: float = 60) -> str:
        completed = subprocess.run(command, env=self.environment, capture_output=True, text=True, timeout=timeout)
        assert completed.returncode == 0, f"{' '.join(command)}: {completed.stderr}"
        return completed.stdout

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETING, COMPLETED, CANCELLED, FAILED, ... ("" once SLURM forgot the job)."""
        completed = subprocess.run(["scontrol", "show", "job", job_id], env=self.environment, capture_output=True,
                                   text=True, timeout=60)
        match = re.search(r"JobState=(\w+)", completed.stdout)
        return match.group(1) if match else ""


def _job_details(cluster: SlurmCluster, job_id: str, output: Path) -> str:
    """What SLURM says of a job and the end of its log, for a failure's message."""
    job = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.environment, capture_output=True,
                         text=True, timeout=60).stdout
    log = output.read_text()[-3000:] if output.is_file() else "(no log)"
    return f"{job}\n{log}"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, fashion_mnist_dir):
    """slurmctld and slurmd on this machine, one node of 2 CPUs that takes several
    jobs at once, and a munged of its own with a fresh key; stopped afterwards by
    the process ids this fixture started."""
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster of one node is started as root (slurmd runs jobs as their users)")
    missing = [program for program in SLURM_PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    directory = tmp_path_factory.mktemp("slurm")
    for name in ("munge", "state", "spool", "log"):
        (directory / name).mkdir(mode=0o700)
    key = directory / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = directory / "munge" / "munge.socket"
    controller_port, node_port = free_ports(2)
    host = socket.gethostname()
    config = directory / "slurm.conf"
    config.write_text(f"""ClusterName=lenettest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
SlurmctldPort={controller_port}
SlurmdPort={node_port}
StateSaveLocation={directory / "state"}
SlurmdSpoolDir={directory / "spool"}
SlurmctldPidFile={directory / "slurmctld.pid"}
SlurmdPidFile={directory / "slurmd.pid"}
SlurmctldLogFile={directory / "log" / "slurmctld.log"}
SlurmdLogFile={directory / "log" / "slurmd.log"}
# No systemd or cgroups needed: processes are tracked by their parents.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# The grace between SIGTERM and SIGKILL, as on most clusters.
KillWait=30
NodeName={host} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
""")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    environment.update(SLURM_CONF=str(config), PYTHONPATH=str(REPO_ROOT),
                       # The sbatch script runs `python`: this interpreter.
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(directory / "log" / "daemons.out", "w")
    started = []
    try:
        started.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={directory / 'munge' / 'munged.pid'}", f"--seed-file={directory / 'munge' / 'munged.seed'}",
             f"--log-file={directory / 'log' / 'munged.log'}"], stdout=log, stderr=subprocess.STDOUT))
        wait_for(socket_path.exists, [], "munged socket", timeout=60, interval=0.2)
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([daemon, "-D", "-f", str(config)], env=environment, stdout=log,
                                            stderr=subprocess.STDOUT))
        cluster = SlurmCluster(directory, environment)

        def node_idle() -> bool:
            completed = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=environment,
                                       capture_output=True, text=True, timeout=60)
            return completed.stdout.strip() == "idle"

        wait_for(node_idle, [], "idle SLURM node (see the logs in " + str(directory / "log") + ")", timeout=120,
                 interval=0.2)
        yield cluster
        subprocess.run(["scancel", "--full", "--quiet", f"--user={os.getuid()}"], env=environment, timeout=60)
    finally:
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _task_pid(job_id: str, rank: int) -> int | None:
    """The process id of task `rank` of job `job_id` on this machine (train.py, found by its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            command = (entry / "cmdline").read_text()
        except OSError:
            continue
        if environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(rank) \
                and "train.py" in command and "srun" not in command:
            return int(entry.name)
    return None


def _epochs_started(output: str) -> list[int]:
    return [int(epoch) for epoch in re.findall(r"^Epoch (\d+)/", output, re.MULTILINE)]


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # One cluster, started once, for one worker.
def test_srun_two_tasks_train_one_multi_worker_run(slurm_cluster, tmp_path):
    """`srun -n 2 python train.py`: no strategy flag, no TF_CONFIG, one run."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    completed = subprocess.run(
        ["srun", "--ntasks=2", "--label", "python", str(REPO_ROOT / "train.py"), *SMALL_RUN, "--epochs", "2",
         "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"), "--format", "saved_model"],
        cwd=tmp_path, env=dict(slurm_cluster.environment, TMPDIR=str(scratch)), capture_output=True, text=True,
        timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2
    assert len(metrics["history"]["loss"]) == 2
    # Both tasks trained together (the same global loss), and only the chief wrote.
    final_lines = {line[:2]: line[2:].split(", tested")[0] for line in completed.stdout.splitlines()
                   if re.match(r"[01]: loss ", line)}
    assert set(final_lines) == {"0:", "1:"} and final_lines["0:"] == final_lines["1:"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exports", "run", "tmp"]
    assert sorted(path.name for path in (tmp_path / "exports" / "lenet_fashion_mnist").iterdir()) == ["1"]
    assert not list(scratch.iterdir())  # The other task's scratch folder is gone.


def _submit(cluster: SlurmCluster, tmp_path: Path, run_dir: Path, epochs: int) -> str:
    """Submits the repository's sbatch script on one node of two tasks, for a small run."""
    return cluster.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={tmp_path / 'job-%j.out'}",
        f"--chdir={REPO_ROOT}", str(SBATCH_SCRIPT), *SMALL_RUN, "--epochs", str(epochs), "--run-dir", str(run_dir),
        "--export-dir", str(tmp_path / "exports")).strip()


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # One cluster, started once, for one worker.
def test_the_sbatch_script_requeued_then_cancelled_resumes_each_time_and_runs_every_epoch_once(slurm_cluster,
                                                                                                tmp_path):
    """The job requeued mid-run (preemption): its next start resumes from the
    backup; then cancelled mid-run (scancel, a time limit): a job submitted
    again resumes from the backup it left, and finishes."""
    run_dir, epochs = tmp_path / "run", 5
    backup = RunDir(run_dir).backup_metadata
    job_id = _submit(slurm_cluster, tmp_path, run_dir, epochs=epochs)
    output = tmp_path / f"job-{job_id}.out"
    details = lambda: _job_details(slurm_cluster, job_id, output)  # noqa: E731
    wait_for(lambda: backed_up_epochs(backup) >= 1 or slurm_cluster.job_state(job_id) not in ("PENDING", "RUNNING"),
             [], "backed-up epoch", interval=0.2)
    assert slurm_cluster.job_state(job_id) == "RUNNING"
    slurm_cluster.run("scontrol", "requeue", job_id)
    # SLURM ends every task (SIGTERM, then SIGKILL after KillWait), then holds
    # the job back for a while before it may start again: start it now.
    wait_for(lambda: slurm_cluster.job_state(job_id) == "PENDING", [], "requeued job", details=details, interval=0.2)
    requeued_at = backed_up_epochs(backup)
    log = output.read_text()
    assert log.count("lenet-tf train: terminated (SIGTERM); run the same command again to resume") == 2, log
    assert "Traceback" not in log
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    # The requeued start backs up an epoch of its own; then the job is cancelled.
    wait_for(lambda: backed_up_epochs(backup) > requeued_at
             or slurm_cluster.job_state(job_id) not in ("PENDING", "RUNNING"), [], "backed-up epoch after the requeue",
             details=details, interval=0.2)
    assert slurm_cluster.job_state(job_id) == "RUNNING", details()
    slurm_cluster.run("scancel", job_id)
    wait_for(lambda: slurm_cluster.job_state(job_id) in ("CANCELLED", ""), [], "cancelled job", details=details,
             interval=0.2)
    cancelled_at = backed_up_epochs(backup)
    assert 1 <= requeued_at < cancelled_at < epochs
    first_start, second_start = output.read_text().split(f"lenet-tf: job {job_id}, start 1")
    assert f"lenet-tf: job {job_id}, start 0" in first_start
    # The requeued job resumed after the backed-up epochs, both tasks together.
    assert _epochs_started(second_start)[:2] == [requeued_at + 1] * 2
    assert "Traceback" not in second_start

    resubmitted = _submit(slurm_cluster, tmp_path, run_dir, epochs=epochs)
    wait_for(lambda: slurm_cluster.job_state(resubmitted) in ("COMPLETED", "FAILED", "CANCELLED"), [], "finished job",
             timeout=900, details=lambda: _job_details(slurm_cluster, resubmitted, tmp_path / f"job-{resubmitted}.out"),
             interval=0.2)
    log = (tmp_path / f"job-{resubmitted}.out").read_text()
    assert slurm_cluster.job_state(resubmitted) == "COMPLETED", log[-3000:]
    assert _epochs_started(log) == [epoch for epoch in range(cancelled_at + 1, epochs + 1) for _ in range(2)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2
    assert len(metrics["history"]["loss"]) == epochs  # Every epoch once, across the three starts.


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # One cluster, started once, for one worker.
def test_a_task_killed_mid_run_ends_the_step_with_one_line(slurm_cluster, tmp_path):
    """SIGKILL to task 1 (out of memory, a node gone): the chief stops within 60 s
    with the package's one line, its backup intact."""
    run_dir = tmp_path / "run"
    step = subprocess.Popen(
        ["srun", "--ntasks=2", "--label", "python", str(REPO_ROOT / "train.py"), *SMALL_RUN, "--epochs", "20",
         "--run-dir", str(run_dir)],
        cwd=tmp_path, env=dict(slurm_cluster.environment, TMPDIR=str(tmp_path)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: backed_up_epochs(RunDir(run_dir).backup_metadata) >= 1 or step.poll() is not None, [],
                 "backed-up epoch", interval=0.2)
        assert step.poll() is None
        job_id = re.search(r"\d+", slurm_cluster.run("squeue", "--noheader", "--format=%i")).group(0)
        os.kill(wait_for(lambda: _task_pid(job_id, 1), [], "task 1's process", interval=0.2), signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = step.communicate(timeout=300)
        step_seconds = time.monotonic() - killed_at
    finally:
        if step.poll() is None:
            step.kill()
            step.communicate()
    assert step.returncode != 0
    assert step_seconds <= 60, f"the step took {step_seconds:.0f} s to end"
    chief_lines = [line[3:] for line in stderr.splitlines() if line.startswith("0: ")]
    assert chief_lines[-1].startswith("lenet-tf train: error: "), stderr[-3000:]
    assert "of this multi-worker run was lost" in chief_lines[-1] and "restart every worker" in chief_lines[-1]
    assert "Traceback" not in stderr
    assert backed_up_epochs(RunDir(run_dir).backup_metadata) >= 1


def test_the_docs_show_the_sbatch_script_the_tests_submit():
    page = (REPO_ROOT / "docs" / "distributed.md").read_text()
    assert f"```bash\n{SBATCH_SCRIPT.read_text()}```" in page


@pytest.mark.slow
def test_sigterm_to_every_worker_stops_a_multi_worker_run_cleanly_without_slurm(tmp_path, fashion_mnist_dir):
    """What scancel does, by hand on loopback (no SLURM or root needed): both
    workers stop with the one-line stop and 143, the chief's backup intact.
    TensorFlow's coordination service had replaced the SIGTERM handler, and
    the workers trained on until SIGKILL."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    run_dir = tmp_path / "run"
    workers = [subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *SMALL_RUN, "--epochs", "20", "--run-dir", str(run_dir),
         "--worker-hosts", hosts, "--task-index", str(index)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        wait_for(lambda: backed_up_epochs(RunDir(run_dir).backup_metadata) >= 1
                 or any(worker.poll() is not None for worker in workers), [], "backed-up epoch", interval=0.2)
        assert all(worker.poll() is None for worker in workers)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        results = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for worker, (_, stderr) in zip(workers, results):
        assert worker.returncode == 143, stderr[-3000:]
        # TensorFlow may log, after it, that the other worker has gone (it leaves
        # its coordination service as the process exits): the package's own line is the stop.
        package_lines = [line for line in stderr.splitlines() if line.startswith("lenet-tf ")]
        assert package_lines == ["lenet-tf train: terminated (SIGTERM); run the same command again to resume"], \
            stderr[-3000:]
        assert "Traceback" not in stderr
    assert 1 <= backed_up_epochs(RunDir(run_dir).backup_metadata) < 20
    assert not run_dir.joinpath("metrics.json").exists()


def test_a_stop_that_lands_while_tensorflow_raises_a_peers_loss_is_still_a_stop():
    """Both workers get SIGTERM; one stops first, and the other's interrupt lands
    while TensorFlow raises the lost peer's UnavailableError: pybind11 reports
    the interrupt as the replacement (words seen on two workers on loopback)."""
    from lenet_tf.cli import _passed_on_stop

    seen = RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized active exception types: "
                        "ORIGINAL UnavailableError REPLACED BY KeyboardInterrupt: <EMPTY MESSAGE>")
    assert _passed_on_stop(seen)
    assert not _passed_on_stop(RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized "
                                            "active exception types: ORIGINAL ValueError REPLACED BY TypeError"))


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # One cluster, started once, for one worker.
def test_the_tune_sbatch_script_runs_one_trial_worker_per_task_on_one_study_and_a_requeue_goes_on(slurm_cluster,
                                                                                                  tmp_path):
    """slurm/tune.sbatch on two tasks, requeued once two trials have finished:
    each trial trained by one of the tasks, none lost, both trained, and the
    trials finished before the requeue kept as they were, not trained again."""
    run_dir = tmp_path / "run"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path / 'job-%j.out'}", f"--chdir={REPO_ROOT}",
        str(REPO_ROOT / "slurm" / "tune.sbatch"), "--trials", "5", "--epochs", "2", "--limit-train", "1024",
        "--limit-test", "256", "--image-every-epochs", "0", "--search", "batch-size=128|256", "--search",
        "conv-filters=6,16|16,32", "--search", "dense-units=64", "--no-prune", "--format", "",
        "--run-dir", str(run_dir)).strip()
    output = tmp_path / f"job-{job_id}.out"
    details = lambda: _job_details(slurm_cluster, job_id, output)  # noqa: E731

    def finished_trials() -> dict[str, bytes]:
        return {path.parent.name: path.read_bytes() for path in (run_dir / "trials").glob("*/metrics.json")}

    wait_for(lambda: len(finished_trials()) >= 2 or slurm_cluster.job_state(job_id) not in ("PENDING", "RUNNING"),
             [], "two finished trials", details=details, interval=0.2)
    assert slurm_cluster.job_state(job_id) == "RUNNING", details()
    slurm_cluster.run("scontrol", "requeue", job_id)
    wait_for(lambda: slurm_cluster.job_state(job_id) == "PENDING", [], "requeued job", details=details, interval=0.2)
    before_requeue = finished_trials()
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    wait_for(lambda: slurm_cluster.job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), [], "finished job",
             timeout=900, details=details, interval=0.2)
    log = output.read_text()
    assert slurm_cluster.job_state(job_id) == "COMPLETED", log[-3000:]
    assert "start 1" in log and "Traceback" not in log  # The requeued start, and no traceback in either.
    started = re.findall(r"^tune: trial (\d+) \(SLURM task (\d)\)", log, re.MULTILINE)
    assert {int(number) for number, _ in started} == set(range(5)), log[-3000:]  # None lost.
    assert {task for _, task in started} == {"0", "1"}  # Both tasks trained.
    after = finished_trials()
    assert sorted(after) == ["0", "1", "2", "3", "4"]
    # Finished before the requeue: kept, never trained again.
    assert {name: after[name] for name in before_requeue} == before_requeue
    for number in before_requeue:
        assert [trial for trial, _ in started].count(number) == 1, log[-3000:]
    best = json.loads((run_dir / "best.json").read_text())
    assert best["trials"] == 5
