"""The coverage job on keras-hub's tiny GPT-2 causal LM and BERT classifier.

keras-hub is a test dependency (setup.py's "hub" extra, in "test"). Each model
is built from its backbone's constructor with explicit sizes (no preset, no
download), measured once (a module fixture): every trainable variable is in
exactly one block, the GPT-2 token embedding's block records both of its uses,
five steps of `fit` with K-FAC lower the loss, and with the normalisation layers'
blocks made "full" both models are 100% structured with `unsupported_layers="error"`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

from kfac_dist import capture, registration
from kfac_dist.blocks import (
    FULL,
    GenericDiagonalBlock,
    PositionEmbeddingBlock,
    ReversibleEmbeddingBlock,
    ScaleShiftBlock,
)
from kfac_dist.jobs import coverage
from tests.paths import ROOT

BATCH, STEPS = 8, 5
GPT2, BERT = (f"{coverage.HUB_PREFIX}{name}" for name in ("GPT2CausalLM", "BertTextClassifier"))


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[keras.Model, coverage.Result]]:
    results = {}
    for name, (build, batch_fn) in coverage.HUB_MODELS.items():
        built: list[keras.Model] = []

        def build_and_keep(build=build, built=built) -> keras.Model:
            built.append(build())
            return built[-1]

        result = coverage.measure(
            name, build_and_keep, batch=BATCH, steps=STEPS, adam=False, batch_fn=batch_fn
        )
        results[name] = (built[0] if built else None, result)
    return results


def test_the_job_knows_both_models_and_they_are_keras_hubs():
    assert set(coverage.HUB_MODELS) == {GPT2, BERT}
    assert coverage.hub_available()
    keras.utils.set_random_seed(0)
    model = coverage.build_gpt2_causal_lm()
    assert isinstance(model, keras_hub.models.GPT2CausalLM)
    embedding = model.backbone.token_embedding
    # keras-hub's backbones use Keras' class; keras-hub's own is a subclass of it.
    assert isinstance(embedding, keras.layers.ReversibleEmbedding) and embedding.tie_weights
    hubs = keras_hub.layers.ReversibleEmbedding(8, 4, tie_weights=False)
    hubs.build((None, 2))
    block = registration.LayerCollection().register_layer(hubs)
    assert isinstance(block, ReversibleEmbeddingBlock) and len(block.variables) == 2


@pytest.mark.parametrize("name", [GPT2, BERT])
def test_every_trainable_variable_is_in_exactly_one_block(measured, name):
    model, result = measured[name]
    assert result.error is None, f"{result.stage}: {result.error}"
    blocks = model.optimizer.curvature.blocks
    keys = [id(v) for b in blocks for v in b.variables]
    assert len(keys) == len(set(keys))
    assert set(keys) == {id(v) for v in model.trainable_variables}
    assert result.coverage.params[coverage.UNCOVERED] == 0
    assert result.coverage.params[coverage.FALLBACK] == 0
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    kinds = {b.layer.name: type(b) for b in blocks if b.layer is not None}
    assert kinds["token_embedding"] is ReversibleEmbeddingBlock
    assert kinds["position_embedding"] is PositionEmbeddingBlock


def test_the_gpt2_token_embedding_records_its_embedding_and_its_output_projection(measured):
    model, _ = measured[GPT2]
    (block,) = [b for b in model.optimizer.curvature.blocks if b.name == "token_embedding"]
    x, _ = coverage.hub_batch(model, 2, seed=1)
    with capture.recording([block]) as records:
        logits = model(x)
    assert [r.reverse for r in records[0]] == [False, True]
    assert tuple(records[0][1].outputs.shape) == tuple(logits.shape)
    # Its vocabulary (64) is small: a full vocabulary side.
    assert block.factor_shapes() == [(64, 64), (coverage.HUB_WIDTH,) * 2]


def test_the_position_embedding_records_the_positions_as_ids(measured):
    model, _ = measured[BERT]
    layer = model.backbone.position_embedding
    block = PositionEmbeddingBlock(layer)
    x, _ = coverage.hub_batch(model, 3, seed=2)
    embedded = model.backbone.token_embedding(x["token_ids"])
    outputs, record = block.record(layer.call, embedded)
    expected = np.broadcast_to(np.arange(coverage.HUB_SEQUENCE), (3, coverage.HUB_SEQUENCE))
    np.testing.assert_array_equal(record.inputs.numpy(), expected)
    table = layer.position_embeddings.numpy()
    np.testing.assert_allclose(outputs.numpy(), np.broadcast_to(table, outputs.shape))
    _, shifted = block.record(layer.call, embedded[:, :4], start_index=5)
    np.testing.assert_array_equal(shifted.inputs.numpy()[0], [5, 6, 7, 8])


@pytest.mark.parametrize("name", [GPT2, BERT])
def test_five_steps_of_fit_with_kfac_lower_the_loss(measured, name):
    _, result = measured[name]
    assert result.error is None, f"{result.stage}: {result.error}"
    losses = result.kfac.losses
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert len(result.kfac.step_times) == STEPS  # one step an epoch: the whole batch
    assert result.kfac.lowered, losses


def test_both_models_are_fully_structured_with_full_normalisation_blocks():
    full_norms = {
        cls: FULL
        for cls, factory in registration.BLOCK_OF_LAYER.items()
        if factory is ScaleShiftBlock
    }
    for name, (build, _) in coverage.HUB_MODELS.items():
        keras.utils.set_random_seed(0)
        model = build()
        blocks = registration.collect_blocks(
            model, fisher_approx=full_norms, unsupported_layers="error"
        )
        cover = coverage.coverage_of(model, blocks)
        assert cover.structured_fraction == 1.0, (name, cover.params)
        assert cover.total_variables == len(model.trainable_variables)


def test_the_command_writes_the_hub_section_apart(tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(f"# Benchmarks\n\n{coverage.HEADING}\n\nkept\n")
    output = tmp_path / "coverage.json"
    arguments = ["--models", BERT, "--coverage-only", "--output", str(output), "--write"]
    assert coverage.main([*arguments, "--benchmarks", str(benchmarks)]) == 0
    (result,) = json.loads(output.read_text())["results"]
    assert result["model"] == BERT and result["error"] is None
    assert result["coverage"]["fallback_layers"] == {}
    text = benchmarks.read_text()
    assert f"{coverage.HEADING}\n\nkept\n" in text  # the applications' section is left alone
    assert coverage.HUB_HEADING in text and f"| {BERT} |" in text


def test_importing_kfac_dist_does_not_import_keras_hub():
    code = "import sys, kfac_dist; print('keras_hub' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
