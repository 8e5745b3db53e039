"""The `lenet-tf` command line: the only module that knows about flags.

Subcommands: train (the default of train.py), tune, summary, export, evaluate,
predict, serve-web, tensorboard. Every mistake a user can make ends in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from typing import TYPE_CHECKING, Sequence

from lenet_tf import stop
from lenet_tf.config import (
    ACTIVATIONS, AUGMENTATIONS, EXPORT_FORMATS, FOLDER_SETTINGS, OPTIMIZERS, POOLINGS, PRESET_SETTINGS, PRESETS,
    SCHEDULES, STRATEGIES, TrainConfig, folder_preset, power_of_two_at_most, preset, validation_count,
)
from lenet_tf.data import BackgroundLoad
from lenet_tf.errors import ParityError, StoppedError, UsageError
from lenet_tf.images import INVERT_CHOICES
from lenet_tf.io_utils import process_start_time
from lenet_tf.quiet import import_tensorflow_quietly
from lenet_tf.registry import DatasetInfo, dataset_names

if TYPE_CHECKING:
    from lenet_tf.folders import FolderDataset


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        # An empty item ("6,,16") is a typo, not a layer to drop silently.
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(value) -> str:
    """A setting as a user types it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _code(value) -> str:
    """A setting as the docs show it: code, but on and off as words."""
    return _shown(value) if isinstance(value, bool) else f"`{_shown(value)}`"


# The meaning of each train flag that is not a TrainConfig field; the fields
# carry their own (lenet_tf.config.flag). The test split's default is
# lenet_tf.folders.DEFAULT_TEST_SPLIT, written out so that building the parser
# does not import that module (tests/test_cli.py keeps the two equal).
_OTHER_TRAIN_FLAGS: dict[str, dict[str, str]] = {
    "test_split": {"help": "a folder of pictures without `test/`: hold out this fraction of each class for "
                           "testing, chosen by --seed", "default_text": "`0.1`"},
    "flip_keeps_class": {"help": "a folder of pictures: a mirror image keeps its class, so the presets may flip",
                         "default_text": "off"},
    "summary": {"help": "print the layer summary and exit without training"},
}
_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


def _source(name: str):
    """Where the train flag with destination `name` has its help: its field's metadata, or _OTHER_TRAIN_FLAGS."""
    return _FIELDS[name].metadata if name in _FIELDS else _OTHER_TRAIN_FLAGS[name]


def _defaults(name: str) -> list[tuple[str, str]]:
    """A flag's default and each preset's value for it, read from the presets
    themselves, e.g. [("default", "`0`"), ("modern", "`0.9`"), ("fast, best", "`0.95`")];
    the default in words where the flag's source gives it (default_text)."""
    if _source(name).get("default_text"):
        return [("default", _source(name)["default_text"])]
    if name not in _FIELDS:
        return []
    default = getattr(TrainConfig(), name)
    datasets = dataset_names()
    by_value: dict[str, list[str]] = {}
    for preset_name in PRESETS:
        values = {dataset: getattr(preset(preset_name, dataset), name) for dataset in datasets}
        first = values[datasets[0]]
        if first != default:
            by_value.setdefault(_code(first), []).append(preset_name)
        for dataset, value in values.items():
            if value != first:  # A dataset that the preset treats differently.
                by_value.setdefault(_code(value), []).append(f"{preset_name} on {dataset}")
    parts = [("default", _code(default)), *((", ".join(names), value) for value, names in by_value.items())]
    modern = PRESET_SETTINGS["modern"].get(name, default)
    if name in FOLDER_SETTINGS and FOLDER_SETTINGS[name] != modern:  # The folder recipe's own changes to modern.
        parts.append(("a folder of pictures", _code(FOLDER_SETTINGS[name])))
    return parts


def _meaning(name: str) -> tuple[str, str]:
    """A flag's meaning and the docs' addition to it, from its source."""
    return _source(name)["help"], _source(name).get("doc", "")


def _plain(text: str) -> str:
    """Help text for a terminal: a [label](page.md) link as docs/page.md, code without its backticks."""
    text = re.sub(r"\[([^\]]*)\]\(([^)#\s]*)(#[^)\s]*)?\)", lambda link: f"docs/{link[2]}" if link[2] else link[1],
                  text)
    return text.replace("`", "")


def _help(name: str) -> str:
    """A train flag's --help: its meaning, then its default and each preset's value."""
    meaning, _ = _meaning(name)
    defaults = "; ".join(f"{label}: {value}" for label, value in _defaults(name))
    # argparse formats help with %, so a literal one is doubled.
    return _plain(f"{meaning} ({defaults})" if defaults else meaning).replace("%", "%%")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=dataset_names(), help=_help("dataset"))
    data.add_argument("--data-dir", metavar="DIR", help=_help("data_dir"))
    data.add_argument("--test-split", type=float, metavar="F", help=_help("test_split"))
    data.add_argument("--flip-keeps-class", action="store_true", help=_help("flip_keeps_class"))
    data.add_argument("--limit-train", type=int, metavar="N", help=_help("limit_train"))
    data.add_argument("--limit-test", type=int, metavar="N", help=_help("limit_test"))

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=PRESETS, help=_help("preset"))
    model.add_argument("--activation", choices=ACTIVATIONS, help=_help("activation"))
    model.add_argument("--pooling", choices=POOLINGS, help=_help("pooling"))
    model.add_argument("--conv-filters", type=_int_list, metavar="N,N,...", help=_help("conv_filters"))
    model.add_argument("--kernel-size", type=_int_list, metavar="K,...", help=_help("kernel_size"))
    model.add_argument("--first-conv-padding", choices=("same", "valid"), help=_help("first_conv_padding"))
    model.add_argument("--crop", type=int, metavar="N", help=_help("crop"))
    model.add_argument("--dense-units", type=_int_list, metavar="N,N,...", help=_help("dense_units"))
    for name in ("batch_norm", "first_conv_batch_norm", "whiten_first_conv", "dense_batch_norm"):
        model.add_argument(_flag_name(name), action=argparse.BooleanOptionalAction, help=_help(name))
    model.add_argument("--batch-norm-momentum", type=float, metavar="M", help=_help("batch_norm_momentum"))
    model.add_argument("--dropout", type=float, metavar="P", help=_help("dropout"))
    model.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, help=_help("test_time_flip"))

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, help=_help("optimizer"))
    optimisation.add_argument("--muon-ns-steps", type=int, metavar="N", help=_help("muon_ns_steps"))
    optimisation.add_argument("--learning-rate", type=float, metavar="LR", help=_help("learning_rate"))
    optimisation.add_argument("--batch-size", type=int, metavar="B", help=_help("batch_size"))
    optimisation.add_argument("--epochs", type=int, metavar="N", help=_help("epochs"))
    optimisation.add_argument("--seed", type=int, metavar="S", help=_help("seed"))
    optimisation.add_argument("--momentum", type=float, metavar="M", help=_help("momentum"))
    optimisation.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help=_help("nesterov"))
    optimisation.add_argument("--weight-decay", type=float, metavar="W", help=_help("weight_decay"))
    optimisation.add_argument("--label-smoothing", type=float, metavar="S", help=_help("label_smoothing"))
    optimisation.add_argument("--lr-schedule", choices=SCHEDULES, help=_help("lr_schedule"))
    optimisation.add_argument("--warmup-epochs", type=float, metavar="E", help=_help("warmup_epochs"))
    optimisation.add_argument("--augment", choices=AUGMENTATIONS, help=_help("augment"))
    optimisation.add_argument("--validation-split", type=float, metavar="F", help=_help("validation_split"))
    optimisation.add_argument("--early-stopping-patience", type=int, metavar="N",
                              help=_help("early_stopping_patience"))

    runtime = parser.add_argument_group("runtime and outputs")
    runtime.add_argument("--steps-per-execution", type=int, metavar="N", help=_help("steps_per_execution"))
    runtime.add_argument("--strategy", choices=STRATEGIES, help=_help("strategy"))
    runtime.add_argument("--logical-cpus", type=int, metavar="N", help=_help("logical_cpus"))
    runtime.add_argument("--worker-hosts", type=_str_list, metavar="HOST:PORT,...", help=_help("worker_hosts"))
    runtime.add_argument("--task-index", type=int, metavar="I", help=_help("task_index"))
    runtime.add_argument("--run-dir", metavar="DIR", help=_help("run_dir"))
    runtime.add_argument("--export-dir", metavar="DIR", help=_help("export_dir"))
    runtime.add_argument("--model-name", metavar="NAME", help=_help("model_name"))
    runtime.add_argument("--format", dest="export_formats", type=_str_list, metavar="LIST",
                         help=_help("export_formats"))
    runtime.add_argument("--tensorboard-update-freq", metavar="FREQ", help=_help("tensorboard_update_freq"))
    runtime.add_argument("--histogram-freq", type=int, metavar="N", help=_help("histogram_freq"))
    runtime.add_argument("--profile-batch", metavar="A,B", help=_help("profile_batch"))
    runtime.add_argument("--image-every-epochs", type=int, metavar="N", help=_help("image_every_epochs"))
    runtime.add_argument("--activation-indices", type=_int_list, metavar="I,J,...", help=_help("activation_indices"))


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


FLAG_TABLE_PAGE = "docs/command-line.md"
_FLAG_TABLE_START = ("<!-- The flag table is made from the flags' help (lenet_tf/config.py, lenet_tf/cli.py): edit "
                     "it there, then run: python -c \"from lenet_tf.cli import write_flag_table; "
                     "write_flag_table()\" -->")
_FLAG_TABLE_END = "<!-- end of the flag table -->"


def flag_table_markdown() -> str:
    """docs/command-line.md's table of every `lenet-tf train` flag: its default
    and each preset's value, and its meaning, from the same source as --help."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in _train_parser()._actions:
        if action.dest == "help":
            continue
        if action.nargs == 0:  # On/off: --flag, or --flag / --no-flag.
            invocation = " / ".join(action.option_strings)
        else:
            value = "{" + ",".join(action.choices) + "}" if action.choices else action.metavar
            invocation = f"{action.option_strings[0]} {value}"
        meaning, doc = _meaning(action.dest)
        # "`0`; modern: `0.9`": the default's value without its label.
        default = "; ".join(value if label == "default" else f"{label}: {value}"
                            for label, value in _defaults(action.dest))
        cells = [f"`{invocation}`", default, f"{meaning} {doc}".strip()]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join([_FLAG_TABLE_START, "", *rows, "", _FLAG_TABLE_END])


def write_flag_table(page: str = FLAG_TABLE_PAGE) -> None:
    """Rewrites the flag table of `page` (run from the repository's root) from the flags' help."""
    from pathlib import Path

    from lenet_tf.io_utils import write_text_atomic

    text = Path(page).read_text()
    start, end = text.index(_FLAG_TABLE_START), text.index(_FLAG_TABLE_END) + len(_FLAG_TABLE_END)
    write_text_atomic(Path(page), text[:start] + flag_table_markdown() + text[end:])


def _train_parser() -> argparse.ArgumentParser:
    """The parser of `lenet-tf train`, as build_parser makes it."""
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices["train"]


def _add_tune_flags(parser: argparse.ArgumentParser) -> None:
    from lenet_tf.tune import DEFAULT_MAX_PARAMS, DEFAULT_VALIDATION_SPLIT

    search = parser.add_argument_group("search (the flags above fix a setting for every trial; the rest is searched)")
    search.add_argument("--trials", type=int, required=True, help="how many trials in all, complete or pruned, "
                        "across every worker and every restart")
    search.add_argument("--parallel", type=int, default=1, help="trials trained at once on this machine, each on "
                        "its share of the cores (default: %(default)s)")
    search.add_argument("--max-params", type=int, default=DEFAULT_MAX_PARAMS,
                        help="the largest model a trial may train (default: %(default)s)")
    search.add_argument("--search", action="append", default=[], metavar="NAME=SPEC",
                        help="narrow or widen the search: learning-rate=0.01..0.5 (a range), conv-filters=6,16|16,32 "
                        "(choices), activation=relu (fixed); repeatable (default space: docs/tuning.md)")
    search.add_argument("--no-prune", dest="prune", action="store_false",
                        help="train every trial to its last epoch (default: stop hopeless trials early)")
    parser.set_defaults(tune_validation_split=DEFAULT_VALIDATION_SPLIT)


def _tune_options(args: argparse.Namespace, folder: FolderDataset | None = None):
    """The search a `tune` command asks for: its flags on top of the preset fix settings, the rest is searched.
    `folder`: the --data-dir of pictures (folder_from_args), which every trial trains on."""
    from lenet_tf.tune import SEARCHABLE, TuneOptions, check_options, default_space, parse_search

    if args.validation_split is None:
        args.validation_split = args.tune_validation_split
    user_run_dir = args.run_dir
    base = config_from_args(args, folder)
    if user_run_dir is None:
        base.run_dir += "-tune"
    dataset = folder.info if folder else None
    fixed = {name for name in SEARCHABLE if getattr(args, name, None) is not None}
    space = parse_search(args.search, default_space(base, fixed, dataset), fixed)
    options = TuneOptions(base, args.trials, space, args.max_params, args.parallel, args.prune, dataset)
    check_options(options, count_parameters=False)
    return options


def config_from_args(args: argparse.Namespace, folder: FolderDataset | None = None) -> TrainConfig:
    """Starts from the preset (for a folder of pictures without --preset, the
    folder recipe sized by the folder) and overrides every field the user gave.
    `folder`: the --data-dir of pictures, scanned by folder_from_args(args)."""
    if folder and args.dataset:
        raise UsageError(f"--dataset {args.dataset} does not apply to --data-dir {args.data_dir}, a folder of pictures "
                         "(it is its own dataset); drop --dataset")
    training_pictures = _training_pictures(folder, args.limit_train) if folder else 0
    if folder and args.preset is None:
        config = folder_preset(folder.info, training_pictures)
    else:
        config = preset(args.preset or "classic", folder.info if folder else args.dataset or TrainConfig().dataset)
    for name in TrainConfig.__dataclass_fields__:
        if name == "preset" or (folder and name == "dataset"):  # A folder of pictures is its own dataset.
            continue
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if args.warmup_epochs is None and config.warmup_epochs >= config.epochs:
        # A preset's warm-up longer than the --epochs the user asked for is
        # shortened to half the run, rather than refused over a flag they
        # never gave.
        config.warmup_epochs = config.epochs / 2
    if folder:
        _fit_the_batch_to_the_folder(config, args, training_pictures)
    if args.run_dir is None:
        from lenet_tf.folders import default_name

        config.run_dir = f"runs/{default_name(folder.info if folder else config.dataset)}"
    return config.validate(folder.info if folder else None)


def _training_pictures(folder: FolderDataset, limit_train: int | None) -> int:
    """The folder's training pictures, as many as --limit-train keeps."""
    count = folder.training_count()
    return count if limit_train is None else min(count, limit_train)


def _fit_the_batch_to_the_folder(config: TrainConfig, args: argparse.Namespace, training_pictures: int) -> None:
    """A preset's batch larger than a small folder's training part becomes the
    largest power of two it holds, rather than an error asking for
    --limit-train; a --batch-size the user gave is theirs to change."""
    kept = training_pictures - validation_count(training_pictures, config.validation_split)
    if args.batch_size is None and kept > 0 and config.batch_size > kept:
        config.batch_size = power_of_two_at_most(kept)


def folder_first_lines(config: TrainConfig, folder: FolderDataset) -> list[str]:
    """The first lines of a run on a folder of pictures: what was chosen and
    why, and the pictures that were not read."""
    unread = folder.listing.unread_note()
    return [_folder_recipe_note(config, _training_pictures(folder, config.limit_train))] + ([unread] if unread else [])


def _folder_recipe_note(config: TrainConfig, training_pictures: int) -> str:
    validation = validation_count(training_pictures, config.validation_split)
    kept = training_pictures - validation
    steps = -(-kept // config.batch_size) * config.epochs
    if config.preset == "folder":
        why = (f"the folder recipe for {kept} training pictures: batch {config.batch_size}, up to "
               f"{config.epochs} epochs ({steps} steps)")
    else:
        why = f"the {config.preset} preset: batch {config.batch_size}, {config.epochs} epochs ({steps} steps)"
    held_out = (f"; {validation} pictures held out for validation"
                + (f", stopping after {config.early_stopping_patience} epochs without a better accuracy and "
                   "keeping the best epoch" if config.early_stopping_patience else "")
                if validation else "")
    return f"{why}{held_out}; any flag overrides (docs/folders.md)"


def folder_from_args(args: argparse.Namespace) -> FolderDataset | None:
    """When --data-dir holds class folders of pictures, the folder as a value
    (scanned and checked, no picture read), which the command hands to
    config_from_args and to training; None for any other --data-dir."""
    from lenet_tf.folders import DEFAULT_TEST_SPLIT, FolderDataset, detect_layout

    if not args.data_dir or detect_layout(args.data_dir) == "idx":
        if args.test_split is not None or args.flip_keeps_class:
            raise UsageError("--test-split and --flip-keeps-class are for a --data-dir of class folders of pictures")
        return None
    folder = FolderDataset.scan(args.data_dir, DEFAULT_TEST_SPLIT if args.test_split is None else args.test_split,
                                TrainConfig().seed if args.seed is None else args.seed, args.flip_keeps_class)
    # Absolute in the run's config.json: export --run-dir and evaluate may run from another folder.
    args.data_dir = str(folder.root)
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lenet-tf", description="Train, export and serve LeNet-5 on Fashion-MNIST and MNIST.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train, evaluate and export a model")
    _add_train_flags(train)
    train.add_argument("--summary", action="store_true", help=_help("summary"))

    tune = commands.add_parser("tune", help="search the training settings: many small trials, one study (docs/tuning.md)")
    _add_train_flags(tune)
    _add_tune_flags(tune)

    summary = commands.add_parser("summary", help="print each layer's output shape and parameters")
    _add_train_flags(summary)

    export = commands.add_parser("export", help="export a run's checkpoint without retraining")
    export.add_argument("--run-dir", required=True, help="a run directory written by `lenet-tf train`")
    export.add_argument("--format", dest="export_formats", type=_str_list, help=f"comma list of {', '.join(EXPORT_FORMATS)} (default: the run's)")
    export.add_argument("--export-dir", help="where to write (default: the run's)")

    evaluate = commands.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix of a model")
    evaluate.add_argument("--model", required=True, help="a .keras checkpoint, a SavedModel folder (or its parent with versions), a .tflite or an .onnx file")
    evaluate.add_argument("--dataset", choices=dataset_names(), help="test split to use (default: the model's, from its model card)")
    evaluate.add_argument("--data-dir", help="folder with the IDX files, or a copy of the folder of pictures the model was trained on (default: searched as for training, or the folder the model card names)")
    evaluate.add_argument("--limit-test", type=int, help="evaluate on the first N test images only")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.add_argument("--no-verify", dest="verify", action="store_false",
                          help="load the model even if its files differ from the SHA-256s in its model card")

    predict = commands.add_parser("predict", help="classify image files (PNG, JPEG, ...)")
    predict.add_argument("--model", required=True, help="a .keras checkpoint, a SavedModel folder, a .tflite or an .onnx file")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files of any size, colour or grey")
    predict.add_argument("--dataset", choices=dataset_names(), help="class names to use (default: the model's)")
    predict.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                         help="invert dark-on-light pictures: auto decides from the border (default: %(default)s)")
    predict.add_argument("--top", type=int, help="how many classes to show (default: 3, or all of a model's 2)")
    predict.add_argument("--json", action="store_true", help="JSON Lines on stdout, one object per file")
    predict.add_argument("--no-verify", dest="verify", action="store_false",
                         help="load the model even if its files differ from the SHA-256s in its model card")

    web = commands.add_parser("serve-web", help="serve the web page of an export made with --format web")
    web.add_argument("--model-dir", required=True, help="an export version folder with web/ (or its parent: the newest version)")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    web.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    web.add_argument("--no-verify", dest="verify", action="store_false",
                     help="serve the page even if its files differ from the SHA-256s in the model card")

    board = commands.add_parser("tensorboard", help="serve a run (or a folder of runs) in TensorBoard")
    board.add_argument("--run-dir", default="runs", help="a run directory or a folder of them (default: %(default)s)")
    board.add_argument("--host", default="127.0.0.1", help="address to bind; localhost unless you mean to share it (default: %(default)s)")
    board.add_argument("--port", type=int, default=6006, help="0 picks a free port (default: %(default)s)")
    return parser


def _train(args) -> int:
    if args.summary:
        return _summary(args)
    from lenet_tf.train import train_and_evaluate

    # The wait a user sees starts with the process: TensorFlow's import counts.
    train_and_evaluate(args.config, started=process_start_time(), background_load=args.background_load,
                       dataset=_dataset(args))
    return 0


def _tune(args) -> int:
    from lenet_tf.tune import (
        WORKER_VARIABLE, ParallelWorkers, finish, run_worker, start_worker, train_trials, wait_for_go_ahead,
    )

    options = args.tune_options
    if os.environ.get(WORKER_VARIABLE):  # Started by a --parallel K run, whose first worker checks and finishes.
        import_tensorflow_quietly()
        if wait_for_go_ahead():
            run_worker(options)
        return 0
    if options.parallel > 1:
        workers = ParallelWorkers(options, args.argv)  # Before this import: the K imports run at once.
        with workers.own_share():
            try:
                # A mistake found here ends the others before they touch anything: one line.
                _import_tensorflow_and_check(options, threads=len(workers.own_cpus))
                started = start_worker(options, worker=0)
            except BaseException:
                workers.cancel()
                raise
            code = workers.run(started, options)
        if code:
            return code
    else:
        _import_tensorflow_and_check(options)
        started = start_worker(options)
        train_trials(started, options)
    if finish(options, started.datasets) is None:
        print("tune: the remaining trials are in other workers' hands; the last one to finish writes best.json",
              flush=True)
    return 0


def _import_tensorflow_and_check(options, threads: int | None = None) -> None:
    """TensorFlow's import, then the check of --max-params against the models'
    parameter counts. `threads`: the size of TensorFlow's thread pools for a
    worker of --parallel, set before the check's models start its runtime."""
    from lenet_tf.tune import check_options, size_thread_pools

    import_tensorflow_quietly()
    if threads is not None:
        size_thread_pools(threads)
    check_options(options)


def _check_flags_and_start_reading_data(args) -> None:
    """Before TensorFlow's import, for `train` and `summary`: turns the flags
    into `args.config`, so that a mistake is reported at once rather than
    after the import's seconds (UsageError); a --data-dir of pictures is
    scanned once, into `args.folder`, the value every later stage takes; for
    a training run, also starts reading its data into `args.background_load`,
    which the import does not need (None when nothing is read)."""
    args.folder = folder_from_args(args) if args.command in ("train", "summary", "tune") else None
    args.config = config_from_args(args, args.folder) if args.command in ("train", "summary") else None
    args.tune_options = _tune_options(args, args.folder) if args.command == "tune" else None
    args.background_load = None
    if args.command == "train" and not args.summary:
        if args.folder:
            print("\n".join(folder_first_lines(args.config, args.folder)), flush=True)
        args.background_load = BackgroundLoad(_dataset(args) or args.config.dataset, args.config.data_dir)


def _dataset(args) -> DatasetInfo | None:
    """The dataset of a train, summary or tune command as a value: the folder of pictures', else None (built-in)."""
    return args.folder.info if args.folder else None


def _summary(args) -> int:
    from lenet_tf.model import build_model, layer_summary

    layer_summary(build_model(args.config, _dataset(args)), sys.stdout)
    return 0


def _export(args) -> int:
    from lenet_tf.export import export_from_run_dir

    result = export_from_run_dir(args.run_dir, args.export_formats, args.export_dir)
    for name, path in result.artifacts.items():
        print(f"{name}: {path}")
    return 0


def _model_dataset(args) -> str | DatasetInfo:
    """The dataset whose classes and framing the model answers in: a built-in's
    name, or the value of the folder of pictures it was trained on (from its card)."""
    from lenet_tf.evaluate import dataset_of_model

    trained_on = dataset_of_model(args.model)
    trained_name = trained_on.name if isinstance(trained_on, DatasetInfo) else trained_on
    if args.dataset and trained_name and args.dataset != trained_name:
        # The class names (and the image framing) would be another dataset's.
        raise UsageError(f"--dataset {args.dataset} does not match the model, which was trained on {trained_name}; "
                         "leave --dataset out to use the model's own")
    return args.dataset or trained_on or "fashion_mnist"


def _evaluate(args) -> int:
    import json

    from lenet_tf.data import load_datasets
    from lenet_tf.evaluate import evaluate_predictor, format_evaluation
    from lenet_tf.inference import load_predictor

    if args.limit_test is not None and args.limit_test <= 0:
        raise UsageError(f"--limit-test must be a positive integer (got {args.limit_test})")
    dataset = _model_dataset(args)
    predictor = load_predictor(args.model, verify=args.verify)
    data = load_datasets(dataset, args.data_dir).limited(None, args.limit_test)
    result = evaluate_predictor(predictor, data.test_images, data.test_labels, dataset)
    print(json.dumps(result) if args.json else format_evaluation(result))
    return 0


def _predict(args) -> int:
    import json

    from lenet_tf.evaluate import predict_files
    from lenet_tf.inference import load_predictor

    predictor = load_predictor(args.model, verify=args.verify)
    results = predict_files(predictor, args.images, _model_dataset(args), args.invert, args.top)
    for result in results:
        if "error" in result:
            print(f"lenet-tf predict: error: {result['error']}", file=sys.stderr)
        elif args.json:
            print(json.dumps(result))
        else:
            tops = ", ".join(f"{entry['class_name']} {entry['probability']:.3f}" for entry in result["top"])
            print(f"{result['file']}: {tops}")
    # Partial success still reports the failures in the exit code.
    return 2 if any("error" in result for result in results) else 0


def _tensorboard(args) -> int:
    from pathlib import Path

    if "tensorflow" not in sys.modules:
        # TensorBoard and its profile plugin import TensorFlow when they can,
        # for features that local log folders do not need (remote storage,
        # capturing a live profile); without it they read the logs with
        # TensorBoard's own reader, as where TensorFlow is not installed. A
        # None entry makes `import tensorflow` fail in this process.
        sys.modules["tensorflow"] = None
    from tensorboard import program

    if not Path(args.run_dir).is_dir():
        raise UsageError(f"--run-dir {args.run_dir} is not a folder; train first or pass a run directory")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535 (got {args.port})")
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", args.run_dir, "--host", args.host, "--port", str(args.port)])
    try:
        url = board.launch()
    except program.TensorBoardPortInUseError:
        raise UsageError(f"port {args.port} on {args.host} is already in use; pass --port 0 to pick a free "
                         "port, or choose another --port") from None
    except program.TensorBoardServerException as error:
        raise UsageError(f"TensorBoard cannot serve on {args.host}:{args.port}: {error.msg}") from None
    print(f"TensorBoard serving {args.run_dir} at {url} (Ctrl-C to stop)", flush=True)
    try:
        import threading

        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


def _serve_web(args) -> int:
    from lenet_tf.webpage import make_server, web_dir_of

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535 (got {args.port})")
    server = make_server(web_dir_of(args.model_dir, verify=args.verify), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving the page at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


HANDLERS = {
    "train": _train, "tune": _tune, "summary": _summary, "export": _export, "evaluate": _evaluate,
    "predict": _predict, "tensorboard": _tensorboard, "serve-web": _serve_web,
}
# Servers of files already written: they start at once, without TensorFlow's import.
WITHOUT_TENSORFLOW = ("serve-web", "tensorboard")
# It imports TensorFlow itself, once it has started what must not wait for the
# import (the other workers of --parallel, which import it meanwhile).
IMPORTS_TENSORFLOW_ITSELF = ("tune",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A `tune --parallel K` starts its workers with the same arguments.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.argv[:1] == [args.command]:
        args.argv = args.argv[1:]
    try:
        _check_flags_and_start_reading_data(args)
    except UsageError as error:
        return _report_error(args.command, error)
    stop_signals: list[int] = []
    unraisable_hook = sys.unraisablehook
    try:
        with _stop_signals_as_interrupts(stop_signals):
            if args.command not in WITHOUT_TENSORFLOW + IMPORTS_TENSORFLOW_ITSELF:
                # Inside: Ctrl-C in the seconds TensorFlow takes to import is a
                # stop like any other, not a traceback from its import machinery.
                import_tensorflow_quietly()
            exit_code = HANDLERS[args.command](args)
        if stop_signals and args.command not in WITHOUT_TENSORFLOW:  # A server ends on Ctrl-C: that is its end.
            # The stop's interrupt was lost somewhere no safe point came after
            # (see lenet_tf/stop.py): the work is done, but the stop is still reported.
            return _report_stop(args.command, stop_signals)
        return exit_code
    except (UsageError, ParityError, StoppedError) as error:
        if stop_signals and isinstance(error, StoppedError):
            # Stopped together (scancel signals every task): a peer that stopped
            # first looks lost to this one, but the stop is what happened.
            return _report_stop(args.command, stop_signals)
        return _report_error(args.command, error)
    except KeyboardInterrupt:
        return _report_stop(args.command, stop_signals)
    except Exception as error:
        if stop_signals and _passed_on_stop(error):
            return _report_stop(args.command, stop_signals)
        reason = _out_of_memory(error)
        if reason is None:
            raise  # A bug: keep the traceback.
        print(f"lenet-tf {args.command}: error: ran out of memory ({reason}); lower --batch-size or the layer "
              "widths (--conv-filters, --dense-units)", file=sys.stderr)
        return 2
    finally:
        if stop_signals:
            # The stop raised wherever the main thread was, perhaps inside a
            # constructor (TensorFlow's ScopedTFImportGraphDefOptions) whose
            # __del__ then fails on the half-built object, and Python would print
            # that as a traceback after the one line. Those objects are freed
            # with the stop's exception, by now, or by this collection; what
            # their finalizers raise was dropped (the stop's handler set the hook).
            # Others live until the process exits (a multiprocessing pool the
            # stop left open, whose __del__ writes to a pipe already closed):
            # their errors are dropped then too.
            import atexit
            import gc

            gc.collect()
            sys.unraisablehook = unraisable_hook
            atexit.register(setattr, sys, "unraisablehook", _drop_unraisable)


def _report_error(command: str, error: UsageError | ParityError | StoppedError) -> int:
    print(f"lenet-tf {command}: error: {error}", file=sys.stderr)
    return error.exit_code


@contextlib.contextmanager
def _stop_signals_as_interrupts(received: list[int]):
    """For the duration, SIGINT (Ctrl-C) and SIGTERM (kill, docker stop, a
    scheduler) raise KeyboardInterrupt in the main thread and are recorded
    in `received`: a stopped run cleans up as its `finally` blocks say (an
    export removes its unfinished version) instead of the process vanishing
    mid-write, as it does on SIGTERM by default. The previous handlers come
    back afterwards (tests call main() inside pytest's process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # Only the main thread may set signal handlers.
        return

    def interrupt(signal_number, frame):
        if _in_a_finalizer(frame):
            # Python prints and drops an exception raised in a finalizer (a
            # __del__ or multiprocessing's Finalize), and the run would train on
            # as if never stopped: deliver the signal again once it has returned.
            threading.Timer(0.05, os.kill, (os.getpid(), signal_number)).start()
            return
        received.append(signal_number)  # Also what stop.raise_if_requested() reads, at the next safe point.
        if stop.deferring():
            return  # Raised when the block that must not be interrupted ends.
        sys.unraisablehook = _drop_unraisable  # Until main() has freed what the stop left half-built.
        raise KeyboardInterrupt()

    stop.watch(received)
    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop.forget()


def _drop_unraisable(unraisable) -> None:
    """sys.unraisablehook after a stop: a finalizer's error on what the stop interrupted."""


def _in_a_finalizer(frame) -> bool:
    """Whether the main thread is running a finalizer, where an exception is printed and dropped."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "__call__" and code.co_filename.endswith(
                os.path.join("multiprocessing", "util.py"))):
            return True
        frame = frame.f_back
    return False


def _report_stop(command: str, received: list[int]) -> int:
    """One line for a run stopped by a signal; the shell's exit code, 128 + the signal."""
    import signal

    if signal.SIGTERM in received:
        print(f"lenet-tf {command}: terminated (SIGTERM); run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"lenet-tf {command}: interrupted; run the same command again to resume", file=sys.stderr)
    return 128 + signal.SIGINT


# pybind11's RuntimeError for a Python exception that changed type on its way
# through C++ (seen for a SIGTERM during the SavedModel export's tracing).
# The interrupt is the replacement when the stop lands while TensorFlow
# raises an error of its own (a multi-worker peer that stopped first).
_PYBIND11_INTERRUPT = re.compile(r"MISMATCH of original and normalized active exception types: "
                                 r"ORIGINAL (KeyboardInterrupt|\w+ REPLACED BY KeyboardInterrupt)")


def _passed_on_stop(error: Exception) -> bool:
    """Whether `error` is a stop's KeyboardInterrupt that C++ code passed on as
    another exception, rather than a bug that happened after a stop signal.

    Two wrappings: pybind11's RuntimeError naming the original KeyboardInterrupt,
    and the tf.errors.UnknownError of TensorFlow's runtime for a Python
    function it called (tf.py_function, tf.data's from_generator and map),
    whose first line names the exception that function raised.
    """
    if isinstance(error, RuntimeError) and _PYBIND11_INTERRUPT.search(str(error)):
        return True
    tf = sys.modules.get("tensorflow")
    return (tf is not None and isinstance(error, tf.errors.UnknownError)
            and "KeyboardInterrupt:" in (str(error).splitlines() or [""])[0])


def _out_of_memory(error: Exception) -> str | None:
    """What ran out, for an out-of-memory error (a model or batch too large for
    this machine, usually absurd widths); None for any other error."""
    import re

    # Not imported here: the error may be TensorFlow's own import failing.
    tf = sys.modules.get("tensorflow")
    exhausted = (MemoryError,) + ((tf.errors.ResourceExhaustedError,) if tf is not None else ())
    if not isinstance(error, exhausted):
        return None
    # TensorFlow's message is several lines of graph context around this part.
    detail = re.search(r"OOM when allocating tensor with shape\[[^\]]*\]", str(error))
    return detail.group(0) if detail else (str(error).splitlines() or [type(error).__name__])[0][:200]


if __name__ == "__main__":
    sys.exit(main())
