"""One typed config for every knob of a run, with named presets.

The CLI is the only place that knows about flags: it turns them into a
`TrainConfig` and hands that to the library. Tests build configs directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenet_tf.errors import UsageError
from lenet_tf.registry import IMAGE_SIZE, DatasetInfo, dataset_info, resolve_dataset

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
ACTIVATIONS = ("sigmoid", "relu")
POOLINGS = ("avg", "max")
EXPORT_FORMATS = ("saved_model", "tflite", "tflite-fp16", "tflite-dynamic", "tflite-int8", "micro", "onnx", "web")
PRESETS = ("classic", "modern", "fast", "best")
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("sgd", "muon")
AUGMENTATIONS = ("none", "shift", "flip", "shift_flip")
MAX_SEED = 2**32 - 1


def flag(default: Any, help: str, *, doc: str = "", default_text: str = "") -> Any:
    """A TrainConfig field that is a command-line flag, with what it means to a user.

    help: the meaning, for `--help` and docs/command-line.md alike; code in
        backticks, and a [label](page.md) link shows as docs/page.md in `--help`.
    doc: more for docs/command-line.md only (details, links to other pages).
    default_text: the default in words, where the value itself would mislead
        (None for "searched", an empty tuple for "the first of each class").
    The CLI adds the default and each preset's value (lenet_tf.cli).
    """
    metadata = {"help": help, "doc": doc, "default_text": default_text}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that decides what a run computes and where it writes.

    The defaults are the book's classic LeNet-5 run (D2L, chapter 7.6):
    sigmoid activations, average pooling, SGD at learning rate 0.9, batch 256,
    10 epochs. Each field is the flag of the same name (`--format` for
    export_formats); its `help` says what it means.
    """

    # Which named starting point this config came from (recorded, not applied).
    preset: str = flag(
        "classic",
        "named configuration, whose fields the other flags override: classic = the book's LeNet-5 and training; "
        "modern = ReLU, max pooling, batch norm, momentum, cosine schedule, augmentation; fast = the shortest wait "
        "for a good model; best = the most accurate under 100,000 parameters; their times and accuracies: "
        "[Results](results.md)",
        doc="(`best`: about 10 minutes on 2 cores, [Speedrun](speedrun.md#beyond-093-on-fashion-mnist))",
        default_text="`classic`; for a --data-dir of pictures, the folder recipe: modern, its batch and length "
        "sized by the folder, early stopping on a validation part ([Your own pictures](folders.md))",
    )

    # --- data -------------------------------------------------------------
    dataset: str = flag("fashion_mnist", "which dataset; not with a --data-dir of pictures, which is its own dataset",
                        default_text="`fashion_mnist`")
    # None searches the usual places (lenet_tf.data.find_data_dir).
    data_dir: str | None = flag(
        None,
        "folder with the four IDX files (`.gz` or not), or your own pictures: one subfolder per class, or `train/` "
        "and `test/` each with the same class subfolders ([Your own pictures](folders.md))",
        doc="(the search: [Where the data comes from](#where-the-data-comes-from))",
        default_text="searched: `$LENET_TF_DATA_DIR`, `/usr/share/datasets/fashion-mnist`, "
        "`~/.keras/datasets/<name>`, then tensorflow_datasets",
    )
    limit_train: int | None = flag(None, "train on the first N examples only, for quick runs",
                                   default_text="all")
    limit_test: int | None = flag(None, "evaluate on the first N examples only", default_text="all")

    # --- model ------------------------------------------------------------
    # The book's LeNet predates ReLU.
    activation: str = flag("sigmoid", "activation of the conv and hidden dense layers")
    # LeNet-5 subsamples by averaging.
    pooling: str = flag("avg", "the 2x2 pooling after each conv layer")
    conv_filters: tuple[int, ...] = flag(
        (6, 16), "filters per conv layer, comma-separated; as many conv layers as numbers")
    kernel_size: tuple[int, ...] = flag((5,), "conv kernel size: one for every conv layer, or one per layer, e.g. 5,3")
    # "valid" is a quarter less work for that layer.
    first_conv_padding: str = flag(
        "same", "padding of the first conv layer: `same` pads the 28x28 image to play LeNet's 32x32, as the book "
        "does; `valid` skips the border")
    dense_units: tuple[int, ...] = flag((120, 84), "hidden dense widths before the output layer, comma-separated")
    # MNIST's digits sit in the central 20x20, its border nearly blank.
    crop: int = flag(
        0, "pixels cut from each side of the 28x28 image before the first conv, inside the model: every exported "
        "format still takes 28x28 images",
        doc="(a whitened first layer is computed from the cropped patches; "
        "[Speedrun](speedrun.md#cropping-mnists-border))")
    batch_norm: bool = flag(False, "batch normalisation after each conv and hidden dense layer, before its activation")
    dense_batch_norm: bool = flag(True, "with --batch-norm, also after the hidden dense layers")
    # Its output is the largest tensor of the model and so the costliest to normalise.
    first_conv_batch_norm: bool = flag(True, "with --batch-norm, also after the first conv layer, the costliest one")
    # The same accuracy in fewer steps, and each step skips that layer's weight
    # gradient (lenet_tf.model.whitening_weights).
    whiten_first_conv: bool = flag(
        False, "fix the first conv layer's kernels to the principal components of the training images' patches, "
        "scaled to unit variance (PCA whitening), and do not train them",
        doc="([Speedrun](speedrun.md#the-whitened-first-layer))")
    # Keras's default 0.99 averages over ~100 steps; short runs need fewer.
    batch_norm_momentum: float = flag(
        0.99, "weight of the old value in batch norm's moving mean and variance per step; short runs want less",
        doc="([Speedrun](speedrun.md))")
    dropout: float = flag(0.0, "dropout rate after each hidden dense layer; 0 disables it")
    # Inside the model (lenet_tf.model.FlipViews): every format runs the model.
    test_time_flip: bool = flag(
        False, "in inference the model averages each image's logits with those of its left-right mirror, so "
        "evaluation, `predict` and every exported format give the averaged answer; twice the inference cost; "
        "refused for digits, which change meaning in a mirror",
        doc="([Speedrun](speedrun.md#flip-test-time-augmentation))")

    # --- optimisation -----------------------------------------------------
    # Muon trained the fast preset to more accuracy per second (docs/speedrun.md).
    optimizer: str = flag(
        "sgd", "`sgd` (the book's), or `muon`: orthogonalised momentum updates for the dense and conv kernels, "
        "AdamW for biases and batch norm (Keras's Muon, extended to the conv kernels); momentum, Nesterov, weight "
        "decay and the schedule apply to either",
        doc="([Speedrun](speedrun.md#muon))")
    # Fewer are cheaper, more are closer to orthogonal; Keras's 5 by default.
    muon_ns_steps: int = flag(
        5, "with muon: the Newton-Schulz iterations that orthogonalise each kernel's update (Keras's `ns_steps`)",
        doc="([Speedrun](speedrun.md#muon))")
    # Large, because sigmoid nets train slowly with plain SGD.
    learning_rate: float = flag(0.9, "the peak learning rate of the schedule")
    # So that one CPU or one GPU sees the book's batch of 256.
    batch_size: int = flag(256, "batch size per replica; the global batch is this times the number of replicas")
    epochs: int = flag(10, "how many epochs to train; with --early-stopping-patience, at most this many")
    seed: int = flag(0, "seeds Python, NumPy, TensorFlow and the shuffle")
    # The book uses plain SGD.
    momentum: float = flag(0.0, "momentum of either optimizer")
    nesterov: bool = flag(False, "Nesterov momentum")
    weight_decay: float = flag(
        0.0, "decoupled weight decay (with muon: for the kernels and the AdamW part alike); 0 disables it")
    label_smoothing: float = flag(0.0, "label smoothing of the cross-entropy loss")
    lr_schedule: str = flag(
        "constant", "the learning rate after the warm-up: hold it, cosine decay to 0, or linear decay to 0 (with a "
        "warm-up, the triangular one-cycle shape)")
    warmup_epochs: float = flag(0.0, "linear learning-rate warm-up from 0, in epochs (fractions allowed)")
    # In the input pipeline: the model is unchanged.
    augment: str = flag(
        "none", "training-time random shifts of up to 2 pixels and/or left-right flips; flips are refused for "
        "digits")
    # Chosen by a seeded shuffle; 0 is the book's way.
    validation_split: float = flag(
        0.0, "hold out this fraction of the training split for validation, and evaluate the test split once, at "
        "the end; 0 validates on the test split every epoch")
    early_stopping_patience: int = flag(
        0, "with --validation-split: stop after N epochs without a better validation accuracy and keep the best "
        "epoch's weights; 0 trains every epoch and keeps the last")

    # --- runtime ----------------------------------------------------------
    # More means fewer Python round trips per epoch (LeNet's steps are so short
    # that they matter); callbacks still see every epoch. The fastest of the
    # values tried (docs/benchmarks.md).
    steps_per_execution: int = flag(
        64, "training steps per call into TensorFlow; 1 under the tf.distribute strategies other than default, "
        "where Keras 3.15 fails with more")
    strategy: str = flag(
        "auto", "tf.distribute strategy; auto = multi_worker over the tasks of a SLURM step (`srun -n N`), else "
        "mirrored on GPUs, default on CPU; multi_worker takes --worker-hosts or `TF_CONFIG`",
        doc="([Distributed](distributed.md#slurm))")
    # Before TensorFlow starts; for tests and demos of several replicas without a GPU.
    logical_cpus: int = flag(
        0, "split the CPU into N logical devices, e.g. for --strategy mirrored without GPUs; 0 = no split")
    worker_hosts: tuple[str, ...] = flag(
        (), "multi-worker without `TF_CONFIG`: comma-separated host:port of every worker",
        default_text="use `TF_CONFIG`")
    task_index: int | None = flag(None, "multi-worker: this worker's index in --worker-hosts",
                                  default_text="use `TF_CONFIG`")
    # The CLI puts runs/<dataset> here unless --run-dir says otherwise.
    run_dir: str = flag(
        "runs/fashion_mnist",
        "where config, logs, checkpoints and metrics go: the same command resumes an interrupted run there, and "
        "trains a new run beside a finished one (`DIR-2`, ...); one training at a time per folder",
        doc="([Resuming and new runs](troubleshooting.md#resuming-and-new-runs))",
        default_text="`runs/<dataset>`, or `runs/<folder name>` for a --data-dir of pictures")
    export_dir: str = flag("exports", "where exported models go")
    model_name: str | None = flag(
        None, "exports go to `<export-dir>/<model-name>/<version>/`",
        default_text="`lenet_<dataset>`, or `lenet_<folder name>` for a --data-dir of pictures")
    # Every TFLite variant is converted from the SavedModel.
    export_formats: tuple[str, ...] = flag(
        ("saved_model", "tflite"),
        f"comma-separated export formats, of {', '.join(EXPORT_FORMATS)}, with saved_model among them; an empty "
        "string disables export",
        doc="([Exports](exports.md))")
    # "epoch" keeps the overhead of per-batch writes away.
    tensorboard_update_freq: str = flag("epoch", "how often TensorBoard's scalars are written: `epoch`, `batch` "
                                                 "or every N batches")
    histogram_freq: int = flag(0, "TensorBoard weight histograms every N epochs; 0 = off")
    profile_batch: str = flag("", "TensorBoard profiler over one batch or a range A,B, e.g. 10,20",
                              doc="(the `profile` extra shows it)", default_text="off")
    image_every_epochs: int = flag(
        5, "TensorBoard image dashboards (confusion matrix, predictions, activations, out-of-distribution) every "
        "N epochs and always at the end; 0 = only at the end")
    activation_indices: tuple[int, ...] = flag(
        (), "test-set indices whose conv activations the dashboards show",
        default_text="the first test image of each class")

    def validate(self, dataset: DatasetInfo | None = None) -> "TrainConfig":
        """Raises UsageError naming the first bad field; returns self.

        `dataset`: the dataset the run reads, when it is a value rather than
        a built-in's name (a folder of pictures: FolderDataset.info); its
        name must be `self.dataset`.
        """
        info = resolve_dataset(self.dataset, dataset)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("pooling", self.pooling, POOLINGS)
        for name in ("epochs", "batch_size", "steps_per_execution", "muon_ns_steps"):
            _positive(name, getattr(self, name))
        _choice("first_conv_padding", self.first_conv_padding, ("same", "valid"))
        if not isinstance(self.crop, int) or isinstance(self.crop, bool) or self.crop < 0:
            raise UsageError(f"--crop must be a whole number of pixels, 0 or more (got {self.crop!r})")
        if not self.kernel_size or len(self.kernel_size) not in (1, len(self.conv_filters)):
            raise UsageError(f"--kernel-size needs one size, or one per conv layer ({len(self.conv_filters)}); "
                             f"got {','.join(map(str, self.kernel_size)) or 'none'}")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                # NaN slips past every comparison below, and inf trains to NaN.
                raise UsageError(f"--{field.name.replace('_', '-')} must be a finite number (got {value})")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be a positive number (got {self.learning_rate})")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            # NumPy's and TensorFlow's global seeds are unsigned 32-bit numbers.
            raise UsageError(f"--seed must be an integer from 0 to {MAX_SEED} (got {self.seed})")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("augment", self.augment, AUGMENTATIONS)
        if not info.flip_keeps_class:
            for flag, mirrors, remedy in ((f"--augment {self.augment}", "flip" in self.augment, "use shift or none"),
                                          ("--test-time-flip", self.test_time_flip, "use --no-test-time-flip")):
                if mirrors:
                    raise UsageError(f"{flag} mirrors images, which changes the class of {self.dataset} images "
                                     f"(a mirrored digit is another shape); {remedy}")
        for name in ("momentum", "label_smoothing", "validation_split", "batch_norm_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(self, name)})")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise UsageError("--weight-decay and --warmup-epochs must be 0 or more")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise UsageError(f"--warmup-epochs ({self.warmup_epochs}) must be fewer than --epochs ({self.epochs})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not self.conv_filters:
            raise UsageError("--conv-filters needs at least one conv layer, e.g. 6,16")
        for name in ("conv_filters", "dense_units", "kernel_size"):
            for value in getattr(self, name):
                _positive(name, value)
        self._check_conv_stack_fits_the_image()
        for export_format in self.export_formats:
            _choice("format", export_format, EXPORT_FORMATS)
        if self.export_formats and "saved_model" not in self.export_formats:
            # Every TFLite variant is converted from the SavedModel.
            raise UsageError("--format must include saved_model: the TFLite files are converted from it")
        if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 0:
            raise UsageError(f"--early-stopping-patience must be a whole number of epochs, 0 or more "
                             f"(got {self.early_stopping_patience!r})")
        if self.early_stopping_patience and not self.validation_split:
            # Choosing the epoch on the test split would make its accuracy an optimistic guess.
            raise UsageError("--early-stopping-patience needs --validation-split: the epoch to keep is chosen on "
                             "pictures held out from training, never on the test split")
        if self.logical_cpus < 0:
            raise UsageError(f"--logical-cpus must be 0 or more (got {self.logical_cpus})")
        if self.image_every_epochs < 0:
            raise UsageError(f"--image-every-epochs must be 0 or more (got {self.image_every_epochs})")
        if any(index < 0 for index in self.activation_indices):
            raise UsageError("--activation-indices must be test-set indices (0 or more)")
        if self.histogram_freq < 0:
            raise UsageError(f"--histogram-freq must be 0 or more (got {self.histogram_freq})")
        if self.tensorboard_update_freq not in ("epoch", "batch") and not self.tensorboard_update_freq.isdigit():
            raise UsageError(
                f"--tensorboard-update-freq must be 'epoch', 'batch' or a number of batches "
                f"(got {self.tensorboard_update_freq!r})"
            )
        self._check_profile_batch()
        if self.model_name is not None and (not self.model_name.strip() or self.model_name in (".", "..")
                                            or any(sep in self.model_name for sep in ("/", "\\"))):
            # Exports go to <export_dir>/<model_name>/<version>/: a path here would write elsewhere.
            raise UsageError(f"--model-name must be a plain folder name, without '/' (got {self.model_name!r})")
        if self.worker_hosts and self.task_index is None:
            raise UsageError("--worker-hosts needs --task-index (this worker's position in the list)")
        if self.task_index is not None and not 0 <= self.task_index < max(len(self.worker_hosts), 1):
            raise UsageError(
                f"--task-index {self.task_index} is outside --worker-hosts (0..{len(self.worker_hosts) - 1})"
            )
        return self

    def _check_profile_batch(self) -> None:
        """--profile-batch is empty, one batch number, or "start,stop" (Keras's TensorBoard format)."""
        if not self.profile_batch:
            return
        parts = self.profile_batch.split(",")
        numbers = [int(part) for part in parts if part.strip().isdigit()]
        if len(numbers) != len(parts) or len(numbers) > 2 or (len(numbers) == 2 and not 0 < numbers[0] <= numbers[1]):
            raise UsageError(f"--profile-batch must be a batch number or a range 'start,stop' such as 10,20 "
                             f"(got {self.profile_batch!r})")

    def _check_conv_stack_fits_the_image(self) -> None:
        """Each conv block (conv, then a 2x2 pool) must leave at least one pixel
        of the 28x28 image less its crop, or Keras fails mid-build with a shape error."""
        side = IMAGE_SIZE - 2 * self.crop
        if side < 1:
            raise UsageError(f"--crop {self.crop} leaves nothing of the {IMAGE_SIZE}x{IMAGE_SIZE} image; "
                             f"crop at most {(IMAGE_SIZE - 1) // 2} pixels from each side")
        for index, kernel_size in enumerate(self.conv_kernel_sizes(), start=1):
            padded = index == 1 and self.first_conv_padding == "same"
            side = (side if padded else side - kernel_size + 1) // 2
            if side < 1:
                raise UsageError(
                    f"conv layer {index} (kernel {kernel_size}) leaves nothing of the {IMAGE_SIZE}x{IMAGE_SIZE} "
                    "image after its 2x2 pooling; use smaller --kernel-size, fewer --conv-filters layers"
                    + (" or a smaller --crop" if self.crop else "")
                )

    def conv_kernel_sizes(self) -> tuple[int, ...]:
        """One kernel size per conv layer."""
        return self.kernel_size * len(self.conv_filters) if len(self.kernel_size) == 1 else self.kernel_size

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        from lenet_tf.io_utils import write_json_atomic

        write_json_atomic(path, self.to_json_dict())

    @classmethod
    def from_json_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                continue  # A config written by a newer version: ignore what we don't know.
            if key == "kernel_size" and isinstance(value, int):
                value = [value]  # Written before kernel sizes could differ per layer.
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @classmethod
    def read(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_json_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read run config {path}: {error}") from None


@dataclass(frozen=True)
class IfMirrorKeepsClass:
    """A preset setting that depends on whether a left-right mirror image keeps
    its class (clothes: yes; digits: no; a folder of pictures: as its user says)."""

    mirror_keeps_class: Any
    otherwise: Any

    def pick(self, flip_keeps_class: bool) -> Any:
        return self.mirror_keeps_class if flip_keeps_class else self.otherwise


# The modern recipe: still LeNet-shaped (two conv blocks, three dense layers,
# under 100,000 parameters); each change stays because an ablation on a
# held-out validation split showed it helping (docs/results.md).
_MODERN: dict[str, Any] = {
    "activation": "relu",
    "pooling": "max",
    "batch_norm": True,
    "conv_filters": (16, 32),  # Wider than LeNet-5, still under 100,000 parameters.
    "dense_units": (96, 64),
    "learning_rate": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "label_smoothing": 0.1,
    "lr_schedule": "cosine",
    "warmup_epochs": 1.0,
    # Mirrored clothes are still clothes; a mirrored digit is another shape.
    "augment": IfMirrorKeepsClass("shift_flip", otherwise="shift"),
    "batch_size": 128,
    "epochs": 30,
}
# Muon at Keras's own momentum and weight decay for it, with the peak rate
# that scored best for it on the fast preset (docs/speedrun.md#muon).
_MUON: dict[str, Any] = {"optimizer": "muon", "learning_rate": 0.01, "momentum": 0.95, "weight_decay": 0.004}

# Each preset as the settings it changes from TrainConfig's defaults (the
# book's classic run), for Fashion-MNIST; MARGIN_SETTINGS below changes some
# of them for datasets like MNIST. docs/speedrun.md and docs/results.md say
# how much each preset scores and how long it takes.
PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    # The book's LeNet-5 and training, unchanged.
    "classic": {},
    "modern": _MODERN,
    # The most accurate model under 100,000 parameters in minutes on a CPU: the
    # modern recipe deeper and narrower at the top, trained with Muon.
    "best": {
        **_MODERN,
        # Three conv blocks of 3x3 kernels: the third block's small map leaves
        # room for more filters under 100,000 parameters.
        "conv_filters": (32, 64, 96),
        "kernel_size": (3,),
        "dense_units": (48,),
        # Each image's answer averaged with its mirror's, where a mirror keeps the class.
        "test_time_flip": IfMirrorKeepsClass(True, otherwise=False),
        **_MUON,
    },
    # The shortest wait for a good model on a CPU: the modern recipe made
    # cheaper per image and shorter.
    "fast": {
        **_MODERN,
        # Batch norm after the convolutions only: it buys most of its accuracy
        # there, and each batch norm layer costs throughput.
        "dense_batch_norm": False,
        # A 5x5 first layer over the unpadded interior, 3x3 after it and one
        # dense layer: less arithmetic per image.
        "kernel_size": (5, 3),
        "first_conv_padding": "valid",
        "dense_units": (96,),
        # A linear warm-up, then linear decay to 0: the triangular "one-cycle"
        # shape that short runs favour.
        "lr_schedule": "linear",
        # A whitened, untrained first layer without batch norm after it reaches
        # the same accuracy in fewer images than a trained one with batch norm,
        # and each step skips its weight gradient.
        "whiten_first_conv": True,
        "first_conv_batch_norm": False,
        # Muon on the conv and dense kernels: more accuracy per second than SGD.
        **_MUON,
        # The image dashboards once, at the end, not during the few epochs.
        "image_every_epochs": 0,
        # Flips cost nothing in the pipeline; shifts would cost throughput.
        "augment": IfMirrorKeepsClass("flip", otherwise="none"),
        "batch_size": 256,
        # Enough epochs at this batch for the speedrun's target accuracy.
        "epochs": 7,
        "warmup_epochs": 1.0,
        # Averaging each image's answer with its mirror's is worth its twice
        # the inference where a mirror keeps the class.
        "test_time_flip": IfMirrorKeepsClass(True, otherwise=False),
    },
}

# For datasets whose objects sit small in a blank margin and are not
# mirror-safe (MNIST's digits in their 20x20 box): what the presets change
# over PRESET_SETTINGS. A folder of pictures is framed to fill the canvas,
# like Fashion-MNIST, and keeps Fashion-MNIST's settings.
MARGIN_SETTINGS: dict[str, dict[str, Any]] = {
    "fast": {
        # Digits are learnt in one epoch; a batch of 128 gives it twice the
        # updates of 256, which a single epoch needs.
        "batch_size": 128,
        "epochs": 1,
        "warmup_epochs": 0.25,
        # In a run of a few hundred steps the weights move too fast for batch
        # norm's default memory of about a hundred steps.
        "batch_norm_momentum": 0.9,
        # Fewer Newton-Schulz iterations: the same accuracy on digits for less
        # time per step (not so on clothes).
        "muon_ns_steps": 3,
        # The blank border carries no information: cropping it leaves less
        # arithmetic per step for the same accuracy.
        "crop": 2,
    },
}


# A folder of pictures trained with no --preset: the modern recipe, with the
# image dashboards only at the end, a held-out validation part of the
# training pictures that decides when to stop and which epoch's weights to
# keep, and a batch size and length that follow the folder's size
# (folder_preset). The presets' epochs were tuned on 60,000 images: a
# 2,000-picture folder at their batch gets a handful of steps an epoch and
# trains to chance. Measured on real photo folders (docs/folders.md).
FOLDER_SETTINGS: dict[str, Any] = {
    **_MODERN,
    "image_every_epochs": 0,
    "validation_split": 0.1,
    # Long enough for the cosine schedule's slow start, short of training
    # on for dozens of epochs after the validation accuracy stopped rising.
    "early_stopping_patience": 10,
}
# How a folder's size sets the batch and the run's length: a batch of about
# one fiftieth of the training pictures (a power of two, from 16 up to the
# modern recipe's 128), and enough epochs for FOLDER_STEPS optimiser steps,
# at least FOLDER_EPOCHS[0] (a large folder still sees every picture a few
# times) and at most FOLDER_EPOCHS[1] (a tiny folder stops somewhere).
FOLDER_PICTURES_PER_BATCH_STEP = 50
FOLDER_BATCH_SIZES = (16, 128)
FOLDER_STEPS = 2000
FOLDER_EPOCHS = (10, 60)


def folder_batch_and_epochs(training_pictures: int) -> tuple[int, int]:
    """The batch size and epochs of the folder recipe for `training_pictures` (after the validation part)."""
    smallest, largest = FOLDER_BATCH_SIZES
    batch_size = max(smallest, min(largest, power_of_two_at_most(training_pictures // FOLDER_PICTURES_PER_BATCH_STEP)))
    batch_size = min(batch_size, power_of_two_at_most(training_pictures))  # A folder smaller than one batch.
    steps_per_epoch = -(-training_pictures // batch_size)
    epochs = min(max(-(-FOLDER_STEPS // steps_per_epoch), FOLDER_EPOCHS[0]), FOLDER_EPOCHS[1])
    return batch_size, epochs


def validation_count(training_pictures: int, validation_split: float) -> int:
    """How many of the training pictures --validation-split holds out (train.py's split, counted ahead)."""
    return int(round(training_pictures * validation_split))


def power_of_two_at_most(count: int) -> int:
    return 1 << (max(count, 1).bit_length() - 1)


def folder_preset(dataset: DatasetInfo, training_pictures: int) -> TrainConfig:
    """The recipe for a folder of pictures (`dataset`, its FolderDataset.info) with
    `training_pictures` training pictures (the test split already taken out,
    the validation part not)."""
    config = _from_settings("folder", dataset, FOLDER_SETTINGS)
    kept = training_pictures - validation_count(training_pictures, config.validation_split)
    config.batch_size, config.epochs = folder_batch_and_epochs(kept)
    return config


def preset(name: str, dataset: str | DatasetInfo = "fashion_mnist") -> TrainConfig:
    """The named preset (PRESET_SETTINGS) for `dataset` (a built-in's name, or a
    DatasetInfo such as a folder of pictures'); every field can still be overridden.

    classic: the book's LeNet-5 and training, unchanged (the dataclass defaults).
    modern:  ReLU, max pooling, batch norm, momentum, cosine schedule, augmentation.
    fast:    the shortest wait for a good model on a CPU (`python -m benchmarks.speedrun` measures it).
    best:    the most accurate model under 100,000 parameters, in minutes on a CPU.
    """
    _choice("preset", name, PRESETS)
    info = dataset_info(dataset)
    settings = dict(PRESET_SETTINGS[name])
    if info.framing.longest_side < IMAGE_SIZE and not info.flip_keeps_class:
        settings.update(MARGIN_SETTINGS.get(name, {}))
    return _from_settings(name, info, settings)


def _from_settings(name: str, dataset: str | DatasetInfo, settings: dict[str, Any]) -> TrainConfig:
    """TrainConfig's defaults changed by `settings`, resolved for `dataset`."""
    info = dataset_info(dataset)
    resolved = {field: value.pick(info.flip_keeps_class) if isinstance(value, IfMirrorKeepsClass) else value
                for field, value in settings.items()}
    return TrainConfig(preset=name, dataset=info.name, **resolved)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} must be one of {', '.join(allowed)} (got {value!r})")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} must be a positive integer (got {value!r})")
