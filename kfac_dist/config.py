"""`KfacConfig`: Kfac's arguments, validated once, with the defaults they resolve to.

Frozen, so a check made here holds for the optimizer's lifetime: the
train step, the update and serialization read one consistent set of
options. The hyperparameters a user may change during training (the
learning rate, damping, momentum, weight decay, KL bound and batch size)
start from here and then live in optimizer variables (`Kfac.damping`, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import keras

from kfac_dist import options
from kfac_dist.options import MOMENTUM_TYPES, QMODEL, QMODEL_FIXED_MU, REGULAR

#: Hyperparameters that can change during training, in the order of their variables.
MUTABLE = (
    "learning_rate",
    "damping",
    "momentum",
    "weight_decay_coeff",
    "norm_constraint",
    "batch_size",
)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
DEFAULT_MOMENTUM = 0.9


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name} must be one of {allowed}, got {value!r}.")


#: The factor sync's largest transient buffer, and the largest stack of factors inverted at
#: once, by default (see `Kfac(sync_chunk_bytes=...)`).
DEFAULT_SYNC_CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True, eq=False)
class KfacConfig:
    """Every `Kfac` argument but the model and the name (see `Kfac` for each one's meaning).

    `__post_init__` checks each argument and resolves what depends on
    others: `adaptive=True` means quadratic-model momentum with adaptive
    damping; the quadratic model chooses the learning rate (stored as 1.0,
    unused) and, unless fixed, the momentum (default 0.9 otherwise).
    """

    learning_rate: Any = None  # float > 0 or a LearningRateSchedule
    damping: float | None = None
    loss: Any = None
    loss_weights: Any = None
    momentum: float | None = None
    momentum_type: str | None = None
    adaptive: bool = False
    adapt_damping: bool = False
    damping_adaptation_interval: int = 5
    damping_adaptation_decay: float = 0.95
    min_damping: float = 1e-8
    include_damping_in_quad_change: bool = False
    weight_decay_coeff: float | None = None
    norm_constraint: float | None = None
    batch_size: int | None = None
    cov_ema_decay: float = 0.95
    cov_update_every: int = 1
    invert_every: int = 10
    stagger_inverses: bool = False
    estimation_mode: str = options.SAMPLED
    fisher_approx: Any = None
    kron_sharing: str = options.EXPAND
    inverse_method: str = options.CHOLESKY
    max_factor_dim: int | None = options.DEFAULT_MAX_FACTOR_DIM
    layer_collection: Any = None
    unsupported_layers: str = "error"
    placement: Any = "round_robin"
    factor_sync: str = options.LAZY
    inverse_sharing: str = "auto"
    sync_chunk_bytes: int | None = DEFAULT_SYNC_CHUNK_BYTES
    inverse_replication: float = 1.0
    seed: int | None = None
    collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S
    gradient_accumulation_steps: int | None = None
    #: The hyperparameters that can change during training: those given, less
    #: those the adaptive mode chooses (resolved in `__post_init__`).
    mutable: tuple[str, ...] = dataclasses.field(init=False, default=())

    def __post_init__(self) -> None:
        if self.damping is None:
            raise ValueError("Kfac needs damping=λ > 0 (e.g. damping=0.01).")
        momentum_type = self.momentum_type or (QMODEL if self.adaptive else REGULAR)
        _one_of("momentum_type", momentum_type, MOMENTUM_TYPES)
        adapt_damping = bool(self.adapt_damping or self.adaptive)
        qmodel = momentum_type != REGULAR
        _require(
            qmodel or not adapt_damping,
            "adapt_damping=True compares the loss's change with the quadratic model's "
            "prediction, which only quadratic-model momentum computes: pass "
            "momentum_type='qmodel' or 'qmodel_fixedmu' (or adaptive=True), or fix the damping.",
        )
        learning_rate = self.learning_rate
        if qmodel:
            _require(
                learning_rate is None,
                f"learning_rate must be left out with momentum_type={momentum_type!r} "
                "(adaptive=True): the quadratic model chooses the step size.",
            )
            _require(
                self.norm_constraint is None,
                "norm_constraint cannot be used with quadratic-model momentum "
                "(adaptive=True): the quadratic model already sizes the step.",
            )
            _require(
                self.momentum is None or momentum_type == QMODEL_FIXED_MU,
                "momentum must be left out with momentum_type='qmodel' (adaptive=True): "
                "the quadratic model chooses it; use 'qmodel_fixedmu' to fix it.",
            )
            learning_rate = 1.0  # unused: Keras' base optimizer needs a value
        _require(learning_rate is not None, "Kfac needs learning_rate=... (e.g. 0.001).")
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = float(learning_rate)
            _require(learning_rate > 0, f"learning_rate must be > 0, got {learning_rate}.")
        momentum = DEFAULT_MOMENTUM if self.momentum is None else self.momentum
        _require(
            int(self.damping_adaptation_interval) >= 1,
            f"damping_adaptation_interval must be >= 1, got {self.damping_adaptation_interval}.",
        )
        _require(
            0 < float(self.damping_adaptation_decay) < 1,
            f"damping_adaptation_decay must be in (0, 1), got {self.damping_adaptation_decay}.",
        )
        _require(float(self.min_damping) >= 0, f"min_damping must be >= 0, got {self.min_damping}.")
        damping = float(self.damping)
        _require(damping > 0, f"damping must be > 0, got {self.damping}.")
        _require(0 <= float(momentum) < 1, f"momentum must be in [0, 1), got {momentum}.")
        _require(
            self.weight_decay_coeff is None or float(self.weight_decay_coeff) >= 0,
            f"weight_decay_coeff must be >= 0, got {self.weight_decay_coeff}.",
        )
        _require(
            self.norm_constraint is None or float(self.norm_constraint) > 0,
            f"norm_constraint must be > 0, got {self.norm_constraint}.",
        )
        _require(
            self.batch_size is None or int(self.batch_size) >= 1,
            f"batch_size must be >= 1, got {self.batch_size}.",
        )
        _require(
            0 <= float(self.cov_ema_decay) < 1,
            f"cov_ema_decay must be in [0, 1), got {self.cov_ema_decay}.",
        )
        _require(
            int(self.cov_update_every) >= 1,
            f"cov_update_every must be >= 1, got {self.cov_update_every}.",
        )
        _require(
            int(self.invert_every) >= 1, f"invert_every must be >= 1, got {self.invert_every}."
        )
        _one_of("estimation_mode", self.estimation_mode, options.ESTIMATION_MODES)
        _one_of("inverse_method", self.inverse_method, options.INVERSE_METHODS)
        _one_of("kron_sharing", self.kron_sharing, options.KRON_SHARINGS)
        bound = self.max_factor_dim
        _require(
            bound is None
            or (isinstance(bound, numbers.Integral) and not isinstance(bound, bool) and bound >= 1),
            f"max_factor_dim must be an int >= 1 (or None: factors kept whole), got {bound!r}.",
        )
        _one_of("unsupported_layers", self.unsupported_layers, options.UNSUPPORTED_LAYER_POLICIES)
        _one_of("factor_sync", self.factor_sync, options.FACTOR_SYNC_MODES)
        _one_of("inverse_sharing", self.inverse_sharing, options.SHARING_METHODS)
        _require(
            0 <= float(self.inverse_replication) <= 1,
            f"inverse_replication must be in [0, 1] (1: every replica holds every inverse, "
            f"0: each only its own), got {self.inverse_replication}.",
        )
        _require(
            self.sync_chunk_bytes is None or int(self.sync_chunk_bytes) >= 1,
            f"sync_chunk_bytes must be >= 1 (or None: one collective), "
            f"got {self.sync_chunk_bytes}.",
        )
        _require(
            self.collective_timeout is None or float(self.collective_timeout) > 0,
            f"collective_timeout must be > 0 seconds (or None: wait forever), "
            f"got {self.collective_timeout}.",
        )
        steps = self.gradient_accumulation_steps
        _require(
            steps is None or int(steps) >= 2,
            f"gradient_accumulation_steps must be >= 2 (or None: off), got {steps}.",
        )
        _require(
            steps is None or not (adapt_damping or qmodel),
            "gradient_accumulation_steps cannot be used with adaptive=True, adapt_damping "
            "or quadratic-model momentum: they measure the loss on the update's whole "
            "batch, which accumulation spreads over several calls. Use a larger batch, "
            "or regular momentum with fixed damping.",
        )
        resolved = {
            "learning_rate": learning_rate,
            "momentum": float(momentum),
            "momentum_type": momentum_type,
            "adapt_damping": adapt_damping,
            "damping": damping,
            "damping_adaptation_interval": int(self.damping_adaptation_interval),
            "damping_adaptation_decay": float(self.damping_adaptation_decay),
            "min_damping": float(self.min_damping),
            "include_damping_in_quad_change": bool(self.include_damping_in_quad_change),
            "cov_ema_decay": float(self.cov_ema_decay),
            "cov_update_every": int(self.cov_update_every),
            "invert_every": int(self.invert_every),
            "stagger_inverses": bool(self.stagger_inverses),
            "inverse_replication": float(self.inverse_replication),
            "sync_chunk_bytes": None
            if self.sync_chunk_bytes is None
            else int(self.sync_chunk_bytes),
            "collective_timeout": None
            if self.collective_timeout is None
            else float(self.collective_timeout),
            "gradient_accumulation_steps": None if steps is None else int(steps),
            "max_factor_dim": None if bound is None else int(bound),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        given = (
            learning_rate,
            self.damping,
            momentum,
            self.weight_decay_coeff,
            self.norm_constraint,
            self.batch_size,
        )
        object.__setattr__(
            self,
            "mutable",
            tuple(
                name
                for name, value in zip(MUTABLE, given)
                if value is not None
                and not (adapt_damping and name == "damping")
                and not (qmodel and name in ("learning_rate", "momentum"))
            ),
        )

    @property
    def uses_qmodel(self) -> bool:
        """Whether the quadratic model chooses the step (`momentum_type` not "regular")."""
        return self.momentum_type != REGULAR

    @property
    def clips_kl(self) -> bool:
        """Whether the step is KL-clipped (regular momentum with `norm_constraint`)."""
        return not self.uses_qmodel and "norm_constraint" in self.mutable

    @property
    def coupled_weight_decay(self) -> bool:
        """Weight decay in the objective (quadratic model) rather than added to the update."""
        return self.uses_qmodel and "weight_decay_coeff" in self.mutable

    def arguments(self) -> dict[str, Any]:
        """The arguments as resolved, by name (what `Kfac.get_config` starts from)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.init
        }
