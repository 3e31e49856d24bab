"""`Kfac`: the K-FAC optimizer for Keras 3, under any tf.distribute strategy.

This file holds the public class: its arguments (validated by `KfacConfig`),
the Keras hooks (`build`, the update, `get_config`) and its state. The step
itself, phase by phase, is `step.py`; the curvature machinery is
`curvature.py` and `blocks/`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# First: checks TensorFlow's and Keras' versions before anything relies on their internals.
from kfac_dist import _versions  # noqa: F401  # isort: skip
from kfac_dist import accumulation, registration, strategies, training
from kfac_dist import curvature as curvature_lib
from kfac_dist import losses as losses_lib
from kfac_dist import step as step_lib
from kfac_dist.config import KfacConfig
from kfac_dist.multi_worker import check_steps_per_execution, enable_multi_worker_fit
from kfac_dist.options import QMODEL
from kfac_dist.placement import report

_CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")
_REJECTED_ARGS = {
    "use_ema": "K-FAC keeps no EMA of the weights",
    "ema_momentum": "K-FAC keeps no EMA of the weights",
    "ema_overwrite_frequency": "K-FAC keeps no EMA of the weights",
    "weight_decay": "use weight_decay_coeff (decoupled, added to the update)",
    "loss_scale_factor": "use the mixed-precision policy, which wraps the optimizer",
}
_KERAS_ONLY_CONFIG = (*_CLIP_ARGS, *_REJECTED_ARGS)


@dataclasses.dataclass(frozen=True)
class KfacState:
    """K-FAC's own variables beyond the curvature's, by group (all per replica but momentum)."""

    #: v of each trainable variable, by the optimizer's variable index.
    velocities: list[keras.Variable]
    #: F̂v of each trainable variable (only with the KL clip, else empty).
    velocity_curvatures: list[keras.Variable]
    #: The last step's KL clip factor (1 without a bound), for the logs.
    kl_clip: keras.Variable
    #: [α, μ, predicted change, ρ] of the quadratic model, for the logs.
    qmodel_state: keras.Variable
    #: Updates skipped for non-finite gradients or statistics.
    skipped_updates: keras.Variable
    #: Each block's variables, by the optimizer's variable index.
    block_indices: list[list[int]]
    #: The micro-batches' statistic sums (gradient accumulation only).
    statistic_sums: accumulation.StatisticSums | None

    @property
    def registered(self) -> list[int]:
        """The variable indices of every block, in block order."""
        return [i for indices in self.block_indices for i in indices]


class _Hyperparameter:
    """A hyperparameter kept in a variable: reads give the variable, writes assign it.

    Only those given when the optimizer was made can change (`Kfac.mutable_hyperparameters`).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, kfac: Any, owner: type | None = None) -> Any:
        return self if kfac is None else getattr(kfac, f"_{self.name}")

    def __set__(self, kfac: Kfac, value: Any) -> None:
        kfac._set_hyperparameter(self.name, value)  # noqa: SLF001


@keras.saving.register_keras_serializable(package="kfac_dist")
class Kfac(keras.optimizers.Optimizer):
    """K-FAC (Martens & Grosse 2015) as a Keras 3 optimizer.

    The update, for each curvature block with gradient ∇ (all-reduced once):

        P∇ = F̂⁻¹ ∇                # F̂ = A ⊗ G (+ damping), or diagonal/full
        ν = min(1, sqrt(C / q)),   q = (μv − lr·P∇)ᵀ F̂ (μv − lr·P∇)   # if norm_constraint=C
        v = ν·(μ·v − lr·P∇) − lr·weight_decay_coeff·θ    # μ = momentum
        θ = θ + v

    The KL clip bounds the step taken, momentum included (q from Σ_blocks
    ⟨P∇, ∇⟩, ⟨v, ∇⟩ and a tracked F̂v); with momentum 0 it is kfac 0.2.4's
    min(1, sqrt(C / (lr² Σ_blocks ⟨P∇, ∇⟩))).

    Args (keyword-only, as in kfac 0.2.4):
        learning_rate: float or `LearningRateSchedule`, > 0.
        damping: Tikhonov damping λ > 0. With `inverse_method="cholesky"` it is
            split between the factors with π (factored Tikhonov) and takes
            effect at the next inverse update; with "eigen" it is exact and
            immediate.
        model: the Keras model to train; `Kfac` installs its train step on it
            and registers its layers when built.
        loss, loss_weights: default to what the model is compiled with.
        momentum: μ in [0, 1), default 0.9 (`momentum_type="regular"`).
        weight_decay_coeff: weight decay wd ≥ 0, default None (off). Decoupled
            (added to the update, as above) with regular momentum; with
            quadratic-model momentum (adaptive=True) it is coupled: the model
            minimised is that of L + ½·wd·‖θ‖² (gradient ∇ + wd·θ, curvature
            F + wd·I, and ρ measured on the same objective).
        include_damping_in_quad_change: whether the quadratic model's predicted
            change, the denominator of ρ, includes the damping term ½λ‖v‖²
            (default False, as in kfac-jax and Martens & Grosse 2015 §6.5:
            ρ compares the loss with the undamped model).
        norm_constraint: KL clipping bound C > 0, default None (off).
        batch_size: global batch size, only to check the data against.
        cov_ema_decay: ε in [0, 1) of the factors' moving average, default 0.95.
        cov_update_every: factor statistics every k steps, default 1.
        invert_every: inverse update every k steps, default 10.
        stagger_inverses: spread each inverse update over the `invert_every`
            steps of its period (default False): every unit is inverted at
            one fixed step of the period (all of them at the first step),
            chosen from the inversion costs alone, so that no step stalls
            on the whole update and every replica count inverts the same
            units at the same steps. Recommended for large models (convnets).
        estimation_mode: "sampled" (default), "empirical" or "exact".
        fisher_approx: {layer name or class: "kron" | "diagonal" | "full"}.
        kron_sharing: how the Kronecker blocks of `Dense` and `EinsumDense`
            take the positions their weights are shared over (sequence
            steps, the rows of a `Dense` on (b, h, w, c)): "expand" (default:
            each position is one more example) or "reduce" (each example's
            inputs averaged and output gradients summed over its positions
            first; exact when the loss sees the positions pooled).
        inverse_method: "cholesky" (default) or "eigen".
        max_factor_dim: the largest side of a matrix factor, default
            2048 (None: no bound; the default is measured in
            BENCHMARKS.md, "Large factors as diagonal blocks"). A Kronecker
            factor of side n above it is kept as k = ceil(n / max_factor_dim)
            diagonal blocks of side ceil(n / k) (the last zero-padded), so
            F ≈ ⊕_{i,j} A_i ⊗ G_j: no inversion and no preconditioning
            product exceeds the bound, inverting costs k·(n/k)³ instead of
            n³, and the placement plans the blocks as one unit of k
            members. The damping stays the whole factor's (π from the whole
            traces), the cross-block curvature is dropped. A "full" block's
            Fisher is split likewise; diagonal factors and the members of
            grouped factors (depthwise and grouped convolutions, each small)
            never are, nor the recurrent blocks' pairs. Changing it changes
            the shapes of the factor state: a checkpoint restores under the
            bound it was saved with.
        layer_collection: a `LayerCollection` of manual registrations.
        unsupported_layers: "error" (default) or "diagonal".
        placement: "round_robin" (default), "balanced", "replicated" or a
            policy object with `assign(costs, num_replicas)`.
        factor_sync: "lazy" (default: sync on inverse updates) or
            "every_update".
        inverse_sharing: how owners' inverses reach every replica: "auto"
            (default: under MultiWorkerMirrored each owner broadcasts its
            inverses; otherwise all-gather when its padded buffer is no larger
            than the all-reduce's, else all-reduce), "all_reduce",
            "all_gather" or "broadcast".
        inverse_replication: distributed preconditioning (as in KAISA),
            default 1: every replica holds every inverse. Below 1, the blocks
            with the most inverse memory per gradient float are held by their
            owner alone, which preconditions their gradients every step (one
            more all-reduce per step, of those gradients), until each replica
            holds at most f·total + (1−f)·total/N of the inverses; 0: each
            replica holds only its own. A restored job recomputes these
            inverses at its first step.
        sync_chunk_bytes: the largest buffer of the factor sync, default 64
            MiB: the factor sums travel in chunks of at most this size, one
            collective each, one after the other (a factor larger than that
            travels alone). None: one collective for all. It bounds the
            inversions too: factors are inverted in batched stacks of at most
            this size, one stack after the other.
        seed: seed of the sampled Fisher. None draws one; under
            MultiWorkerMirroredStrategy every worker then uses the chief's
            draw (the seed is a variable, broadcast when created inside
            `strategy.scope()`), and checkpoints save it, so a resumed job
            samples the same Fishers.
        collective_timeout: seconds any of K-FAC's collectives (and the
            gradient all-reduce) may wait for its peers before the step
            fails with `DeadlineExceededError` instead of hanging, default
            600; None waits forever. Raise it when one worker can lag the
            others by longer (e.g. tracing a very large model).
        gradient_accumulation_steps: k ≥ 2 to apply one update per k calls
            (micro-batches), default None (off). Gradients and curvature
            statistics are summed over the k micro-batches, so the update is
            that of one step on their union. `iterations`, the learning-rate
            schedule and every K-FAC schedule (cov_update_every, invert_every)
            count applied updates. Not with adaptive/adapt_damping.
    """

    is_kfac = True
    built: bool
    state: KfacState

    def __init__(
        self,
        *args: Any,
        model: keras.Model | None = None,
        name: str | None = None,
        **arguments: Any,
    ):
        if args:
            raise TypeError(
                "Kfac takes keyword arguments only, e.g. Kfac(learning_rate=0.001, "
                "damping=0.01, model=model, loss=loss)."
            )
        for arg in _CLIP_ARGS:
            if arguments.get(arg) is not None:
                raise ValueError(
                    f"Kfac does not support {arg}: K-FAC bounds its update by the KL "
                    "divergence instead; use norm_constraint=C (KL clipping)."
                )
            arguments.pop(arg, None)
        for arg, why in _REJECTED_ARGS.items():
            if arg in arguments and arguments[arg] not in (None, False):
                raise ValueError(f"Kfac does not support {arg}: {why}.")
            arguments.pop(arg, None)
        known = {f.name for f in dataclasses.fields(KfacConfig) if f.init}
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise TypeError(f"Kfac got unexpected argument(s): {unknown}.")
        config = KfacConfig(**arguments)
        super().__init__(
            learning_rate=config.learning_rate,
            name=name,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.config = config
        with keras.name_scope(self.name, caller=self):
            # Per replica: adaptive damping is updated inside the step, identically
            # on every replica, with no implicit communication.
            self._damping = self._hyper_variable(
                "damping", config.damping, synchronization="on_read"
            )
            self._momentum = self._hyper_variable("momentum", config.momentum)
            self._weight_decay_coeff = self._hyper_variable(
                "weight_decay_coeff", config.weight_decay_coeff or 0.0
            )
            self._norm_constraint = self._hyper_variable(
                "norm_constraint", config.norm_constraint or 0.0
            )
            self._batch_size = self._hyper_variable("batch_size", config.batch_size or 0, "int64")
            seed = config.seed if config.seed is not None else np.random.randint(0, 2**31 - 1)
            # A variable: MultiWorkerMirrored broadcasts the chief's initial
            # value to every worker, and checkpoints save it.
            self._seed = self._hyper_variable("seed", int(seed), "int64")
        self._model_ref: weakref.ref | None = None
        self._output_losses: list[losses_lib.OutputLoss | None] | None = None
        self._curvature: curvature_lib.Curvature | None = None
        self._traced_update = False  # whether a traced step holds K-FAC's state
        if model is not None:
            self.bind(model)

    def _hyper_variable(
        self, name: str, value: Any, dtype: str = "float32", synchronization: str = "auto"
    ) -> keras.Variable:
        variable = keras.Variable(
            value,
            synchronization=synchronization,
            name=name,
            dtype=dtype,
            trainable=False,
            aggregation="only_first_replica",
        )
        self._track_variable(variable)
        return variable

    @property
    def curvature(self) -> curvature_lib.Curvature:
        """The factors and inverses of every block (made when the optimizer is built)."""
        if self._curvature is None:
            raise ValueError(
                "This Kfac is not built yet: it registers the model's layers when built, "
                "at the first fit step or with optimizer.build(model.trainable_variables)."
            )
        return self._curvature

    # --- the model ------------------------------------------------------------
    @property
    def model(self) -> keras.Model | None:
        return self._model_ref() if self._model_ref is not None else None

    def trains(self, model: keras.Model) -> bool:
        """Whether this optimizer is bound to `model`."""
        return self.model is model

    def bind(self, model: keras.Model) -> None:
        """Binds to `model`: its strategy, its train step, its layers."""
        self._model_ref = weakref.ref(model)
        self.context = strategies.resolve(
            model.distribute_strategy, collective_timeout=self.config.collective_timeout
        )
        training.install(model)
        enable_multi_worker_fit(model)
        if registration.is_built(model):
            # Building now (not inside the first traced step) registers the
            # layers, fails early on unsupported ones, and spares Keras a
            # second trace of the train step for the variables created there.
            with model.distribute_strategy.scope():
                self.build(model.trainable_variables)

    def build(self, var_list: Sequence[keras.Variable]) -> None:
        """Registers the layers of `var_list` and creates K-FAC's state for them.

        `var_list` is all of the model's trainable variables, or K-FAC's share
        of them in a `keras.optimizers.MultiOptimizer`.
        """
        if self.built:
            if {id(v) for v in var_list} != {id(v) for v in self._trainable_variables}:
                self._rebuild(var_list)
            return
        model = self.model
        if model is None:
            raise ValueError(
                "This Kfac optimizer is not bound to a model: pass model= to Kfac, "
                "or load a saved model with kfac_dist.keras.saving_utils.load_model(path)."
            )
        check_steps_per_execution(model)
        if not registration.is_built(model) and not model.trainable_variables:
            raise ValueError(
                f"Kfac cannot register the layers of model '{model.name}': it has no "
                "variables yet. Let fit build it, or build it first by calling it on a "
                "batch (model(x)) before building the optimizer."
            )
        self._check_share(model, var_list)
        self._first_state_variable = len(self._variables)
        super().build(var_list)
        config = self.config
        blocks = registration.collect_blocks(
            model,
            fisher_approx=config.fisher_approx,
            kron_sharing=config.kron_sharing,
            unsupported_layers=config.unsupported_layers,
            layer_collection=config.layer_collection,
            variables=var_list,
            max_factor_dim=config.max_factor_dim,
        )
        self._curvature = curvature_lib.Curvature(
            blocks,
            self.context,
            inverse_method=config.inverse_method,
            placement=config.placement,
            cov_ema_decay=config.cov_ema_decay,
            factor_sync=config.factor_sync,
            sharing=config.inverse_sharing,
            sync_chunk_bytes=config.sync_chunk_bytes,
            stagger_period=config.invert_every if config.stagger_inverses else 1,
            inverse_replication=config.inverse_replication,
        )
        add = curvature_lib.per_replica_variable(self)
        self._curvature.build(add)
        self.state = KfacState(
            velocities=[self.add_variable_from_reference(v, "velocity") for v in var_list],
            # F̂v for each velocity v: the KL clip of a momentum step needs ⟨v, F̂v⟩.
            velocity_curvatures=[
                self.add_variable_from_reference(v, "velocity_curvature") for v in var_list
            ]
            if config.clips_kl
            else [],
            kl_clip=add((), "kl_clip"),
            qmodel_state=add((4,), "qmodel_state"),
            skipped_updates=add((), "skipped_updates", "int64"),
            block_indices=[[self._get_variable_index(v) for v in b.variables] for b in blocks],
            statistic_sums=accumulation.StatisticSums(self._curvature, add)
            if config.gradient_accumulation_steps
            else None,
        )
        self.built = True

    def _rebuild(self, var_list: Sequence[keras.Variable]) -> None:
        """Builds again on `var_list`, a MultiOptimizer's share of the variables.

        `bind` builds on all the variables of a built model, before a
        MultiOptimizer can say which are K-FAC's; while no update has been
        traced, that state was never used and is dropped.
        """
        if self._traced_update:
            raise ValueError(
                "Kfac has already trained all of the model's trainable variables and "
                "cannot be narrowed to a MultiOptimizer's share now: build the "
                "MultiOptimizer before the first step (compile with it, then fit)."
            )
        del self._variables[self._first_state_variable :]
        self._trainable_variables_indices: dict[str, int] = {}
        self.built = False
        self.build(var_list)

    def _check_share(self, model: keras.Model, var_list: Sequence[keras.Variable]) -> None:
        """Given only some of the model's variables, the update rule must allow it."""
        mine = {id(v) for v in var_list}
        if all(id(v) in mine for v in model.trainable_variables):
            return
        if self.config.uses_qmodel or self.config.adapt_damping:
            raise ValueError(
                "Kfac with adaptive=True, adapt_damping or quadratic-model momentum must "
                "train all of the model's trainable variables: the quadratic model and ρ "
                "assume no other optimizer moves the loss. In a MultiOptimizer, use regular "
                "momentum with a fixed damping."
            )

    def output_losses(self, num_outputs: int) -> list[losses_lib.OutputLoss | None]:
        """One `OutputLoss` (or None: no loss) per flat model output."""
        if self._output_losses is None:
            collection = self.config.layer_collection
            self._output_losses = losses_lib.resolve_output_losses(
                self.model,
                self.config.loss,
                self.config.loss_weights,
                collection.losses if collection else {},
                num_outputs,
            )
        return self._output_losses

    # --- hyperparameters that can change during training ---------------------------
    @property
    def mutable_hyperparameters(self) -> tuple[str, ...]:
        return self.config.mutable

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        if name not in self.config.mutable:
            raise ValueError(
                f"{name} cannot change during training: it was None when this Kfac was "
                f"created. Mutable hyperparameters: {self.config.mutable}."
            )
        getattr(self, f"_{name}").assign(value)

    damping = _Hyperparameter()
    momentum = _Hyperparameter()
    weight_decay_coeff = _Hyperparameter()
    norm_constraint = _Hyperparameter()
    batch_size = _Hyperparameter()

    @property
    def seed(self) -> keras.Variable:
        """The sampled Fisher's seed (an int64 variable, the same on every worker)."""
        return self._seed

    def damping_value(self) -> tf.Tensor:
        return tf.convert_to_tensor(self._damping)

    def check_batch_size(self, local_batch_size: tf.Tensor) -> None:
        """With batch_size given, the global batch must match it."""
        if "batch_size" not in self.config.mutable:
            return
        global_batch = tf.cast(local_batch_size, tf.int64) * self.context.num_replicas
        tf.debugging.assert_equal(
            global_batch,
            tf.convert_to_tensor(self._batch_size),
            message="Kfac(batch_size=...) does not match the global batch size of the data",
        )

    # --- the update -----------------------------------------------------------------
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Keras' `apply`, called outside K-FAC's train step: folds and inverts nothing."""
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        self.apply_step(grads, trainable_variables, None)

    def apply_step(
        self,
        grads: Sequence[Any],
        trainable_variables: Sequence[Any],
        inputs: step_lib.StepInputs | None,
    ) -> step_lib.StepOutcome:
        """Keras' `apply` (build, filter, update, constraints, count) with K-FAC's update.

        `inputs` are what the train step hands over (`step.StepInputs`); the
        update (`step.update`) returns whether it was applied.
        """
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        self._check_variables_are_known(trainable_variables)
        outcome = step_lib.StepOutcome(finite=tf.constant(True))
        with keras.name_scope(self.name, caller=self):
            grads, trainable_variables = self._filter_empty_gradients(grads, trainable_variables)
            grads, trainable_variables = self._overwrite_variables_directly_with_gradients(
                grads, trainable_variables
            )
            if grads:
                self._traced_update = True
                variables = [
                    v.value if isinstance(v, keras.Variable) else v for v in trainable_variables
                ]
                outcome = step_lib.update(self, grads, variables, self.learning_rate, inputs)
                for variable in trainable_variables:
                    if variable.constraint is not None:
                        variable.assign(variable.constraint(variable))
        self._iterations.assign_add(1)
        return outcome

    def _get_current_learning_rate(self) -> Any:
        # A schedule counts applied updates (`iterations`), as the inverse
        # schedule does; Keras' base counts accumulated micro-batches.
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def variable_indices(self, variables: Sequence[Any]) -> list[int]:
        """The optimizer's index of each variable (that of its velocity, its accumulator)."""
        return [self._get_variable_index(v) for v in variables]

    def gradient_accumulators(self, variables: Sequence[Any]) -> list[keras.Variable]:
        """Keras' gradient accumulator of each variable (gradient accumulation only)."""
        return [self._accumulated_gradients[i] for i in self.variable_indices(variables)]

    def update_variables(
        self,
        directions: Sequence[tf.Tensor],
        variables: Sequence[tf.Variable],
        coefficients: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
        accumulators: Sequence[tuple[tf.Tensor, keras.Variable]],
        curvature_gradients: Sequence[tf.Tensor],
    ) -> None:
        """The update rule on every variable (and F̂v, the accumulators), in one `merge_call`.

        `coefficients` = (s, μ, finite) of v = μv + s·(d + wd·θ).
        """
        curvature_updates = [
            (gradient, self.state.velocity_curvatures[i].value)
            for i, gradient in zip(self.state.registered, curvature_gradients)
        ]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_update,
            self._distribution_strategy,
            list(zip(directions, variables)),
            coefficients,
            accumulators,
            curvature_updates,
        )

    def _distributed_update(
        self,
        distribution: tf.distribute.Strategy,
        directions_and_variables: Sequence[tuple[tf.Tensor, tf.Variable]],
        coefficients: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
        accumulators: Sequence[tuple[tf.Tensor, keras.Variable]],
        curvature_updates: Sequence[tuple[tf.Tensor, tf.Variable]],
    ) -> None:
        # The coefficients travel as merge_call arguments, so each replica's
        # update reads its own copy (identical values, no cross-device reads).
        for direction, variable in directions_and_variables:
            distribution.extended.update(
                variable, self._update_variable, args=(direction, coefficients), group=False
            )
        for gradient, velocity_curvature in curvature_updates:
            distribution.extended.update(
                velocity_curvature,
                self._update_velocity_curvature,
                args=(gradient, coefficients),
                group=False,
            )
        # Each replica keeps its own sum of its micro-batches' gradients.
        for value, accumulator in accumulators:
            distribution.extended.update(accumulator.value, _assign, args=(value,), group=False)

    def _update_variable(
        self,
        variable: tf.Variable,
        direction: tf.Tensor,
        coefficients: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
    ) -> None:
        """v = μv + s·(d + wd·θ); θ = θ + v; nothing moves on a non-finite step.

        s = −lr and μ = momentum ("regular"), or (s, μ) = (α, μ) of the
        quadratic model.
        """
        scale, momentum, finite = coefficients
        velocity = self.state.velocities[self._get_variable_index(variable)]
        # Coupled weight decay is already in the gradient (quadratic-model modes).
        decay = 0.0 if self.config.coupled_weight_decay else self._weight_decay_coeff
        decay = tf.cast(decay, variable.dtype)
        scale = tf.cast(scale, variable.dtype)
        momentum = tf.cast(momentum, variable.dtype)
        new_velocity = momentum * velocity + scale * (direction + decay * variable)
        new_velocity = tf.where(finite, new_velocity, velocity)
        self.assign(velocity, new_velocity)
        self.assign_add(variable, tf.where(finite, new_velocity, tf.zeros_like(new_velocity)))

    def _update_velocity_curvature(
        self,
        velocity_curvature: tf.Variable,
        gradient: tf.Tensor,
        coefficients: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
    ) -> None:
        """F̂v ← μ·F̂v + s·clip·∇, the velocity's update seen through F̂ (F̂P∇ = ∇)."""
        scale, momentum, finite = coefficients
        dtype = velocity_curvature.dtype
        updated = tf.cast(momentum, dtype) * velocity_curvature + tf.cast(scale, dtype) * gradient
        self.assign(velocity_curvature, tf.where(finite, updated, velocity_curvature))

    # --- logs -------------------------------------------------------------------------
    def step_logs(self) -> dict[str, float]:
        """K-FAC's own state for the `fit` history, `return_dict=True` and TensorBoard.

        Read on the host after a step, from this process's first replica:
        these values are identical on every replica, so reading one copy
        needs no collective (a log returned by the train step would cost
        Keras' mean across replicas, a round trip per value and step).
        """
        local = self.context.strategy.experimental_local_results

        def first(variable: keras.Variable) -> np.ndarray:
            return np.asarray(local(variable.value)[0])

        logs = {
            "damping": float(first(self._damping)),
            "kl_clip": float(first(self.state.kl_clip)),
        }
        if self.config.uses_qmodel:
            alpha, mu, change, rho = first(self.state.qmodel_state)
            logs.update(qmodel_alpha=float(alpha), qmodel_mu=float(mu), qmodel_change=float(change))
            logs["rho"] = float(rho)
        skips = first(self.state.skipped_updates) + first(self.curvature.skipped_statistics)
        logs["nonfinite_skips"] = float(skips)
        return logs

    # --- placement report --------------------------------------------------------------
    def placement_report(self, as_dict: bool = False) -> str | dict:
        """Who inverts which factor, at what cost, and what each replica holds and moves.

        A table for logs, or with `as_dict=True` a JSON-ready dict (see
        `placement.report.curvature_report`).
        """
        if self._curvature is None:
            raise ValueError(
                "placement_report needs a built Kfac: the placement is made when the "
                "optimizer is built, at the first fit step or with "
                "optimizer.build(model.trainable_variables)."
            )
        return report.curvature_report(self.curvature, as_dict)

    # --- saving ----------------------------------------------------------------------
    def sync_factors(self) -> None:
        """Brings every replica's factor sums to their common average (one sync).

        A collective: under MultiWorkerMirroredStrategy every worker must call
        it, at the same step. `StepCheckpoint` does, before each save, so that
        replica 0's copy is every replica's state and a resume is exact.
        """
        if self._curvature is None:
            return
        if getattr(self, "_sync_function", None) is None:
            strategy = self.context.strategy
            # Not an attribute Keras should track (it is no state to save).
            object.__setattr__(
                self,
                "_sync_function",
                tf.function(lambda: strategy.run(self.curvature.sync), autograph=False),
            )
        self._sync_function()

    def save_own_variables(self, store: Any) -> None:
        """Saves this process' state as it is, with no collective.

        `model.save` is often called on the chief only, and a collective here
        would wait forever for the other workers. The factor sums saved are
        replica 0's: between two inverse updates (factor_sync="lazy") they are
        the global moving average as of the last sync plus the statistics of
        replica 0's own shards since, an estimate of the same average from
        fewer examples (exact right after an inverse update, with
        factor_sync="every_update", or with one replica). Inverses, counters,
        damping, the seed and momentum are identical on every replica. For an
        exact snapshot of every replica's statistics, call `sync_factors()` on
        every worker first (`StepCheckpoint` does).
        """
        if self.context.num_replicas > 1 and not _spans_workers(self.context.strategy):
            # Every replica lives in this process: syncing cannot wait for anyone.
            self.sync_factors()
        super().save_own_variables(store)

    # --- serialization ---------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Keras' config plus every K-FAC argument, hyperparameters at their current values."""
        config = super().get_config()
        for key in _KERAS_ONLY_CONFIG:
            config.pop(key, None)
        arguments = self.config.arguments()
        mutable = self.config.mutable
        loss = arguments["loss"]
        arguments.update(
            damping=float(self._damping.numpy()),
            loss=keras.losses.serialize(loss)
            if loss is not None and not isinstance(loss, (str, list, dict))
            else loss,
            momentum=float(self._momentum.numpy()),
            weight_decay_coeff=float(self._weight_decay_coeff.numpy())
            if "weight_decay_coeff" in mutable
            else None,
            norm_constraint=float(self._norm_constraint.numpy())
            if "norm_constraint" in mutable
            else None,
            batch_size=int(self._batch_size.numpy()) if "batch_size" in mutable else None,
            fisher_approx=arguments["fisher_approx"]
            if _plain(arguments["fisher_approx"])
            else None,
            # A manual LayerCollection and a policy object are not serializable:
            # pass them again to `from_config`'s caller.
            layer_collection=None,
            placement=arguments["placement"]
            if isinstance(arguments["placement"], str)
            else "round_robin",
            seed=int(self._seed.numpy()),
        )
        # Keras' own learning rate (a schedule serialized) is in `config`.
        arguments.pop("learning_rate")
        if self.config.uses_qmodel:
            # The quadratic model chooses the step size (and, with "qmodel", the momentum).
            config["learning_rate"] = None
            if self.config.momentum_type == QMODEL:
                arguments["momentum"] = None
        config.update(arguments)
        return config

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: Any = None, model: keras.Model | None = None
    ) -> Kfac:
        config = dict(config)
        lr = config.get("learning_rate")
        if isinstance(lr, dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(
                lr, custom_objects=custom_objects
            )
        if isinstance(config.get("loss"), dict):
            config["loss"] = keras.losses.deserialize(config["loss"], custom_objects=custom_objects)
        return cls(model=model, **config)


def _assign(variable: tf.Variable, value: tf.Tensor) -> None:
    variable.assign(value)


def _spans_workers(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()  # noqa: SLF001
    )


def _plain(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, dict) and all(isinstance(k, str) for k in value))
    )
