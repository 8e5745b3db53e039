"""The command line: help, summary, and one-line errors with exit code 2 for user mistakes."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lenet_tf import cli
from lenet_tf.cli import build_parser, config_from_args, main
from lenet_tf.config import PRESETS, TrainConfig, preset
from lenet_tf.registry import dataset_names

from conftest import REPO_ROOT, run_main, write_idx_dir


def _train_args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_help_documents_every_flag_with_its_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--dataset", "--data-dir", "--epochs", "--batch-size", "--learning-rate", "--strategy",
                 "--run-dir", "--export-dir", "--format", "--seed", "--limit-train", "--activation", "--summary"):
        assert flag in help_text
    assert "default: 0.9" in help_text and "default: 256" in help_text and "default: 10" in help_text


def test_the_docs_flag_table_is_made_from_the_flags_help():
    """docs/command-line.md's table of train flags is flag_table_markdown(),
    which reads each flag's meaning where --help reads it: a help changed
    without the page, or a flag added or removed, fails here."""
    page = (REPO_ROOT / "docs" / "command-line.md").read_text()
    assert cli.flag_table_markdown() in page, (
        "docs/command-line.md's flag table differs from the flags' help; regenerate it from the repository's "
        'root: python -c "from lenet_tf.cli import write_flag_table; write_flag_table()"')
    table = page.split("<!-- end of the flag table -->")[0].split("| --- | --- | --- |\n")[1]
    documented = [flag for row in table.splitlines() for flag in re.findall(r"--[\w-]+", row.split(" | ")[0])]
    train = cli._train_parser()
    flags = [flag for action in train._actions for flag in action.option_strings if flag not in ("-h", "--help")]
    assert documented == flags
    help_text = train.format_help()
    assert "`" not in help_text and "](" not in help_text  # Markdown is for the page only.


def test_every_config_field_is_a_train_flag_with_its_help():
    dests = {action.dest for action in cli._train_parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in dests and field.metadata["help"], field.name


def test_a_default_in_words_hides_no_preset_value():
    """A flag whose default is given in words lists no preset's value: none may change it."""
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["default_text"] and field.name not in ("preset", "dataset"):
            values = {getattr(preset(name, dataset), field.name) for name in PRESETS for dataset in dataset_names()}
            assert values == {field.default}, field.name


def test_the_test_splits_written_default_is_the_folders_own():
    from lenet_tf.folders import DEFAULT_TEST_SPLIT

    assert cli._defaults("test_split") == [("default", f"`{DEFAULT_TEST_SPLIT:g}`")]


def test_flags_override_the_preset():
    config = config_from_args(_train_args("--epochs", "3", "--conv-filters", "8,16", "--no-batch-norm",
                                          "--format", "saved_model,tflite-int8", "--dataset", "mnist"))
    assert config.epochs == 3 and config.conv_filters == (8, 16) and config.batch_norm is False
    assert config.export_formats == ("saved_model", "tflite-int8")
    assert config.run_dir == "runs/mnist"
    assert config.learning_rate == TrainConfig().learning_rate


def test_train_py_summary_prints_the_books_shapes(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["train.py", "--summary"])
    with pytest.raises(SystemExit) as exit_info:  # train.py run as a script, in this process.
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    for shape in ("(1, 28, 28, 6)", "(1, 14, 14, 6)", "(1, 10, 10, 16)", "(1, 5, 5, 16)", "(1, 400)",
                  "(1, 120)", "(1, 84)", "(1, 10)"):
        assert shape in captured.out
    assert "61,706" in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "--epochs must be a positive integer"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--learning-rate", "-0.1"], "--learning-rate must be a positive number"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--format", "saved_model,pickle"], "--format must be one of"),
        (["--conv-filters", "6,x"], "expected comma-separated integers"),
        (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
        (["--strategy", "tpu"], "invalid choice: 'tpu'"),
        (["--activation", "tanh"], "invalid choice: 'tanh'"),
        (["--optimizer", "adam"], "invalid choice: 'adam'"),
        (["--epochs", "ten"], "invalid int value"),
        (["--kernel-size", "29"], "conv layer 2 (kernel 29) leaves nothing of the 28x28 image"),
        (["--conv-filters", "6,16,32"], "conv layer 3 (kernel 5) leaves nothing"),
        (["--conv-filters", "6,,16"], "expected comma-separated integers"),
        (["--crop", "-1"], "--crop must be a whole number of pixels, 0 or more"),
        (["--crop", "14"], "--crop 14 leaves nothing of the 28x28 image; crop at most 13 pixels"),
        (["--crop", "9"], "conv layer 2 (kernel 5) leaves nothing of the 28x28 image after its 2x2 pooling; use "
                          "smaller --kernel-size, fewer --conv-filters layers or a smaller --crop"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
        (["--seed", str(2**32)], "--seed must be an integer from 0 to 4294967295"),
        (["--profile-batch", "abc"], "--profile-batch must be a batch number or a range"),
        (["--profile-batch", "20,10"], "--profile-batch must be a batch number or a range"),
        (["--model-name", "../elsewhere"], "--model-name must be a plain folder name"),
        (["--model-name", ".."], "--model-name must be a plain folder name"),
    ],
)
def test_invalid_flags_give_one_line_and_exit_2(argv, message, capsys):
    try:
        code = main(["train", *argv])  # Config checks return 2 ...
    except SystemExit as exit_info:  # ... argparse's own checks exit 2.
        code = exit_info.code
    error = capsys.readouterr().err
    assert code == 2
    assert message in error
    assert error.count("\n") == 1, error


@pytest.mark.parametrize("command", ["train", "summary"])
def test_a_bad_flag_is_reported_before_tensorflow_imports(command):
    """A mistake in the flags is one line at once, not after the seconds
    that TensorFlow's import takes."""
    script = ("import sys; from lenet_tf.cli import main; "
              f"code = main([{command!r}, '--crop', '14']); print('tensorflow' in sys.modules, code)")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120)
    assert completed.stdout.split() == ["False", "2"], completed.stderr[-3000:]
    assert completed.stderr == (f"lenet-tf {command}: error: --crop 14 leaves nothing of the 28x28 image; "
                                "crop at most 13 pixels from each side\n")


def _assert_one_line_error(completed, *fragments):
    assert completed.returncode == 2, completed.stderr[-3000:]
    error_lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_missing_data_dir_is_one_line(tmp_path):
    completed = run_main("train", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"))
    _assert_one_line_error(completed, "does not exist")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_empty_data_dir_names_the_files_needed(tmp_path):
    (tmp_path / "empty").mkdir()
    completed = run_main("train", "--data-dir", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run"))
    _assert_one_line_error(completed, "train-images-idx3-ubyte")


def test_truncated_gzip_is_one_line(tmp_path):
    directory = write_idx_dir(tmp_path / "data")
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    completed = run_main("train", "--data-dir", str(directory), "--run-dir", str(tmp_path / "run"))
    _assert_one_line_error(completed, "train-images-idx3-ubyte.gz", "re-download")


def test_batch_larger_than_data_is_one_line(tmp_path):
    directory = write_idx_dir(tmp_path / "data", train=64, test=32)
    completed = run_main("train", "--data-dir", str(directory), "--run-dir", str(tmp_path / "run"))
    _assert_one_line_error(completed, "global batch size 256 is larger than the 64 training examples")
    # The run folder this command created (for its lock) goes with it.
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_memory_is_one_line(capsys):
    code = main(["summary", "--dense-units", str(10**11)])
    error = capsys.readouterr().err
    assert code == 2
    assert "ran out of memory (OOM when allocating tensor with shape[400,100000000000])" in error
    assert error.count("\n") == 1, error


def test_model_path_that_is_not_a_model_is_one_line(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"garbage")
    completed = run_main("evaluate", "--model", str(tmp_path / "model.tflite"))
    _assert_one_line_error(completed, "cannot load TFLite model")
    (tmp_path / "folder").mkdir()
    completed = run_main("predict", "--model", str(tmp_path / "folder"), "x.png")
    _assert_one_line_error(completed, "is not a model this package can load")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    completed = run_main("evaluate", "--model", str(tmp_path / "bad.keras"))
    _assert_one_line_error(completed, "cannot load Keras model")


def test_export_from_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    completed = run_main("export", "--run-dir", str(tmp_path))
    _assert_one_line_error(completed, "is not a run directory with a checkpoint")


@pytest.mark.parametrize("stop, line, code", [
    (signal.SIGTERM, "lenet-tf summary: terminated (SIGTERM); run the same command again to resume", 143),
    (signal.SIGINT, "lenet-tf summary: interrupted; run the same command again to resume", 130),
])
def test_a_stop_signal_is_one_line_even_when_tensorflow_turns_the_interrupt_into_another_error(
        monkeypatch, capsys, stop, line, code):
    """A signal that lands inside TensorFlow's C++ bindings surfaces as their
    RuntimeError (seen in a SIGTERM during the SavedModel export's tracing)."""
    import lenet_tf.cli as cli

    def stopped_inside_tensorflow(args):
        try:
            os.kill(os.getpid(), stop)
            time.sleep(30)  # The handler raises here.
        except KeyboardInterrupt:
            # pybind11's words, as it passes a KeyboardInterrupt on from C++.
            raise RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized active "
                               "exception types: ORIGINAL KeyboardInterrupt REPLACED BY SystemError: "
                               "<built-in function ...> returned a result with an exception set") from None

    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.HANDLERS, "summary", stopped_inside_tensorflow)
    assert main(["summary"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


def test_a_stop_inside_a_constructor_is_one_line_without_its_finalizers_traceback(monkeypatch, capsys):
    """A SIGTERM that lands in a constructor before it sets an attribute its
    __del__ reads (TensorFlow's ScopedTFImportGraphDefOptions, mid-export): before,
    Python printed the __del__'s AttributeError as a traceback after the one line."""
    import lenet_tf.cli as cli

    class HalfBuilt:
        def __init__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # The handler raises here, before `options` is set.
            self.options = "set"

        def __del__(self):
            assert self.options  # AttributeError on the half-built one.

    def stopped_in_a_constructor(args):
        HalfBuilt()

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setitem(cli.HANDLERS, "summary", stopped_in_a_constructor)
    assert main(["summary"]) == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        "lenet-tf summary: terminated (SIGTERM); run the same command again to resume"]
    assert unraisable == [] and sys.unraisablehook == unraisable.append  # Dropped, and the hook put back.


def test_a_stopped_process_ends_in_its_one_line_whatever_its_finalizers_raise_at_exit():
    """What a stop leaves open until the process exits (a multiprocessing pool,
    whose __del__ then writes to a closed pipe: seen after scancel) fails in its
    finalizer at exit: before, Python printed that as a traceback after the line."""
    script = """
import os, signal, sys, time
import lenet_tf.cli as cli

class LeftOpen:
    def __del__(self):
        raise OSError(9, "Bad file descriptor")

def stopped(args):
    global left_open
    left_open = LeftOpen()  # Freed only as the interpreter shuts down.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

cli.import_tensorflow_quietly = lambda: None
cli.HANDLERS["summary"] = stopped
sys.exit(cli.main(["summary"]))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert completed.returncode == 143
    assert completed.stderr.strip().splitlines() == [
        "lenet-tf summary: terminated (SIGTERM); run the same command again to resume"]


@pytest.mark.parametrize("stop, line, code", [
    (signal.SIGTERM, "lenet-tf train: terminated (SIGTERM); run the same command again to resume", 143),
    (signal.SIGINT, "lenet-tf train: interrupted; run the same command again to resume", 130),
])
def test_a_stop_signal_while_tensorflow_imports_is_one_line(monkeypatch, capsys, stop, line, code):
    """Ctrl-C in the first seconds of a run, while TensorFlow imports: before,
    a KeyboardInterrupt traceback from deep in the import machinery."""
    import lenet_tf.cli as cli

    def stopped_while_importing():
        os.kill(os.getpid(), stop)
        time.sleep(30)  # The handler raises here.

    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "import_tensorflow_quietly", stopped_while_importing)
    assert main(["train", "--epochs", "1"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


def test_a_stop_inside_a_python_function_that_tensorflow_runs_is_one_line(monkeypatch, capsys):
    """TensorFlow's runtime passes a KeyboardInterrupt raised in a Python
    function it called (tf.py_function, tf.data's generators) on as its own
    UnknownError, which still is the user's stop."""
    import tensorflow as tf

    import lenet_tf.cli as cli

    def stopped_inside_a_tensorflow_op(args):
        def wait(value):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # The handler raises here, inside TensorFlow's op.
            return value

        tf.py_function(wait, [1.0], tf.float32)

    monkeypatch.setitem(cli.HANDLERS, "summary", stopped_inside_a_tensorflow_op)
    assert main(["summary"]) == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        "lenet-tf summary: terminated (SIGTERM); run the same command again to resume"]


@pytest.mark.parametrize("bug", [RuntimeError("a bug in the clean-up"), ValueError("a bug in the clean-up")])
def test_a_bug_after_a_stop_signal_keeps_its_traceback(monkeypatch, capsys, bug):
    """Only what a stop causes is reported as a stop: a bug that happens
    after the signal (here in code that handled the stop) keeps its traceback."""
    import lenet_tf.cli as cli

    def stopped_then_a_bug(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # The handler raises here.
        except KeyboardInterrupt:
            pass
        raise bug

    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.HANDLERS, "summary", stopped_then_a_bug)
    with pytest.raises(type(bug), match="a bug in the clean-up"):
        main(["summary"])
    assert "terminated" not in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before


_STOPPED_ONCE_SERVING = """
import os, signal, sys, threading
from lenet_tf.cli import main

class Watched:
    # Stops the server (as Ctrl-C does) once it says that it serves.
    def write(self, text):
        sys.__stdout__.write(text)
        if "(Ctrl-C to stop)" in text:
            # A moment later: in the server's loop, where Ctrl-C ends it with exit code 0.
            threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        return len(text)

    def flush(self):
        sys.__stdout__.flush()

sys.stdout = Watched()
print("exit code:", main(sys.argv[1:]), file=sys.__stdout__)  # Ctrl-C is how a server ends: 0.
if sys.argv[1] == "tensorboard":
    import tensorboard.compat
    tensorboard.compat.tf.io  # What TensorBoard reads the logs with: TensorFlow, if it would import it.
# On a line of its own: the stop may have cut the server's line short of its newline.
# (tensorboard blocks TensorFlow's import with a None entry.)
print("\\ntensorflow imported:", sys.modules.get("tensorflow") is not None, file=sys.__stdout__)
"""


@pytest.mark.parametrize("command", ["serve-web", "tensorboard"])
def test_the_servers_start_and_stop_without_importing_tensorflow(command, tmp_path):
    """serve-web and tensorboard serve files already written: TensorFlow's import would only delay them."""
    (tmp_path / "1" / "web").mkdir(parents=True)
    (tmp_path / "1" / "web" / "index.html").write_text("<html></html>")
    arguments = (["serve-web", "--model-dir", str(tmp_path / "1")] if command == "serve-web"
                 else ["tensorboard", "--run-dir", str(tmp_path)]) + ["--port", "0"]
    completed = subprocess.run([sys.executable, "-c", _STOPPED_ONCE_SERVING, *arguments], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300)
    assert "(Ctrl-C to stop)" in completed.stdout, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "tensorflow imported: False", completed.stderr[-3000:]
    assert "exit code: 0" in completed.stdout and "interrupted" not in completed.stderr, completed.stderr[-3000:]
