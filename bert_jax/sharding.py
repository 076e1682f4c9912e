"""Device meshes and shardings: the one table from logical axis names to mesh axes.

Every parameter carries logical axis names (`bert_jax/modeling/layers.py`); `LOGICAL_AXIS_RULES`
maps them onto the mesh axes ("data", "fsdp", "tensor"). Batches are split over data x fsdp;
parameters (and the optimizer state that mirrors them) are split over fsdp on the hidden
axis and over tensor on heads / mlp / vocab. A dimension that a mesh axis does not divide is
replicated instead, so tiny models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bert_jax.errors import BertJaxError

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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

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


def param_shardings(abstract_boxed_params, mesh: Mesh):
    """NamedShardings for a param tree of `nn.Partitioned` leaves (from `jax.eval_shape`)."""
    logical = nn.get_partition_spec(abstract_boxed_params)
    mesh_specs = nn.logical_to_mesh(logical, LOGICAL_AXIS_RULES)
    shapes = nn.meta.unbox(abstract_boxed_params)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


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
