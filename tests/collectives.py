"""Test utility: collectives (and other ops) in a traced Keras train function's graph.

Counts CollectiveReduce / CollectiveGather / CollectiveBcast* ops in the
graph itself and every function it calls (tf.cond and tf.while bodies,
nested tf.functions), not the project's own counters. A `tf.cond` (or a
`tf.switch_case`) runs one branch, so it counts as its busiest branch; a while body counts once (one
iteration). Ops under K-FAC's inverse-update scope count per inverse
update, the rest per step. Under MirroredStrategy each replica's ops appear
once per local replica: divide by their number.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from kfac_dist.step import INVERSE_UPDATE_SCOPE

COLLECTIVE_OPS = frozenset(
    f"{name}{version}"
    for name in (
        "CollectiveReduce",
        "CollectiveGather",
        "CollectiveBcastSend",
        "CollectiveBcastRecv",
        "CollectiveAllToAll",
        "CollectiveReduceScatter",
    )
    for version in ("", "V2", "V3")
)
_BRANCHES = {"If": ("then_branch", "else_branch"), "StatelessIf": ("then_branch", "else_branch")}
_CALLS = {
    "While": ("cond", "body"),
    "StatelessWhile": ("cond", "body"),
    "PartitionedCall": ("f",),
    "StatefulPartitionedCall": ("f",),
}


@dataclasses.dataclass(frozen=True)
class Collectives:
    per_step: int
    per_inverse_update: int

    def __add__(self, other: Collectives) -> Collectives:
        return Collectives(
            self.per_step + other.per_step, self.per_inverse_update + other.per_inverse_update
        )

    def per_replica(self, local_replicas: int) -> Collectives:
        assert self.per_step % local_replicas == 0, self
        assert self.per_inverse_update % local_replicas == 0, self
        return Collectives(
            self.per_step // local_replicas, self.per_inverse_update // local_replicas
        )


def _count(nodes, library) -> Collectives:
    total = Collectives(0, 0)
    for node in nodes:
        if node.op in COLLECTIVE_OPS:
            total += Collectives(1, 0)
        elif node.op in _BRANCHES:
            branches = [
                _count(library[node.attr[a].func.name].node_def, library)
                for a in _BRANCHES[node.op]
            ]
            busiest = Collectives(
                max(b.per_step for b in branches), max(b.per_inverse_update for b in branches)
            )
            if INVERSE_UPDATE_SCOPE in node.name:
                busiest = Collectives(0, busiest.per_step + busiest.per_inverse_update)
            total += busiest
        elif node.op in ("Case", "StatelessCase"):
            branches = [
                _count(library[f.name].node_def, library) for f in node.attr["branches"].list.func
            ]
            busiest = Collectives(
                max(b.per_step for b in branches), max(b.per_inverse_update for b in branches)
            )
            if INVERSE_UPDATE_SCOPE in node.name:
                busiest = Collectives(0, busiest.per_step + busiest.per_inverse_update)
            total += busiest
        elif node.op in _CALLS:
            for attr in _CALLS[node.op]:
                total += _count(library[node.attr[attr].func.name].node_def, library)
        elif node.op in library:
            total += _count(library[node.op].node_def, library)
    return total


def count_collectives(train_function) -> Collectives:
    """Collectives of the one traced graph of a Keras train function (after `fit`)."""
    graph = _traced_graph(train_function)
    library = {f.signature.name: f for f in graph.library.function}
    return _count(graph.node, library)


def count_ops(train_function, op_types: set[str]) -> int:
    """Ops of these types in the traced graph and every function it holds (each once)."""
    graph = _traced_graph(train_function)
    functions = [graph.node, *(f.node_def for f in graph.library.function)]
    return sum(node.op in op_types for nodes in functions for node in nodes)


def _traced_graph(train_function):
    keras_function = getattr(train_function, "__wrapped__", train_function)
    traced = [
        cell.cell_contents
        for cell in keras_function.__closure__ or ()
        if isinstance(cell.cell_contents, tf.types.experimental.PolymorphicFunction)
    ]
    concrete = [c for f in traced for c in f._list_all_concrete_functions()]  # noqa: SLF001
    assert len(concrete) == 1, f"expected one traced train function, found {len(concrete)}"
    return concrete[0].graph.as_graph_def()
