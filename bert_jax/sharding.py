"""Device meshes and shardings: the one table from logical axis names to mesh axes.

Every parameter carries logical axis names (`bert_jax/modeling/layers.py`); `LOGICAL_AXIS_RULES`
maps them onto the mesh axes ("data", "fsdp", "tensor"). Batches are split over data x fsdp;
parameters (and the optimizer state that mirrors them) are split over fsdp on the hidden
axis and over tensor on heads / mlp / vocab.

A parameter dimension that its mesh axes do not divide is an error naming the parameter, its
shape and the mesh (`param_shardings`), never a silent copy on every device: the vocabulary
is padded instead (`vocab_multiple`, `ModelConfig.vocab_multiple`), and a mesh that should
replicate what it cannot split says so (`MeshConfig.allow_replication`). Activations whose
batch or length a mesh axis does not divide stay whole (`activation_spec`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bert_jax.errors import BertJaxError

logger = logging.getLogger("bert_jax")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("positions", None),
    ("token_types", None),
    ("classes", None),
    ("lambdas", None),
    ("layers", None),  # the stacked layer axis of scanned params (modeling/scan.py)
    ("length", None),
    ("act_embed", None),
)
# Vocabulary rows per `tensor` shard are padded to a multiple of this (`vocab_multiple`): the
# TPU's 128 lanes, and Megatron-LM's default `make_vocab_size_divisible_by`.
VOCAB_ROWS_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices.

    allow_replication: replicate dims the mesh does not divide, instead of refusing (each
        such parameter, and its optimizer moments, is then whole on every device).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    allow_replication: bool = False

    def shape(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise BertJaxError(f"mesh {dataclasses.asdict(self)}: sizes must be positive, "
                               f"with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise BertJaxError(f"mesh {dataclasses.asdict(self)} does not divide "
                                   f"{device_count} devices")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise BertJaxError(f"mesh {dataclasses.asdict(self)} needs {math.prod(sizes)} devices, "
                               f"but {device_count} are available")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicate the dimensions that their mesh axes do not divide."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def vocab_multiple(mesh: Mesh) -> int:
    """What a model trained on `mesh` pads its vocabulary to a multiple of
    (`config.with_vocab_multiple`): 128 rows per `tensor` shard, so the embedding, the MLM
    decoder and their optimizer moments split over `tensor` whatever the vocabulary size."""
    return VOCAB_ROWS_MULTIPLE * mesh.shape["tensor"]


def describe(mesh: Mesh) -> str:
    """`data=2 x fsdp=4 x tensor=2`: the mesh as error messages name it."""
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def param_shardings(abstract_boxed_params, mesh: Mesh, *, allow_replication: bool = False):
    """NamedShardings for a param tree of `nn.Partitioned` leaves (from `jax.eval_shape`).

    A dimension that its mesh axes do not divide is a BertJaxError naming the parameter, its
    shape and the mesh; with `allow_replication` (`MeshConfig.allow_replication`) it is
    replicated instead.
    """
    logical = nn.get_partition_spec(abstract_boxed_params)
    mesh_specs = nn.logical_to_mesh(logical, LOGICAL_AXIS_RULES)
    shapes = nn.meta.unbox(abstract_boxed_params)
    refused: list[str] = []

    def fit_param(path, spec, names, x):
        fitted = _fit(spec, x.shape, mesh)
        if fitted != _padded(spec, x.ndim):
            refused.append(_undivided(_path_name(path), x.shape, spec, names, mesh))
        return NamedSharding(mesh, fitted)

    out = jax.tree_util.tree_map_with_path(fit_param, mesh_specs, logical, shapes,
                                           is_leaf=lambda x: isinstance(x, PartitionSpec))
    if refused and not allow_replication:
        more = f" (and {len(refused) - 1} more parameters)" if len(refused) > 1 else ""
        raise BertJaxError(f"{refused[0]}{more}")
    if refused:
        logger.info("Replicated over the mesh (allow_replication): %s", "; ".join(refused))
    return out


def _padded(spec: PartitionSpec, ndim: int) -> PartitionSpec:
    return PartitionSpec(*(tuple(spec) + (None,) * (ndim - len(spec))))


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _undivided(name: str, shape: tuple[int, ...], spec: PartitionSpec,
               names: PartitionSpec, mesh: Mesh) -> str:
    """What is wrong with the first dimension of `name` that its mesh axes do not divide."""
    logical = tuple(names) + (None,) * (len(shape) - len(names))
    for i, (dim, axes) in enumerate(zip(shape, tuple(_padded(spec, len(shape))))):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            where = f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {axes}"
            hint = ("pad the vocabulary: config.with_vocab_multiple(sharding.vocab_multiple("
                    "mesh))" if logical[i] == "vocab" else
                    "choose mesh sizes that divide it, or set mesh.allow_replication: true to "
                    "replicate it on every device")
            return (f"parameter {name} of shape {tuple(shape)}: dimension {i} ({dim}, logical "
                    f"axis {logical[i]!r}) does not split over {where} of size {size} "
                    f"(mesh {describe(mesh)}); {hint}")
    raise AssertionError(name)


def activation_spec(logical: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec | None:
    """The spec of an activation under the current mesh (`jax.set_mesh`), None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    rules = dict(LOGICAL_AXIS_RULES)
    return _fit(PartitionSpec(*(rules[name] for name in logical)), shape, mesh)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Examples split over data x fsdp, the other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> int:
    """How many ways a batch's examples are split (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    split = batch_split(mesh)
    if global_batch % split:
        raise BertJaxError(f"global batch {global_batch} is not divisible by the data x fsdp "
                           f"mesh axes ({split} ways)")


def bytes_per_device(tree) -> int:
    """The largest number of bytes any one device holds of a tree of sharded arrays/structs."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        size = math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + size
    return max(per_device.values())


def place(host_params, shardings):
    """Host (NumPy) arrays -> global arrays laid out by `shardings`, each device given only
    its own slice (`jax.make_array_from_callback`; every process passes the same arrays)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        x.shape, s, lambda index: np.asarray(x[index])), host_params, shardings)
