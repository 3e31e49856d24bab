"""A communication and memory model of K-FAC at scale: α–β time per collective, bytes held.

What travels between replicas (float32 unless stated, `itemsize` bytes):

- every step, one all-reduce of the gradients: P floats, every trainable
  parameter;
- every inverse update, one all-reduce of the factor sums: each matrix
  factor's packed triangle n(n+1)/2, each diagonal factor's n entries, and
  2 floats (the sums of examples and of sample weights), in one collective
  or, with `sync_chunk_bytes`, one collective per chunk (more latency, the
  same bytes);
- every inverse update, sharing the inverses each owner computed (payload
  per unit: `InversionUnit.result_floats`): "all_reduce" hands in a buffer
  of every shared payload (zeros where another replica owns it),
  "all_gather" each replica's own payloads padded to the largest
  replica's, "broadcast" issues one broadcast per owner of its own.

Distributed preconditioning (`replication` f, KAISA's grad_worker_fraction
adapted to collectives over all replicas): a block is either replicated
(every replica holds its inverses, shared as above) or distributed (only
its owner holds them, never shared; the owner preconditions the block's
gradients every step, and one extra all-reduce per step hands the
distributed blocks' preconditioned gradients, P_dist floats, to everyone).
`distribute_blocks` picks the distributed blocks.

Staggered inverse updates (`invert_every` k): the units are spread over k
slots (`stagger_slots`), and each step syncs and shares only its slot's
units: two collectives (more with chunks or broadcasts) of about 1/k of the
update's bytes every step.

Time: the α–β (Hockney) model with ring algorithms, `Network`. Memory per
replica: one copy of the factor sums, the inverses it holds, and its largest
transient buffer (`ReplicaFootprint`). NumPy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from collections.abc import Mapping, Sequence

from kfac_dist.options import SHARING_METHODS
from kfac_dist.placement.cost import FlopCostModel
from kfac_dist.placement.plan import PlacementPlan, make_plan, spread_over_slots
from kfac_dist.placement.report import SYNC_WEIGHT_FLOATS
from kfac_dist.placement.units import InversionUnit, check_method

FLOAT32_BYTES = 4


# --- the network --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Network:
    """α–β (Hockney) cost of ring collectives among N replicas.

    `alpha` is the latency of one message in seconds, `beta` the bandwidth of
    one link in bytes per second. A collective of 0 bytes, or among one
    replica, is not issued and costs 0.
    """

    name: str
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        for field in ("alpha", "beta"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Network {field} must be a finite number >= 0, got {value!r}.")
        if self.beta == 0:
            raise ValueError("Network beta (bytes per second) must be > 0.")

    def all_reduce(self, nbytes: float, num_replicas: int, collectives: int = 1) -> float:
        """Ring all-reduce of `nbytes` per replica in `collectives` pieces:
        2(N−1)α per piece + 2(N−1)/N·B/β (reduce-scatter, then all-gather)."""
        n = _replicas(num_replicas)
        if n == 1 or nbytes == 0:
            return 0.0
        return collectives * 2 * (n - 1) * self.alpha + 2 * (n - 1) / n * nbytes / self.beta

    def all_gather(self, own_bytes: float, num_replicas: int) -> float:
        """Ring all-gather of `own_bytes` from each replica:
        (N−1)α + (N−1)/N·(N·B_own)/β."""
        n = _replicas(num_replicas)
        if n == 1 or own_bytes == 0:
            return 0.0
        return (n - 1) * self.alpha + (n - 1) / n * (n * own_bytes) / self.beta

    def broadcast(self, nbytes: float, num_replicas: int) -> float:
        """Pipelined tree broadcast of `nbytes` from one root: ⌈log2 N⌉·α + B/β."""
        n = _replicas(num_replicas)
        if n == 1 or nbytes == 0:
            return 0.0
        return math.ceil(math.log2(n)) * self.alpha + nbytes / self.beta


#: 100 Gb/s Ethernet between hosts: 10 µs per message, 12.5 GB/s per link.
ETHERNET_100G = Network("100 Gb/s Ethernet", alpha=10e-6, beta=12.5e9)
#: An NVLink- or ICI-like interconnect: 5 µs per message, 100 GB/s per link.
NVLINK_LIKE = Network("NVLink/ICI-like", alpha=5e-6, beta=100e9)
NETWORKS = (ETHERNET_100G, NVLINK_LIKE)


def _replicas(num_replicas: int) -> int:
    if (
        isinstance(num_replicas, bool)
        or not isinstance(num_replicas, numbers.Integral)
        or num_replicas < 1
    ):
        raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}.")
    return int(num_replicas)


# --- the model's shape --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model as the communication sees it: its inversion units and each block's parameters.

    `block_params` maps every block name (in block order) to its number of
    trainable parameters, the floats of its gradients; every unit's block
    must be in it.
    """

    name: str
    units: tuple[InversionUnit, ...]
    block_params: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "block_params", dict(self.block_params))
        for block, params in self.block_params.items():
            if isinstance(params, bool) or not isinstance(params, numbers.Integral) or params < 1:
                raise ValueError(
                    f"ModelShape {self.name!r}: block {block!r} needs an int >= 1 "
                    f"parameters, got {params!r}."
                )
        missing = sorted({u.block for u in self.units} - set(self.block_params))
        if missing:
            raise ValueError(f"ModelShape {self.name!r}: no parameter count for blocks {missing}.")

    @property
    def num_params(self) -> int:
        """P: the floats of the gradients all-reduced every step."""
        return sum(self.block_params.values())

    @property
    def blocks(self) -> list[str]:
        return list(self.block_params)

    def block_units(self, block: str) -> list[InversionUnit]:
        return [unit for unit in self.units if unit.block == block]

    def factor_floats(self) -> int:
        """Floats of one factor sync (packed triangles), apart from the weight sums."""
        return sum(unit.factor_floats() for unit in self.units)

    def stored_factor_floats(self) -> int:
        """Floats of the factor sums as held between steps (full matrices)."""
        return sum(stored_factor_floats(unit) for unit in self.units)

    def stored_inverse_floats(self, method: str) -> int:
        """Floats of every inverse payload as held between steps."""
        return sum(stored_inverse_floats(unit, method) for unit in self.units)


def stored_factor_floats(unit: InversionUnit) -> int:
    """Floats of a factor sum as the curvature keeps it: `n*n` for a matrix, `n` for a
    diagonal (each member's, grouped); the sync packs only the triangle."""
    n = unit.dim
    return unit.groups * (n if unit.kind == "diagonal" else n * n)


def stored_inverse_floats(unit: InversionUnit, method: str) -> int:
    """Floats of a unit's inverse payload as a replica holds it: the full `n*n` inverse
    (Cholesky; the sharing sends its triangle), `n*n + n` eigenvectors and values
    (eigen), `n` for a diagonal; each member's, grouped."""
    check_method(method)
    n = unit.dim
    if unit.kind == "diagonal":
        return unit.groups * n
    return unit.groups * (n * n if method == "cholesky" else n * n + n)


def _dense(name: str, fan_in: int, fan_out: int, bias: bool = True) -> tuple:
    """A Dense/EinsumDense block: A over the inputs (+1 for the bias), G over the outputs."""
    a = fan_in + int(bias)
    units = (InversionUnit(f"{name}/A", name, a), InversionUnit(f"{name}/G", name, fan_out))
    return units, {name: fan_in * fan_out + int(bias) * fan_out}


def _embedding(name: str, rows: int, width: int) -> tuple:
    """An Embedding block: a diagonal A over the rows (their counts), G over the width."""
    units = (
        InversionUnit(f"{name}/A", name, rows, "diagonal"),
        InversionUnit(f"{name}/G", name, width),
    )
    return units, {name: rows * width}


def _layer_norm(name: str, width: int) -> tuple:
    """A LayerNormalization block: one diagonal factor over γ and β."""
    return (InversionUnit(f"{name}/diagonal", name, 2 * width, "diagonal"),), {name: 2 * width}


def bert_shape(
    *,
    layers: int = 24,
    hidden: int = 1024,
    heads: int = 16,
    ffn: int = 4096,
    vocab: int = 30522,
    positions: int = 512,
    type_vocab: int = 2,
    pooler: bool = True,
    name: str = "BERT-Large",
) -> ModelShape:
    """The inversion units and block sizes `Kfac` would have for a BERT encoder, by hand.

    Blocks as `Kfac` registers them: the word, position and token-type
    embeddings (diagonal A over the rows, G over `hidden`) and their
    LayerNorm; per layer the query, key, value and attention-output
    projections (EinsumDense with bias: A `hidden + 1`, G `hidden`; the heads
    only split `hidden` into `heads × hidden/heads`), the attention
    LayerNorm, the FFN's two Dense layers (A `hidden + 1`, G `ffn`; A
    `ffn + 1`, G `hidden`) and the output LayerNorm; then the pooler (Dense
    `hidden → hidden`) when `pooler`. No masked-LM or next-sentence head:
    the convention of the 335M count of BERT-Large (Hugging Face's
    `BertModel`).
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}).")
    units: list[InversionUnit] = []
    params: dict[str, int] = {}

    def add(block: tuple) -> None:
        units.extend(block[0])
        params.update(block[1])

    add(_embedding("embeddings/word", vocab, hidden))
    add(_embedding("embeddings/position", positions, hidden))
    add(_embedding("embeddings/token_type", type_vocab, hidden))
    add(_layer_norm("embeddings/layer_norm", hidden))
    for i in range(layers):
        prefix = f"layer_{i}"
        for projection in ("query", "key", "value", "attention_output"):
            add(_dense(f"{prefix}/{projection}", hidden, hidden))
        add(_layer_norm(f"{prefix}/attention_layer_norm", hidden))
        add(_dense(f"{prefix}/ffn_intermediate", hidden, ffn))
        add(_dense(f"{prefix}/ffn_output", ffn, hidden))
        add(_layer_norm(f"{prefix}/output_layer_norm", hidden))
    if pooler:
        add(_dense("pooler", hidden, hidden))
    return ModelShape(name, tuple(units), params)


# --- distributed preconditioning ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Distribution:
    """Which blocks are distributed (held and preconditioned by one owner) and what each
    replica holds.

    `owners` maps each distributed block to its replica; `held` is each
    replica's inverse floats (every replicated block's, plus its own
    distributed ones); `bound` is f·total + (1−f)·total/N; `bound_met` is
    False only where distributing every block still leaves a replica above
    it (a block larger than total/N).
    """

    replication: float
    num_replicas: int
    owners: Mapping[str, int]
    held: tuple[int, ...]
    total: int
    bound: float
    distributed_params: int

    @property
    def bound_met(self) -> bool:
        return max(self.held) <= self.bound * (1 + 1e-12)


def distribute_blocks(
    shape: ModelShape, num_replicas: int, method: str, replication: float
) -> Distribution:
    """Distributes blocks until every replica holds at most f·total + (1−f)·total/N floats.

    Floats held: `stored_inverse_floats`, the inverses as a replica keeps
    them. Blocks go in descending (inverse floats / gradient floats) — the most
    memory saved per float of extra per-step traffic first; ties in block
    order — each to the replica with the fewest distributed floats so far
    (ties to the lowest id). f = 1 distributes nothing; f = 0 every block
    (on one replica, nothing: it holds everything either way).
    """
    check_method(method)
    n = _replicas(num_replicas)
    if not isinstance(replication, numbers.Real) or not 0 <= replication <= 1:
        raise ValueError(f"replication must be a number in [0, 1], got {replication!r}.")
    blocks = shape.blocks
    inverse = {
        b: sum(stored_inverse_floats(u, method) for u in shape.block_units(b)) for b in blocks
    }
    total = sum(inverse.values())
    bound = replication * total + (1 - replication) * total / n
    order = sorted(
        range(len(blocks)),
        key=lambda i: (-inverse[blocks[i]] / shape.block_params[blocks[i]], i),
    )
    replicated = total
    distributed = [0] * n
    loads = [(0, replica) for replica in range(n)]  # (distributed floats, replica)
    owners: dict[str, int] = {}
    for i in order:
        if n == 1 or replicated + max(distributed) <= bound * (1 + 1e-12):
            break
        block = blocks[i]
        load, replica = heapq.heappop(loads)
        owners[block] = replica
        distributed[replica] += inverse[block]
        replicated -= inverse[block]
        heapq.heappush(loads, (load + inverse[block], replica))
    return Distribution(
        replication=float(replication),
        num_replicas=n,
        owners=owners,
        held=tuple(replicated + d for d in distributed),
        total=total,
        bound=bound,
        distributed_params=sum(shape.block_params[b] for b in owners),
    )


# --- one inverse update's traffic ----------------------------------------------------
def stagger_slots(units: Sequence[InversionUnit], invert_every: int, method: str) -> list[int]:
    """Each unit's slot in `[0, invert_every)`, as the runtime's plan spreads them by flops."""
    cost = FlopCostModel(method)
    return list(spread_over_slots([cost(unit) for unit in units], invert_every))


@dataclasses.dataclass(frozen=True)
class UpdateTraffic:
    """What one inverse update (or one staggered slot) moves, per replica.

    `sync_bytes`: the factor sums all-reduced, in `sync_collectives`
    chunks. `own_bytes`: each replica's own shared payloads. `share_sent`
    and `share_buffer`: what each replica hands in to the sharing collective
    and the transient buffer it holds (for broadcasts the largest owner's);
    `share_collectives` how many it issues.
    """

    sync_bytes: int
    sync_collectives: int
    sync_buffer: int
    sharing: str | None
    own_bytes: tuple[int, ...]
    share_sent: int
    share_buffer: int
    share_collectives: int

    def time(self, network: Network) -> float:
        """Seconds of the factor sync and then the sharing, under `network`."""
        n = len(self.own_bytes)
        sync = network.all_reduce(self.sync_bytes, n, self.sync_collectives)
        if self.sharing == "broadcast":
            share = sum(network.broadcast(b, n) for b in self.own_bytes if b > 0)
        elif self.sharing == "all_gather":
            share = network.all_gather(max(self.own_bytes), n)
        elif self.sharing == "all_reduce":
            share = network.all_reduce(sum(self.own_bytes), n)
        else:
            share = 0.0
        return sync + share


def update_traffic(
    plan: PlacementPlan,
    method: str,
    sharing: str,
    *,
    itemsize: int = FLOAT32_BYTES,
    sync_chunk_bytes: int | None = None,
    weight_floats: int = SYNC_WEIGHT_FLOATS,
) -> UpdateTraffic:
    """The factor sync and the sharing of `plan`'s units (owner None: not shared).

    The sharing bytes are those of `inverse_sharing` (report.py), which the
    curvature issues: all_reduce hands in (and holds) every shared payload,
    all_gather N × the largest replica's own, broadcast one buffer per owner.
    """
    check_method(method)
    if sharing not in SHARING_METHODS or sharing == "auto":
        raise ValueError(
            f"sharing must be one of {[m for m in SHARING_METHODS if m != 'auto']}, "
            f"got {sharing!r}."
        )
    if sync_chunk_bytes is not None and (
        isinstance(sync_chunk_bytes, bool)
        or not isinstance(sync_chunk_bytes, int)
        or sync_chunk_bytes < itemsize
    ):
        raise ValueError(
            f"sync_chunk_bytes must be None or an int >= {itemsize}, got {sync_chunk_bytes!r}."
        )
    n = plan.num_replicas
    sync_bytes = (sum(u.factor_floats() for u in plan.units) + weight_floats) * itemsize
    if sync_chunk_bytes is None:
        sync_collectives, sync_buffer = 1, sync_bytes
    else:
        chunk = sync_chunk_bytes // itemsize * itemsize  # whole floats
        sync_collectives = max(1, -(-sync_bytes // chunk))
        sync_buffer = min(sync_bytes, chunk)
    own = [0] * n
    for unit, owner in zip(plan.units, plan.owners, strict=True):
        if owner is not None:
            own[owner] += unit.result_floats(method) * itemsize
    total, largest = sum(own), max(own)
    if n == 1 or total == 0:
        method_used, sent, buffer, collectives = None, 0, 0, 0
    elif sharing == "broadcast":
        method_used, sent, buffer = sharing, largest, largest
        collectives = sum(1 for b in own if b > 0)
    elif sharing == "all_gather":
        method_used, sent, buffer, collectives = sharing, largest, n * largest, 1
    else:
        method_used, sent, buffer, collectives = sharing, total, total, 1
    return UpdateTraffic(
        sync_bytes=sync_bytes,
        sync_collectives=sync_collectives,
        sync_buffer=sync_buffer,
        sharing=method_used,
        own_bytes=tuple(own) if method_used else (0,) * n,
        share_sent=sent,
        share_buffer=buffer,
        share_collectives=collectives,
    )


# --- the whole model ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReplicaFootprint:
    """K-FAC memory on the replica that holds the most, in bytes.

    `factor_sums`: one copy of every factor sum (full matrices,
    `stored_factor_floats`) and the 2 weight sums (the runtime keeps no
    other copy).
    `inverses`: the inverse payloads it holds (`stored_inverse_floats`). `transient`: its
    largest buffer alive during one collective (factor sync chunk, sharing
    buffer, or the distributed blocks' preconditioned gradients).
    """

    factor_sums: int
    inverses: int
    transient: int

    @property
    def total(self) -> int:
        return self.factor_sums + self.inverses + self.transient


@dataclasses.dataclass(frozen=True)
class CommunicationCost:
    """Per-step and per-inverse-update communication time, and the memory per replica.

    `step_s`: the gradient all-reduce plus, with distributed blocks, the
    all-reduce of their preconditioned gradients. `update_s`: one inverse
    update's factor sync and sharing. `staggered_step_s`: a step with
    staggered inverse updates (`invert_every` slots), `step_s` plus the
    mean over the slots of one slot's sync and sharing.
    """

    model: str
    network: Network
    num_replicas: int
    method: str
    sharing: str
    replication: float
    invert_every: int
    step_s: float
    update_s: float
    staggered_step_s: float
    step_bytes: int
    update: UpdateTraffic
    memory: ReplicaFootprint
    distribution: Distribution


def replica_owners(
    shape: ModelShape,
    distribution: Distribution,
    method: str,
    policy: str = "balanced",
) -> PlacementPlan:
    """Every unit's owner: the replicated blocks' units placed by `policy` (flop costs),
    a distributed block's units None (held by its block owner, never shared)."""
    replicated = [u for u in shape.units if u.block not in distribution.owners]
    placed = make_plan(replicated, distribution.num_replicas, policy, FlopCostModel(method))
    owner_of = dict(zip((u.name for u in placed.units), placed.owners, strict=True))
    cost = FlopCostModel(method)
    return PlacementPlan(
        units=shape.units,
        owners=tuple(owner_of.get(u.name) for u in shape.units),
        costs=tuple(cost(u) for u in shape.units),
        num_replicas=distribution.num_replicas,
        policy_name=placed.policy_name,
    )


def communication_cost(
    shape: ModelShape,
    num_replicas: int,
    network: Network,
    *,
    method: str = "cholesky",
    sharing: str = "all_reduce",
    replication: float = 1.0,
    invert_every: int = 10,
    sync_chunk_bytes: int | None = None,
    policy: str = "balanced",
    itemsize: int = FLOAT32_BYTES,
) -> CommunicationCost:
    """The communication time and memory of `shape` on `num_replicas` under `network`."""
    distribution = distribute_blocks(shape, num_replicas, method, replication)
    plan = replica_owners(shape, distribution, method, policy)
    n = plan.num_replicas
    update = update_traffic(
        plan, method, sharing, itemsize=itemsize, sync_chunk_bytes=sync_chunk_bytes
    )
    gradients = shape.num_params * itemsize
    precondition = distribution.distributed_params * itemsize
    step_s = network.all_reduce(gradients, n) + network.all_reduce(precondition, n)
    slots = stagger_slots(shape.units, invert_every, method)
    slot_times = []
    for slot in range(invert_every):
        members = [i for i, s in enumerate(slots) if s == slot]
        slot_plan = PlacementPlan(
            units=tuple(plan.units[i] for i in members),
            owners=tuple(plan.owners[i] for i in members),
            costs=tuple(plan.costs[i] for i in members),
            num_replicas=n,
            policy_name=plan.policy_name,
        )
        traffic = update_traffic(
            slot_plan, method, sharing, itemsize=itemsize, sync_chunk_bytes=sync_chunk_bytes
        )
        slot_times.append(traffic.time(network))
    memory = ReplicaFootprint(
        factor_sums=(shape.stored_factor_floats() + SYNC_WEIGHT_FLOATS) * itemsize,
        inverses=max(distribution.held) * itemsize,
        transient=max(update.sync_buffer, update.share_buffer, precondition),
    )
    return CommunicationCost(
        model=shape.name,
        network=network,
        num_replicas=n,
        method=method,
        sharing=sharing,
        replication=float(replication),
        invert_every=invert_every,
        step_s=step_s,
        update_s=update.time(network),
        staggered_step_s=step_s + math.fsum(slot_times) / invert_every,
        step_bytes=gradients + precondition,
        update=update,
        memory=memory,
        distribution=distribution,
    )
