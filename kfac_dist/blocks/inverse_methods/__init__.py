"""The inverse methods, one module each, and their registry (`inverse_method` name → method)."""

from __future__ import annotations

from kfac_dist.blocks.inverse_methods.base import InverseMethod, Payload
from kfac_dist.blocks.inverse_methods.cholesky import Cholesky
from kfac_dist.blocks.inverse_methods.eigen import Eigen

#: Every inverse method, by the `inverse_method` option that selects it.
INVERSE_METHOD_OF: dict[str, InverseMethod] = {
    method.name: method for method in (Cholesky(), Eigen())
}


def inverse_method(method: str | InverseMethod) -> InverseMethod:
    """The registered inverse method of a name (a method is returned as it is)."""
    if isinstance(method, InverseMethod):
        return method
    if method not in INVERSE_METHOD_OF:
        raise ValueError(
            f"Unknown inverse method {method!r}: expected one of {tuple(INVERSE_METHOD_OF)}."
        )
    return INVERSE_METHOD_OF[method]


__all__ = ["INVERSE_METHOD_OF", "Cholesky", "Eigen", "InverseMethod", "Payload", "inverse_method"]
