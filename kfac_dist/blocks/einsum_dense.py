"""EinsumDense layers (the projections of attention): a Dense block once the equation is read.

The equation's axes fall into four kinds: input features (in the input and
the kernel, contracted away), output features (in the kernel and the
output), shared axes (in the input and the output, not the kernel: the
batch, sequence positions) and summed axes (in the input only, summed away
by the einsum). The kernel is then an (input features, output features)
matrix applied at every shared position, which is a Dense layer on rows:
each row is one position of one example, its input features flattened in
kernel order. `kron_sharing` ("expand" by default, or "reduce") says how the
positions of one example enter the factors, as for Dense (kfac-jax's
repeated dense; Eschenhagen et al. 2023, "Kronecker-Factored Approximate
Curvature for Modern Neural Network Architectures").

The bias (`bias_axes`) must span every output feature axis; over output
features alone it is a constant input 1, as for Dense. A bias that also
spans shared axes (one bias per sequence position) is carried by a one-hot
input over those positions: row ā = [a, e_t] and matrix [kernel; bias] with
one bias row per position, which is again exact for a linear layer.

A kernel axis that is in the input, the kernel and the output (a batched
einsum: one matrix per entry of that axis) is not one Kronecker block; such
a layer is left to `unsupported_layers="diagonal"` or
`LayerCollection.register_generic`, as are LoRA and quantized layers.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src.backend import get_keras_mask

from kfac_dist.blocks.dense import DenseBlock
from kfac_dist.blocks.records import Record, with_ones
from kfac_dist.linalg import curvature_dtype
from kfac_dist.options import EXPAND

_EQUATION = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)$")


@dataclasses.dataclass(frozen=True)
class EinsumAxes:
    """The axes of an EinsumDense equation by kind, "..." written out as letters."""

    inputs: str
    kernel: str
    outputs: str
    shared: str  # in input order; the first is the batch axis
    summed: str  # in the input only: the einsum sums over them
    input_features: str  # in kernel order
    output_features: str  # in kernel order
    batched: str  # in the input, the kernel and the output
    bias: str  # the bias variable's axes, in output order (its size-1 axes left out)
    bias_span: str  # the output axes the bias variable is shaped over (Keras' layout)

    @property
    def bias_shared(self) -> str:
        """The shared axes the bias spans, in shared order (one bias row per their entry)."""
        return "".join(c for c in self.shared if c in self.bias)


def parse_equation(equation: str, input_rank: int, bias_axes: str | None = None) -> EinsumAxes:
    """Classifies the axes of `equation` (Keras' "[X],[Y]->[Z]" forms, "..." included)."""
    match = _EQUATION.match(equation.replace(" ", ""))
    if match is None:
        raise ValueError(f"Cannot read the EinsumDense equation {equation!r}.")
    inputs, kernel, outputs = match.groups()
    if "..." in inputs:
        unused = [c for c in string.ascii_letters if c not in equation]
        explicit = inputs.replace("...", "")
        elided = "".join(unused[: max(input_rank - len(explicit), 0)])
        inputs, outputs = inputs.replace("...", elided), outputs.replace("...", elided)
    if "." in inputs + outputs:
        raise ValueError(f"Cannot read the EinsumDense equation {equation!r}.")
    bias = "".join(c for c in outputs if bias_axes and c in bias_axes)
    first = min((outputs.index(c) for c in bias), default=len(outputs))
    return EinsumAxes(
        inputs=inputs,
        kernel=kernel,
        outputs=outputs,
        shared="".join(c for c in inputs if c in outputs and c not in kernel),
        summed="".join(c for c in inputs if c not in outputs and c not in kernel),
        input_features="".join(c for c in kernel if c in inputs and c not in outputs),
        output_features="".join(c for c in kernel if c in outputs and c not in inputs),
        batched="".join(c for c in kernel if c in inputs and c in outputs),
        bias=bias,
        bias_span=outputs[first:] if bias else "",
    )


def layer_axes(layer: Any) -> EinsumAxes:
    """The axes of a built EinsumDense layer's equation."""
    return parse_equation(layer.equation, int(layer.input_spec.ndim), layer.bias_axes)


def why_unsupported(layer: Any) -> str | None:
    """Why an EinsumDense layer is not one Kronecker block, or None when it is."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled, so its trainable variables are the low-rank factors"
    if getattr(layer, "quantization_mode", None) is not None:
        return f"it is quantized ({layer.quantization_mode})"
    if not layer.built:
        return "it is not built"
    try:
        axes = layer_axes(layer)
    except ValueError as error:
        return str(error).rstrip(".")
    where = f"of its equation {layer.equation!r}"
    if axes.batched:
        return (
            f"kernel axis {', '.join(axes.batched)} {where} is in the input, the kernel and "
            "the output (a batched einsum, one weight matrix per entry), which is not one "
            "Kronecker block"
        )
    if not axes.shared or axes.outputs[:1] != axes.inputs[:1] or axes.inputs[0] not in axes.shared:
        return f"the first (batch) axis {where} is not the first axis of both input and output"
    if axes.bias and axes.inputs[0] in axes.bias:
        return f"its bias spans the batch axis {where}"
    missing = [c for c in axes.output_features if c not in axes.bias]
    if axes.bias and missing:
        return (
            f"its bias (bias_axes={layer.bias_axes!r}) leaves out output axis "
            f"{', '.join(missing)} {where}: the bias is then tied across that axis, "
            "which is not a constant input of the kernel's block"
        )
    return None


def unsupported_message(layer: Any, reason: str) -> str:
    """The error for an EinsumDense layer this block cannot cover, with how to register it."""
    return (
        f"K-FAC cannot make a Kronecker block of EinsumDense layer '{layer.name}': {reason}. "
        "Pass unsupported_layers='diagonal' to Kfac (a diagonal Fisher block for it), or "
        "register it by hand: lc = kfac_dist.LayerCollection(); "
        "lc.register_generic(layer.trainable_variables, name=layer.name); "
        "Kfac(..., layer_collection=lc)."
    )


class EinsumDenseBlock(DenseBlock):
    """K-FAC for `keras.layers.EinsumDense`: F ≈ A ⊗ G over the (inputs, outputs) kernel matrix."""

    def __init__(self, layer: Any, approx: str | None = None, kron_sharing: str = EXPAND):
        reason = why_unsupported(layer)
        if reason is not None:
            raise ValueError(unsupported_message(layer, reason))
        self.axes = layer_axes(layer)
        super().__init__(layer, approx, kron_sharing)
        axes, kernel = self.axes, self.variables[0]
        self._sizes = {c: int(n) for c, n in zip(axes.kernel, kernel.shape)}
        if self.has_bias:
            bias_shape = self.variables[1].shape
            self._sizes.update(
                {c: int(n) for c, n in zip(axes.bias_span, bias_shape) if c in axes.bias}
            )
        self._in_dim = self._size(axes.input_features)
        self._out_dim = self._size(axes.output_features)
        self._bias_rows = self._size(axes.bias_shared) if self.has_bias else 0

    def _size(self, letters: str) -> int:
        return int(np.prod([self._sizes[c] for c in letters], dtype=np.int64))

    def _shape(self, letters: str) -> list[int]:
        return [self._sizes[c] for c in letters]

    # --- what it records ------------------------------------------------------
    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        outputs, record = super().record(call, inputs, *args, **kwargs)
        record.extras = self._input_mask(inputs)
        return outputs, record

    def _input_mask(self, inputs: Any) -> dict[str, tf.Tensor]:
        # A Keras mask is one entry per position of the leading axes; it lines
        # up with the rows when those are exactly the shared axes, in order.
        mask = get_keras_mask(inputs)
        shared = self.axes.shared
        if mask is None or self.axes.inputs[: len(shared)] != shared:
            return {}
        if mask.shape.rank != len(shared):
            return {}
        return {"mask": mask}

    # --- the kernel seen as a Dense layer on rows -----------------------------
    def input_rows(self, record: Record) -> tf.Tensor:
        axes = self.axes
        x = tf.cast(record.inputs, curvature_dtype())
        letters = axes.inputs
        if axes.summed:
            x = tf.reduce_sum(x, axis=[letters.index(c) for c in axes.summed])
            letters = "".join(c for c in letters if c not in axes.summed)
        x = _transpose(x, letters, axes.shared + axes.input_features)
        a = tf.reshape(x, [-1, self._in_dim])
        if not self.has_bias:
            return a
        if not axes.bias_shared:
            return with_ones(a)
        # One bias row per entry of the shared axes the bias spans (in shared
        # order, as the rows): a one-hot input over them, broadcast over the
        # other shared axes.
        shape = [self._sizes[c] if c in axes.bias_shared else 1 for c in axes.shared[1:]]
        eye = tf.reshape(tf.eye(self._bias_rows, dtype=a.dtype), [1, *shape, self._bias_rows])
        onehot = tf.broadcast_to(
            eye, tf.concat([tf.shape(x)[: len(axes.shared)], [self._bias_rows]], axis=0)
        )
        return tf.concat([a, tf.reshape(onehot, [-1, self._bias_rows])], axis=1)

    def output_rows(self, grads: tf.Tensor) -> tf.Tensor:
        axes = self.axes
        g = tf.cast(grads, curvature_dtype())
        # The leading column axis stays first: "_" is no einsum letter.
        g = _transpose(g, "_" + axes.outputs, "_" + axes.shared + axes.output_features)
        return tf.reshape(g, [-1, self._out_dim])

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        fan_in = self._in_dim + self._bias_rows
        return (fan_in, fan_in), self._out_dim

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        per_record = []
        for record, grads in zip(records, output_grads):
            batch = tf.shape(record.outputs)[0]
            a = self.input_rows(record)
            positions = tf.shape(a)[0] // tf.maximum(batch, 1)
            a = tf.reshape(a, tf.stack([batch, positions, a.shape[-1]]))
            g = self.output_rows(grads)
            g = tf.reshape(g, tf.stack([tf.shape(grads)[0], batch, positions, self._out_dim]))
            per_record.append(tf.einsum("bti,cbto->cbio", a, g))
        total = tf.add_n(per_record)
        parts = self._to_variables(total, lead=2)
        return tf.concat(
            [tf.reshape(p, [-1, int(np.prod(v.shape))]) for p, v in zip(parts, self.variables)],
            axis=1,
        )

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        axes = self.axes
        kernel = _transpose(
            tf.convert_to_tensor(grads[0]), axes.kernel, axes.input_features + axes.output_features
        )
        kernel = tf.reshape(kernel, [self._in_dim, self._out_dim])
        if not self.has_bias:
            return kernel
        bias = tf.reshape(grads[1], self._shape(axes.bias))
        bias = _transpose(bias, axes.bias, axes.bias_shared + axes.output_features)
        return tf.concat([kernel, tf.reshape(bias, [-1, self._out_dim])], axis=0)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        return self._to_variables(matrix, lead=0)

    def _to_variables(self, matrix: tf.Tensor, lead: int) -> list[tf.Tensor]:
        """(*L, fan_in, out) matrices to (*L, *variable shape) tensors, one per variable."""
        axes = self.axes
        leading = tf.shape(matrix)[:lead]
        marks = string.digits[:lead]  # the leading axes, as letters no equation uses
        parts = (
            tf.split(matrix, [self._in_dim, self._bias_rows], axis=lead)
            if self.has_bias
            else [matrix]
        )
        kernel_letters = axes.input_features + axes.output_features
        kernel = tf.reshape(parts[0], tf.concat([leading, self._shape(kernel_letters)], 0))
        kernel = _transpose(kernel, marks + kernel_letters, marks + axes.kernel)
        out = [tf.reshape(kernel, tf.concat([leading, self.variables[0].shape], 0))]
        if self.has_bias:
            bias_letters = axes.bias_shared + axes.output_features
            bias = tf.reshape(parts[1], tf.concat([leading, self._shape(bias_letters)], 0))
            bias = _transpose(bias, marks + bias_letters, marks + axes.bias)
            out.append(tf.reshape(bias, tf.concat([leading, self.variables[1].shape], 0)))
        return out


def einsum_dense_block(
    layer: Any, approx: str | None = None, kron_sharing: str = EXPAND
) -> EinsumDenseBlock | None:
    """The block of an EinsumDense layer, or None when it is not one Kronecker block.

    None lets registration treat the layer as unsupported (`why_unsupported`
    says why): an error naming it, or a diagonal block on request.
    """
    if why_unsupported(layer) is not None:
        return None
    return EinsumDenseBlock(layer, approx, kron_sharing)


def _transpose(tensor: tf.Tensor, source: str, target: str) -> tf.Tensor:
    """`tensor` with axes named `source` reordered as `target` (no op when already so)."""
    if source == target:
        return tensor
    return tf.transpose(tensor, [source.index(c) for c in target])
