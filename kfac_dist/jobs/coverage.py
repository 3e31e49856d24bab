"""The coverage command: how much of each `keras.applications` model K-FAC's blocks cover.

    python scripts/coverage.py                              # every application, print only
    python scripts/coverage.py --models MobileNetV2 ResNet50 --output coverage.json
    python scripts/coverage.py --models MobileNet --write   # also update BENCHMARKS.md
    python scripts/coverage.py --models keras_hub.GPT2CausalLM keras_hub.BertTextClassifier

Each model is built offline (`weights=None`, `classes=10`, no classifier
activation) at `--input-size`, and registered as `Kfac` registers it with
`unsupported_layers="diagonal"`. Its trainable variables and parameters are
counted by the kind of block the registration gave them (each block's class
and `approx`, not a list of layer names): "structured" (a Kronecker or full
block), "diagonal" (a layer's own block that is diagonal by design: the
scale and shift of a normalisation layer), "fallback" (the generic diagonal
block of a layer K-FAC has no block for: with the default
`unsupported_layers="error"` that model does not register) and "uncovered"
(in no block: always 0 unless registration is broken). Then `--steps` steps
of `fit` (sparse categorical cross-entropy on one random batch, fixed seed)
with K-FAC, and with Adam from the same initial weights in the same
process: whether the loss went down, and each optimizer's median step time
after the first (measured here, never asserted by the tests). A model that
cannot be built at that size, or whose registration or training fails, is
reported with the reason and the run goes on.

Where keras-hub is installed, its tiny randomly initialised models
(HUB_MODELS: a GPT-2 causal LM, whose logits are its token embedding used
in reverse, and a BERT classifier, built from the backbones' constructors
with explicit sizes, no preset and no download) are measured the same way
on random token ids, in a section of their own (HUB_HEADING); `--models`
names them as `keras_hub.<task>`, and the default run adds them.

The flags are parsed before TensorFlow loads (`--help` answers at once).
`scripts/coverage.py` and the console script `kfac-coverage` call `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kfac_dist.jobs.placement_benchmark import default_output
from kfac_dist.jobs.tuner import write_markdown_section

if TYPE_CHECKING:
    import keras

    from kfac_dist.blocks import Block

DESCRIPTION = (
    "Command line of the coverage report: how much of each keras.applications model "
    "K-FAC's blocks cover, and whether a few steps of fit lower the loss."
)
HEADING = "## Layer coverage of keras.applications"
HUB_HEADING = "## Layer coverage of keras-hub models"

# What a variable is covered by (see the module docstring).
STRUCTURED, DIAGONAL, FALLBACK, UNCOVERED = "structured", "diagonal", "fallback", "uncovered"
CATEGORIES = (STRUCTURED, DIAGONAL, FALLBACK, UNCOVERED)

CLASSES = 10
VOCABULARY = 16  # integer inputs (token ids) are drawn from [0, VOCABULARY)
# A few steps on one small random batch must lower the loss of any of these
# models: a smaller learning rate and more damping than the autoencoder's
# default point (lr 1, damping 0.01), which overshoots on deep BatchNorm
# networks here, and an inverse every step, so that each step uses the
# curvature of its own weights (the step times include that inversion).
KFAC_SETTINGS: dict[str, Any] = {
    "learning_rate": 0.1,
    "damping": 0.1,
    "norm_constraint": 0.3,
    "momentum": 0.9,
    "invert_every": 1,
}
ADAM_LEARNING_RATE = 1e-3
# Models cheap enough to train at 32×32 on 2 cores (about a minute or two each,
# mostly tracing); ConvNeXtTiny is as cheap once its grouped convolutions register.
CHEAP_MODELS = (
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "ResNet50",
    "DenseNet121",
    "NASNetMobile",
    "VGG16",
)


# --- classification ---------------------------------------------------------------
def category(block: Block) -> str:
    """What `block` is: STRUCTURED, DIAGONAL (a layer's block, diagonal by design) or
    FALLBACK (the generic diagonal block of a layer without a block of its own)."""
    from kfac_dist.blocks import DIAGONAL as DIAGONAL_APPROX
    from kfac_dist.blocks import GenericDiagonalBlock

    if isinstance(block, GenericDiagonalBlock):
        return FALLBACK
    return DIAGONAL if block.approx == DIAGONAL_APPROX else STRUCTURED


@dataclasses.dataclass
class Coverage:
    """Trainable variables and parameters of one model, by what covers them."""

    variables: dict[str, int]
    params: dict[str, int]
    blocks: dict[str, int]  # how many blocks of each category
    block_kinds: dict[str, int]  # "ClassName/approx": how many blocks
    fallback_layers: dict[str, int]  # class of each layer with a fallback block: how many

    @property
    def total_variables(self) -> int:
        return sum(self.variables.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def fraction(self, kind: str) -> float:
        """The share of the parameters covered by `kind` (1.0 for structured without any)."""
        if not self.total_params:
            return 1.0 if kind == STRUCTURED else 0.0
        return self.params[kind] / self.total_params

    @property
    def structured_fraction(self) -> float:
        return self.fraction(STRUCTURED)

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "total_variables": self.total_variables,
            "total_params": self.total_params,
            "structured_fraction": self.structured_fraction,
        }


def _key(variable: Any) -> int:
    # As registration keys them: a Keras variable and its backend value are one.
    return id(getattr(variable, "value", variable))


def _owner_classes(model: keras.Model) -> dict[int, str]:
    """Each trainable variable's innermost owning layer's class name."""
    owners: dict[int, tuple[int, str]] = {}
    stack: list[tuple[Any, int]] = [(model, 0)]
    seen = {id(model)}
    while stack:
        layer, depth = stack.pop()
        for variable in getattr(layer, "_trainable_variables", []):
            key = _key(variable)
            if key not in owners or depth > owners[key][0]:
                owners[key] = (depth, type(layer).__name__)
        for child in layer._flatten_layers(include_self=False, recursive=False):  # noqa: SLF001
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, depth + 1))
    return {key: name for key, (_, name) in owners.items()}


def coverage_of(model: keras.Model, blocks: Sequence[Block]) -> Coverage:
    """Counts `model`'s trainable variables by the category of the block holding them.

    A variable in no block is UNCOVERED; one in two blocks is counted twice
    (registration forbids it: the totals then exceed the model's).
    """
    variables = dict.fromkeys(CATEGORIES, 0)
    params = dict.fromkeys(CATEGORIES, 0)
    counts = dict.fromkeys((STRUCTURED, DIAGONAL, FALLBACK), 0)
    kinds: dict[str, int] = {}
    fallback_layers: dict[str, int] = {}
    owners = _owner_classes(model)
    trainable = {_key(v) for v in model.trainable_variables}
    covered: set[int] = set()
    for block in blocks:
        kind = category(block)
        counts[kind] += 1
        label = f"{type(block).__name__}/{block.approx}"
        kinds[label] = kinds.get(label, 0) + 1
        if kind == FALLBACK:
            classes = sorted({owners.get(_key(v), "?") for v in block.variables})
            for name in classes:
                fallback_layers[name] = fallback_layers.get(name, 0) + 1
        for variable in block.variables:
            if _key(variable) not in trainable:
                continue  # not the model's to train (another optimizer's share)
            covered.add(_key(variable))
            variables[kind] += 1
            params[kind] += _size(variable)
    for variable in model.trainable_variables:
        if _key(variable) not in covered:
            variables[UNCOVERED] += 1
            params[UNCOVERED] += _size(variable)
    return Coverage(variables, params, counts, dict(sorted(kinds.items())), fallback_layers)


def _size(variable: Any) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


# --- models and data ----------------------------------------------------------------
def application_names() -> list[str]:
    """Every model builder of `keras.applications` (functions, not modules)."""
    import keras

    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def build_application(name: str, input_size: int, **kwargs: Any) -> keras.Model:
    """`keras.applications.<name>` at input_size², `weights=None`, CLASSES classes,
    logits out; `kwargs` (e.g. `alpha`) go to the builder."""
    import keras

    build = getattr(keras.applications, name, None)
    if build is None or not callable(build):
        raise ValueError(f"keras.applications has no model {name!r}.")
    return build(
        weights=None,
        input_shape=(input_size, input_size, 3),
        classes=CLASSES,
        classifier_activation=None,
        **kwargs,
    )


# keras-hub's models, tiny: vocabulary, sequence length, width, layers, heads.
HUB_VOCABULARY, HUB_SEQUENCE, HUB_WIDTH, HUB_LAYERS, HUB_HEADS = 64, 16, 16, 1, 2
HUB_PREFIX = "keras_hub."


def hub_available() -> bool:
    """Whether keras-hub can be imported (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("keras_hub") is not None


def _hub_sizes() -> dict[str, int]:
    return {
        "vocabulary_size": HUB_VOCABULARY,
        "num_layers": HUB_LAYERS,
        "num_heads": HUB_HEADS,
        "hidden_dim": HUB_WIDTH,
        "intermediate_dim": 2 * HUB_WIDTH,
        "max_sequence_length": HUB_SEQUENCE,
    }


def build_gpt2_causal_lm() -> keras.Model:
    """A tiny `GPT2Backbone` under `GPT2CausalLM` (no preprocessor): the logits are the
    token embedding used in reverse, so the tied table has two uses."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(**_hub_sizes())
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def build_bert_classifier() -> keras.Model:
    """A tiny `BertBackbone` under `BertTextClassifier` (no preprocessor), CLASSES logits."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(**_hub_sizes())
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=CLASSES, preprocessor=None, activation=None
    )


def hub_note() -> str:
    """What the keras-hub section's models are, for its text."""
    import keras_hub

    sizes = ", ".join(f"{k}={v}" for k, v in _hub_sizes().items())
    return (
        f"keras-hub {keras_hub.__version__}: `GPT2Backbone` and `BertBackbone` with {sizes}, "
        "randomly initialised, under `GPT2CausalLM` (logits from the tied token embedding "
        "used in reverse) and `BertTextClassifier` (no preprocessors); a batch of random "
        "token ids, next-token or class labels. Their step times are of a few milliseconds "
        "on a shared machine: the ratio is coarse."
    )


def hub_batch(model: keras.Model, batch: int, seed: int) -> tuple[Any, Any]:
    """Random token ids (segment 0, no padding) for a keras-hub model, and labels per
    output position (each next token for the LM, a class for the classifier)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch, HUB_SEQUENCE)
    x = {
        "token_ids": rng.integers(0, HUB_VOCABULARY, size=shape).astype(np.int32),
        "padding_mask": np.ones(shape, np.int32),
    }
    names = {spec.name for spec in model.inputs}
    if "segment_ids" in names:
        x["segment_ids"] = np.zeros(shape, np.int32)
    (output,) = model.outputs
    classes = int(output.shape[-1])
    labels = (batch, *([HUB_SEQUENCE] if len(output.shape) == 3 else []))
    return x, rng.integers(0, classes, size=labels).astype(np.int32)


#: keras-hub's models by their `--models` name: (builder, batch).
HUB_MODELS: dict[str, tuple[Callable[[], keras.Model], Callable[..., tuple[Any, Any]]]] = {
    f"{HUB_PREFIX}GPT2CausalLM": (build_gpt2_causal_lm, hub_batch),
    f"{HUB_PREFIX}BertTextClassifier": (build_bert_classifier, hub_batch),
}


def random_batch(model: keras.Model, batch: int, seed: int) -> tuple[Any, Any]:
    """One batch for `model`: standard normal inputs (token ids in [0, VOCABULARY) for
    an integer input) and labels in [0, CLASSES) for each output position."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (spec,) = model.inputs
    shape = (batch, *spec.shape[1:])
    if "int" in str(spec.dtype):
        x = rng.integers(0, VOCABULARY, size=shape).astype(np.int32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    (output,) = model.outputs
    classes = int(output.shape[-1])
    y = rng.integers(0, classes, size=(batch, *output.shape[1:-1])).astype(np.int32)
    return x, y


def _loss() -> Any:
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_kfac(
    model: keras.Model, seed: int = 0, unsupported_layers: str = "diagonal", **overrides: Any
) -> Any:
    """`Kfac` bound to `model` with KFAC_SETTINGS (the fallback's warning silenced:
    the report counts those blocks)."""
    import kfac_dist as kfac

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="K-FAC preconditions these layers")
        return kfac.Kfac(
            model=model,
            loss=_loss(),
            unsupported_layers=unsupported_layers,
            seed=seed,
            **{**KFAC_SETTINGS, **overrides},
        )


@dataclasses.dataclass
class Training:
    """What `--steps` steps of `fit` did: each step's batch loss and wall time."""

    losses: list[float]
    step_times: list[float]

    @property
    def lowered(self) -> bool:
        """Whether the last step's batch loss (after steps-1 updates) is below the first's."""
        finite = all(map(_finite, self.losses))
        return finite and len(self.losses) > 1 and self.losses[-1] < self.losses[0]

    @property
    def median_step_time(self) -> float | None:
        """Median wall time of the steps after the first (which traces)."""
        return statistics.median(self.step_times[1:]) if len(self.step_times) > 1 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "lowered": self.lowered,
            "median_step_time": self.median_step_time,
        }


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def train(model: keras.Model, optimizer: Any, x: Any, y: Any, steps: int) -> Training:
    """`steps` steps of `fit` on the one batch (x, y): one epoch a step, each timed."""
    import keras

    times: list[float] = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            times.append(time.perf_counter() - self.start)

    model.compile(optimizer=optimizer, loss=_loss())
    examples = len(keras.tree.flatten(x)[0])  # x may be a dict of inputs
    history = model.fit(
        x, y, batch_size=examples, epochs=steps, shuffle=False, verbose=0, callbacks=[StepTimer()]
    )
    return Training([float(v) for v in history.history["loss"]], times)


# --- one model -------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One model's report; `error` says what stopped it, and at which stage."""

    model: str
    params: int | None = None
    coverage: Coverage | None = None
    kfac: Training | None = None
    adam: Training | None = None
    error: str | None = None
    stage: str | None = None  # "build", "register", "kfac", "adam" (where `error` arose)
    not_trained: str | None = None  # why training was left out

    @property
    def step_time_ratio(self) -> float | None:
        kfac, adam = self.kfac, self.adam
        if kfac is None or adam is None or not kfac.median_step_time or not adam.median_step_time:
            return None
        return kfac.median_step_time / adam.median_step_time

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params": self.params,
            "coverage": self.coverage.as_dict() if self.coverage else None,
            "kfac": self.kfac.as_dict() if self.kfac else None,
            "adam": self.adam.as_dict() if self.adam else None,
            "step_time_ratio": self.step_time_ratio,
            "error": self.error,
            "stage": self.stage,
            "not_trained": self.not_trained,
        }


def _reason(error: BaseException) -> str:
    """The error's class and first line: what a table cell can hold."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


def measure(
    name: str,
    build: Callable[[], keras.Model],
    *,
    batch: int = 8,
    steps: int = 5,
    seed: int = 0,
    adam: bool = True,
    train_models: bool = True,
    max_train_params: float | None = None,
    kfac_settings: dict[str, Any] | None = None,
    batch_fn: Callable[..., tuple[Any, Any]] | None = None,
) -> Result:
    """The coverage (and, with `train_models`, K-FAC's and Adam's training) of the
    model `build` makes; every failure is caught and reported in the result.

    `build` is called under a fixed seed, a second time for Adam, so that both
    start from the same weights. Models over `max_train_params` are registered
    without building K-FAC (its factors could be too large for the machine).
    `kfac_settings` replace entries of KFAC_SETTINGS; `batch_fn(model, batch, seed)`
    makes the batch (default `random_batch`).
    """
    import keras

    from kfac_dist import registration

    result = Result(name)
    try:
        keras.utils.set_random_seed(seed)
        model = build()
    except Exception as error:  # noqa: BLE001 - any builder's failure is reported
        result.error, result.stage = _reason(error), "build"
        return result
    result.params = sum(_size(v) for v in model.trainable_variables)
    heavy = max_train_params is not None and result.params > max_train_params
    if heavy:
        result.not_trained = f"over --max-train-params ({result.params:,} parameters)"
    elif not train_models:
        result.not_trained = "coverage only in this run"
    try:
        if result.not_trained:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="K-FAC preconditions these layers")
                blocks = registration.collect_blocks(model, unsupported_layers="diagonal")
        else:
            optimizer = make_kfac(model, seed=seed, **(kfac_settings or {}))
            blocks = optimizer.curvature.blocks
        result.coverage = coverage_of(model, blocks)
    except Exception as error:  # noqa: BLE001 - an unsupported layer must not stop the run
        result.error, result.stage = _reason(error), "register"
        return result
    if result.not_trained:
        return result
    try:
        x, y = (batch_fn or random_batch)(model, batch, seed)
        result.kfac = train(model, optimizer, x, y, steps)
    except Exception as error:  # noqa: BLE001
        result.error, result.stage = _reason(error), "kfac"
        return result
    if adam:
        try:
            keras.utils.set_random_seed(seed)
            adam_model = build()
            result.adam = train(adam_model, keras.optimizers.Adam(ADAM_LEARNING_RATE), x, y, steps)
        except Exception as error:  # noqa: BLE001
            result.error, result.stage = _reason(error), "adam"
    return result


# --- the report -------------------------------------------------------------------------
def machine() -> str:
    """This machine in a line: CPUs, Python, TensorFlow, Keras, load average."""
    import keras
    import tensorflow as tf

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (
        f"{os.cpu_count()} CPUs ({platform.machine()}), {gpus} GPUs; Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}; "
        f"load average at the end {load}"
    )


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _loss_cell(training: Training | None) -> str:
    if training is None:
        return "—"
    mark = "" if training.lowered else " (not lowered)"
    return f"{training.losses[0]:.3f} → {training.losses[-1]:.3f}{mark}"


def _ms(training: Training | None) -> str:
    if training is None or training.median_step_time is None:
        return "—"
    return f"{1000 * training.median_step_time:.0f}"


def markdown(
    results: Sequence[Result],
    settings: dict[str, Any],
    when: str,
    where: str,
    command: str = "python scripts/coverage.py --models NAME ... --write",
    heading: str = HEADING,
    note: str = "",
) -> str:
    """The BENCHMARKS.md section: one row per model registered, then the rest and why."""
    lines = [
        heading,
        "",
        "```",
        f"{command}  # kfac_dist/jobs/coverage.py",
        "```",
        "",
        f"Run {when} on {where}. Settings: {json.dumps(settings)}.",
        "",
        *([note, ""] if note else []),
        "Parameters (of the trainable variables) by what K-FAC's registration covers "
        "them with: a structured block (Kronecker or full), a diagonal block by design "
        "(the scale and shift of a normalisation layer), or the generic diagonal "
        'fallback of `unsupported_layers="diagonal"` (layers without a block of their '
        'own: with the default `"error"` these models do not register). Losses: the '
        "batch loss of the first and last of the steps of `fit` on one random batch; "
        "ms/step: median wall time of the steps after the first, K-FAC (inverting "
        "every step) and Adam from the same weights in the same process.",
        "",
        "| model | params | structured | diagonal | fallback | fallback layers | "
        "K-FAC loss | Adam loss | K-FAC ms/step | Adam ms/step | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    left: list[str] = []
    not_trained: dict[str, list[str]] = {}
    for result in results:
        cover = result.coverage
        if cover is None:
            left.append(f"- {result.model}: {result.stage} failed: {result.error}")
            continue
        fallback = ", ".join(f"{n} ×{c}" for n, c in sorted(cover.fallback_layers.items()))
        ratio = result.step_time_ratio
        lines.append(
            f"| {result.model} | {cover.total_params:,} | {_percent(cover.fraction(STRUCTURED))} "
            f"| {_percent(cover.fraction(DIAGONAL))} | {_percent(cover.fraction(FALLBACK))} "
            f"| {fallback or '—'} | {_loss_cell(result.kfac)} | {_loss_cell(result.adam)} "
            f"| {_ms(result.kfac)} | {_ms(result.adam)} | "
            f"{'—' if ratio is None else f'{ratio:.1f}×'} |"
        )
        if cover.params[UNCOVERED]:
            left.append(f"- {result.model}: {cover.params[UNCOVERED]:,} parameters in no block")
        if result.error:
            left.append(f"- {result.model}: {result.stage} failed: {result.error}")
        elif result.not_trained:
            not_trained.setdefault(result.not_trained, []).append(result.model)
    left += [f"- not trained ({why}): {', '.join(names)}" for why, names in not_trained.items()]
    if left:
        lines += ["", "Not measured, or only in part:", "", *left]
    return "\n".join(lines) + "\n"


# --- the command line --------------------------------------------------------------------
def build_parser(output: str) -> argparse.ArgumentParser:
    """The command line; `output` is `--benchmarks`' default."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument(
        "--models",
        nargs="+",
        help="keras.applications names, or keras-hub's models as keras_hub.<task> "
        f"({', '.join(HUB_MODELS)}) (default: every application, and keras-hub's models "
        f"when it is installed; on a small machine pick some, e.g. {' '.join(CHEAP_MODELS[:4])})",
    )
    parser.add_argument("--input-size", type=int, default=32, help="input height = width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps of fit per optimizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-adam", action="store_true", help="K-FAC's training only")
    parser.add_argument(
        "--train",
        nargs="+",
        metavar="MODEL",
        help="train only these of --models (the others: coverage only); default: all",
    )
    parser.add_argument(
        "--coverage-only", action="store_true", help="register the models, train none"
    )
    parser.add_argument(
        "--max-train-params",
        type=float,
        help="register but do not train models with more trainable parameters",
    )
    parser.add_argument("--output", help="also write every result to this JSON file")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also put the section into --benchmarks (a tracked file: left alone unless asked)",
    )
    parser.add_argument(
        "--benchmarks", default=output, help="markdown file --write updates (%(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, script: str | None = None) -> int:
    """Measures the models and prints the section (written with `--write`, every result
    to `--output` as JSON); exit status 0 even where models fail: they are reported.
    `script`: the file in scripts/ that started it, whose checkout's BENCHMARKS.md
    `--write` updates by default."""
    args = build_parser(default_output(script)).parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads TensorFlow
    names = args.models or application_names() + (list(HUB_MODELS) if hub_available() else [])
    settings = {
        "input_size": args.input_size,
        "batch": args.batch,
        "steps": args.steps,
        "seed": args.seed,
        "kfac": KFAC_SETTINGS,
        "adam_learning_rate": None if args.no_adam else ADAM_LEARNING_RATE,
    }
    unknown = sorted(set(args.train or ()) - set(names))
    if unknown:
        build_parser(default_output(script)).error(
            f"--train names models not in --models: {unknown}"
        )
    import keras

    results = []
    for name in names:
        keras.backend.clear_session(free_memory=True)  # the models before are done with
        start = time.perf_counter()
        trained = not args.coverage_only and (args.train is None or name in args.train)
        build, batch_fn = HUB_MODELS.get(
            name, (functools.partial(build_application, name, args.input_size), None)
        )
        result = measure(
            name,
            build,
            batch_fn=batch_fn,
            batch=args.batch,
            steps=args.steps,
            seed=args.seed,
            adam=not args.no_adam,
            train_models=trained,
            max_train_params=args.max_train_params,
        )
        results.append(result)
        status = result.error or (
            f"structured {_percent(result.coverage.structured_fraction)}" if result.coverage else ""
        )
        print(f"{name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    when = datetime.date.today().isoformat()
    command = " ".join(["python scripts/coverage.py", *(sys.argv[1:] if argv is None else argv)])
    applications = [r for r in results if r.model not in HUB_MODELS]
    hub = [r for r in results if r.model in HUB_MODELS]
    hub_settings = {**settings, "input_size": None, "sequence": HUB_SEQUENCE}
    sections = [markdown(applications, settings, when, machine(), command)] if applications else []
    if hub:
        sections.append(
            markdown(hub, hub_settings, when, machine(), command, HUB_HEADING, hub_note())
        )
    for section in sections:
        print(section)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "date": when,
                    "machine": machine(),
                    "settings": settings,
                    "results": [r.as_dict() for r in results],
                },
                f,
                indent=1,
            )
        print(f"results written to {args.output}")
    if args.write:
        for section in sections:
            write_markdown_section(args.benchmarks, section)
        print(f"written to {os.path.normpath(args.benchmarks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
