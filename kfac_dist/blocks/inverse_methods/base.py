"""The interface every inverse method answers: payload shapes, batched inversion, solves.

An inverse method turns a factor into its payload (what is stored, shared
between replicas and used at preconditioning) and applies payloads to
gradients. The factors it inverts at once all have one shape, so that one
batched op serves any set of factors a replica owns.
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
    def payload_shapes(self, factor_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of the payload of a full (n, n) or diagonal (n,) factor."""

    @abc.abstractmethod
    def invert(
        self, factors: Sequence[tf.Tensor], dampings: tf.Tensor | None
    ) -> tuple[list[list[tf.Tensor]], list[tf.Tensor]]:
        """The payloads of equally shaped factors, and each one's retries (int32 scalars).

        `dampings` holds one damping per factor when `needs_factor_damping`,
        else it is None.
        """

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
        result has M's shape.
        """
