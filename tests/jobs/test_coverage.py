"""The coverage job (kfac_dist/jobs/coverage.py) on a fast subset of models.

Each model is measured once (a module fixture): its coverage counts every
trainable variable exactly once (against the model's own list and
parameter count, not the job's), five steps of `fit` with K-FAC lower the
loss, and the structured fraction is reported. The last test is the goal:
every model registers with `unsupported_layers="error"` and is 100%
structured once the normalisation layers ask for "full" blocks (it fails
as soon as a layer kind has no block of its own).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kfac_dist import registration
from kfac_dist.blocks import (
    DIAGONAL,
    FULL,
    KRON,
    DenseBlock,
    GenericDiagonalBlock,
    ScaleShiftBlock,
)
from kfac_dist.jobs import coverage

# Batch 8, not 4: at 32×32 MobileNetV2 ends at 1×1 positions, where BatchNormalization
# over 4 values makes the loss jump under a relative weight change of 1e-4 (Adam too).
SIZE, BATCH, STEPS = 32, 8, 5


def mobilenet_v2() -> keras.Model:
    return coverage.build_application("MobileNetV2", SIZE, alpha=0.35)


def efficientnet_b0_smallest() -> keras.Model:
    """EfficientNetB0's blocks (MBConv: depthwise conv, squeeze-excitation, drop-connect,
    Rescaling and Normalization in front) at one block a stage and a quarter of the
    width: EfficientNetB0 itself takes minutes to trace on 2 shared cores."""
    from keras.src.applications.efficientnet import EfficientNet

    return EfficientNet(
        0.25,
        0.1,
        SIZE,
        0.2,
        name="efficientnet_smallest",
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        classes=coverage.CLASSES,
        classifier_activation=None,
    )


def transformer_encoder() -> keras.Model:
    """Token ids → embedding → one post-norm encoder layer (MultiHeadAttention, FFN) →
    mean over positions → logits."""
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(coverage.VOCABULARY, 8)(tokens)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    ffn = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(h))
    h = keras.layers.LayerNormalization()(h + ffn)
    logits = keras.layers.Dense(coverage.CLASSES)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, logits)


def conv_transpose_decoder() -> keras.Model:
    """A 4×4 code upsampled twice by Conv2DTranspose: 16×16 per-pixel logits."""
    code = keras.Input((4, 4, 3))
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(code)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(h)
    return keras.Model(code, keras.layers.Conv2D(coverage.CLASSES, 1)(h))


def regnetx_style() -> keras.Model:
    """RegNetX002's building block, which Keras 3 no longer ships (keras.applications
    has no RegNet): a stem, then X blocks of 1×1 conv, 3×3 grouped conv (group width
    8) with stride 2, 1×1 conv, BatchNormalization, and a projected shortcut."""
    image = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(image)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    for width in (16, 24):
        shortcut = keras.layers.BatchNormalization()(
            keras.layers.Conv2D(width, 1, strides=2, use_bias=False)(h)
        )
        y = keras.layers.Conv2D(width, 1, use_bias=False)(h)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.Conv2D(
            width, 3, strides=2, padding="same", groups=width // 8, use_bias=False
        )(y)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.BatchNormalization()(keras.layers.Conv2D(width, 1, use_bias=False)(y))
        h = keras.layers.ReLU()(y + shortcut)
    logits = keras.layers.Dense(coverage.CLASSES)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(image, logits)


MODELS = {
    "MobileNetV2": mobilenet_v2,
    "EfficientNetB0-smallest": efficientnet_b0_smallest,
    "transformer": transformer_encoder,
    "Conv2DTranspose-decoder": conv_transpose_decoder,
    "RegNetX-style": regnetx_style,
}


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[keras.Model, coverage.Result]]:
    """Each model of MODELS, built, registered and trained once for the tests below."""
    results: dict[str, tuple[keras.Model, coverage.Result]] = {}
    for name, build in MODELS.items():
        built: list[keras.Model] = []

        def build_and_keep(build=build, built=built) -> keras.Model:
            built.append(build())
            return built[-1]

        result = coverage.measure(name, build_and_keep, batch=BATCH, steps=STEPS, adam=False)
        results[name] = (built[0] if built else None, result)
    return results


def _trainable_params(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@pytest.mark.parametrize("name", list(MODELS))
def test_coverage_counts_every_trainable_variable_once(measured, name):
    model, result = measured[name]
    assert result.error is None, f"{result.stage}: {result.error}"
    cover = result.coverage
    assert cover.total_variables == len(model.trainable_variables)
    assert cover.total_params == _trainable_params(model) == result.params
    assert cover.params[coverage.UNCOVERED] == 0
    # Every block's variables are the model's, and no two blocks share one.
    keys = [id(v) for b in model.optimizer.curvature.blocks for v in b.variables]
    assert len(keys) == len(set(keys))
    assert set(keys) == {id(v) for v in model.trainable_variables}
    assert sum(cover.blocks.values()) == len(model.optimizer.curvature.blocks)


@pytest.mark.parametrize("name", list(MODELS))
def test_five_steps_of_fit_with_kfac_lower_the_loss(measured, name):
    _, result = measured[name]
    assert result.error is None, f"{result.stage}: {result.error}"
    losses = result.kfac.losses
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert result.kfac.lowered, losses
    assert len(result.kfac.step_times) == STEPS


@pytest.mark.parametrize("name", list(MODELS))
def test_structured_fraction_is_reported_in_the_table_and_the_json(measured, name):
    model, result = measured[name]
    assert result.error is None, f"{result.stage}: {result.error}"
    cover = result.coverage
    structured = sum(
        _size(v)
        for b in model.optimizer.curvature.blocks
        if b.approx in (KRON, FULL)
        for v in b.variables
    )
    assert cover.structured_fraction == pytest.approx(structured / _trainable_params(model))
    fractions = [cover.fraction(kind) for kind in coverage.CATEGORIES]
    assert sum(fractions) == pytest.approx(1.0)
    row = next(
        line
        for line in coverage.markdown([result], {}, "today", "here").splitlines()
        if line.startswith(f"| {name} |")
    )
    assert f"{100 * cover.structured_fraction:.1f}%" in row
    as_json = json.loads(json.dumps(result.as_dict()))
    assert as_json["coverage"]["structured_fraction"] == pytest.approx(cover.structured_fraction)
    print(f"{name}: {100 * cover.structured_fraction:.1f}% structured", cover.fallback_layers)


def _size(variable) -> int:
    return int(np.prod(variable.shape))


class Scale(keras.layers.Layer):
    """A layer K-FAC will never know: one weight per feature."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def test_fallback_and_by_design_diagonal_blocks_are_told_apart():
    """A model of one Dense, one BatchNormalization and one layer without a block:
    each category holds exactly that layer's parameters."""
    model = keras.Sequential(
        [
            keras.Input((3, 4)),
            keras.layers.Dense(5, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            Scale(name="local"),
        ]
    )
    blocks = registration.collect_blocks(model, unsupported_layers="diagonal")
    kinds = {b.name: type(b) for b in blocks}
    assert kinds["dense"] is DenseBlock and kinds["local"] is GenericDiagonalBlock
    cover = coverage.coverage_of(model, blocks)
    layer_params = {name: _trainable_params(model.get_layer(name)) for name in kinds}
    assert cover.params == {
        coverage.STRUCTURED: layer_params["dense"],
        coverage.DIAGONAL: layer_params["bn"],
        coverage.FALLBACK: layer_params["local"],
        coverage.UNCOVERED: 0,
    }
    assert cover.fallback_layers == {"Scale": 1}
    assert cover.blocks == {coverage.STRUCTURED: 1, coverage.DIAGONAL: 1, coverage.FALLBACK: 1}
    assert [b.approx for b in blocks if b.name == "bn"] == [DIAGONAL]
    # A variable in no block is uncovered, and a block of another model's variable is ignored.
    dense_only = [b for b in blocks if b.name == "dense"]
    partial = coverage.coverage_of(model, dense_only)
    assert partial.params[coverage.UNCOVERED] == layer_params["bn"] + layer_params["local"]
    assert partial.total_params == _trainable_params(model)


def test_a_model_that_cannot_be_built_is_reported_not_raised():
    # InceptionV3 needs inputs of at least 75×75.
    result = coverage.measure(
        "InceptionV3", lambda: coverage.build_application("InceptionV3", SIZE)
    )
    assert result.stage == "build" and result.coverage is None
    assert "ValueError" in result.error
    section = coverage.markdown([result], {}, "today", "here")
    assert "- InceptionV3: build failed: ValueError" in section


def test_every_subset_model_is_fully_structured():
    """The goal: every layer of every subset model has a structured block.

    Registered with `unsupported_layers="error"` (a layer without a block of
    its own fails here) and the normalisation layers' scale-and-shift blocks
    made "full" (they are diagonal by default, by design).
    """
    full_norms = {
        cls: FULL
        for cls, factory in registration.BLOCK_OF_LAYER.items()
        if factory is ScaleShiftBlock
    }
    failures = {}
    for name, build in MODELS.items():
        keras.utils.set_random_seed(0)
        model = build()
        try:
            blocks = registration.collect_blocks(
                model, fisher_approx=full_norms, unsupported_layers="error"
            )
        except Exception as error:  # noqa: BLE001 - collected, reported together below
            failures[name] = f"{type(error).__name__}: {str(error)[:400]}"
            continue
        fraction = coverage.coverage_of(model, blocks).structured_fraction
        if fraction != 1.0:
            failures[name] = f"{100 * fraction:.2f}% structured"
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


def test_the_command_writes_the_json_and_its_section_of_the_markdown(tmp_path, capsys):
    """--coverage-only on an application that builds and one that cannot: both are in
    the JSON and the section; the markdown's other sections are left as they were."""
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    output = tmp_path / "coverage.json"
    status = coverage.main(
        [
            "--models",
            "MobileNetV3Small",
            "InceptionV3",
            "--coverage-only",
            "--output",
            str(output),
            "--write",
            "--benchmarks",
            str(benchmarks),
        ]
    )
    assert status == 0
    report = json.loads(output.read_text())
    first, second = report["results"]
    assert first["model"] == "MobileNetV3Small" and first["error"] is None
    assert first["coverage"]["total_params"] == first["params"] > 0
    assert first["coverage"]["fallback_layers"] == {}  # its DepthwiseConv2D has a block
    assert second["stage"] == "build" and second["coverage"] is None
    text = benchmarks.read_text()
    assert text.startswith("# Benchmarks\n\n## Other\n\nkept\n\n" + coverage.HEADING)
    assert "| MobileNetV3Small |" in text and "- InceptionV3: build failed" in text
    assert "- not trained (coverage only in this run): MobileNetV3Small\n" in text
    assert "python scripts/coverage.py --models MobileNetV3Small InceptionV3" in text
    assert coverage.HEADING in capsys.readouterr().out
