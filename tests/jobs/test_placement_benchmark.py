"""Tests of the placement benchmark's communication tables (jobs/placement_benchmark.py)."""

import keras
import pytest

from kfac_dist.jobs import tuner
from kfac_dist.jobs.placement_benchmark import (
    COMMUNICATION_HEADING,
    build_parser,
    communication_benchmark,
    communication_markdown,
    keras_shape,
)
from kfac_dist.placement.communication import (
    NETWORKS,
    Network,
    bert_shape,
    communication_cost,
)


def table_rows(lines, header):
    """The rows of the markdown table under `header`, split into stripped cells."""
    start = lines.index(header) + 2
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[start:end]]


def test_keras_shape_has_every_trainable_parameter():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    hidden = keras.layers.LayerNormalization()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, use_bias=False)(hidden))
    shape = keras_shape(model, "small")
    assert shape.num_params == sum(int(v.numpy().size) for v in model.trainable_variables)
    assert shape.units == tuple(tuner.model_units(model))
    dims = {u.name.rsplit("/", 1)[-1] + str(u.dim) for u in shape.units}
    assert dims == {"A7", "G4", "diagonal8", "A4", "G3"}


@pytest.fixture(scope="module")
def bert_tables():
    shapes = (bert_shape(),)
    results = communication_benchmark(shapes, replica_counts=(8, 64))
    return results, communication_markdown(results, shapes)


def test_communication_tables_have_a_row_per_mode(bert_tables):
    results, text = bert_tables
    lines = text.splitlines()
    assert lines[0] == COMMUNICATION_HEADING
    assert "### BERT-Large" in lines and "P = 335,141,888 parameters" in text
    # Per method: 3 sharing modes at f = 1 and 0.5, one row at f = 0 (nothing shared).
    assert len(results) == len(NETWORKS) * 2 * 2 * 7
    header = "| method | sharing | f | N=8 step | update | stag. | N=64 step | update | stag. |"
    for network in NETWORKS:
        start = lines.index(f"Time in ms, {network.name}:")
        rows = table_rows(lines[start:], header)
        assert [(r[0], r[1], r[2]) for r in rows] == [
            (method, sharing, f)
            for method in ("cholesky", "eigen")
            for sharing, f in [
                ("all_reduce", "1"),
                ("all_gather", "1"),
                ("broadcast", "1"),
                ("all_reduce", "0.5"),
                ("all_gather", "0.5"),
                ("broadcast", "0.5"),
                ("distributed (nothing shared)", "0"),
            ]
        ]
        # A cell is the model's time, recomputed independently of the job.
        eigen_broadcast_half = rows[12]
        cost = communication_cost(
            bert_shape(), 64, network, method="eigen", sharing="broadcast", replication=0.5
        )
        assert float(eigen_broadcast_half[6]) == pytest.approx(cost.step_s * 1e3, rel=5e-3)
        assert float(eigen_broadcast_half[7]) == pytest.approx(cost.update_s * 1e3, rel=5e-3)
        assert float(eigen_broadcast_half[8]) == pytest.approx(
            cost.staggered_step_s * 1e3, rel=5e-3
        )
    memory = table_rows(
        lines, "| method | sharing | f | N=8 memory | dist. | N=64 memory | dist. |"
    )
    assert len(memory) == 14
    assert all(row[4] == "0%" for row in memory if row[2] == "1")
    assert all(row[4] == "100%" for row in memory if row[2] == "0")


def test_communication_flags():
    args = build_parser("BENCHMARKS.md").parse_args(
        ["--network", "2", "50", "--network", "10", "12.5", "--sync-chunk-mib", "64"]
    )
    assert args.network == [[2.0, 50.0], [10.0, 12.5]]
    assert args.comm_replicas == [8, 64, 256] and args.invert_every == 10
    assert args.sync_chunk_mib == 64.0
    # Chunks show in the text.
    shapes = (bert_shape(layers=1),)
    net = Network("n", 2e-6, 50e9)
    chunked = communication_benchmark(
        shapes, replica_counts=(8,), networks=(net,), sync_chunk_bytes=64 * 2**20
    )
    assert "in chunks of 64.0 MiB" in communication_markdown(chunked, shapes)


def test_resnet50_shape():
    shape = keras_shape(tuner.load_model("ResNet50"), "ResNet-50")
    # keras.applications.ResNet50's trainable parameters (BatchNorm moving stats excluded).
    assert shape.num_params == 25_583_592
    assert len(shape.units) == 161 and len(shape.block_params) == 107


def test_the_default_sync_chunk_is_kfacs():
    from kfac_dist.config import DEFAULT_SYNC_CHUNK_BYTES
    from kfac_dist.jobs import placement_benchmark

    args = placement_benchmark.build_parser("BENCHMARKS.md").parse_args([])
    assert args.sync_chunk_mib * 2**20 == DEFAULT_SYNC_CHUNK_BYTES
