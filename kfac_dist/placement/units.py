"""Inversion units: the factors that are inverted, one owner replica each.

A grouped factor (a block-diagonal factor of g equal members, such as the
per-channel factors of a depthwise convolution) is one unit: its owner
inverts all g members, and its sizes and costs are g times a member's.
"""

from __future__ import annotations

import dataclasses
import numbers

from kfac_dist.options import INVERSE_METHODS

UNIT_KINDS = ("matrix", "diagonal")


def check_method(method: str) -> str:
    """Returns `method` if it is a known inverse method, else raises ValueError."""
    if method not in INVERSE_METHODS:
        raise ValueError(f"Unknown inverse method {method!r}: expected one of {INVERSE_METHODS}.")
    return method


@dataclasses.dataclass(frozen=True)
class InversionUnit:
    """One factor inverted as a whole on an inverse update.

    Attributes:
        name: unique name of the factor, e.g. `"dense_1/A"`.
        block: name of the curvature block the factor belongs to.
        dim: side `n` of a matrix factor, or number of entries of a diagonal
            factor; at least 1.
        kind: `"matrix"` (an `n x n` symmetric factor) or `"diagonal"`.
        groups: number of members of a grouped factor (`dim` is then a
            member's side or length), 1 for a factor that is not grouped.
    """

    name: str
    block: str
    dim: int
    kind: str = "matrix"
    groups: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"InversionUnit name must be a non-empty str, got {self.name!r}.")
        if not isinstance(self.block, str) or not self.block:
            raise ValueError(
                f"InversionUnit {self.name!r}: block must be a non-empty str, got {self.block!r}."
            )
        # bool is an int subclass, but dim=True is always a mistake.
        if isinstance(self.dim, bool) or not isinstance(self.dim, numbers.Integral) or self.dim < 1:
            raise ValueError(
                f"InversionUnit {self.name!r}: dim must be an int >= 1, got {self.dim!r}."
            )
        # Shapes often arrive as NumPy integers; a plain int keeps units hashable
        # and JSON-ready.
        object.__setattr__(self, "dim", int(self.dim))
        if self.kind not in UNIT_KINDS:
            raise ValueError(
                f"InversionUnit {self.name!r}: kind must be one of {UNIT_KINDS}, got {self.kind!r}."
            )
        if (
            isinstance(self.groups, bool)
            or not isinstance(self.groups, numbers.Integral)
            or self.groups < 1
        ):
            raise ValueError(
                f"InversionUnit {self.name!r}: groups must be an int >= 1, got {self.groups!r}."
            )
        object.__setattr__(self, "groups", int(self.groups))

    def factor_floats(self) -> int:
        """Number of floats of the factor in the factor sync.

        A matrix factor travels as its packed triangle `n(n+1)/2`, a diagonal
        one as its `n` entries; a grouped factor as each member's.
        """
        n = self.dim
        per_member = n if self.kind == "diagonal" else n * (n + 1) // 2
        return self.groups * per_member

    def result_floats(self, method: str) -> int:
        """Number of floats the owner shares with the other replicas.

        A Cholesky-mode inverse is symmetric, so only its packed triangle
        `n(n+1)/2` travels; eigen mode shares the eigenvectors and eigenvalues,
        `n*n + n`. A diagonal factor shares its `n` entries in either mode. A
        grouped factor shares each member's.
        """
        check_method(method)
        n = self.dim
        if self.kind == "diagonal":
            per_member = n
        elif method == "cholesky":
            per_member = n * (n + 1) // 2
        else:
            per_member = n * n + n
        return self.groups * per_member
