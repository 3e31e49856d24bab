"""Grouped Conv1D/Conv2D (groups > 1): one Kronecker pair per group, kept as one grouped pair.

A convolution with g groups maps the input channels of group j (C_in/g of
them) to its own F/g output channels: its Fisher has no coupling between
groups under a loss whose Hessian does not couple output channels, and its
K-FAC approximation is block diagonal, ⊕_j A_j ⊗ G_j, with A_j the moments
of group j's patches (its channels at every kernel position, plus the
constant 1 of the bias) and G_j those of the gradients at its outputs,
scaled as KFC's (`records` docstring). The pairs are one grouped A
(g, n, n) and one grouped G (g, m, m): two variables and two placement
units whatever g, inverted in batched ops.

`GroupedPatchBlock` is that structure for any convolution whose kernel is
a grouped one: a depthwise convolution is the grouped convolution with one
group per input channel (its (k, C, M) kernel is the (k, 1, C·M) kernel of
groups=C), see `depthwise.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.approximations import KronPart
from kfac_dist.blocks.base import Block
from kfac_dist.blocks.conv import ConvBlock, extract_patches
from kfac_dist.blocks.diagonal import signed_gradient_diagonal
from kfac_dist.blocks.patch_moments import conv_geometry, patch_moments
from kfac_dist.blocks.records import Record, row_weights, rows
from kfac_dist.linalg import curvature_dtype


def channels_last(layer: Any, tensor: tf.Tensor, column_axis: bool = False) -> tf.Tensor:
    """A channels-first layer's tensor with its channels last (after a leading column axis)."""
    if layer.data_format != "channels_first":
        return tensor
    rank = tensor.shape.rank
    lead = 2 if column_axis else 1
    perm = list(range(lead)) + list(range(lead + 1, rank)) + [lead]
    return tf.transpose(tensor, perm)


def record_pre_activation(
    layer: Any, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
) -> tuple[Any, Record]:
    """Calls `layer` with its activation set aside: (output, Record of the pre-activation).

    Keras convolutions take no masks, and patch rows are output positions,
    which an input mask would not line up with: none is recorded.
    """
    activation = layer.activation
    layer.activation = None
    try:
        s = call(inputs, *args, **kwargs)
    finally:
        layer.activation = activation
    outputs = activation(s) if activation is not None else s
    return outputs, Record(inputs=inputs, outputs=s)


def grouped_kron_factors(
    input_rows: tf.Tensor,
    output_rows: tf.Tensor,
    batch_size: tf.Tensor | int,
    weights: tf.Tensor | None = None,
) -> list[tf.Tensor]:
    """A_j = (1/b) Σ w ā ā ᵀ and G_j = (1/(b·T)) Σ g gᵀ of every group j, batched.

    `input_rows` (g, b·T, n) holds each group's rows at the b·T positions;
    `output_rows` (C·b·T, g, m) the gradients at those positions for each
    output column. Returns A (g, n, n) and G (g, m, m), `records.kron_factors`
    group by group.
    """
    b = tf.cast(batch_size, input_rows.dtype)
    positions = input_rows.shape[1]
    if positions is None:
        positions = tf.cast(tf.shape(input_rows)[1], input_rows.dtype)
    weighted = input_rows if weights is None else input_rows * weights[tf.newaxis, :, tf.newaxis]
    a = tf.matmul(input_rows, weighted, transpose_a=True) / b
    g = tf.einsum("rgi,rgj->gij", output_rows, output_rows) / positions
    return [a, g]


class GroupedPatchBlock(Block):
    """A convolution with a grouped kernel: one Kronecker pair per group.

    A layer kind sets `_groups` (g), `_group_inputs` (input channels per
    group), `_group_outputs` (output channels per group) and its `kernel`
    and `bias` variables (the kernel reshapes to (kernel positions,
    _group_inputs, g·_group_outputs), output channel j·_group_outputs + o
    belonging to group j).
    """

    _groups: int
    _group_inputs: int
    _group_outputs: int

    def __init__(self, layer: Any, kernel: Any, bias: Any, approx: str | None = None):
        self._layer = layer
        self._kernel, self._bias = kernel, bias
        variables = [kernel] + ([bias] if bias is not None else [])
        super().__init__(layer.name, variables, approx)

    @property
    def layer(self) -> Any:
        return self._layer

    @property
    def has_bias(self) -> bool:
        return self._bias is not None

    @property
    def kernel_positions(self) -> int:
        return math.prod(self._layer.kernel_size)

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        return record_pre_activation(self._layer, call, inputs, *args, **kwargs)

    # --- the convolution seen as rows of (input, output) pairs, per group -------
    def patch_rows(self, record: Record) -> tf.Tensor:
        """(b·T, kernel positions, input channels): the patches the kernel sees."""
        patches = extract_patches(self._layer, tf.cast(record.inputs, curvature_dtype()))
        flat = rows(patches)
        return tf.reshape(
            flat, [-1, self.kernel_positions, flat.shape[-1] // self.kernel_positions]
        )

    def group_rows(self, patches: tf.Tensor, bias: bool | None = None) -> tf.Tensor:
        """(g, b·T, n): each group's patch (kernel positions × its channels [, 1])."""
        k, g, c = self.kernel_positions, self._groups, self._group_inputs
        split = tf.reshape(patches, [-1, k, g, c])
        grouped = tf.reshape(tf.transpose(split, [2, 0, 1, 3]), [g, -1, k * c])
        if not (self.has_bias if bias is None else bias):
            return grouped
        return tf.pad(grouped, [[0, 0], [0, 0], [0, 1]], constant_values=1)

    def output_rows(self, grads: tf.Tensor) -> tf.Tensor:
        """(C·b·T, g, m): the output gradients of each group at every position."""
        last = channels_last(self._layer, tf.cast(grads, curvature_dtype()), column_axis=True)
        return tf.reshape(last, [-1, self._groups, self._group_outputs])

    def position_rows(self, record: Record) -> tf.Tensor:
        """(b·T, filters): one row per output position, as the patch rows (a reshape)."""
        return rows(channels_last(self._layer, record.outputs))

    def kron_parts(self) -> list[KronPart]:
        n = self.kernel_positions * self._group_inputs + int(self.has_bias)
        return [KronPart("", (n, n), self._group_outputs, self._groups)]

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        # A in chunks of examples' patches (patch_moments.py): never the batch's.
        a = self.grouped_input_moments(records, example_weights, batch_size)
        outputs = tf.concat([self.output_rows(g) for g in output_grads], axis=0)
        positions = tf.add_n([tf.shape(self.position_rows(r))[0] for r in records])
        g = tf.einsum("rgi,rgj->gij", outputs, outputs) / tf.cast(positions, outputs.dtype)
        return [a, g]

    def grouped_input_moments(
        self,
        records: Sequence[Record],
        example_weights: tf.Tensor | None,
        batch_size: tf.Tensor | int,
        bias: bool | None = None,
    ) -> tf.Tensor:
        """A_j = (1/b) Σ w ā ā ᵀ of every group's patches (`group_rows`' layout): (g, n, n)."""
        bias = self.has_bias if bias is None else bias
        channels_first = self._layer.data_format == "channels_first"
        moments = []
        for record in records:
            geometry = conv_geometry(self._layer, record.inputs, record.outputs)
            weights = row_weights([record], example_weights, self.position_rows)
            moments.append(
                patch_moments(record.inputs, geometry, weights, bias, self._groups, channels_first)
            )
        return tf.add_n(moments) / tf.cast(batch_size, curvature_dtype())

    def diagonal_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
    ) -> tf.Tensor:
        """diag(F) estimated from the signed batch gradient, as `ConvBlock`'s."""
        return signed_gradient_diagonal(self, records, output_grads, batch_size)

    def kernel_matrices(self, kernel: tf.Tensor, bias: tf.Tensor | None) -> tf.Tensor:
        """(g, n, m): each group's (kernel [; bias]) matrix, rows as `group_rows`."""
        k, c, g, m = self.kernel_positions, self._group_inputs, self._groups, self._group_outputs
        matrix = tf.transpose(tf.reshape(kernel, [k * c, g, m]), [1, 0, 2])
        if bias is None:
            return matrix
        return tf.concat([matrix, tf.reshape(bias, [g, 1, m])], axis=1)

    def split_kernel_matrices(self, matrices: tf.Tensor, bias: bool) -> list[tf.Tensor]:
        """Inverse of `kernel_matrices`: [kernel] or [kernel, bias]."""
        g, m = self._groups, self._group_outputs
        kernel = matrices[:, :-1] if bias else matrices
        kernel = tf.reshape(tf.transpose(kernel, [1, 0, 2]), self._kernel.shape)
        if not bias:
            return [kernel]
        return [kernel, tf.reshape(matrices[:, -1], [g * m])]

    def gradient_matrices(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return [self.kernel_matrices(grads[0], grads[1] if self.has_bias else None)]

    def split_matrices(self, matrices: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return self.split_kernel_matrices(matrices[0], self.has_bias)

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        per_record = []
        for record, grads in zip(records, output_grads):
            batch = tf.shape(record.outputs)[0]
            inputs = self.group_rows(self.patch_rows(record))
            inputs = tf.reshape(inputs, [self._groups, batch, -1, inputs.shape[-1]])
            columns = tf.shape(grads)[0]
            outs = tf.reshape(
                self.output_rows(grads), [columns, batch, -1, self._groups, self._group_outputs]
            )
            # Σ_t ā_t g_tᵀ of each group: (column, example, row, group, output).
            per_record.append(tf.einsum("gbti,cbtgo->cbigo", inputs, outs))
        total = tf.add_n(per_record)
        columns_examples = tf.shape(total)[:2]
        if not self.has_bias:
            return tf.reshape(total, [-1, self._kernel.shape.num_elements()])
        # The kernel's rows, then the bias row, flattened as the variables are.
        kernel = tf.reshape(total[:, :, :-1], tf.concat([columns_examples, [-1]], 0))
        bias = tf.reshape(total[:, :, -1], tf.concat([columns_examples, [-1]], 0))
        flat = tf.concat([kernel, bias], axis=-1)
        return tf.reshape(flat, [-1, self.num_params])


class GroupedConvBlock(GroupedPatchBlock):
    """K-FAC for `keras.layers.Conv1D` and `Conv2D` with groups > 1: ⊕_j A_j ⊗ G_j."""

    def __init__(self, layer: Any, approx: str | None = None):
        groups = int(getattr(layer, "groups", 1))
        if groups < 2:
            raise ValueError(
                f"Layer '{layer.name}' has groups={groups}: it is an ordinary convolution, "
                "whose block is ConvBlock (registration picks it)."
            )
        self._groups = groups
        self._group_inputs = int(layer.kernel.shape[-2])
        self._group_outputs = int(layer.filters) // groups
        super().__init__(layer, layer.kernel, layer.bias, approx)


def conv_block(layer: Any, approx: str | None = None) -> Block:
    """The block of a Conv1D/Conv2D: KFC's (`ConvBlock`), or one pair per group when groups > 1."""
    if int(getattr(layer, "groups", 1)) > 1:
        return GroupedConvBlock(layer, approx)
    return ConvBlock(layer, approx)
