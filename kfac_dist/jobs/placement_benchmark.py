"""The placement benchmark's command: each policy's max share on ResNet-50 shapes, and the
communication and memory model at scale on ResNet-50 and BERT-Large.

    python scripts/benchmark_placement.py              # print only: the tree stays clean
    python scripts/benchmark_placement.py --write      # print, and update BENCHMARKS.md
    python scripts/benchmark_placement.py --replicas 2 16 128
    python scripts/benchmark_placement.py --comm-replicas 8 64 --network 2 50

Exits with 1 if "balanced" is not within 5% of the lower bound at every
replica count. Nothing is trained: the plans and their tables are
kfac_dist/jobs/tuner.py's (Keras loads only to build the model, after the
flags are parsed); the communication tables are
kfac_dist/placement/communication.py's α–β model, on ResNet-50's blocks
and on BERT-Large's shapes written out by hand. `scripts/benchmark_placement.py`
and the console script `kfac-benchmark-placement` call `main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kfac_dist.jobs import tuner
from kfac_dist.placement.communication import (
    FLOAT32_BYTES,
    NETWORKS,
    CommunicationCost,
    ModelShape,
    Network,
    bert_shape,
    communication_cost,
)
from kfac_dist.placement.report import format_bytes

if TYPE_CHECKING:
    import keras

DESCRIPTION = (
    "Command line of the placement benchmark: each policy's max share on ResNet-50 shapes."
)
TOLERANCE = 0.05
BENCHMARKS_NAME = "BENCHMARKS.md"
MODEL = "ResNet50"
MODEL_LABEL = "`keras.applications.ResNet50(weights=None)`"
COMMUNICATION_HEADING = "## Communication and memory per replica at scale (α–β model)"
COMMUNICATION_REPLICAS = (8, 64, 256)
COMMUNICATION_METHODS = ("cholesky", "eigen")
COMMUNICATION_SHARING = ("all_reduce", "all_gather", "broadcast")
#: Fractions of the inverses replicated; 0 needs no sharing mode (nothing is shared).
COMMUNICATION_REPLICATION = (1.0, 0.5, 0.0)


def default_output(script: str | None = None) -> str:
    """BENCHMARKS.md at the top of the checkout: the folder above `script`'s (a file
    in scripts/), or without one the folder above this package."""
    if script is None:
        top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    else:
        top = os.path.join(os.path.dirname(os.path.abspath(script)), "..")
    return os.path.normpath(os.path.join(top, BENCHMARKS_NAME))


def build_parser(output: str) -> argparse.ArgumentParser:
    """The command line; `output` is `--output`'s default."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--replicas", type=int, nargs="+", default=list(tuner.BENCHMARK_REPLICAS))
    parser.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    parser.add_argument(
        "--comm-replicas",
        type=int,
        nargs="+",
        default=list(COMMUNICATION_REPLICAS),
        help="replica counts of the communication tables (%(default)s)",
    )
    parser.add_argument(
        "--network",
        type=float,
        nargs=2,
        action="append",
        metavar=("ALPHA_US", "BETA_GB_S"),
        help="a network of the communication tables: latency in µs per message and "
        "bandwidth in GB/s per link; repeat for several (default: 100 Gb/s Ethernet, "
        "10 µs and 12.5 GB/s; NVLink/ICI-like, 5 µs and 100 GB/s)",
    )
    parser.add_argument(
        "--invert-every",
        type=int,
        default=10,
        help="slots of the staggered inverse updates (Kfac's default, %(default)s)",
    )
    parser.add_argument(
        "--sync-chunk-mib",
        type=float,
        default=64.0,
        help="factor sync in chunks of at most this many MiB (Kfac's sync_chunk_bytes default, "
        "%(default)s; 0: one collective)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="also put the section into --output (a tracked file: left alone unless asked)",
    )
    parser.add_argument(
        "--output", default=output, help="markdown file --write updates (%(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, script: str | None = None) -> int:
    """Prints the benchmark's section (and writes it with `--write`); exit status 1 if
    "balanced" is not within TOLERANCE of the bound. `script`: the file in scripts/
    that started it, whose checkout's BENCHMARKS.md `--write` updates by default."""
    args = build_parser(default_output(script)).parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads TensorFlow
    resnet = keras_shape(tuner.load_model(MODEL), "ResNet-50")
    benchmark = tuner.benchmark_placement(
        resnet.units,
        model_name=MODEL_LABEL,
        replica_counts=args.replicas,
        inverse_method=args.inverse_method,
    )
    section = tuner.benchmark_markdown(benchmark)
    networks: tuple[Network, ...] = NETWORKS
    if args.network:
        networks = tuple(
            Network(f"α = {alpha:g} µs, β = {beta:g} GB/s", alpha * 1e-6, beta * 1e9)
            for alpha, beta in args.network
        )
    chunk = int(args.sync_chunk_mib * 2**20) or None
    shapes = (resnet, bert_shape())
    communication = communication_markdown(
        communication_benchmark(
            shapes,
            replica_counts=args.comm_replicas,
            networks=networks,
            invert_every=args.invert_every,
            sync_chunk_bytes=chunk,
        ),
        shapes,
    )
    print(section)
    print(communication)
    if args.write:
        tuner.write_markdown_section(args.output, section)
        tuner.write_markdown_section(args.output, communication)
        print(f"written to {os.path.normpath(args.output)}")
    within = benchmark.within("balanced", TOLERANCE)
    print(f"balanced within {TOLERANCE:.0%} of the bound at every N: {'yes' if within else 'NO'}")
    return 0 if within else 1


# --- the communication tables -------------------------------------------------------
def keras_shape(model: keras.Model, name: str) -> ModelShape:
    """The inversion units `Kfac` would have for `model`, and each block's parameters
    (registered as `tuner.model_units` registers them)."""
    from kfac_dist import curvature, registration

    blocks = registration.collect_blocks(model)
    return ModelShape(
        name, tuple(curvature.inversion_units(blocks)), {b.name: b.num_params for b in blocks}
    )


def communication_benchmark(
    shapes: Sequence[ModelShape],
    *,
    replica_counts: Sequence[int] = COMMUNICATION_REPLICAS,
    networks: Sequence[Network] = NETWORKS,
    methods: Sequence[str] = COMMUNICATION_METHODS,
    invert_every: int = 10,
    sync_chunk_bytes: int | None = None,
) -> list[CommunicationCost]:
    """Every (model, network, replicas, method, sharing, replication) of the tables.

    With replication 0 nothing is shared, so one sharing mode stands for all.
    """
    results = []
    for shape in shapes:
        for network in networks:
            for n in replica_counts:
                for method in methods:
                    for f in COMMUNICATION_REPLICATION:
                        for sharing in COMMUNICATION_SHARING[: 1 if f == 0 else None]:
                            results.append(
                                communication_cost(
                                    shape,
                                    n,
                                    network,
                                    method=method,
                                    sharing=sharing,
                                    replication=f,
                                    invert_every=invert_every,
                                    sync_chunk_bytes=sync_chunk_bytes,
                                )
                            )
    return results


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _mode(result: CommunicationCost) -> str:
    return "distributed (nothing shared)" if result.replication == 0 else result.sharing


def communication_markdown(
    results: Sequence[CommunicationCost], shapes: Sequence[ModelShape]
) -> str:
    """The results as a markdown section under `COMMUNICATION_HEADING`: per model, one
    time table per network and one memory table, the (method, sharing, f) as rows and
    the replica counts as column groups."""
    first = results[0]
    chunk = first.update.sync_collectives > 1 or first.update.sync_buffer < first.update.sync_bytes
    networks = list(dict.fromkeys(r.network for r in results))
    counts = list(dict.fromkeys(r.num_replicas for r in results))
    k = first.invert_every
    lines = [
        COMMUNICATION_HEADING,
        "",
        "Written by `python scripts/benchmark_placement.py --write` (a model, nothing run: "
        "kfac_dist/placement/communication.py). Float32 (4 bytes). Ring collectives under the "
        "α–β (Hockney) model: all-reduce 2(N−1)α + 2(N−1)/N·B/β; all-gather "
        "(N−1)α + (N−1)/N·(N·B_own)/β; broadcast ⌈log2 N⌉α + B/β per owner. Networks: "
        + "; ".join(
            f"{n.name}, α = {n.alpha * 1e6:g} µs, β = {n.beta / 1e9:g} GB/s" for n in networks
        )
        + ".",
        "",
        "- **step**: the gradient all-reduce (P floats) plus, with distributed blocks, the "
        "all-reduce of their preconditioned gradients (P_dist floats).",
        "- **update**: one inverse update: the factor-sum all-reduce (packed triangles, "
        + (f"in chunks of {format_bytes(first.update.sync_buffer)}" if chunk else "one collective")
        + ") and the sharing of the replicated blocks' inverses (Cholesky: triangles; eigen: "
        "n² + n), each unit placed by `balanced` on flop costs.",
        f"- **stag.**: a step with staggered inverse updates, `invert_every = {k}`: the units "
        f"spread over {k} slots by flops, each step syncs and shares one slot's; step + the "
        "mean slot.",
        "- **f**: the fraction of inverses replicated (`inverse_replication`). Blocks are "
        "distributed, largest (inverse floats held / gradient floats) first, until every "
        "replica holds at most f·total + (1−f)·total/N of the inverses; a distributed block is "
        "held and preconditioned by its owner only, never shared. f = 0: every block.",
        "- **memory**: the busiest replica's factor sums (one copy, full matrices as held), "
        "the inverses it holds (Cholesky: the full n×n inverse) and its largest transient "
        "buffer (factor sync, sharing, or P_dist). "
        "**dist.**: share of the parameters in distributed blocks.",
    ]
    for shape in shapes:
        own = [r for r in results if r.model == shape.name]
        lines += [
            "",
            f"### {shape.name}",
            "",
            f"{len(shape.units)} units in {len(shape.block_params)} blocks; P = "
            f"{shape.num_params:,} parameters ({format_bytes(shape.num_params * FLOAT32_BYTES)}"
            f" of gradients); factor sync {format_bytes(own[0].update.sync_bytes)}; inverses "
            f"held {format_bytes(shape.stored_inverse_floats('cholesky') * FLOAT32_BYTES)} "
            f"(Cholesky), {format_bytes(shape.stored_inverse_floats('eigen') * FLOAT32_BYTES)} "
            "(eigen).",
        ]
        if shape.name.startswith("BERT"):
            lines += ["", BERT_NOTE]
        for network in networks:
            lines += [
                "",
                f"Time in ms, {network.name}:",
                "",
                "| method | sharing | f | "
                + " | ".join(f"N={n} step | update | stag." for n in counts)
                + " |",
                "|:---|:---|---:|" + "---:|" * (3 * len(counts)),
            ]
            for row in _rows([r for r in own if r.network == network], counts):
                cells = []
                for r in row:
                    cells += [_ms(r.step_s), _ms(r.update_s), _ms(r.staggered_step_s)]
                lines.append(_row_label(row[0]) + " | ".join(cells) + " |")
        lines += [
            "",
            "Memory per replica:",
            "",
            "| method | sharing | f | "
            + " | ".join(f"N={n} memory | dist." for n in counts)
            + " |",
            "|:---|:---|---:|" + "---:|" * (2 * len(counts)),
        ]
        for row in _rows([r for r in own if r.network == networks[0]], counts):
            cells = []
            for r in row:
                share = r.distribution.distributed_params / shape.num_params
                cells += [format_bytes(r.memory.total), f"{100 * share:.0f}%"]
            lines.append(_row_label(row[0]) + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BERT_NOTE = (
    "BERT-Large by hand (`bert_shape`): 24 layers, hidden 1024, 16 heads, FFN 4096, vocabulary "
    "30522, 512 positions, 2 token types; Dense/EinsumDense with bias (A = in + 1, G = out), "
    "embeddings with a diagonal A, LayerNorms diagonal; the pooler, no masked-LM head "
    "(335,141,888 parameters, Hugging Face's `BertModel` count)."
)


def _rows(
    results: Sequence[CommunicationCost], counts: Sequence[int]
) -> list[list[CommunicationCost]]:
    """The results grouped into table rows, (method, sharing, f) in order, one per count."""
    keys = list(dict.fromkeys((r.method, _mode(r), r.replication) for r in results))
    by_key = {(r.method, _mode(r), r.replication, r.num_replicas): r for r in results}
    return [[by_key[key + (n,)] for n in counts] for key in keys]


def _row_label(result: CommunicationCost) -> str:
    return f"| {result.method} | {_mode(result)} | {result.replication:g} | "


if __name__ == "__main__":
    sys.exit(main())
