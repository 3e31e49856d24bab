"""`Kfac`: the K-FAC optimizer for Keras 3, under any tf.distribute strategy."""

from __future__ import annotations

import threading
import weakref

import keras
import numpy as np
import tensorflow as tf

# First: checks TensorFlow's and Keras' versions before anything relies on their internals.
from kfac_dist import _versions  # noqa: F401  # isort: skip
from kfac_dist import accumulation, linalg, registration, strategies, training
from kfac_dist import adaptive as adaptive_lib
from kfac_dist import blocks as blocks_lib
from kfac_dist import curvature as curvature_lib
from kfac_dist import losses as losses_lib
from kfac_dist import placement as placement_lib
from kfac_dist.multi_worker import check_steps_per_execution, enable_multi_worker_fit
from kfac_dist.placement import report

#: Name scope of the inverse update's `tf.cond`, so tools can find it in a graph.
INVERSE_UPDATE_SCOPE = "kfac_inverse_update"

MUTABLE = (
    "learning_rate",
    "damping",
    "momentum",
    "weight_decay_coeff",
    "norm_constraint",
    "batch_size",
)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
_CLIP_ARGS = ("clipnorm", "clipvalue", "global_clipnorm")
_REJECTED_ARGS = {
    "use_ema": "K-FAC keeps no EMA of the weights",
    "ema_momentum": "K-FAC keeps no EMA of the weights",
    "ema_overwrite_frequency": "K-FAC keeps no EMA of the weights",
    "weight_decay": "use weight_decay_coeff (decoupled, added to the update)",
    "loss_scale_factor": "use the mixed-precision policy, which wraps the optimizer",
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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
        estimation_mode: "sampled" (default), "empirical" or "exact".
        fisher_approx: {layer name or class: "kron" | "diagonal" | "full"}.
        inverse_method: "cholesky" (default) or "eigen".
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

    def __init__(
        self,
        *args,
        learning_rate=None,
        damping=None,
        model: keras.Model | None = None,
        loss=None,
        loss_weights=None,
        momentum: float | None = None,
        momentum_type: str | None = None,
        adaptive: bool = False,
        adapt_damping: bool = False,
        damping_adaptation_interval: int = 5,
        damping_adaptation_decay: float = 0.95,
        min_damping: float = 1e-8,
        include_damping_in_quad_change: bool = False,
        weight_decay_coeff: float | None = None,
        norm_constraint: float | None = None,
        batch_size: int | None = None,
        cov_ema_decay: float = 0.95,
        cov_update_every: int = 1,
        invert_every: int = 10,
        estimation_mode: str = losses_lib.SAMPLED,
        fisher_approx=None,
        inverse_method: str = blocks_lib.CHOLESKY,
        layer_collection: registration.LayerCollection | None = None,
        unsupported_layers: str = "error",
        placement="round_robin",
        factor_sync: str = curvature_lib.LAZY,
        inverse_sharing: str = "auto",
        seed: int | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs,
    ):
        if args:
            raise TypeError(
                "Kfac takes keyword arguments only, e.g. Kfac(learning_rate=0.001, "
                "damping=0.01, model=model, loss=loss)."
            )
        for arg in _CLIP_ARGS:
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"Kfac does not support {arg}: K-FAC bounds its update by the KL "
                    "divergence instead; use norm_constraint=C (KL clipping)."
                )
            kwargs.pop(arg, None)
        for arg, why in _REJECTED_ARGS.items():
            if arg in kwargs and kwargs[arg] not in (None, False):
                raise ValueError(f"Kfac does not support {arg}: {why}.")
            kwargs.pop(arg, None)
        if kwargs:
            raise TypeError(f"Kfac got unexpected argument(s): {sorted(kwargs)}.")
        _require(damping is not None, "Kfac needs damping=λ > 0 (e.g. damping=0.01).")
        if momentum_type is None:
            momentum_type = adaptive_lib.QMODEL if adaptive else adaptive_lib.REGULAR
        _require(
            momentum_type in adaptive_lib.MOMENTUM_TYPES,
            f"momentum_type must be one of {adaptive_lib.MOMENTUM_TYPES}, got {momentum_type!r}.",
        )
        adapt_damping = bool(adapt_damping or adaptive)
        qmodel = momentum_type != adaptive_lib.REGULAR
        _require(
            qmodel or not adapt_damping,
            "adapt_damping=True compares the loss's change with the quadratic model's "
            "prediction, which only quadratic-model momentum computes: pass "
            "momentum_type='qmodel' or 'qmodel_fixedmu' (or adaptive=True), or fix the damping.",
        )
        if qmodel:
            _require(
                learning_rate is None,
                f"learning_rate must be left out with momentum_type={momentum_type!r} "
                "(adaptive=True): the quadratic model chooses the step size.",
            )
            _require(
                norm_constraint is None,
                "norm_constraint cannot be used with quadratic-model momentum "
                "(adaptive=True): the quadratic model already sizes the step.",
            )
            _require(
                momentum is None or momentum_type == adaptive_lib.QMODEL_FIXED_MU,
                "momentum must be left out with momentum_type='qmodel' (adaptive=True): "
                "the quadratic model chooses it; use 'qmodel_fixedmu' to fix it.",
            )
            learning_rate = 1.0  # unused: Keras' base optimizer needs a value
        _require(learning_rate is not None, "Kfac needs learning_rate=... (e.g. 0.001).")
        if momentum is None:
            momentum = 0.9
        _require(
            int(damping_adaptation_interval) >= 1,
            f"damping_adaptation_interval must be >= 1, got {damping_adaptation_interval}.",
        )
        _require(
            0 < float(damping_adaptation_decay) < 1,
            f"damping_adaptation_decay must be in (0, 1), got {damping_adaptation_decay}.",
        )
        _require(float(min_damping) >= 0, f"min_damping must be >= 0, got {min_damping}.")
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = float(learning_rate)
            _require(
                float(learning_rate) > 0,
                f"learning_rate must be > 0, got {learning_rate}.",
            )
        _require(float(damping) > 0, f"damping must be > 0, got {damping}.")
        _require(0 <= float(momentum) < 1, f"momentum must be in [0, 1), got {momentum}.")
        _require(
            weight_decay_coeff is None or float(weight_decay_coeff) >= 0,
            f"weight_decay_coeff must be >= 0, got {weight_decay_coeff}.",
        )
        _require(
            norm_constraint is None or float(norm_constraint) > 0,
            f"norm_constraint must be > 0, got {norm_constraint}.",
        )
        _require(
            batch_size is None or int(batch_size) >= 1,
            f"batch_size must be >= 1, got {batch_size}.",
        )
        _require(
            0 <= float(cov_ema_decay) < 1,
            f"cov_ema_decay must be in [0, 1), got {cov_ema_decay}.",
        )
        _require(
            int(cov_update_every) >= 1,
            f"cov_update_every must be >= 1, got {cov_update_every}.",
        )
        _require(int(invert_every) >= 1, f"invert_every must be >= 1, got {invert_every}.")
        _require(
            estimation_mode in losses_lib.ESTIMATION_MODES,
            f"estimation_mode must be one of {losses_lib.ESTIMATION_MODES}, "
            f"got {estimation_mode!r}.",
        )
        _require(
            inverse_method in blocks_lib.INVERSE_METHODS,
            f"inverse_method must be one of {blocks_lib.INVERSE_METHODS}, got {inverse_method!r}.",
        )
        _require(
            unsupported_layers in registration.UNSUPPORTED_LAYER_POLICIES,
            f"unsupported_layers must be one of {registration.UNSUPPORTED_LAYER_POLICIES}, "
            f"got {unsupported_layers!r}.",
        )
        _require(
            factor_sync in curvature_lib.FACTOR_SYNC_MODES,
            f"factor_sync must be one of {curvature_lib.FACTOR_SYNC_MODES}, got {factor_sync!r}.",
        )
        _require(
            inverse_sharing in placement_lib.SHARING_METHODS,
            f"inverse_sharing must be one of {placement_lib.SHARING_METHODS}, "
            f"got {inverse_sharing!r}.",
        )
        _require(
            collective_timeout is None or float(collective_timeout) > 0,
            f"collective_timeout must be > 0 seconds (or None: wait forever), "
            f"got {collective_timeout}.",
        )
        _require(
            gradient_accumulation_steps is None or int(gradient_accumulation_steps) >= 2,
            f"gradient_accumulation_steps must be >= 2 (or None: off), "
            f"got {gradient_accumulation_steps}.",
        )
        _require(
            gradient_accumulation_steps is None or not (adapt_damping or qmodel),
            "gradient_accumulation_steps cannot be used with adaptive=True, adapt_damping "
            "or quadratic-model momentum: they measure the loss on the update's whole "
            "batch, which accumulation spreads over several calls. Use a larger batch, "
            "or regular momentum with fixed damping.",
        )
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            gradient_accumulation_steps=gradient_accumulation_steps
            and int(gradient_accumulation_steps),
        )
        self._mutable = tuple(
            h
            for h, value in zip(
                MUTABLE,
                (
                    learning_rate,
                    damping,
                    momentum,
                    weight_decay_coeff,
                    norm_constraint,
                    batch_size,
                ),
            )
            if value is not None
            and not (adapt_damping and h == "damping")
            and not (qmodel and h in ("learning_rate", "momentum"))
        )
        self.momentum_type = momentum_type
        self.adapt_damping = adapt_damping
        self.damping_adaptation_interval = int(damping_adaptation_interval)
        self.damping_adaptation_decay = float(damping_adaptation_decay)
        self.min_damping = float(min_damping)
        self.include_damping_in_quad_change = bool(include_damping_in_quad_change)
        with keras.name_scope(self.name, caller=self):
            # Per replica: adaptive damping is updated inside the step, identically
            # on every replica, with no implicit communication.
            self._damping = self._hyper_variable("damping", damping, synchronization="on_read")
            self._momentum = self._hyper_variable("momentum", momentum)
            self._weight_decay_coeff = self._hyper_variable(
                "weight_decay_coeff", weight_decay_coeff or 0.0
            )
            self._norm_constraint = self._hyper_variable("norm_constraint", norm_constraint or 0.0)
            self._batch_size = self._hyper_variable("batch_size", batch_size or 0, "int64")
            if seed is None:
                seed = np.random.randint(0, 2**31 - 1)
            # A variable: MultiWorkerMirrored broadcasts the chief's initial
            # value to every worker, and checkpoints save it.
            self._seed = self._hyper_variable("seed", int(seed), "int64")
        self.loss = loss
        self.loss_weights = loss_weights
        self.cov_ema_decay = float(cov_ema_decay)
        self.cov_update_every = int(cov_update_every)
        self.invert_every = int(invert_every)
        self.estimation_mode = estimation_mode
        self.fisher_approx = fisher_approx
        self.inverse_method = inverse_method
        self.layer_collection = layer_collection
        self.unsupported_layers = unsupported_layers
        self.placement = placement
        self.factor_sync = factor_sync
        self.inverse_sharing = inverse_sharing
        self.collective_timeout = None if collective_timeout is None else float(collective_timeout)
        self._model_ref = None
        # What one replica's step hands from the train step to the update: a
        # replica thread's own (MirroredStrategy traces replicas in threads).
        self._replica_step = threading.local()
        self._output_losses = None
        self.curvature = None
        self._traced_update = False  # whether a traced step holds K-FAC's state
        if model is not None:
            self.bind(model)

    def _hyper_variable(
        self, name: str, value, dtype: str = "float32", synchronization: str = "auto"
    ):
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

    # --- the model ------------------------------------------------------------
    @property
    def model(self) -> keras.Model | None:
        return self._model_ref() if self._model_ref is not None else None

    def bind(self, model: keras.Model) -> None:
        """Binds to `model`: its strategy, its train step, its layers."""
        self._model_ref = weakref.ref(model)
        self.context = strategies.resolve(
            model.distribute_strategy, collective_timeout=self.collective_timeout
        )
        training.install(model)
        enable_multi_worker_fit(model)
        if registration.is_built(model):
            # Building now (not inside the first traced step) registers the
            # layers, fails early on unsupported ones, and spares Keras a
            # second trace of the train step for the variables created there.
            with model.distribute_strategy.scope():
                self.build(model.trainable_variables)

    def _register(self, model, var_list):
        return registration.collect_blocks(
            model,
            fisher_approx=self.fisher_approx,
            unsupported_layers=self.unsupported_layers,
            layer_collection=self.layer_collection,
            variables=var_list,
        )

    def build(self, var_list):
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
        blocks = self._register(model, var_list)
        self.curvature = curvature_lib.Curvature(
            blocks,
            self.context,
            inverse_method=self.inverse_method,
            placement=self.placement,
            cov_ema_decay=self.cov_ema_decay,
            factor_sync=self.factor_sync,
            sharing=self.inverse_sharing,
        )
        add = curvature_lib.per_replica_variable(self)
        self.curvature.build(add)
        self._statistic_sums = (
            accumulation.StatisticSums(self.curvature, add)
            if self.gradient_accumulation_steps
            else None
        )
        self._kl_clip = add((), "kl_clip")
        # [α, μ, predicted change, ρ] of the quadratic model, for the history.
        self._qmodel_state = add((4,), "qmodel_state")
        self._skipped_updates = add((), "skipped_updates", "int64")
        self._velocities = [self.add_variable_from_reference(v, "velocity") for v in var_list]
        # F̂v for each velocity v: the KL clip of a momentum step needs ⟨v, F̂v⟩.
        self._velocity_curvatures = (
            [self.add_variable_from_reference(v, "velocity_curvature") for v in var_list]
            if self._clips_kl
            else []
        )
        self._block_indices = [[self._get_variable_index(v) for v in b.variables] for b in blocks]
        registered = {i for indices in self._block_indices for i in indices}
        self._unregistered = [i for i in range(len(var_list)) if i not in registered]
        self.built = True

    def _rebuild(self, var_list) -> None:
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
        self._trainable_variables_indices = {}
        self.built = False
        self.build(var_list)

    def _check_share(self, model, var_list) -> None:
        """Given only some of the model's variables, the update rule must allow it."""
        mine = {id(v) for v in var_list}
        if all(id(v) in mine for v in model.trainable_variables):
            return
        _require(
            self.momentum_type == adaptive_lib.REGULAR and not self.adapt_damping,
            "Kfac with adaptive=True, adapt_damping or quadratic-model momentum must train "
            "all of the model's trainable variables: the quadratic model and ρ assume no "
            "other optimizer moves the loss. In a MultiOptimizer, use regular momentum "
            "with a fixed damping.",
        )

    # --- losses -------------------------------------------------------------------
    def output_losses(self, num_outputs: int) -> list[losses_lib.OutputLoss | None]:
        """One `OutputLoss` (or None: no loss) per flat model output."""
        if self._output_losses is None:
            self._output_losses = self._resolve_losses(num_outputs)
        return self._output_losses

    def _resolve_losses(self, num_outputs):
        model = self.model
        compiled = getattr(model, "_compile_loss", None)
        compiled_loss = getattr(compiled, "_user_loss", None)
        compiled_weights = getattr(compiled, "_user_loss_weights", None)
        if (
            self.loss is not None
            and compiled_loss is not None
            and not _same_loss(self.loss, compiled_loss)
        ):
            raise ValueError(
                f"Kfac(loss={self.loss!r}) differs from the loss the model was compiled "
                f"with ({compiled_loss!r}); pass the same loss to both, or only to compile."
            )
        if (
            self.loss_weights is not None
            and compiled_weights is not None
            and self.loss_weights != compiled_weights
        ):
            raise ValueError(
                f"Kfac(loss_weights={self.loss_weights!r}) differs from compile's "
                f"loss_weights={compiled_weights!r}; pass the same to both, or only to compile."
            )
        loss = self.loss if self.loss is not None else compiled_loss
        weights = self.loss_weights if self.loss_weights is not None else compiled_weights
        names = list(getattr(model, "output_names", None) or [])
        manual = self.layer_collection.losses if self.layer_collection else {}
        out = []
        for index in range(num_outputs):
            name = names[index] if index < len(names) else None
            if index in manual or name in manual:
                entry, weight = manual.get(index, manual.get(name))
            else:
                entry = _pick(loss, index, name, num_outputs, "loss")
                weight = _pick(weights, index, name, num_outputs, "loss_weights")
            out.append(None if entry is None else losses_lib.output_loss(entry, weight))
        if all(o is None for o in out):
            raise ValueError("Kfac found no loss: pass loss= to Kfac or to model.compile.")
        return out

    # --- hyperparameters ---------------------------------------------------------
    @property
    def mutable_hyperparameters(self) -> tuple[str, ...]:
        return self._mutable

    def __setattr__(self, name, value):
        if name in MUTABLE[1:] and getattr(self, "_mutable", None) is not None:
            self._set_hyperparameter(name, value)
            return
        super().__setattr__(name, value)

    def _set_hyperparameter(self, name, value):
        if name not in self._mutable:
            raise ValueError(
                f"{name} cannot change during training: it was None when this Kfac was "
                f"created. Mutable hyperparameters: {self._mutable}."
            )
        getattr(self, f"_{name}").assign(value)

    @property
    def damping(self):
        return self._damping

    @property
    def seed(self):
        """The sampled Fisher's seed (an int64 variable, the same on every worker)."""
        return self._seed

    @property
    def momentum(self):
        return self._momentum

    @property
    def weight_decay_coeff(self):
        return self._weight_decay_coeff

    @property
    def norm_constraint(self):
        return self._norm_constraint

    @property
    def batch_size(self):
        return self._batch_size

    def damping_value(self) -> tf.Tensor:
        return tf.convert_to_tensor(self._damping)

    def check_batch_size(self, local_batch_size) -> None:
        """With batch_size given, the global batch must match it."""
        if "batch_size" not in self._mutable:
            return
        global_batch = tf.cast(local_batch_size, tf.int64) * self.context.num_replicas
        tf.debugging.assert_equal(
            global_batch,
            tf.convert_to_tensor(self._batch_size),
            message="Kfac(batch_size=...) does not match the global batch size of the data",
        )

    # --- the update -----------------------------------------------------------------
    def _backend_apply_gradients(self, grads, trainable_variables):
        """K-FAC's update on every call, or on every k-th with gradient accumulation.

        Replaces Keras' own accumulation, which cannot serve (see accumulation.py).
        """
        self._backend_update_step(grads, trainable_variables, self.learning_rate)

    def _get_current_learning_rate(self):
        # A schedule counts applied updates (`iterations`), as the inverse
        # schedule does; Keras' base counts accumulated micro-batches.
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """All-reduce once, precondition in replica context, then Keras' per-variable update."""
        trainable_variables = [
            v.value if isinstance(v, keras.Variable) else v for v in trainable_variables
        ]
        # A sparse gradient (an Embedding's, unscaled by the loss scale) can lose
        # its static shape when made dense; the variable's is the gradient's.
        grads = [
            tf.ensure_shape(tf.convert_to_tensor(g), v.shape)
            for g, v in zip(grads, trainable_variables)
        ]
        self._traced_update = True
        curvature_step = self._take_curvature_step()
        accumulators = []
        if self.gradient_accumulation_steps:
            directions, coefficients, curvature_gradients, accumulators = (
                self._accumulated_directions(
                    grads, trainable_variables, learning_rate, curvature_step
                )
            )
        else:
            directions, coefficients, curvature_gradients = self._directions(
                grads, trainable_variables, learning_rate, curvature_step
            )
        registered = [i for indices in self._block_indices for i in indices]
        curvature_updates = [
            (gradient, self._velocity_curvatures[i].value)
            for i, gradient in zip(registered, curvature_gradients)
        ]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_kfac_update,
            self._distribution_strategy,
            list(zip(directions, trainable_variables)),
            coefficients,
            accumulators,
            curvature_updates,
        )

    def _accumulated_directions(self, grads, trainable_variables, learning_rate, curvature_step):
        """Adds this micro-batch to the sums; on the k-th call, the update of their means.

        Also returns each gradient accumulator's next value (zero after an
        update), for the update's `merge_call` to write.
        """
        steps = self.gradient_accumulation_steps
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables
        ]
        sums = [tf.convert_to_tensor(a) + g for a, g in zip(accumulators, grads)]
        statistics, is_statistics_step, is_inverse_step = curvature_step
        statistics = self._statistic_sums.add(statistics)
        is_update_step = tf.equal((self._iterations + 1) % steps, 0)

        def update():
            means = [total / tf.cast(steps, total.dtype) for total in sums]
            directions, (scale, momentum, finite), curvature_gradients = self._directions(
                means,
                trainable_variables,
                learning_rate,
                (statistics, is_statistics_step, is_inverse_step),
                conditional=True,
            )
            self._statistic_sums.reset()
            return directions, scale, momentum, finite, curvature_gradients

        def accumulate():
            zero = tf.constant(0.0, linalg.curvature_dtype())
            no_curvature = [tf.zeros_like(grads[i]) for i in registered] if self._clips_kl else []
            return [tf.zeros_like(g) for g in grads], zero, zero, tf.constant(False), no_curvature

        by_index = {self._get_variable_index(v): i for i, v in enumerate(trainable_variables)}
        registered = [by_index[i] for indices in self._block_indices for i in indices]
        directions, scale, momentum, finite, curvature_gradients = tf.cond(
            is_update_step, update, accumulate
        )
        next_sums = [tf.where(is_update_step, tf.zeros_like(t), t) for t in sums]
        return (
            directions,
            (scale, momentum, finite),
            curvature_gradients,
            list(zip(next_sums, accumulators)),
        )

    def _directions(
        self, grads, trainable_variables, learning_rate, curvature_step, conditional=False
    ):
        """The all-reduced, preconditioned (and clipped) directions and the update's coefficients.

        Folds the statistics and, on schedule, updates the inverses first.
        `conditional`: called inside a `tf.cond` (see
        `CrossReplicaContext.all_reduce_gradients`).
        """
        statistics, is_statistics_step, is_inverse_step = curvature_step
        loss_scaled = getattr(self._replica_step, "loss_scaled", False)
        self._replica_step.loss_scaled = False
        # This replica's non-finite statistics travel inside the one gradient
        # all-reduce: every replica then skips the same steps, with no extra
        # collective (a replica that skipped alone would skew the factors).
        local_bad = tf.cast(tf.logical_not(statistics.finite), grads[0].dtype)
        *grads, bad = self.context.all_reduce_gradients([*grads, local_bad], conditional)
        finite = tf.logical_and(
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]),
            tf.equal(bad, 0),
        )
        grads = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
        self._replica_step.finite = finite
        if loss_scaled:
            # A step the loss scale rejects is no step (`loss_scaling.finish_step`):
            # the inverse update due runs at the next step, which has this index.
            is_inverse_step = tf.logical_and(is_inverse_step, finite)
        if self._coupled_weight_decay:
            decay = self._weight_decay_coeff
            grads = [g + tf.cast(decay, g.dtype) * v for g, v in zip(grads, trainable_variables)]
        curvature = self.curvature
        curvature.fold(statistics, tf.logical_and(is_statistics_step, finite))

        def update_inverses():
            curvature.update_inverses(self.damping_value())
            return tf.no_op()

        with tf.name_scope(INVERSE_UPDATE_SCOPE):
            tf.cond(is_inverse_step, update_inverses, tf.no_op)
        by_index = {self._get_variable_index(v): i for i, v in enumerate(trainable_variables)}
        block_grads = [[grads[by_index[i]] for i in indices] for indices in self._block_indices]
        preconditioned = self.curvature.precondition(block_grads, self._damping)
        directions = list(grads)
        inner = tf.constant(0.0, linalg.curvature_dtype())
        for indices, block_grad, block_pre in zip(self._block_indices, block_grads, preconditioned):
            for i, g, p in zip(indices, block_grad, block_pre):
                directions[by_index[i]] = tf.cast(p, g.dtype)
                inner += tf.reduce_sum(tf.cast(p * g, inner.dtype))
        if self.momentum_type == adaptive_lib.REGULAR:
            if self._clips_kl:
                clip = self._kl_clip_of_step(grads, by_index, inner, learning_rate)
            else:
                clip = tf.constant(1.0, inner.dtype)
            # The whole step μv − lr·P∇ is scaled, momentum included.
            directions = [d * tf.cast(clip, d.dtype) for d in directions]
            self._kl_clip.assign(tf.where(finite, clip, self._kl_clip))
            scale = -tf.cast(learning_rate, inner.dtype)
            momentum = tf.cast(self._momentum, inner.dtype) * clip
        else:
            self._kl_clip.assign(tf.ones_like(self._kl_clip))
            scale, momentum = self._qmodel_coefficients(
                grads, directions, trainable_variables, by_index, inner
            )
        self._skipped_updates.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        # F̂·(clip·P∇) = clip·∇: F̂v follows the velocity with the gradients.
        curvature_gradients = (
            [
                grads[by_index[i]] * tf.cast(clip, grads[by_index[i]].dtype)
                for indices in self._block_indices
                for i in indices
            ]
            if self._clips_kl
            else []
        )
        return directions, (scale, momentum, finite), curvature_gradients

    @property
    def _clips_kl(self) -> bool:
        return self.momentum_type == adaptive_lib.REGULAR and "norm_constraint" in self._mutable

    def _kl_clip_of_step(self, grads, by_index, inner, learning_rate) -> tf.Tensor:
        """The KL clip of this step, momentum included (`linalg.kl_clip_factor`).

        Identical on every replica: ∇ is all-reduced, v and F̂v are shared
        state. F̂v is exact while the inverses stay the same, an estimate from
        the previous inverses for a few steps after each inverse update.
        """
        dtype = inner.dtype
        registered = [i for indices in self._block_indices for i in indices]
        velocities = [self._velocities[i] for i in registered]
        velocity_gradient = adaptive_lib.flat_dot(
            velocities, [grads[by_index[i]] for i in registered], dtype
        )
        velocity_curvature = adaptive_lib.flat_dot(
            velocities, [self._velocity_curvatures[i] for i in registered], dtype
        )
        return linalg.kl_clip_factor(
            inner,
            learning_rate,
            self._norm_constraint,
            self._momentum,
            velocity_gradient,
            velocity_curvature,
        )

    def step_was_finite(self) -> tf.Tensor:
        """Whether this replica's last update was applied (the same on every replica).

        Decided after the gradient all-reduce: every replica's gradients and
        statistics were finite.
        """
        return self._replica_step.finite

    def _take_curvature_step(self):
        """This replica's batch statistics, whether to fold them and whether to invert.

        The train step hands them over; `apply_gradients` called outside it
        folds nothing and inverts nothing.
        """
        handed = getattr(self._replica_step, "curvature", None)
        self._replica_step.curvature = None
        if handed is None:
            return self.curvature.empty_statistics(), tf.constant(False), tf.constant(False)
        statistics, is_statistics_step, step = handed
        return statistics, is_statistics_step, tf.equal(step % self.invert_every, 0)

    def _distributed_kfac_update(
        self, distribution, grads_and_vars, coefficients, accumulators, curvature_updates
    ):
        # The coefficients travel as merge_call arguments, so each replica's
        # update reads its own copy (identical values, no cross-device reads).
        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, self._kfac_update, args=(grad, coefficients), group=False
            )
        for grad, velocity_curvature in curvature_updates:
            distribution.extended.update(
                velocity_curvature,
                self._velocity_curvature_update,
                args=(grad, coefficients),
                group=False,
            )

        # Each replica keeps its own sum of its micro-batches' gradients.
        for value, accumulator in accumulators:
            distribution.extended.update(accumulator.value, _assign, args=(value,), group=False)

    def _velocity_curvature_update(self, velocity_curvature, gradient, coefficients):
        """F̂v ← μ·F̂v + s·clip·∇, the velocity's update seen through F̂ (F̂P∇ = ∇)."""
        scale, momentum, finite = coefficients
        dtype = velocity_curvature.dtype
        updated = tf.cast(momentum, dtype) * velocity_curvature + tf.cast(scale, dtype) * gradient
        self.assign(velocity_curvature, tf.where(finite, updated, velocity_curvature))

    def _kfac_update(self, variable, gradient, coefficients):
        """v = μv + s·(d + wd·θ); θ = θ + v; nothing moves on a non-finite step.

        s = −lr and μ = momentum ("regular"), or (s, μ) = (α, μ) of the
        quadratic model.
        """
        scale, momentum, finite = coefficients
        velocity = self._velocities[self._get_variable_index(variable)]
        # Coupled weight decay is already in the gradient (quadratic-model modes).
        decay = 0.0 if self._coupled_weight_decay else self._weight_decay_coeff
        decay = tf.cast(decay, variable.dtype)
        scale = tf.cast(scale, variable.dtype)
        momentum = tf.cast(momentum, variable.dtype)
        new_velocity = momentum * velocity + scale * (gradient + decay * variable)
        new_velocity = tf.where(finite, new_velocity, velocity)
        self.assign(velocity, new_velocity)
        self.assign_add(
            variable,
            tf.where(finite, new_velocity, tf.zeros_like(new_velocity)),
        )

    @property
    def _coupled_weight_decay(self) -> bool:
        return self.momentum_type != adaptive_lib.REGULAR and "weight_decay_coeff" in self._mutable

    def _weight_decay_loss(self, variables, dtype) -> tf.Tensor:
        """½·wd·‖θ‖², the coupled weight decay's term of the objective (0 if none)."""
        if not self._coupled_weight_decay:
            return tf.constant(0.0, dtype)
        decay = tf.cast(self._weight_decay_coeff, dtype)
        return 0.5 * decay * adaptive_lib.flat_dot(variables, variables, dtype)

    def _qmodel_coefficients(self, grads, directions, variables, by_index, inner):
        """(α, μ) of the quadratic model on this batch, identical on every replica.

        The Fisher terms are local (this replica's batch); one small
        all-reduce averages them with the step's loss, which ρ needs later.
        """
        dtype = inner.dtype
        batch = self._replica_step.inputs
        kept = [i for i in range(len(variables)) if directions[i] is not None]
        previous = [
            tf.convert_to_tensor(self._velocities[self._get_variable_index(variables[i])])
            for i in kept
        ]
        delta = [directions[i] for i in kept]
        tangent_vars = [variables[i] for i in kept]
        losses = self.output_losses(len(keras.tree.flatten(batch["y_pred"])))
        # The forward passes start from the random state of the step's own pass:
        # the same dropout masks as the loss they model (see training.py).
        state = batch["state"]
        j_delta, etas = adaptive_lib.output_tangents(
            self.model, batch["x"], tangent_vars, delta, losses, state
        )
        j_prev, _ = adaptive_lib.output_tangents(
            self.model, batch["x"], tangent_vars, previous, losses, state
        )
        weights = batch["sample_weights"]
        b = batch["batch_size"]
        loss_before = tf.cast(batch["loss"], dtype) + self._weight_decay_loss(variables, dtype)
        terms = tf.stack(
            [
                tf.cast(adaptive_lib.fisher_products(losses, etas, ja, jb, weights, b), dtype)
                for ja, jb in ((j_delta, j_delta), (j_delta, j_prev), (j_prev, j_prev))
            ]
            + [loss_before]
        )
        terms = (
            self.context.all_reduce_sum([terms], strategies.ADAPTIVE)[0] / self.context.num_replicas
        )
        damping = tf.cast(self._damping, dtype)
        decay = tf.cast(self._weight_decay_coeff if self._coupled_weight_decay else 0.0, dtype)
        dd = adaptive_lib.flat_dot(delta, delta, dtype)
        dp = adaptive_lib.flat_dot(delta, previous, dtype)
        pp = adaptive_lib.flat_dot(previous, previous, dtype)
        # M = [ΔᵀCΔ, ΔᵀCδ; δᵀCΔ, δᵀCδ] with C = F + wd·I (the objective's
        # curvature), damped by λI for solving.
        curvature = tf.stack(
            [
                tf.stack([terms[0] + decay * dd, terms[1] + decay * dp]),
                tf.stack([terms[1] + decay * dp, terms[2] + decay * pp]),
            ]
        )
        norms = tf.stack([tf.stack([dd, dp]), tf.stack([dp, pp])])
        damped = curvature + damping * norms
        grad_list = [grads[i] for i in kept]
        linear = tf.stack([inner, adaptive_lib.flat_dot(grad_list, previous, dtype)])
        fixed_mu = self._momentum if self.momentum_type == adaptive_lib.QMODEL_FIXED_MU else None
        alpha, mu = adaptive_lib.solve_qmodel(damped, linear, fixed_mu)
        model = damped if self.include_damping_in_quad_change else curvature
        change = adaptive_lib.quadratic_change(model, linear, alpha, mu)
        self._replica_step.loss = terms[3]
        self._qmodel_state.assign(tf.stack([alpha, mu, change, self._qmodel_state[3]]))
        return alpha, mu

    def adapt_damping_after_step(self, loss_after) -> None:
        """Levenberg–Marquardt rule on ρ, with the loss after the step on the same batch.

        `loss_after` is this replica's compiled loss (Keras' per-replica
        scaling undone, as the loss before the step); one small all-reduce
        averages it. A NaN ρ (a non-finite loss) raises the damping.
        """
        dtype = self._qmodel_state.dtype
        loss_after = tf.cast(loss_after, dtype) + self._weight_decay_loss(
            self.model.trainable_variables, dtype
        )
        loss_after = (
            self.context.all_reduce_sum([tf.reshape(loss_after, [1])], strategies.ADAPTIVE)[0][0]
            / self.context.num_replicas
        )
        change = self._qmodel_state[2]
        rho = tf.math.divide_no_nan(loss_after - tf.cast(self._replica_step.loss, dtype), change)
        damping = adaptive_lib.adapt_damping(
            tf.convert_to_tensor(self._damping),
            tf.cast(rho, self._damping.dtype),
            interval=self.damping_adaptation_interval,
            decay=self.damping_adaptation_decay,
            min_damping=self.min_damping,
        )
        self._damping.assign(damping)
        self._qmodel_state.assign(tf.concat([self._qmodel_state[:3], [rho]], 0))

    def step_logs(self) -> dict[str, float]:
        """K-FAC's own state for the `fit` history, `return_dict=True` and TensorBoard.

        Read on the host after a step, from this process's first replica:
        these values are identical on every replica, so reading one copy
        needs no collective (a log returned by the train step would cost
        Keras' mean across replicas, a round trip per value and step).
        """
        local = self.context.strategy.experimental_local_results

        def first(variable) -> np.ndarray:
            return np.asarray(local(variable.value)[0])

        logs = {"damping": float(first(self._damping)), "kl_clip": float(first(self._kl_clip))}
        if self.momentum_type != adaptive_lib.REGULAR:
            alpha, mu, change, rho = first(self._qmodel_state)
            logs.update(qmodel_alpha=float(alpha), qmodel_mu=float(mu), qmodel_change=float(change))
            logs["rho"] = float(rho)
        skips = first(self._skipped_updates) + first(self.curvature.skipped_statistics)
        logs["nonfinite_skips"] = float(skips)
        return logs

    # --- placement report --------------------------------------------------------------
    def placement_report(self, as_dict: bool = False) -> str | dict:
        """Who inverts which factor, at what cost, and what each replica holds and moves.

        One row per replica: the factors it inverts and shares, their cost
        under the plan's cost model and its share of the total, and its K-FAC
        memory — the persistent state (factor sums, their last-good copies,
        inverse payloads) apart from the transient buffers of the factor sync
        and of the inverse sharing. The footer gives the bytes each replica
        hands in to those two collectives. A table for logs, or with
        `as_dict=True` a JSON-ready dict.
        """
        if self.curvature is None:
            raise ValueError(
                "placement_report needs a built Kfac: the placement is made when the "
                "optimizer is built, at the first fit step or with "
                "optimizer.build(model.trainable_variables)."
            )
        curvature = self.curvature
        plan = curvature.plan
        dtype = tf.as_dtype(curvature.weight_sum.dtype)
        sync_bytes = report.factor_sync_bytes(
            curvature.units, dtype.size, weight_floats=int(np.prod(curvature.weight_sum.shape))
        )
        sharing = curvature.sharing
        # Every replica holds every factor and every (shared) inverse.
        memory = report.ReplicaMemory(
            factor_sums=self._placement_bytes([*curvature.factor_sums, curvature.weight_sum]),
            last_good=self._placement_bytes([*curvature.good_sums, curvature.good_weight]),
            inverses=self._placement_bytes([v for p in curvature.payloads for v in p]),
            sync_buffer=sync_bytes,
            share_buffer=sharing.buffer,
        )
        reported = dict(
            bytes_per_factor_sync=sync_bytes,
            bytes_per_inverse_share=sharing.sent,
            sharing_method=curvature.sharing_method,
            sharing_collectives=sharing.collectives,
            memory_per_replica=[memory] * plan.num_replicas,
        )
        if not as_dict:
            return report.format_placement_table(plan, **reported)
        return {
            **report.plan_to_dict(plan, **reported),
            "inverse_method": curvature.inverse_method,
            "factor_sync": curvature.factor_sync,
            "dtype": dtype.name,
        }

    @staticmethod
    def _placement_bytes(variables) -> int:
        return sum(
            int(np.prod(v.shape, dtype=np.int64)) * tf.as_dtype(v.dtype).size for v in variables
        )

    # --- saving ----------------------------------------------------------------------
    def sync_factors(self) -> None:
        """Brings every replica's factor sums to their common average (one sync).

        A collective: under MultiWorkerMirroredStrategy every worker must call
        it, at the same step. `StepCheckpoint` does, before each save, so that
        replica 0's copy is every replica's state and a resume is exact.
        """
        if self.curvature is None:
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

    def save_own_variables(self, store):
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
    def get_config(self):
        config = super().get_config()
        for key in (
            "weight_decay",
            "clipnorm",
            "clipvalue",
            "global_clipnorm",
            "use_ema",
            "ema_momentum",
            "ema_overwrite_frequency",
            "loss_scale_factor",
        ):
            config.pop(key, None)
        config.update(
            {
                "damping": float(self._damping.numpy()),
                "loss": keras.losses.serialize(self.loss)
                if self.loss is not None and not isinstance(self.loss, (str, list, dict))
                else self.loss,
                "loss_weights": self.loss_weights,
                "momentum": float(self._momentum.numpy()),
                "weight_decay_coeff": float(self._weight_decay_coeff.numpy())
                if "weight_decay_coeff" in self._mutable
                else None,
                "norm_constraint": float(self._norm_constraint.numpy())
                if "norm_constraint" in self._mutable
                else None,
                "batch_size": int(self._batch_size.numpy())
                if "batch_size" in self._mutable
                else None,
                "include_damping_in_quad_change": self.include_damping_in_quad_change,
                "cov_ema_decay": self.cov_ema_decay,
                "cov_update_every": self.cov_update_every,
                "invert_every": self.invert_every,
                "estimation_mode": self.estimation_mode,
                "fisher_approx": self.fisher_approx if _plain(self.fisher_approx) else None,
                "inverse_method": self.inverse_method,
                "unsupported_layers": self.unsupported_layers,
                "placement": self.placement if isinstance(self.placement, str) else "round_robin",
                "factor_sync": self.factor_sync,
                "inverse_sharing": self.inverse_sharing,
                "seed": int(self._seed.numpy()),
                "collective_timeout": self.collective_timeout,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None, model=None):
        config = dict(config)
        lr = config.get("learning_rate")
        if isinstance(lr, dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(
                lr, custom_objects=custom_objects
            )
        if isinstance(config.get("loss"), dict):
            config["loss"] = keras.losses.deserialize(config["loss"], custom_objects=custom_objects)
        return cls(model=model, **config)


def _assign(variable, value):
    variable.assign(value)


def _spans_workers(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()  # noqa: SLF001
    )


def _plain(value) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, dict) and all(isinstance(k, str) for k in value))
    )


def _same_loss(a, b) -> bool:
    def canonical(loss):
        if isinstance(loss, (list, tuple)):
            return [canonical(x) for x in loss]
        if isinstance(loss, dict):
            return {k: canonical(v) for k, v in loss.items()}
        try:
            return keras.losses.serialize(keras.losses.get(loss) if isinstance(loss, str) else loss)
        except (ValueError, TypeError):
            return repr(loss)

    return a is b or canonical(a) == canonical(b) or _kind(a) == _kind(b)


def _kind(loss):
    try:
        out = losses_lib.output_loss(loss)
        return (out.kind, out.from_logits, out.label_smoothing)
    except (ValueError, TypeError):
        return object()


def _pick(spec, index: int, name, count: int, what: str):
    """The entry of a loss (or loss-weight) spec for one output."""
    if spec is None or not isinstance(spec, (list, tuple, dict)):
        return spec
    if isinstance(spec, dict):
        return spec.get(name)
    if len(spec) != count:
        raise ValueError(
            f"{what} has {len(spec)} entries but the model has {count} outputs; "
            "give one per output."
        )
    return spec[index]
