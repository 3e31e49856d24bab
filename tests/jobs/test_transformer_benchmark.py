"""The transformer benchmark (kfac_dist/jobs/transformer_benchmark.py): its data, its models
(built, every variable in exactly one structured K-FAC block, a few K-FAC steps) and its
bookkeeping (target, best points, ratios, floor, phases, report). No timing is asserted.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from kfac_dist import registration
from kfac_dist.blocks import (
    DenseBlock,
    EinsumDenseBlock,
    EmbeddingBlock,
    GenericDiagonalBlock,
    ScaleShiftBlock,
)
from kfac_dist.jobs import benchmarks, tuner
from kfac_dist.jobs import transformer_benchmark as tb

TINY = {"width": 8, "depth": 1, "heads": 2, "mlp_ratio": 2}
VOCAB, LENGTH = 7, 8
ATTENTION_PARTS = ("query", "key", "value", "attention_output")


def _tiny(task: str) -> keras.Model:
    if task == "vit":
        return tb.build_vit(tokens=4, patch_size=6, classes=3, seed=0, **TINY)
    return tb.build_charlm(vocabulary=VOCAB, length=LENGTH, seed=0, **TINY)


def _batch(task: str, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if task == "vit":
        return rng.normal(size=(n, 4, 6)).astype("float32"), rng.integers(0, 3, n)
    ids = rng.integers(0, VOCAB, size=(n, LENGTH + 1)).astype("int32")
    return ids[:, :-1], ids[:, 1:]


# --- data ------------------------------------------------------------------------------
def test_patchify_matches_a_loop_over_the_patch_grid():
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 1))
    patches = tb.patchify(images, 7)
    assert patches.shape == (2, 16, 49)
    for n in range(2):
        for r in range(4):
            for c in range(4):
                expected = images[n, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7, 0].reshape(-1)
                np.testing.assert_array_equal(patches[n, 4 * r + c], expected)
    with pytest.raises(ValueError, match="do not split"):
        tb.patchify(np.zeros((1, 28, 28, 1)), 5)


def test_char_windows_are_consecutive_and_their_targets_shifted_by_one():
    x, y = tb.char_windows(np.arange(129), 64)
    np.testing.assert_array_equal(x, [np.arange(64), np.arange(64, 128)])
    np.testing.assert_array_equal(y, [np.arange(1, 65), np.arange(65, 129)])
    x, _ = tb.char_windows(np.arange(128), 64)  # the second window has no last target
    assert x.shape == (1, 64)
    with pytest.raises(ValueError, match="no window"):
        tb.char_windows(np.arange(64), 64)


def test_the_text_is_pydoc_topics_in_sorted_key_order_and_splits_ninety_ten():
    from pydoc_data.topics import topics

    text = tb.topics_text()
    first, last = min(topics), max(topics)
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert len(text) == sum(map(len, topics.values())) > 100_000
    chars, index = tb.char_vocabulary("banana")
    assert chars == "abn" and index == {"a": 0, "b": 1, "n": 2}

    small = "abcdefghij" * 20  # 200 characters: 180 train, 20 held out
    data = tb.charlm_data(small, length=4)
    assert data.vocabulary == 10
    assert data.x.shape == (44, 4) and data.x_held_out.shape == (4, 4)
    np.testing.assert_array_equal(data.x[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(data.y[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(data.x_held_out[0], [0, 1, 2, 3])  # character 180: "a"


# --- models ----------------------------------------------------------------------------
def test_position_embedding_adds_each_positions_row_to_every_example():
    layer = tb._position_embedding_class()(3, 2, name="positions")
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    table = keras.ops.convert_to_numpy(layer.embedding.embeddings)
    np.testing.assert_allclose(out, x + table[None], rtol=1e-6)


@pytest.mark.parametrize("task", ["vit", "charlm"])
@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_every_variable_is_in_exactly_one_structured_block(task, sharing):
    model = _tiny(task)
    x, _ = _batch(task)
    classes = 3 if task == "vit" else VOCAB
    expected_shape = (6, classes) if task == "vit" else (6, LENGTH, classes)
    assert model(x).shape == expected_shape
    blocks = registration.collect_blocks(model, unsupported_layers="error", kron_sharing=sharing)
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    registered = [v.path for b in blocks for v in b.variables]
    assert sorted(registered) == sorted(v.path for v in model.trainable_variables)
    kinds = {b.name: type(b) for b in blocks}
    for part in ATTENTION_PARTS:
        assert kinds[part] is EinsumDenseBlock
    for name in ("block_0_mlp_in", "block_0_mlp_out", "head"):
        assert kinds[name] is DenseBlock
    for name in ("block_0_norm_1", "block_0_norm_2", "final_norm"):
        assert kinds[name] is ScaleShiftBlock
    assert kinds["position_embedding"] is EmbeddingBlock
    assert kinds["token_embedding" if task == "charlm" else "patch_embedding"] is (
        EmbeddingBlock if task == "charlm" else DenseBlock
    )
    assert {b.kron_sharing for b in blocks if hasattr(b, "kron_sharing")} == {sharing}


@pytest.mark.parametrize("task, sharing", [("vit", "expand"), ("charlm", "reduce")])
def test_kfac_at_a_grid_point_trains_the_model_with_finite_losses(task, sharing):
    model = _tiny(task)
    before = [w.copy() for w in model.get_weights()]
    point = {"norm_constraint": 1e-3, "kron_sharing": sharing}
    optimizer = tb.make_optimizer("kfac", point, model, invert_every=1)
    tb.compile_model(model, optimizer)
    x, y = _batch(task)
    losses = [float(model.train_on_batch(x, y, return_dict=True)["loss"]) for _ in range(3)]
    assert all(map(math.isfinite, losses))
    assert not any(isinstance(b, GenericDiagonalBlock) for b in optimizer.curvature.blocks)
    assert all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()) if a.ndim > 1)
    sizes = {f["block"]: f["factors"] for f in tb.factor_sizes(optimizer)}
    assert sizes["query"] == [[9, 9], [8, 8]]  # (width + bias)², (heads · key_dim)²
    assert sizes["block_0_mlp_out"] == [[17, 17], [8, 8]]


def test_muon_proper_takes_the_2d_variables_but_the_embeddings_and_head():
    # Keras' rule is the variable's rank: the attention kernels (3-D) go to its
    # AdamW part, the (heads, key_dim) biases of query/key/value (2-D) do not.
    model = _tiny("charlm")
    muon = tb.make_optimizer("muon", tb.MUON_GRID[0], model)
    muon.build(model.trainable_variables)
    by_muon = sorted(
        v.path
        for v in model.trainable_variables
        if not muon._should_use_adamw(v)  # noqa: SLF001 - Keras' own rule, as it applies it
    )
    assert by_muon == [
        "block_0_attention/key/bias",
        "block_0_attention/query/bias",
        "block_0_attention/value/bias",
        "block_0_mlp_in/kernel",
        "block_0_mlp_out/kernel",
    ]


# --- bookkeeping -----------------------------------------------------------------------
def _run(name: str, losses, seconds: float = 0.1, threshold: float | None = None):
    run = benchmarks.RunResult(
        name, {"learning_rate": 0.1}, list(map(float, losses)), [seconds] * len(losses)
    )
    return run if threshold is None else tb.with_threshold(run, threshold)


def test_the_target_is_the_best_adamw_runs_moving_average_at_seventy_percent():
    worse = _run("adamw[a]", [100.0 - k / 2 for k in range(20)])
    better = _run("adamw[b]", [100.0 - k for k in range(20)])
    target, reference = tb.target_loss([worse, better])
    assert reference is better
    # Step 14 (70% of 20): the mean of the losses of steps 5..14, 96..87.
    assert target == pytest.approx(91.5)
    with pytest.raises(ValueError, match="finite"):
        tb.target_loss([_run("adamw[nan]", [math.nan] * 20)])


def test_the_best_point_reaches_the_target_first_then_fastest():
    slow = _run("kfac[slow]", [100.0 - k for k in range(20)], threshold=91.5)  # step 14
    fast = _run("kfac[fast]", [100.0 - 2 * k for k in range(20)], threshold=91.5)  # step 10
    never = _run("kfac[never]", [99.0] * 20, threshold=91.5)
    assert fast.crossing(91.5).step == 10 and slow.crossing(91.5).step == 14
    assert never.crossing(91.5).step is None
    assert tb.best_run([never, slow, fast], 91.5) is fast
    quicker = _run("kfac[quick]", [100.0 - 2 * k for k in range(20)], 0.05, threshold=91.5)
    assert tb.best_run([fast, quicker], 91.5) is quicker  # same steps, fewer seconds


def test_ratios_against_adamw_and_muon_and_the_floor():
    target = 91.5
    best = {
        "adamw": _run("adamw", [100.0 - k for k in range(20)], 0.1, target),  # step 14
        "muon": _run("muon", [100.0 - 1.4 * k for k in range(20)], 0.1, target),  # step 12
        "kfac": _run("kfac", [100.0 - 2 * k for k in range(20)], 0.2, target),  # step 10
    }
    interleaved = {"adamw": 0.1, "muon": 0.1, "kfac": 0.12}
    measured = tb.comparison(best, target, interleaved)
    assert measured["steps_to_target_kfac_over_adamw"] == pytest.approx(10 / 14)
    assert measured["steps_to_target_kfac_over_muon"] == pytest.approx(10 / 12)
    # Seconds: steps 2..k, so 9 steps of 0.2 against 13 of 0.1.
    assert measured["seconds_to_target_kfac_over_adamw"] == pytest.approx(1.8 / 1.3)
    assert measured["step_time_kfac_over_adamw"] == pytest.approx(2.0)
    assert measured["interleaved_step_time_kfac_over_muon"] == pytest.approx(1.2)
    assert measured["interleaved_seconds_to_target_kfac_over_adamw"] == pytest.approx(
        10 * 0.12 / (14 * 0.1)
    )
    met = tb.check_floor(measured)
    assert met == {
        "steps_to_target_kfac_over_adamw": True,
        "seconds_to_target_kfac_over_adamw": False,
        "seconds_to_target_kfac_over_muon": False,
    }
    assert not tb.floor_holds(met)
    # The steps bound is inclusive, the seconds bounds strict; not reached is not met.
    edge = {
        "steps_to_target_kfac_over_adamw": 0.75,
        "seconds_to_target_kfac_over_adamw": 0.99,
        "seconds_to_target_kfac_over_muon": 1.0,
    }
    assert tb.check_floor(edge) == {
        "steps_to_target_kfac_over_adamw": True,
        "seconds_to_target_kfac_over_adamw": True,
        "seconds_to_target_kfac_over_muon": False,
    }
    assert tb.floor_holds({**tb.check_floor(edge), "seconds_to_target_kfac_over_muon": True})
    assert not tb.floor_holds({**tb.check_floor(edge), "seconds_to_target_kfac_over_muon": None})
    best["kfac"] = _run("kfac", [99.0] * 20, 0.2, target)
    assert tb.comparison(best, target, None)["steps_to_target_kfac_over_adamw"] is None


def test_phase_split_attributes_the_differences_of_the_variants():
    split = tb.phase_split(
        {"kfac": 0.05, "no_inverse": 0.04, "no_statistics": 0.025, "adamw": 0.02}
    )
    assert split["inversion"] == pytest.approx(0.01)
    assert split["statistics"] == pytest.approx(0.015)
    assert split["preconditioning_and_rest"] == pytest.approx(0.005)
    assert split["adamw_step"] == 0.02 and split["kfac_step"] == 0.05


class _Recorder:
    """A stand-in for a compiled model: records its batches, returns a loss per call."""

    def __init__(self):
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    def train_on_batch(self, x, y, return_dict=False):
        self.batches.append((x, y))
        loss = float(len(self.batches))
        return {"loss": loss} if return_dict else loss


def test_supervised_lets_the_shared_loops_train_on_inputs_and_labels():
    x = np.arange(10.0)[:, None] * 10
    y = np.arange(10)
    recorder = _Recorder()
    batches = benchmarks.batch_indices(10, 5, steps=3, seed=0)
    run = benchmarks.train(tb.Supervised(recorder, x, y), np.arange(10), batches, name="r")
    assert run.losses == [1.0, 2.0, 3.0]
    for (bx, by), index in zip(recorder.batches, batches):
        np.testing.assert_array_equal(bx, x[index])
        np.testing.assert_array_equal(by, y[index])
    recorder.batches.clear()
    benchmarks.interleaved_step_seconds(
        {"a": tb.Supervised(recorder, x, y)}, np.arange(10), batches, rounds=1, block=2
    )
    assert len(recorder.batches) == 4  # a warm-up round and a timed one, of 2 steps
    np.testing.assert_array_equal(recorder.batches[2][1], y[batches[2]])


def _fake_task(task: str) -> dict:
    target = 91.5
    runs = {
        "adamw": [_run("adamw[learning_rate=0.001]", [100.0 - k for k in range(20)], 0.1, target)],
        "muon": [_run("muon[learning_rate=0.003]", [100.0 - k for k in range(20)], 0.1, target)],
        "kfac": [
            _run("kfac[a]", [100.0 - 2 * k for k in range(20)], 0.2, target),
            _run("kfac[b]", [99.0] * 20, 0.2, target),
        ],
    }
    best = {name: tb.best_run(rs, target) for name, rs in runs.items()}
    held = {"held_out_loss": 0.5, "held_out_accuracy": 0.9}
    measured = tb.comparison(best, target, {"adamw": 0.1, "muon": 0.1, "kfac": 0.2})
    met = tb.check_floor(measured)
    seconds = {"kfac": 0.05, "no_inverse": 0.04, "no_statistics": 0.025, "adamw": 0.02}
    return {
        "task": task,
        "data": "fake data",
        "steps": 20,
        "batch_size": 4,
        "seed": 0,
        "parameters": 1234,
        "target": {"loss": target, "fraction": 0.7, "from": "adamw[learning_rate=0.001]"},
        "grids": {k: [dict(p) for p in v] for k, v in tb.GRIDS.items()},
        "runs": {n: [{**r.summary(), **held} for r in rs] for n, rs in runs.items()},
        "best": {n: {**r.summary(), **held} for n, r in best.items()},
        "ratios": measured,
        "floor": {"bounds": tb.FLOORS, "met": met, "holds": tb.floor_holds(met)},
        "interleaved_seconds_per_step": {"adamw": 0.1, "muon": 0.1, "kfac": 0.2},
        "kfac_profile": {"seconds_per_step": seconds, "split": tb.phase_split(seconds)},
        "kfac_factors": [
            {"block": "query", "kind": "EinsumDenseBlock", "factors": [[65, 65], [64, 64]]},
            {"block": "key", "kind": "EinsumDenseBlock", "factors": [[65, 65], [64, 64]]},
            {"block": "norm", "kind": "ScaleShiftBlock", "factors": [[128]]},
        ],
        "_runs": runs,
    }


def test_the_section_reports_each_task_and_replaces_only_itself(tmp_path):
    result = {
        "machine": {
            "processor": "cpu",
            "cpu_count": 2,
            "platform": "p",
            "tensorflow": "t",
            "keras": "k",
        },
        "started_utc": "2026-12-01 17:00",
        "minutes": 12.5,
        "load_before": (2.0, 2.0, 2.0),
        "load_after": (3.0, 3.0, 3.0),
        "tasks": [_fake_task("vit"), _fake_task("charlm")],
    }
    section = tb.benchmark_markdown(result)
    assert section.splitlines()[0] == tb.SECTION_HEADING
    assert "### vit:" in section and "### charlm:" in section
    assert "Target loss **91.5000**" in section
    assert "| K-FAC | learning_rate 0.1 | 10 | 1.8 |" in section
    assert "| steps to target | 0.714 | 0.714 |" in section
    assert "Floor does NOT hold" in section and "kfac[b] | not reached" in section
    assert "inversion 10.0" in section and "statistics 15.0" in section
    assert "3 blocks, all structured: EinsumDenseBlock (2× 65×65 ⊗ 64×64)" in section
    payload = tb.to_json(result)
    assert '"losses"' in payload and "_runs" not in payload

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    tuner.write_markdown_section(str(path), section)
    tuner.write_markdown_section(str(path), section)  # again: replaced, not appended
    text = path.read_text()
    assert text.count(tb.SECTION_HEADING) == 1 and "## Other\n\nkept" in text


def test_the_command_line_defaults():
    args = tb.build_parser().parse_args([])
    assert args.tasks == ["vit", "charlm"] and args.steps is None and not args.write
    assert args.output.endswith("BENCHMARKS.md")
    args = tb.build_parser().parse_args(["--tasks", "vit", "--steps", "5", "--write"])
    assert args.tasks == ["vit"] and args.steps == 5 and args.write
