"""`lenet-tf tune`: the search space and its flags, bad input, a small search end
to end through a SIGTERM and its resume, and two workers sharing one study."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_tf import cli
from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.run_dir import RunDir
from lenet_tf.tune import (
    DEFAULT_SPACE, Choice, Range, TuneOptions, check_options, default_space, parse_search, setting_value,
    settings_as_flags,
)

from conftest import REPO_ROOT, backed_up_epochs, read_event_tags, run_main, wait_for, write_class_folders

# Small and quick: about two seconds a trial on two cores.
SMALL_SEARCH = ["--limit-train", "1024", "--limit-test", "256", "--image-every-epochs", "0",
                "--search", "batch-size=128|256", "--search", "conv-filters=6,16|16,32", "--search", "dense-units=64"]


def test_the_search_flags_narrow_widen_and_fix_the_space():
    space = parse_search(["learning-rate=0.01..0.5", "conv_filters=6,16|16,32", "activation=relu",
                          "kernel-size=3|5", "epochs=2..4"], DEFAULT_SPACE, fixed=set())
    assert space["learning_rate"] == Range(0.01, 0.5, log=True)  # The default's log scale is kept.
    assert space["conv_filters"] == Choice(("6,16", "16,32"))
    assert space["activation"] == Choice(("relu",))  # One value fixes it.
    assert space["kernel_size"] == Choice(("3", "5"))  # A setting outside the default space joins it.
    assert space["epochs"] == Range(2, 4) and isinstance(space["epochs"].low, int)
    assert set(DEFAULT_SPACE) <= set(space)


@pytest.mark.parametrize("spec, message", [
    ("optimiser=sgd", "--optimiser is not a setting the search can vary"),
    ("run-dir=x", "--run-dir is not a setting the search can vary"),
    ("learning-rate", "must read NAME=LOW..HIGH"),
    ("learning-rate=0.5..0.1", "low end must be below its high end"),
    ("activation=a..b", "takes values, not a range"),
    ("dropout=x..0.5", "must be numbers"),
])
def test_a_bad_search_flag_is_one_clear_error(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_search([spec], DEFAULT_SPACE, fixed=set())


def test_a_flag_fixes_its_setting_and_digits_are_never_flipped():
    space = default_space(TrainConfig(dataset="mnist"), fixed={"activation"})
    assert "activation" not in space and space["augment"] == Choice(("none", "shift"))
    with pytest.raises(UsageError, match="--activation is both given as a flag"):
        parse_search(["activation=relu"], space, fixed={"activation"})


def test_settings_read_and_write_as_flags():
    settings = {name: setting_value(name, text) for name, text in
                (("conv_filters", "16,32"), ("batch_norm", "off"), ("learning_rate", "0.25"), ("batch_size", "64"),
                 ("augment", "shift"))}
    assert settings == {"conv_filters": (16, 32), "batch_norm": False, "learning_rate": 0.25, "batch_size": 64,
                        "augment": "shift"}
    assert settings_as_flags(settings) == ("--conv-filters 16,32 --no-batch-norm --learning-rate 0.25 "
                                           "--batch-size 64 --augment shift")
    with pytest.raises(UsageError, match="on or off"):
        setting_value("batch_norm", "yes")


def test_every_default_setting_is_a_valid_value_and_the_defaults_fit_max_params():
    check_options(TuneOptions(TrainConfig(validation_split=0.1), 8, default_space(TrainConfig())))


@pytest.mark.parametrize("arguments, message", [
    (["--trials", "0"], "--trials must be a positive integer (got 0)"),
    (["--trials", "3", "--search", "optimiser=sgd"], "--optimiser is not a setting the search can vary"),
    (["--trials", "3", "--max-params", "5000"], "--max-params 5,000: no setting of the search space is that small"),
    # Found by the first worker once the others were started: they end, and nothing is written.
    (["--trials", "3", "--max-params", "5000", "--parallel", "2"], "--max-params 5,000: no setting"),
    (["--trials", "3", "--search", "batch-size=0|64"], "--batch-size must be a positive integer (got 0)"),
    (["--trials", "3", "--validation-split", "0"], "--validation-split must be above 0"),
])
def test_bad_input_is_one_line_and_exit_code_2(arguments, message, capsys, tmp_path):
    assert cli.main(["tune", "--run-dir", str(tmp_path / "run"), *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lenet-tf tune: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def _tune_command(run_dir: Path, trials: int, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lenet_tf", "tune", *SMALL_SEARCH, "--trials", str(trials), "--epochs",
            str(epochs), "--run-dir", str(run_dir), "--export-dir", str(run_dir.parent / "exports"), *extra]


def _trial_metrics(run_dir: Path) -> dict[int, Path]:
    return {int(path.parent.name): path for path in (run_dir / "trials").glob("*/metrics.json")}


def _hparams(log_dir: Path) -> dict:
    """The hyperparameters a run's TensorBoard logs record for the HParams dashboard."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = read_event_tags(log_dir)
    content = accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in data.session_start_info.hparams.items()}


@pytest.mark.slow
def test_a_small_search_stopped_by_sigterm_resumes_to_its_trials_best_and_export(tmp_path, fashion_mnist_dir):
    """3 trials of 3 epochs; SIGTERM once the third trial has backed up an epoch:
    the same command takes it over from its backup, and leaves the first two as they were."""
    run_dir = tmp_path / "run"
    command = _tune_command(run_dir, 3, 3, "--format", "saved_model")
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: len(_trial_metrics(run_dir)) >= 2
                 and backed_up_epochs(RunDir(run_dir / "trials" / "2").backup_metadata) >= 1, [first],
                 "second trial finished and the third's first epoch backed up")
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "lenet-tf tune: terminated (SIGTERM); run the same command again to resume"
    kept = {number: path.read_bytes() for number, path in _trial_metrics(run_dir).items()}
    assert sorted(kept) == [0, 1] and not (run_dir / "best.json").exists()

    second = run_main(*command[3:], cwd=tmp_path)  # The reruns need no process of their own: the stopped one is gone.
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tune: taking over trial 2, left unfinished" in second.stdout
    assert re.findall(r"^tune: trial (\d+) \(", second.stdout, re.MULTILINE) == ["2"]  # Only trial 2 trained.
    finished = _trial_metrics(run_dir)
    assert sorted(finished) == [0, 1, 2]
    assert {number: finished[number].read_bytes() for number in (0, 1)} == kept  # Untouched on disk.
    resumed = json.loads(finished[2].read_text())
    assert len(resumed["history"]["loss"]) == 3 and resumed["epochs_run_this_session"] < 3

    best = json.loads((run_dir / "best.json").read_text())
    assert set(best) >= {"trial", "settings", "validation_accuracy", "test_accuracy"} and best["trials"] == 3
    trial = json.loads((run_dir / "trials" / str(best["trial"]) / "metrics.json").read_text())
    assert best["validation_accuracy"] == pytest.approx(trial["validation_accuracy"])
    assert 0.0 <= best["test_accuracy"] <= 1.0
    for number in range(3):
        metrics = json.loads(finished[number].read_text())
        assert "test_accuracy" not in metrics and metrics["test_examples"] == 0  # Trials never see the test split.
        config = TrainConfig.read(run_dir / "trials" / str(number) / "config.json")
        hparams = _hparams(run_dir / "trials" / str(number) / "logs")
        assert hparams["learning_rate"] == pytest.approx(config.learning_rate)
        assert hparams["conv_filters"] == ",".join(map(str, config.conv_filters))
        assert hparams["batch_size"] == config.batch_size
    card = json.loads((Path(best["export"]) / "metadata.json").read_text())
    assert card["metrics"]["tuning"]["trial"] == best["trial"]
    assert card["metrics"]["tuning"]["settings"] == best["settings"]
    assert card["metrics"]["test_accuracy"] == best["test_accuracy"]

    # Run again once finished: nothing to train, nothing new exported.
    again = run_main(*command[3:], cwd=tmp_path)
    assert again.returncode == 0 and "tune: trial" not in again.stdout, again.stdout
    assert json.loads((run_dir / "best.json").read_text()) == best
    assert [path.name for path in Path(best["export"]).parent.iterdir()] == ["1"]


@pytest.mark.slow
def test_a_stop_whose_interrupt_is_lost_still_ends_the_search_at_the_next_batch(tmp_path, fashion_mnist_dir,
                                                                                monkeypatch):
    """TensorFlow's C++ now and then clears the KeyboardInterrupt a stop raises
    in Python code it called (lenet_tf/stop.py); under SLURM a requeued job's
    worker trained on, trial after trial. Here trial 1's training starts in
    code that loses the interrupt the same way: the search still stops, at that
    trial's first epoch, with its one line and exit code 143."""
    from lenet_tf import train

    train_and_evaluate = train.train_and_evaluate

    def train_losing_a_stop(config, *args, **kwargs):
        if Path(config.run_dir).name == "1":
            try:
                signal.raise_signal(signal.SIGTERM)  # The handler raises the interrupt ...
            except KeyboardInterrupt:
                pass  # ... and it is lost, as in TensorFlow's C++.
            else:
                pytest.fail("the SIGTERM handler raised nothing")
        return train_and_evaluate(config, *args, **kwargs)

    monkeypatch.setattr(train, "train_and_evaluate", train_losing_a_stop)
    run_dir = tmp_path / "run"
    result = run_main(*_tune_command(run_dir, 3, 1, "--format", "")[3:], cwd=tmp_path)
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("lenet-tf tune: terminated (SIGTERM); run the same command "
                                                      "again to resume")
    assert sorted(_trial_metrics(run_dir)) == [0]  # Trial 1 did not finish its epoch; trial 2 never began.
    assert re.findall(r"^tune: trial (\d+) \(", result.stdout, re.MULTILINE) == ["0", "1"]
    assert backed_up_epochs(RunDir(run_dir / "trials" / "1").backup_metadata) == 0


def test_a_stop_signal_inside_a_write_to_the_study_waits_for_the_write_and_its_lock(tmp_path, monkeypatch):
    """Optuna's journal lock is released in two steps (rename, unlink), and its
    clean-up after an interrupt unlinks again: a SIGTERM between the unlink and
    the return ended a SLURM task with a FileNotFoundError traceback. The
    study's writes are not interrupted: the stop comes once the write is done."""
    from optuna.storages.journal import _file

    from lenet_tf import tune

    options = TuneOptions(TrainConfig(validation_split=0.1, run_dir=str(tmp_path / "run")), 3,
                          default_space(TrainConfig()))
    options.run_dir.mkdir()
    study = tune._open_study(options, seed=0)
    unlink = os.unlink

    def unlink_then_stop(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if str(path).endswith(_file.RENAME_FILE_SUFFIX):  # The lock's release, its last step.
            signal.raise_signal(signal.SIGTERM)  # Its handler runs before this returns.

    received = []
    with cli._stop_signals_as_interrupts(received):
        monkeypatch.setattr(os, "unlink", unlink_then_stop)
        try:
            with pytest.raises(KeyboardInterrupt):
                study.set_user_attr("note", "written")
        finally:
            monkeypatch.undo()
    assert received == [signal.SIGTERM]
    assert tune._open_study(options, seed=0).user_attrs == {"note": "written"}
    assert sorted(path.name for path in options.run_dir.iterdir()) == ["study.journal"]  # No lock left behind.


@pytest.mark.slow
def test_parallel_2_trains_in_two_processes_on_one_study_and_each_trial_once(tmp_path, fashion_mnist_dir):
    """`--parallel 2`: this process and one it starts, each on one of the two
    CPUs, share the study: each trial trained once, none lost, both trained."""
    run_dir = tmp_path / "run"
    command = _tune_command(run_dir, 4, 1, "--format", "", "--parallel", "2")
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    started = re.findall(r"^tune: trial (\d+) \(worker (\d)\)", result.stdout, re.MULTILINE)
    assert sorted(int(number) for number, _ in started) == [0, 1, 2, 3], result.stdout  # Each once, none lost.
    assert {worker for _, worker in started} == {"0", "1"}, result.stdout  # Both trained.
    assert sorted(_trial_metrics(run_dir)) == [0, 1, 2, 3]
    assert json.loads((run_dir / "best.json").read_text())["trials"] == 4
    assert "tune: best of 4 trials" in result.stdout and "Traceback" not in result.stderr
    assert "oneDNN" not in result.stderr, result.stderr[-3000:]  # TensorFlow imported quietly in both processes.


def test_the_docs_show_the_tune_sbatch_script():
    page = (REPO_ROOT / "docs" / "tuning.md").read_text()
    assert f"```bash\n{(REPO_ROOT / 'slurm' / 'tune.sbatch').read_text()}```" in page


def test_the_starting_settings_are_in_the_space_and_are_the_first_trial():
    """A preset's values outside the default space join it, so that the search's
    first trial trains the starting settings, which the others must beat."""
    from lenet_tf.tune import allowed_structures, starting_params

    base = TrainConfig(batch_size=32, learning_rate=2.0, dense_units=(100,), validation_split=0.1)
    space = default_space(base)
    assert "32" in space["batch_size"].values and space["learning_rate"] == Range(0.01, 2.0, log=True)
    options = TuneOptions(base, 8, space)
    params = starting_params(options, allowed_structures(options))
    assert params["batch_size"] == "32" and params["learning_rate"] == 2.0
    assert params["structure"] == "conv_filters=6,16 dense_units=100 batch_norm=off"
    narrowed = TuneOptions(base, 8, parse_search(["batch-size=64|128"], space, fixed=set()))
    assert starting_params(narrowed, allowed_structures(narrowed)) is None  # Not in the space: not compared.


@pytest.mark.slow
def test_a_search_on_a_folder_of_pictures_trains_and_exports_its_classes(tmp_path):
    """`tune --data-dir PHOTOS`: the folder scanned by the command reaches every
    trial and the best one's export, which name its classes and the folder."""
    photos = write_class_folders(tmp_path / "shapes", {"circle": 16, "square": 16, "star": 16})
    run_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    tuned = run_main("tune", "--data-dir", str(photos), "--trials", "2", "--epochs", "1", "--no-prune",
                     "--image-every-epochs", "0", "--search", "batch-size=8|16", "--search", "conv-filters=6,16",
                     "--search", "dense-units=64", "--run-dir", str(run_dir), "--export-dir", str(export_dir),
                     "--format", "saved_model", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    trials = _trial_metrics(run_dir)
    assert sorted(trials) == [0, 1]
    for path in trials.values():
        assert json.loads(path.read_text())["class_names"] == ["circle", "square", "star"]
    best = json.loads((run_dir / "best.json").read_text())
    card = json.loads((Path(best["export"]) / "metadata.json").read_text())
    assert Path(best["export"]).parent.name == "lenet_shapes"
    assert card["class_names"] == ["circle", "square", "star"] and card["folder"]["path"] == str(photos.resolve())
