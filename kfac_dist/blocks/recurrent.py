"""Recurrent layers (SimpleRNN, LSTM, GRU): a Kronecker block per kernel, each step an example.

A cell computes the pre-activations of its gates, stacked, as
z_t = x_t W + h_{t-1} U + b, then its nonlinear gating. With every time
step taken as one more example (the independence-across-time
approximation of Martens, Ba & Johnson 2018, "Kronecker-factored curvature
approximations for recurrent neural networks", in its simplest form), the
input kernel with the bias is one Kronecker block, A = (1/b) Σ_{i,t} ā āᵀ
over ā = [x_t, 1], and the recurrent kernel another, A = (1/b) Σ_{i,t} h hᵀ
over h = h_{t-1}; both share G = (1/(b·T)) Σ g gᵀ over g_t = ∂L/∂z_t.
Keras' GRU with `reset_after=True` (its default) computes the input part
x W + b_x and the recurrent part h U + b_h separately: the z and r gates
take their sum, the candidate tanh(x_h + r ⊙ (h U + b_h)_h) gates the
recurrent part after the product. Its recurrent block is then [U; b_h]
over [h_{t-1}, 1], with its own output gradients ∂L/∂(h U + b_h): the input
part's on the z and r columns, r ⊙ the candidate's pre-activation gradient
on the candidate columns (r is recorded with the step). The block's
factors are [A_input, G_input, A_recurrent, G_recurrent] (`KroneckerPair`);
for SimpleRNN and LSTM the two G are the same statistic. "diagonal" and
"full" use the exact per-example gradients Σ_t ā_t g_tᵀ of both kernels.

Recording: the per-step quantities exist only inside the cell's calls.
With `unroll=True` Keras calls the cell once per step in Python, so for the
recorded forward pass each call sees its step's x_t and h_{t-1} (kept, after
the cell's own dropout mask when it applies one), and the pre-activations
pass through a tap (`_StepHooks`): an identity whose gradient is also handed
to that step's slice of one zero "probe" tensor of shape (batch, T,
gates·units), so that the pseudo-loss's gradient at the probe is every g_t
at once. The output is bit-identical to the layer's, eager or traced.

With `unroll=False` (Keras' default) the steps run in a `tf.while_loop` (or
in cuDNN's fused kernel on a GPU): the cell is traced once, its per-step
tensors live in the loop body's graph and cannot be read from outside it
(TensorFlow raises InaccessibleTensorError), and a per-step probe would
have to be threaded through the loop as an extra input, with h_{t-1}
returned as an extra output — i.e. a different layer. Such a layer is left
to `unsupported_layers="diagonal"` (or `LayerCollection.register_generic`),
as are `implementation=1` (one dropout mask and one bias slice per gate;
`recurrent_dropout > 0` selects it) and GRU's `reset_after=False` (the
candidate's recurrent input r ⊙ h_{t-1} differs from the other gates', so U
has no single input factor).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras.src.backend import get_keras_mask

from kfac_dist.blocks.approximations import Approximation, Kronecker, LayerKind
from kfac_dist.blocks.base import DIAGONAL, FULL, KRON, Block
from kfac_dist.blocks.inverse_methods import InverseMethod, Payload
from kfac_dist.blocks.records import Record, concat_rows, kron_factors, row_weights, rows, with_ones
from kfac_dist.linalg import curvature_dtype

#: The cells this block models, each with the call it models (a subclass
#: that overrides `call` computes something else).
CELLS: tuple[Any, ...] = (
    keras.layers.SimpleRNNCell,
    keras.layers.LSTMCell,
    keras.layers.GRUCell,
)
#: Why the recurrent layer that runs a cell got no Kronecker block, for the
#: message that names the cell (the cell owns the variables, so it is the
#: layer registration reports).
_WHY_OF_CELL: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _models_cell(cell: Any) -> bool:
    return any(
        isinstance(cell, cls) and getattr(type(cell), "call", None) is cls.call for cls in CELLS
    )


def why_unsupported(layer: Any) -> str | None:
    """Why a SimpleRNN/LSTM/GRU layer gets no Kronecker blocks, or None when it does."""
    cell = getattr(layer, "cell", None)
    if cell is None or not _models_cell(cell):
        return (
            f"its cell ({type(cell).__name__}) is not a SimpleRNNCell, LSTMCell or GRUCell "
            "computing their own call"
        )
    if not layer.built or not cell.built:
        return "it is not built"
    reasons = []
    if not layer.unroll:
        reasons.append(
            f"with unroll=False its {type(layer).__name__} runs the cell in a tf.while_loop "
            "(cuDNN on a GPU), where K-FAC cannot record the per-step inputs and output "
            "gradients; pass unroll=True to the layer (short, fixed-length sequences) for "
            "Kronecker blocks of its input and recurrent kernels"
        )
    if getattr(cell, "implementation", 2) == 1:
        reasons.append(
            "implementation=1 (which recurrent_dropout > 0 selects) applies a dropout mask "
            "and a bias slice per gate, so a kernel has no single input factor; use "
            "implementation=2 without recurrent_dropout"
        )
    if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
        reasons.append(
            "with reset_after=False the candidate's recurrent input is r ⊙ h_{t-1}, not the "
            "other gates' h_{t-1}, so the recurrent kernel has no single input factor; use "
            "reset_after=True (Keras' default)"
        )
    return "; ".join(reasons) or None


def why_cell_unsupported(cell: Any) -> str:
    """Why a recurrent cell's variables got no Kronecker block (the cell is their owner)."""
    known = _WHY_OF_CELL.get(cell)
    if known is not None:
        return known
    return (
        "K-FAC makes Kronecker blocks for the cells of SimpleRNN, LSTM and GRU layers "
        "with unroll=True, not for a cell run by another recurrent layer"
    )


def unsupported_message(layer: Any, reason: str) -> str:
    """The error for a recurrent layer this block cannot cover, with how to register it."""
    return (
        f"K-FAC cannot make Kronecker blocks of {type(layer).__name__} layer '{layer.name}': "
        f"{reason}. To train it anyway, pass unsupported_layers='diagonal' to Kfac (a "
        "diagonal Fisher block for it), or register it by hand: lc = kfac_dist.LayerCollection(); "
        "lc.register_generic(layer.trainable_variables, name=layer.name); "
        "Kfac(..., layer_collection=lc)."
    )


def recurrent_block(layer: Any, approx: str | None = None) -> RecurrentBlock | None:
    """The block of a SimpleRNN/LSTM/GRU layer, or None when it cannot have one.

    None lets registration treat the layer's cell (the owner of its
    variables) as unsupported: an error naming it and saying why, or a
    diagonal block on request.
    """
    reason = why_unsupported(layer)
    if reason is not None:
        cell = getattr(layer, "cell", None)
        if cell is not None:
            _WHY_OF_CELL[cell] = reason
        return None
    return RecurrentBlock(layer, approx)


class KroneckerPair(Approximation):
    """Two Kronecker blocks side by side: (A_input ⊗ G_input) ⊕ (A_recurrent ⊗ G_recurrent).

    Each pair is damped and inverted as a Kronecker block of its own
    (factored Tikhonov with its own π for Cholesky, exact damping for eigen).
    """

    name = KRON

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        return ["A_input", "G_input", "A_recurrent", "G_recurrent"]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        (input_dim, output_dim), (recurrent_dim, _) = _recurrent(layer).pair_dims()
        return [
            (input_dim, input_dim),
            (output_dim, output_dim),
            (recurrent_dim, recurrent_dim),
            (output_dim, output_dim),
        ]

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        return layer.kron_statistics(records, output_grads, batch_size, example_weights)

    def weighted_factors(self, layer: LayerKind | None = None) -> list[bool]:
        return [True, False, True, False]

    def factor_dampings(self, mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float) -> tf.Tensor:
        """Kronecker's (π√λ, √λ/π) for each of the two pairs of each block."""
        pairs = tf.reshape(mean_eigenvalues, [-1, 2])
        return tf.reshape(Kronecker().factor_dampings(pairs, damping), [-1, 4])

    def precondition(
        self,
        layer: LayerKind,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: InverseMethod,
    ) -> list[tf.Tensor]:
        kind = _recurrent(layer)
        input_matrix, recurrent_matrix = kind.pair_matrices(grads)
        return kind.split_pair_matrices(
            method.solve_kronecker(payloads[0], payloads[1], input_matrix, damping),
            method.solve_kronecker(payloads[2], payloads[3], recurrent_matrix, damping),
        )


def _recurrent(layer: LayerKind) -> RecurrentBlock:
    if not isinstance(layer, RecurrentBlock):
        raise TypeError(
            f"KroneckerPair preconditions recurrent blocks, not {type(layer).__name__}."
        )
    return layer


@contextlib.contextmanager
def _swapped(obj: Any, attributes: dict[str, Any]) -> Iterator[None]:
    """Sets instance attributes (past Keras' tracking) for a block, then restores them."""
    saved = {name: (name in obj.__dict__, obj.__dict__.get(name)) for name in attributes}
    for name, value in attributes.items():
        object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        for name, (had, value) in saved.items():
            if had:
                object.__setattr__(obj, name, value)
            else:
                object.__delattr__(obj, name)


@tf.custom_gradient
def _tap(z: tf.Tensor, probe: tf.Tensor) -> Any:
    """z itself, whose gradient is also handed to `probe`."""

    def grad(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return upstream, upstream

    return tf.identity(z), grad


class _StepHooks:
    """Taps one step's pre-activations where the cell hands them on.

    SimpleRNN: z_t as it enters the activation. LSTM (implementation=2):
    the gates' four slices of z_t as they enter
    `_compute_carry_and_output_fused`. GRU: x_z + (h U + b_h)_z and
    x_r + (h U + b_h)_r as they enter the recurrent activation (z, then r:
    the cell's order), and x_h + r ⊙ (h U + b_h)_h as it enters the
    activation, keeping r. A tap is an identity whose gradient also goes to
    the step's slice of the probe: the forward graph keeps its ops (the
    identity is optimised away), so even the fused kernels TensorFlow's
    graph optimiser makes of it (MatMul with bias and activation, oneDNN's
    among them) are the same.
    """

    def __init__(self, cell: Any, probe: tf.Tensor):
        self._cell, self._probe = cell, probe
        self.calls: dict[str, int] = {}
        self.reset: tf.Tensor | None = None

    def _count(self, name: str) -> int:
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        return count

    def attributes(self) -> dict[str, Any]:
        cell, probe = self._cell, self._probe
        if isinstance(cell, keras.layers.SimpleRNNCell):
            activation = cell.activation

            def activate(z: tf.Tensor) -> tf.Tensor:
                self._count("activation")
                z = _tap(z, probe)
                return z if activation is None else activation(z)

            return {"activation": activate}
        if isinstance(cell, keras.layers.LSTMCell):
            carry = cell._compute_carry_and_output_fused  # noqa: SLF001

            def carry_with_probe(z: Sequence[tf.Tensor], c_tm1: tf.Tensor) -> Any:
                self._count("carry")
                gates = tf.split(probe, 4, axis=-1)
                return carry([_tap(part, gate) for part, gate in zip(z, gates)], c_tm1)

            return {"_compute_carry_and_output_fused": carry_with_probe}
        units = int(cell.units)
        recurrent_activation, activation = cell.recurrent_activation, cell.activation

        def gate(z: tf.Tensor) -> tf.Tensor:
            index = self._count("recurrent_activation")
            if index > 1:
                return recurrent_activation(z)  # `check` reports it
            out = recurrent_activation(_tap(z, probe[:, index * units : (index + 1) * units]))
            if index == 1:
                self.reset = out
            return out

        def candidate(z: tf.Tensor) -> tf.Tensor:
            if self._count("activation") > 0:
                return activation(z)
            return activation(_tap(z, probe[:, 2 * units :]))

        return {"recurrent_activation": gate, "activation": candidate}

    def check(self) -> None:
        """Whether the cell called each hook as the hooks expect (Keras' cells, as read)."""
        cell = self._cell
        if isinstance(cell, keras.layers.SimpleRNNCell):
            expected = {"activation": 1}
        elif isinstance(cell, keras.layers.LSTMCell):
            expected = {"carry": 1}
        else:
            expected = {"recurrent_activation": 2, "activation": 1}
        if self.calls != expected:
            raise RuntimeError(
                f"{type(cell).__name__} '{cell.name}' computed a step with {self.calls} calls "
                f"of what K-FAC records ({expected} expected): this Keras version's cell "
                "differs from the one K-FAC's recurrent block reads. Pass "
                "unsupported_layers='diagonal' or register the layer with "
                "LayerCollection.register_generic."
            )


class RecurrentBlock(Block):
    """K-FAC for SimpleRNN, LSTM and GRU layers with unroll=True (see the module docstring)."""

    approximations = (KRON, DIAGONAL, FULL)

    def __init__(self, layer: Any, approx: str | None = None):
        reason = why_unsupported(layer)
        if reason is not None:
            raise ValueError(unsupported_message(layer, reason))
        self._layer = layer
        self._cell = cell = layer.cell
        self.has_bias = cell.bias is not None
        # GRU(reset_after=True): bias (2, units·3) = [input bias; recurrent bias], and the
        # recurrent part has its own output gradients.
        self.separate_recurrent = isinstance(cell, keras.layers.GRUCell)
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if self.has_bias else [])
        super().__init__(layer.name, variables, approx)
        if self.approx == KRON:
            self.approximation = KroneckerPair()
        self._signature = inspect.signature(type(layer).call)

    @property
    def layer(self) -> Any:
        return self._layer

    @property
    def _outputs(self) -> int:
        """gates · units: the width of z_t."""
        return int(self._cell.kernel.shape[-1])

    def pair_dims(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((input rows, outputs), (recurrent rows, outputs)) of the two Kronecker blocks."""
        kernel, recurrent = self._cell.kernel, self._cell.recurrent_kernel
        recurrent_bias = int(self.has_bias and self.separate_recurrent)
        return (
            (int(kernel.shape[0]) + int(self.has_bias), self._outputs),
            (int(recurrent.shape[0]) + recurrent_bias, self._outputs),
        )

    # --- recording ------------------------------------------------------------
    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        layer, cell = self._layer, self._cell
        steps = inputs.shape[1]
        if steps is None or not layer.unroll:
            raise ValueError(
                unsupported_message(
                    layer, why_unsupported(layer) or "its sequence length is not static"
                )
            )
        try:
            mask = self._signature.bind(layer, inputs, *args, **kwargs).arguments.get("mask")
        except TypeError:
            mask = kwargs.get("mask")
        mask = keras.tree.flatten(mask)[0] if mask is not None else get_keras_mask(inputs)
        # Zeros (their values are never used) made from the kernel, so that they are on
        # the gradient tape; the kernel's gradient through them is 0.
        row = tf.cast(cell.kernel.value[0], cell.compute_dtype)
        zero = tf.math.multiply_no_nan(row, tf.zeros_like(row))
        probe = tf.broadcast_to(zero, tf.stack([tf.shape(inputs)[0], steps, self._outputs]))
        # One tensor per step, from one unstack: its gradient is one stack.
        per_step = tf.unstack(probe, num=steps, axis=1)
        seen: list[tuple[int, tf.Tensor, tf.Tensor, tf.Tensor | None]] = []

        def step_call(step_inputs: Any, states: Any, *step_args: Any, **step_kwargs: Any) -> Any:
            count = len(seen)
            if count >= steps:
                raise RuntimeError(
                    f"{type(layer).__name__} '{layer.name}' called its cell more than once "
                    f"per step ({steps} steps): K-FAC records the steps of unroll=True only."
                )
            # Keras walks the steps backwards for go_backwards (a Bidirectional's backward
            # layer): rows are kept in time order, as the layer's input and mask are.
            t = steps - 1 - count if layer.go_backwards else count
            hooks = _StepHooks(cell, per_step[t])
            with _swapped(cell, hooks.attributes()):
                outputs = original(step_inputs, states, *step_args, **step_kwargs)
            hooks.check()
            training = step_kwargs.get("training", False)
            x, h = self._kernel_inputs(step_inputs, keras.tree.flatten(states)[0], training)
            seen.append((t, x, h, hooks.reset))
            return outputs

        original = cell.call
        with _swapped(cell, {"call": step_call}):
            outputs = call(inputs, *args, **kwargs)
        if len(seen) != steps:
            raise RuntimeError(
                f"{type(layer).__name__} '{layer.name}' called its cell {len(seen)} times "
                f"for {steps} steps: K-FAC records the steps of unroll=True only."
            )
        seen.sort(key=lambda entry: entry[0])
        extras = {"recurrent": tf.stack([entry[2] for entry in seen], axis=1)}
        if self.separate_recurrent:
            extras["reset"] = tf.stack([entry[3] for entry in seen], axis=1)
        if mask is not None and mask.shape.rank == 2:
            extras["mask"] = mask
        record = Record(
            inputs=tf.stack([entry[1] for entry in seen], axis=1), outputs=probe, extras=extras
        )
        return outputs, record

    def _kernel_inputs(
        self, inputs: tf.Tensor, state: tf.Tensor, training: Any
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """What the kernels multiply at one step: the cell's dropout masks applied as it does.

        The conditions are the cell's own (`training` last: without dropout
        it is never read).
        """
        cell = self._cell
        if isinstance(cell, keras.layers.SimpleRNNCell):
            if cell.dropout > 0 and training:
                inputs = inputs * cell.get_dropout_mask(inputs)
            if cell.recurrent_dropout > 0 and training:
                state = state * cell.get_recurrent_dropout_mask(state)
        elif 0.0 < cell.dropout < 1.0 and training:
            # implementation=2: one mask, cached for the whole sequence by the cell.
            inputs = inputs * cell.get_dropout_mask(inputs)
        return inputs, state

    # --- the rows of each kernel's linear map --------------------------------
    def input_rows(self, record: Record) -> tf.Tensor:
        """(b·T, d [+ 1]): one row [x_t, 1] per step, example by example."""
        x = rows(tf.cast(record.inputs, curvature_dtype()))
        return with_ones(x) if self.has_bias else x

    def recurrent_rows(self, record: Record) -> tf.Tensor:
        """(b·T, units [+ 1]): one row h_{t-1} per step ([h_{t-1}, 1] for GRU's recurrent bias)."""
        h = rows(tf.cast(record.extras["recurrent"], curvature_dtype()))
        return with_ones(h) if self.has_bias and self.separate_recurrent else h

    def _output_rows(self, record: Record, grads: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(C·b·T, gates·units) output gradients of the input and of the recurrent part."""
        g_input, g_recurrent = self._output_grads(record, grads)
        return rows(g_input), rows(g_recurrent)

    def _output_grads(self, record: Record, grads: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(C, b, T, gates·units): ∂L/∂(x W + b_x) and ∂L/∂(h U [+ b_h]).

        They are one z_t but for GRU, whose candidate adds r ⊙ (h U_h + b_h)
        to its input part: there the recurrent part's gradient is r ⊙ the
        candidate's (z and r gates add both parts as they are).
        """
        g = tf.cast(grads, curvature_dtype())
        if not self.separate_recurrent:
            return g, g
        units = int(self._cell.units)
        reset = tf.cast(record.extras["reset"], curvature_dtype())[tf.newaxis]
        return g, tf.concat([g[..., : 2 * units], reset * g[..., 2 * units :]], axis=-1)

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[A_input, G_input, A_recurrent, G_recurrent], each step one more example.

        A Keras mask keeps padded steps out of both A (their g is 0: Keras
        keeps the previous state there).
        """
        outputs = [self._output_rows(r, g) for r, g in zip(records, output_grads)]
        weights = row_weights(records, example_weights, self.input_rows)
        inputs = concat_rows([self.input_rows(r) for r in records])
        a_input, g_input = kron_factors(
            inputs, concat_rows([o[0] for o in outputs]), batch_size, weights
        )
        recurrent = concat_rows([self.recurrent_rows(r) for r in records])
        if not self.separate_recurrent:
            # One z_t: both blocks share G (kept twice, one per Kronecker pair).
            no_outputs = tf.zeros([0, 0], recurrent.dtype)
            a_recurrent, _ = kron_factors(recurrent, no_outputs, batch_size, weights)
            return [a_input, g_input, a_recurrent, g_input]
        a_recurrent, g_recurrent = kron_factors(
            recurrent, concat_rows([o[1] for o in outputs]), batch_size, weights
        )
        return [a_input, g_input, a_recurrent, g_recurrent]

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        total: tf.Tensor | None = None
        for record, grads in zip(records, output_grads):
            batch, columns = tf.shape(record.outputs)[0], tf.shape(grads)[0]
            x = tf.cast(record.inputs, curvature_dtype())
            h = tf.cast(record.extras["recurrent"], curvature_dtype())
            g_input, g_recurrent = self._output_grads(record, grads)  # (C, b, T, n) each
            parts = [
                tf.einsum("bti,cbto->cbio", x, g_input),
                tf.einsum("bti,cbto->cbio", h, g_recurrent),
            ]
            if self.has_bias:
                # Σ_t g_t: (n,), or [Σ g_input; Σ g_recurrent] for GRU's (2, n) bias.
                parts.append(tf.reduce_sum(g_input, axis=2))
                if self.separate_recurrent:
                    parts.append(tf.reduce_sum(g_recurrent, axis=2))
            flat = tf.concat([tf.reshape(p, tf.stack([columns * batch, -1])) for p in parts], 1)
            total = flat if total is None else total + flat
        return total

    # --- the two kernels' gradient matrices ----------------------------------
    def pair_matrices(self, grads: Sequence[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """([kernel; input bias], recurrent kernel [; recurrent bias]) as matrices."""
        kernel, recurrent = tf.convert_to_tensor(grads[0]), tf.convert_to_tensor(grads[1])
        if not self.has_bias:
            return kernel, recurrent
        bias = tf.reshape(grads[2], [-1, self._outputs])
        kernel = tf.concat([kernel, bias[:1]], axis=0)
        if self.separate_recurrent:
            recurrent = tf.concat([recurrent, bias[1:]], axis=0)
        return kernel, recurrent

    def split_pair_matrices(
        self, input_matrix: tf.Tensor, recurrent_matrix: tf.Tensor
    ) -> list[tf.Tensor]:
        """Inverse of `pair_matrices`: one tensor per variable."""
        if not self.has_bias:
            return [input_matrix, recurrent_matrix]
        kernel, input_bias = input_matrix[:-1], input_matrix[-1:]
        if not self.separate_recurrent:
            return [kernel, recurrent_matrix, tf.reshape(input_bias, [-1])]
        recurrent, recurrent_bias = recurrent_matrix[:-1], recurrent_matrix[-1:]
        bias = tf.concat([input_bias, recurrent_bias], axis=0)
        return [kernel, recurrent, tf.reshape(bias, self.variables[2].shape)]


__all__ = [
    "CELLS",
    "KroneckerPair",
    "RecurrentBlock",
    "recurrent_block",
    "unsupported_message",
    "why_cell_unsupported",
    "why_unsupported",
]
