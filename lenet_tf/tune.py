"""`lenet-tf tune`: many small training runs that search the settings, on one
machine or a whole cluster, sharing one Optuna study through the run folder.

    RUN_DIR/
        study.journal      the Optuna study (JournalStorage, one file, locked by Optuna)
        study.lock         held while a worker asks for, takes over or finishes a trial
        claims/<n>.lock    held by the worker training trial n, for as long as it lives
        trials/<n>/        trial n: a normal run folder (config, metrics, logs with its hyperparameters)
        best.json          the best trial, its settings as flags, validation and test accuracy

Why Optuna: its JournalStorage keeps a study in one append-only file that
workers on several machines share through a shared file system, with no
server that must outlive them; it prunes hopeless trials from the
validation accuracy each epoch reports. KerasTuner's distributed mode needs
a chief oracle process that serves the workers over gRPC for the whole search.

A worker's loop: under study.lock, take over a trial that a dead worker left
running (its claim lock is free: flock locks end with their process), or ask
Optuna for a new one while fewer than --trials are finished or running;
claim it; train it in RUN_DIR/trials/<n> with train_and_evaluate (which
resumes from the trial's backup); tell Optuna its last validation accuracy.
Trials never see the test split. When --trials trials are finished (complete
or pruned), the best complete one is evaluated once on the test split and
exported, and best.json written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

from lenet_tf import stop
from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.io_utils import write_json_atomic
from lenet_tf.registry import DatasetInfo, resolve_dataset

DEFAULT_MAX_PARAMS = 100_000
DEFAULT_VALIDATION_SPLIT = 0.1
STUDY_NAME = "lenet-tf"
# Set by `--parallel K` for the worker processes it starts: the worker's index,
# the CPUs it may use (its share of this machine's), and the pipe it reads the
# first worker's go-ahead from.
WORKER_VARIABLE = "LENET_TF_TUNE_WORKER"
CPUS_VARIABLE = "LENET_TF_TUNE_CPUS"
GO_AHEAD_VARIABLE = "LENET_TF_TUNE_GO_AHEAD"


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (integers for an integer setting), on a log scale if `log`."""

    low: float
    high: float
    log: bool = False

    def describe(self) -> str:
        return f"{_flag_value(self.low)}..{_flag_value(self.high)}" + (" (log)" if self.log else "")


@dataclass(frozen=True)
class Choice:
    """One of `values`, each as it is typed after its flag ("6,16", "relu", "on")."""

    values: tuple[str, ...]

    def describe(self) -> str:
        return "|".join(self.values)


# The default search space: what moves accuracy most for a LeNet in a few
# epochs. Widths stay LeNet-sized; --max-params bounds them further.
DEFAULT_SPACE: dict[str, Range | Choice] = {
    "learning_rate": Range(0.01, 1.0, log=True),
    "batch_size": Choice(("64", "128", "256")),
    "momentum": Choice(("0", "0.9")),
    "weight_decay": Choice(("0", "0.0001", "0.0005", "0.002")),
    "dropout": Range(0.0, 0.5),
    "activation": Choice(("sigmoid", "relu")),
    "pooling": Choice(("avg", "max")),
    "batch_norm": Choice(("off", "on")),
    "conv_filters": Choice(("6,16", "16,32", "32,48")),
    "dense_units": Choice(("120,84", "96,64", "64")),
    "lr_schedule": Choice(("constant", "cosine")),
    "label_smoothing": Range(0.0, 0.2),
    # The flips are dropped where a mirror image changes the class (digits).
    "augment": Choice(("none", "shift", "flip", "shift_flip")),
}
# Settings a search may vary (--search NAME=...): what a run computes, not where it reads or writes.
SEARCHABLE = ("activation", "pooling", "conv_filters", "kernel_size", "first_conv_padding", "crop", "dense_units",
              "batch_norm", "first_conv_batch_norm", "dense_batch_norm", "whiten_first_conv", "batch_norm_momentum",
              "dropout", "test_time_flip", "optimizer", "muon_ns_steps", "learning_rate", "batch_size", "epochs",
              "momentum", "nesterov", "weight_decay", "label_smoothing", "lr_schedule", "warmup_epochs", "augment")
# Settings that change a model's parameter count: --max-params is checked over their choices.
STRUCTURAL = ("conv_filters", "kernel_size", "first_conv_padding", "crop", "dense_units", "batch_norm",
              "first_conv_batch_norm", "dense_batch_norm")
# Settings of the tuning run that its trials may change on a resume without changing the study.
_FREE_ON_RESUME = ("run_dir", "export_dir", "data_dir", "model_name", "export_formats", "strategy", "logical_cpus",
                   "steps_per_execution", "tensorboard_update_freq", "histogram_freq", "profile_batch",
                   "image_every_epochs", "activation_indices", "worker_hosts", "task_index")


@dataclass
class TuneOptions:
    """How to search: the settings every trial starts from and what varies.

    Args:
        base: the trial settings before the search's (the preset and the
            user's flags); its run_dir is the tuning run's folder.
        trials: how many trials in all (complete or pruned).
        space: name -> Range or Choice, the settings searched.
        max_params: the largest model a trial may train.
        parallel: worker processes on this machine.
        prune: stop hopeless trials early (Optuna's median pruner).
        dataset: what `base.dataset` names, as a value: a folder of
            pictures' FolderDataset.info, which every trial and the final
            export take. None: the built-in dataset `base.dataset`. (A
            --parallel worker is a process of its own that scans the folder
            again from the same flags.)
    """

    base: TrainConfig
    trials: int
    space: dict[str, Range | Choice]
    max_params: int = DEFAULT_MAX_PARAMS
    parallel: int = 1
    prune: bool = True
    dataset: DatasetInfo | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.base.run_dir)


def default_space(base: TrainConfig, fixed: set[str] = frozenset(),
                  dataset: DatasetInfo | None = None) -> dict[str, Range | Choice]:
    """The default search space for `base`'s dataset (`dataset`, its value, for
    a folder of pictures), without the settings the user fixed with a flag,
    and holding `base`'s own values (the starting settings are the search's
    first trial, which the others must beat)."""
    space = {name: spec for name, spec in DEFAULT_SPACE.items() if name not in fixed}
    if "augment" in space and not resolve_dataset(base.dataset, dataset).flip_keeps_class:
        space["augment"] = Choice(tuple(value for value in space["augment"].values if "flip" not in value))
    for name, spec in space.items():
        value = getattr(base, name)
        if isinstance(spec, Choice) and _flag_text(value) not in spec.values:
            space[name] = Choice((*spec.values, _flag_text(value)))
        elif isinstance(spec, Range) and not spec.low <= value <= spec.high and (value > 0 or not spec.log):
            space[name] = Range(min(spec.low, value), max(spec.high, value), spec.log)
    return space


def _flag_text(value: Any) -> str:
    """A setting's value as a Choice holds it ("6,16", "on", "0.0005")."""
    return ("on" if value else "off") if isinstance(value, bool) else _flag_value(value)


def starting_params(options: TuneOptions, structures: list[str]) -> dict[str, Any] | None:
    """The Optuna parameters of the starting settings (the preset and the
    flags, unsearched), or None when the space cannot express them (a --search that leaves them out)."""
    params: dict[str, Any] = {}
    structural = [name for name in STRUCTURAL if isinstance(options.space.get(name), Choice)]
    if structures:
        key = " ".join(f"{name}={_flag_text(getattr(options.base, name))}" for name in structural)
        if key not in structures:
            return None
        params[STRUCTURE_PARAMETER] = key
    for name, spec in options.space.items():
        value = getattr(options.base, name)
        if name in structural:
            continue
        if isinstance(spec, Choice):
            if _flag_text(value) not in spec.values:
                return None
            params[name] = _flag_text(value)
        elif not spec.low <= value <= spec.high:
            return None
        else:
            params[name] = value
    return params


def parse_search(specs: list[str], space: dict[str, Range | Choice], fixed: set[str]) -> dict[str, Range | Choice]:
    """Applies --search NAME=SPEC entries to `space`: `LOW..HIGH` a range, `A|B|C` choices, one value fixes it.

    A range keeps the default's log scale (learning rate); NAME is the
    flag's name without its dashes (learning-rate) or the setting's (learning_rate).
    """
    space = dict(space)
    defaults = TrainConfig()
    for spec in specs:
        name, separator, values = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        flag = "--" + name.replace("_", "-")
        if not separator or not values.strip():
            raise UsageError(f"--search {spec!r} must read NAME=LOW..HIGH, NAME=A|B|C or NAME=VALUE")
        if name not in SEARCHABLE:
            raise UsageError(f"--search {spec!r}: {flag} is not a setting the search can vary; it can vary "
                             + ", ".join(setting.replace("_", "-") for setting in SEARCHABLE))
        if name in fixed:
            raise UsageError(f"{flag} is both given as a flag (which fixes it) and searched; drop one of them")
        if ".." in values:
            low, _, high = values.partition("..")
            kind = type(getattr(defaults, name))
            if kind not in (int, float):
                raise UsageError(f"--search {spec!r}: {flag} takes values, not a range; use A|B|C")
            try:
                low_value, high_value = kind(low), kind(high)
            except ValueError:
                raise UsageError(f"--search {spec!r}: {low!r} and {high!r} must be numbers") from None
            if not low_value < high_value:
                raise UsageError(f"--search {spec!r}: the range's low end must be below its high end")
            previous = space.get(name)
            log = isinstance(previous, Range) and previous.log and low_value > 0
            space[name] = Range(low_value, high_value, log)
        else:
            space[name] = Choice(tuple(value.strip() for value in values.split("|") if value.strip()))
    return space


def setting_value(name: str, text: str | float | int) -> Any:
    """A setting's value from its text as typed after its flag, typed as TrainConfig's field."""
    default = getattr(TrainConfig(), name)
    if not isinstance(text, str):
        return int(text) if isinstance(default, int) and not isinstance(default, bool) else text
    flag = "--" + name.replace("_", "-")
    try:
        if isinstance(default, bool):
            if text not in ("on", "off"):
                raise ValueError
            return text == "on"
        if isinstance(default, tuple):
            return tuple(int(part) for part in text.split(",") if part.strip())
        if isinstance(default, (int, float)):
            return type(default)(text)
        return text
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a value of {flag}"
                         + (" (on or off)" if isinstance(default, bool) else "")) from None


def settings_as_flags(settings: dict[str, Any]) -> str:
    """`--learning-rate 0.1 --batch-norm ...`: the settings as `lenet-tf train` takes them."""
    words = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, _flag_value(value)]
    return " ".join(words)


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_options(options: TuneOptions, count_parameters: bool = True) -> None:
    """Raises UsageError for a search that cannot run: no trials, a bad value in
    the space, or (with `count_parameters`, which imports TensorFlow to build
    the models) no setting small enough for --max-params."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("lenet-tf tune needs Optuna: pip install optuna (or, in a clone, pip install -e '.[tune]')") from None
    if options.trials < 1:
        raise UsageError(f"--trials must be a positive integer (got {options.trials})")
    if options.parallel < 1:
        raise UsageError(f"--parallel must be a positive integer (got {options.parallel})")
    if options.max_params < 1:
        raise UsageError(f"--max-params must be a positive integer (got {options.max_params})")
    base = options.base
    if base.strategy not in ("auto", "default") or base.worker_hosts or base.logical_cpus:
        raise UsageError("each trial trains on one process: leave out --strategy, --worker-hosts and --logical-cpus "
                         "(use --parallel, or srun -n K, to run trials side by side)")
    if not base.validation_split:
        raise UsageError("trials choose on a validation split held out from the training data: "
                         "--validation-split must be above 0")
    for name, spec in options.space.items():
        values = spec.values if isinstance(spec, Choice) else (spec.low, spec.high)
        if isinstance(spec, Choice) and not values:
            raise UsageError(f"--search {name.replace('_', '-')}: no value to choose from")
        for value in values:
            dataclasses.replace(base, **{name: setting_value(name, value)}).validate(options.dataset)
    if not count_parameters:
        return
    counts = _structure_parameter_counts(options)
    if counts and min(counts.values()) > options.max_params:
        raise UsageError(f"--max-params {options.max_params:,}: no setting of the search space is that small (the "
                         f"smallest has {min(counts.values()):,} parameters); raise --max-params or search smaller "
                         "--conv-filters/--dense-units")


def _structure_parameter_counts(options: TuneOptions) -> dict[str, int]:
    """Every combination of the space's structural choices (one value each
    of --conv-filters, --dense-units, --batch-norm, ...), as "name=value ..."
    text, with its model's parameter count; invalid combinations left out."""
    from lenet_tf.model import build_model

    choices = [[(name, value) for value in options.space[name].values] for name in STRUCTURAL
               if isinstance(options.space.get(name), Choice)]
    if not choices:
        return {}  # Every structural setting fixed: --max-params is checked on each trial's model.
    counts = {}
    for combination in itertools.product(*choices):
        config = dataclasses.replace(options.base, **{name: setting_value(name, value) for name, value in combination})
        try:
            config.validate(options.dataset)
        except UsageError:
            continue
        counts[" ".join(f"{name}={value}" for name, value in combination)] = \
            build_model(config, options.dataset).count_params()
    return counts


def allowed_structures(options: TuneOptions) -> list[str]:
    """The structural combinations under --max-params: the search picks one of
    them as a whole, so that no trial draws a model too large to train."""
    return [structure for structure, count in _structure_parameter_counts(options).items()
            if count <= options.max_params]


# --- the study, shared through the run folder ------------------------------------------------------------------


def _open_study(options: TuneOptions, seed: int):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    class StopSafeJournal(JournalFileBackend):
        """The study's journal file, each write under its lock finished before
        a stop signal raises its interrupt. Optuna's lock is not safe against
        one: interrupted between the two steps of its release, it fails on its
        own clean-up; interrupted while it waits, it removes the lock another
        worker holds. (A stop then waits as long as the lock does: at most
        Optuna's 30 s grace for a lock whose holder died.)"""

        def append_logs(self, logs):
            with stop.deferred():
                super().append_logs(logs)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(StopSafeJournal(str(options.run_dir / "study.journal")))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if options.prune \
        else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True,
                               sampler=_sampler(options, seed), pruner=pruner)


def _sampler(options: TuneOptions, seed: int):
    import warnings

    import optuna

    # Random trials first, then TPE over the settings jointly (multivariate:
    # a good learning rate depends on the momentum and the activation);
    # constant_liar keeps parallel workers from asking for the same settings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, options.trials // 3), multivariate=True,
                                          constant_liar=True)


def _study_record(options: TuneOptions) -> dict[str, Any]:
    """What makes a study this study: the trials' base settings, the space and --max-params."""
    base = {name: value for name, value in options.base.to_json_dict().items() if name not in _FREE_ON_RESUME}
    return {"base": json.loads(json.dumps(base)), "space": {name: spec.describe() for name, spec in
                                                           options.space.items()},
            "max_params": options.max_params}


def _check_same_study(study, options: TuneOptions) -> None:
    record = _study_record(options)
    before = study.user_attrs.get("record")
    if before is None:
        study.set_user_attr("record", record)
        return
    changed = [f"{key} {before['base'].get(key)} -> {value}" for key, value in record["base"].items()
               if before["base"].get(key) != value]
    if before["space"] != record["space"]:
        changed.append("the search space")
    if before["max_params"] != record["max_params"]:
        changed.append(f"--max-params {before['max_params']} -> {record['max_params']}")
    if changed:
        raise UsageError(f"the study in {options.run_dir} was started with other settings ({'; '.join(changed)}); "
                         "run it with its first command's flags (--trials may change), or pass another --run-dir")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """flock on `path` for the duration (waiting for another holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


class _Claim:
    """The lock a worker holds on a trial while it trains it (flock: it ends
    with the worker's process, however that ends)."""

    def __init__(self, run_dir: Path, number: int):
        path = run_dir / "claims" / f"{number}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._descriptor: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def take(self) -> bool:
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self.release()
            return False

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _next_trial(study, options: TuneOptions, seed: int):
    """Under the study lock: a trial a dead worker left running, or a new one
    while fewer than --trials are finished or running; with its claim. None when there is nothing left to do."""
    import optuna
    from optuna.trial import TrialState

    with _locked(options.run_dir / "study.lock"):
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for frozen in running:
            claim = _Claim(options.run_dir, frozen.number)
            if claim.take():
                # FrozenTrial has no public trial id; Trial(study, id) continues the running trial.
                return optuna.trial.Trial(study, frozen._trial_id), claim, True
        if _finished_count(study) + len(running) >= options.trials:
            return None
        # A fresh seed for every trial asked (the count so far, under this lock):
        # workers sharing the study draw different settings, and one worker's search repeats.
        study.sampler = _sampler(options, seed + len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        claim = _Claim(options.run_dir, trial.number)
        claim.take()
        return trial, claim, False


STRUCTURE_PARAMETER = "structure"


def _suggest(trial, space: dict[str, Range | Choice], structures: list[str]) -> dict[str, Any]:
    """The trial's settings: the structural choices drawn together, as one of
    `structures` (those under --max-params), the others one by one."""
    settings = {}
    if structures:
        for item in trial.suggest_categorical(STRUCTURE_PARAMETER, structures).split(" "):
            name, _, value = item.partition("=")
            settings[name] = setting_value(name, value)
    for name, spec in space.items():
        if name in settings:
            continue
        if isinstance(spec, Choice):
            settings[name] = setting_value(name, trial.suggest_categorical(name, list(spec.values)))
        elif isinstance(getattr(TrainConfig(), name), int):
            settings[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            settings[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return settings


def trial_dir(run_dir: Path, number: int) -> Path:
    return Path(run_dir) / "trials" / str(number)


def _pruning_callback(trial):
    import keras

    class ReportValidationAccuracy(keras.callbacks.Callback):
        """Reports each epoch's validation accuracy to Optuna; stops a trial its pruner finds hopeless."""

        pruned = False

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get("val_accuracy")
            if value is None:
                return
            trial.report(float(value), epoch)
            if trial.should_prune():
                self.pruned = True
                self.model.stop_training = True

    return ReportValidationAccuracy()


def _run_trial(study, trial, options: TuneOptions, structures: list[str], datasets, out: TextIO,
               worker: int | None) -> None:
    """Trains one trial in its folder (resuming it if a worker left it) and tells Optuna how it went."""
    from optuna.trial import TrialState

    from lenet_tf.model import build_model
    from lenet_tf.run_dir import RunDir
    from lenet_tf.train import NonFiniteLossError, train_and_evaluate

    settings = _suggest(trial, options.space, structures)
    config = dataclasses.replace(options.base, **settings, run_dir=str(trial_dir(options.run_dir, trial.number)),
                                 export_formats=(), strategy="default")
    try:
        config.validate(options.dataset)
    except UsageError as error:
        trial.set_user_attr("skipped", str(error))
        study.tell(trial, state=TrialState.FAIL)
        return
    params = build_model(config, options.dataset).count_params()
    if params > options.max_params:
        trial.set_user_attr("skipped", f"{params:,} parameters, over --max-params {options.max_params:,}")
        study.tell(trial, state=TrialState.FAIL)
        return
    trial.set_user_attr("flags", settings_as_flags(settings))
    trial.set_user_attr("parameters", params)
    run_dir = RunDir(config.run_dir)
    metrics = json.loads(run_dir.metrics.read_text()) if run_dir.metrics.is_file() else None
    pruned = False
    if metrics is None:  # Else trained by a worker that stopped before telling Optuna.
        print(f"tune: trial {trial.number} ({_worker_name(worker)}): {settings_as_flags(settings)}", file=out,
              flush=True)
        callback = _pruning_callback(trial)
        try:
            metrics = train_and_evaluate(config, datasets=datasets, out=out, extra_callbacks=(callback,),
                                         evaluate_test=False, dataset=options.dataset)
        except NonFiniteLossError as error:
            trial.set_user_attr("diverged", str(error))
            study.tell(trial, state=TrialState.PRUNED)
            print(f"tune: trial {trial.number} diverged; counted as pruned", file=out, flush=True)
            return
        pruned = callback.pruned
    pruned = pruned or len(metrics["history"].get("loss", [])) < config.epochs
    value = metrics["validation_accuracy"]
    if pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)
    print(f"tune: trial {trial.number} {'pruned' if pruned else 'complete'}: validation accuracy {value:.4f}",
          file=out, flush=True)


def _worker_index() -> int | None:
    """This process's index among the workers of a --parallel run (None outside one)."""
    index = os.environ.get(WORKER_VARIABLE, "")
    return int(index) if index.isdigit() else None


def _worker_name(worker: int | None) -> str:
    if worker is not None:
        return f"worker {worker}"
    if os.environ.get("SLURM_PROCID") and os.environ.get("SLURM_STEP_NUM_TASKS", "1") != "1":
        return f"SLURM task {os.environ['SLURM_PROCID']}"
    return f"process {os.getpid()}"


def _worker_seed(seed: int, worker: int | None) -> int:
    """Different for each worker of one search (several may ask at the same count after a takeover)."""
    index = str(worker) if worker is not None else os.environ.get("SLURM_PROCID") or "0"
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    return seed + 1000 * int(index if index.isdigit() else 0) + 100_000 * int(array_task if array_task.isdigit()
                                                                                else 0)


@dataclass
class StartedWorker:
    """A worker ready for its first trial: its index in a --parallel run
    (None outside one), its seed, the study, the structures under
    --max-params and the data."""

    index: int | None
    seed: int
    study: Any
    structures: list[str]
    datasets: Any


def start_worker(options: TuneOptions, datasets=None, worker: int | None = None) -> StartedWorker:
    """Everything a worker does before its first trial: the run folder and
    the study (UsageError for one started with other settings), the data
    (UsageError when it cannot be found). `worker`: its index in a --parallel
    run (default: from the environment ParallelWorkers gives the workers it
    starts, whose CPU share is then set here; None outside one)."""
    from lenet_tf.data import load_datasets

    if worker is None:
        worker = _worker_index()
        cpus = os.environ.get(CPUS_VARIABLE)
        if cpus:
            _use_cpu_share({int(cpu) for cpu in cpus.split(",")})
    options.run_dir.mkdir(parents=True, exist_ok=True)
    seed = _worker_seed(options.base.seed, worker)
    study = _open_study(options, seed)
    structures = allowed_structures(options)
    with _locked(options.run_dir / "study.lock"):
        _check_same_study(study, options)
        if not study.get_trials(deepcopy=False):
            # The first trial trains the starting settings: the search says whether it beat them.
            params = starting_params(options, structures)
            if params is not None:
                study.enqueue_trial(params, user_attrs={"starting_settings": True})
    if datasets is None:
        datasets = load_datasets(_dataset(options), options.base.data_dir)
    return StartedWorker(worker, seed, study, structures, datasets)


def train_trials(started: StartedWorker, options: TuneOptions, out: TextIO | None = None) -> int:
    """Trains trials until the study has --trials finished ones (or every
    remaining one is in another worker's hands); returns how many it trained.
    Progress goes to `out` (default: sys.stdout as it is at the call)."""
    out = out or sys.stdout
    trained = 0
    while True:
        stop.raise_if_requested()  # A stop whose interrupt a trial lost ends the search here, not a trial later.
        taken = _next_trial(started.study, options, started.seed)
        if taken is None:
            return trained
        trial, claim, resumed = taken
        try:
            if resumed:
                print(f"tune: taking over trial {trial.number}, left unfinished", file=out, flush=True)
            _run_trial(started.study, trial, options, started.structures, started.datasets, out, started.index)
            trained += 1
        finally:
            claim.release()


def run_worker(options: TuneOptions, datasets=None, out: TextIO | None = None) -> int:
    """start_worker, then train_trials: a worker's whole part of the search; returns how many trials it trained."""
    return train_trials(start_worker(options, datasets), options, out)


def _use_cpu_share(cpus: set[int]) -> None:
    """A --parallel worker: its share of the CPUs, and TensorFlow's thread pools sized to it."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    size_thread_pools(len(cpus))


def size_thread_pools(threads: int) -> None:
    """TensorFlow's thread pools for a worker of `threads` CPUs; before its runtime starts (the first op)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow's runtime has started already (in a test's process): its pools stay.


def cpu_shares(workers: int) -> list[set[int]]:
    """This process's CPUs dealt out among `workers` workers (all of them to each, when fewer CPUs than workers)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return [set(cpus[index::workers] or cpus) for index in range(workers)]


# --- the end: the best trial, tested once and exported ----------------------------------------------------------


def finish(options: TuneOptions, datasets=None, out: TextIO | None = None) -> dict[str, Any] | None:
    """With --trials trials finished: the best complete trial, evaluated once on
    the test split and exported; writes and returns best.json (None while trials remain).
    Progress goes to `out` (default: sys.stdout as it is at the call)."""
    out = out or sys.stdout
    from optuna.trial import TrialState

    study = _open_study(options, options.base.seed)
    best_path = options.run_dir / "best.json"
    with _locked(options.run_dir / "study.lock"):
        finished = _finished_count(study)
        if finished < options.trials:
            return None
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise UsageError(f"every one of the {finished} trials was pruned or diverged; run more --trials "
                             "or narrow the search (--search)")
        best = max(complete, key=lambda trial: (trial.value, -trial.number))
        if best_path.is_file():
            written = json.loads(best_path.read_text())
            if written.get("trial") == best.number and written.get("trials") == finished:
                return written  # Finished by another worker, or by an earlier run of this command.
        result = _test_and_export(options, study, best, finished, datasets)
        start = next((trial for trial in study.get_trials(deepcopy=False)
                      if trial.user_attrs.get("starting_settings")), None)
        if start is not None and start.value is not None:
            result["starting_settings"] = {"trial": start.number, "validation_accuracy": start.value,
                                           "state": start.state.name.lower()}
            result["improved"] = best.value > start.value
        write_json_atomic(best_path, result)
    print(f"tune: best of {finished} trials: trial {best.number}, validation accuracy "
          f"{result['validation_accuracy']:.4f}, test accuracy {result['test_accuracy']:.4f}: {result['settings']}",
          file=out, flush=True)
    start = result.get("starting_settings")
    if start and result["improved"]:
        print(f"tune: the starting settings (trial {start['trial']}) reached validation accuracy "
              f"{start['validation_accuracy']:.4f}; the best trial improves it by "
              f"{result['validation_accuracy'] - start['validation_accuracy']:+.4f}", file=out, flush=True)
    elif start:
        print(f"tune: no trial improved on the starting settings (trial {start['trial']}, validation accuracy "
              f"{start['validation_accuracy']:.4f}); search more --trials or another space (--search)",
              file=out, flush=True)
    if result.get("export"):
        print(f"tune: exported trial {best.number} to {result['export']}", file=out, flush=True)
    return result


def _test_and_export(options: TuneOptions, study, best, finished: int, datasets) -> dict[str, Any]:
    import keras
    import numpy as np

    from lenet_tf.data import load_datasets
    from lenet_tf.model import predict_probabilities
    from lenet_tf.run_dir import RunDir

    run_dir = RunDir(trial_dir(options.run_dir, best.number))
    config = TrainConfig.read(run_dir.config)
    if datasets is None:
        datasets = load_datasets(_dataset(options), config.data_dir)
    datasets = datasets.limited(config.limit_train, config.limit_test)
    model = keras.models.load_model(run_dir.checkpoint, compile=False)
    predicted = predict_probabilities(model, datasets.test_images).argmax(axis=1)
    test_accuracy = float(np.mean(predicted == datasets.test_labels))
    metrics = json.loads(run_dir.metrics.read_text())
    result = {
        "trial": best.number,
        "settings": best.user_attrs.get("flags", ""),
        "validation_accuracy": best.value,
        "test_accuracy": test_accuracy,
        "trials": finished,
        "pruned": finished - len(study.get_trials(deepcopy=False, states=(best.state,))),
        "parameters": best.user_attrs.get("parameters"),
        "run_dir": str(run_dir.root),
    }
    if options.base.export_formats:
        from lenet_tf.export import check_can_export, export_model

        config = dataclasses.replace(config, export_formats=options.base.export_formats,
                                     export_dir=options.base.export_dir, model_name=options.base.model_name)
        check_can_export(config)
        card_metrics = {**metrics, "test_accuracy": test_accuracy,
                        "tuning": {"trial": best.number, "settings": result["settings"],
                                   "study": str(options.run_dir), "trials": finished}}
        export = export_model(model, config, datasets, card_metrics, dataset=options.dataset)
        result["export"] = str(export.version_dir)
    return result


def _dataset(options: TuneOptions) -> DatasetInfo:
    return resolve_dataset(options.base.dataset, options.dataset)


# --- --parallel K: K workers on this machine ---------------------------------------------------------------------


class ParallelWorkers:
    """The K-1 processes of a `--parallel K` search beside this one, each
    `lenet-tf tune ARGV --parallel 1` on its own share of the CPUs, this
    process being the first worker (a parent that only waited would pay
    TensorFlow's import, seconds of CPU, for nothing).

    Started before this process imports TensorFlow, so that the K imports run
    at once. Each then waits for the go-ahead run() gives (wait_for_go_ahead)
    before it touches the run folder: a search this process finds it cannot
    run, before that, ends them (cancel()) and leaves nothing of theirs behind.
    """

    def __init__(self, options: TuneOptions, argv: list[str]):
        from lenet_tf.io_utils import child_environment

        shares = cpu_shares(options.parallel)
        self.own_cpus = shares[0]
        self._processes: list[subprocess.Popen] = []
        read_end, write_end = os.pipe()
        self._go_ahead: int | None = write_end
        try:
            for index, share in enumerate(shares[1:], start=1):
                environment = child_environment(**{WORKER_VARIABLE: str(index),
                                                   CPUS_VARIABLE: ",".join(map(str, sorted(share))),
                                                   GO_AHEAD_VARIABLE: str(read_end)})
                command = [sys.executable, "-m", "lenet_tf.child", str(os.getpid()), "lenet_tf", "tune", *argv,
                           "--parallel", "1"]
                self._processes.append(subprocess.Popen(command, env=environment, pass_fds=(read_end,)))
        except BaseException:
            self.cancel()
            raise
        finally:
            os.close(read_end)

    @contextlib.contextmanager
    def own_share(self) -> Iterator[None]:
        """This process on its share of the CPUs for the duration. Entered
        before TensorFlow's runtime starts, whose threads then keep the share
        (an affinity set later holds for the calling thread only), as does
        the end (the best trial's test and export) after the block. Its thread
        pools are sized by the caller, once TensorFlow is imported quietly
        (size_thread_pools)."""
        if not hasattr(os, "sched_setaffinity"):
            yield
            return
        all_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.own_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, all_cpus)

    def cancel(self) -> None:
        """Ends the others before they touch the run folder (nothing of theirs to keep)."""
        self._close_go_ahead()
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def run(self, started: StartedWorker, options: TuneOptions, out: TextIO | None = None) -> int:
        """Gives the others the go-ahead, trains trials here (`started`: this
        process's start_worker, index 0) and waits for them; returns the first
        failing worker's exit code, or 0."""
        try:
            try:
                os.write(self._go_ahead, b"1" * len(self._processes))  # One byte for each of them to read.
            except BrokenPipeError:
                pass  # Every other worker has ended already: its exit code says how, below.
            self._close_go_ahead()
            train_trials(started, options, out)
            stop.raise_if_requested()  # A stop this process lost must still reach the others.
            codes = [process.wait() for process in self._processes]
        except BaseException:
            for process in self._processes:
                if process.poll() is None:
                    process.terminate()  # SIGTERM: it stops at its next safe point, its trial's backup intact.
            for process in self._processes:
                process.wait()
            raise
        return next((code for code in codes if code != 0), 0)

    def _close_go_ahead(self) -> None:
        if self._go_ahead is not None:
            os.close(self._go_ahead)
            self._go_ahead = None


def wait_for_go_ahead() -> bool:
    """In a worker that ParallelWorkers started: waits until the first worker
    has checked the search; False when it found that the search cannot run."""
    descriptor = os.environ.get(GO_AHEAD_VARIABLE)
    if not descriptor:
        return True
    try:
        return os.read(int(descriptor), 1) == b"1"
    finally:
        os.close(int(descriptor))
