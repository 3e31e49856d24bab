"""The interface every inverse method answers: payload shapes, batched inversion, solves.

An inverse method turns a factor into its payload (what is stored, shared
between replicas and used at preconditioning) and applies payloads to
gradients. The factors it inverts at once all have one shape, so that one
batched op serves any set of factors a replica owns. A grouped factor (g
members with a leading group axis, see `linalg.members`) has the payload of
its members stacked on that axis, and its Kronecker solve runs over the
group axis as a batch.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import tensorflow as tf

#: One factor's payload: the tensors `InverseMethod.invert` makes of it.
Payload = Sequence[tf.Tensor]


class InverseMethod(abc.ABC):
    """How a factor is inverted, and how its payload preconditions a gradient."""

    #: the `inverse_method` option that selects it.
    name: ClassVar[str]
    #: whether `invert` takes each factor's damping (see `blocks.factor_dampings`):
    #: True when the damping is baked into the payload, False when it is
    #: applied exactly at preconditioning (so that a new damping acts at once).
    needs_factor_damping: ClassVar[bool]

    @abc.abstractmethod
    def payload_shapes(
        self, factor_shape: tuple[int, ...], groups: int | None = None
    ) -> list[tuple[int, ...]]:
        """Shapes of the payload of a full (n, n) or diagonal (n,) factor.

        With `groups`, the factor is grouped ((g, n, n) or (g, n)): the
        shapes of its members' payloads with the group axis in front.
        """

    @abc.abstractmethod
    def invert_stack(
        self, stack: tf.Tensor, dampings: tf.Tensor | None
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """The payload of each of a (k, n, n) or (k, n) stack of factors, and each one's retries.

        Returns the payload tensors, each with the stack's leading axis
        (k, ...) (an empty tensor of no elements may have none), and the
        (k,) int32 retries. `dampings` holds one damping per factor when
        `needs_factor_damping`, else it is None.
        """

    def invert(
        self, factors: Sequence[tf.Tensor], dampings: tf.Tensor | None
    ) -> tuple[list[list[tf.Tensor]], list[tf.Tensor]]:
        """The payloads of equally shaped factors, and each one's retries (int32 scalars).

        `dampings` holds one damping per factor when `needs_factor_damping`,
        else it is None.
        """
        count = len(factors)
        stacks, retries = self.invert_stack(tf.stack(list(factors)), dampings)
        per_tensor = [
            tf.unstack(s, num=count) if s.shape.num_elements() else [s] * count for s in stacks
        ]
        return [list(p) for p in zip(*per_tensor)], tf.unstack(retries, num=count)

    @abc.abstractmethod
    def solve(self, payload: Payload, vector: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
        """(F + λI)⁻¹ v for a full or diagonal factor F given by its payload; v flat."""

    @abc.abstractmethod
    def solve_kronecker(
        self,
        input_payload: Payload,
        output_payload: Payload,
        matrix: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        """The damped (A ⊗ G)⁻¹ applied to the (input side, output side) matrix M.

        A (full or diagonal) and G (full) are given by their payloads; the
        result has M's shape. Grouped factors precondition a (g, in, out)
        stack of matrices, each member pair its own matrix.
        """

    @abc.abstractmethod
    def solve_kronecker_blocks(
        self,
        input_payload: Payload,
        output_payload: Payload,
        grid: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        """(⊕_{i,j} A_i ⊗ G_j)⁻¹, damped, applied to a (k_A, m_A, k_G, m_G) grid of blocks.

        Block (i, j) of the grid, X[i, :, j, :], is solved with member i of A
        and member j of G: the payloads of k_A members of A ((k_A, ...),
        full or diagonal) and k_G of G. Every product is a batched matmul
        over one members axis (no broadcasting between batch shapes).
        """


def grouped_shapes(shapes: list[tuple[int, ...]], groups: int | None) -> list[tuple[int, ...]]:
    """Member payload shapes with the group axis in front (an empty shape stays as it is)."""
    if groups is None:
        return shapes
    return [shape if 0 in shape else (groups, *shape) for shape in shapes]
