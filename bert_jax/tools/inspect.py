"""`bert-jax inspect DIR`: what a model directory holds and what converting it would do.

Reads metadata only (config.json, safetensors headers, Orbax tree metadata; a
`pytorch_model.bin` has no header, so its tensors are loaded, safely) and runs the same
mapping table as the conversion, so "would be ignored / newly initialised / fail" is what
`bert-jax convert` then does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Any

from bert_jax.convert import hf_dir, orbax_dir
from bert_jax.convert.families import family_of_config
from bert_jax.convert.mapping import hf_shape
from bert_jax.convert.weight_files import find_weights, read_tensor_specs, read_weight_map
from bert_jax.tools.convert import model_format

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Row:
    """One stored tensor and what it converts to."""

    stored: str  # HF key, or Orbax param path "a/b/c"
    shape: Shape
    dtype: str
    target: str  # the param path (HF dir) or HF key(s) (Orbax dir) it becomes
    target_shape: Shape


@dataclasses.dataclass(frozen=True)
class Inspection:
    path: Path
    format: str  # "hf" | "orbax"
    weights: str  # where the tensors are, e.g. "model.safetensors.index.json (3 shards)"
    config: Any
    num_parameters: int  # of the model (what transformers' num_parameters() counts)
    rows: list[Row]  # in the mapping table's order
    tied: dict[str, str]  # HF key read from another tensor -> that tensor's key
    ignored: list[str]  # stored, and known not to be needed (aliases, buffers)
    unused: list[str]  # stored, but not part of this architecture
    newly_initialised: list[str]  # absent; conversion initialises them (head weights)
    problems: list[str]  # why conversion would fail

    @property
    def dtypes(self) -> collections.Counter:
        return collections.Counter(row.dtype for row in self.rows)

    def report(self) -> str:
        c = self.config
        kind = "Hugging Face" if self.format == "hf" else "bert_jax Orbax"
        family = family_of_config(c).name
        dtypes = ", ".join(f"{d} ({n} tensors)" for d, n in self.dtypes.most_common())
        lines = [
            f"{self.path}: {kind} directory, {self.weights}",
            f"architecture  {c.architecture} (family {family}"
            + (f", model_type {c.model_type})" if hasattr(c, "model_type") else ")"),
            f"parameters    {self.num_parameters:,}",
            f"dtypes        {dtypes or 'none'}; config.json declares {hf_dir.declared_dtype(c)}",
            "tied weights  " + ("; ".join(f"{k} = {v}" for k, v in self.tied.items()) or "none"),
            "",
        ]
        target = "bert_jax param" if self.format == "hf" else "Hugging Face tensor"
        table = [("stored", "shape", "dtype", f"-> {target}", "shape")]
        table += [(r.stored, _shape(r.shape), r.dtype, r.target, _shape(r.target_shape))
                  for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths + [0])).rstrip()
                  for row in table]
        for label, keys in (("ignored (aliases and buffers, not needed)", self.ignored),
                            (f"unused (not part of {c.architecture})", self.unused),
                            ("missing, newly initialised on conversion", self.newly_initialised)):
            if keys:
                lines += ["", f"{label}:"] + [f"  {key}" for key in keys]
        if self.problems:
            lines += ["", "conversion would fail:"] + [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def inspect_dir(path: str | Path) -> Inspection:
    """Inspect an HF or bert_jax Orbax model directory (one-line error for anything else)."""
    path = Path(path)
    fmt = model_format(path)
    config = hf_dir.load_config(path)
    return (_inspect_hf if fmt == "hf" else _inspect_orbax)(path, config)


def _inspect_hf(path: Path, config) -> Inspection:
    table = family_of_config(config).mapping
    weights = find_weights(path)
    specs = read_tensor_specs(path)
    # The loader's key variants, applied to the names: canonical key -> stored key.
    stored_as = table.canonical_state_dict({key: key for key in specs}, str(weights))
    shapes = hf_dir.param_shapes(config)
    rows, new, problems = [], [], []
    for rule in table.rules(config):
        expected = hf_shape(rule, shapes[rule.path])
        if rule.hf_key not in stored_as:
            if table.may_be_newly_initialised(rule.hf_key):
                new.append(rule.hf_key)
            else:
                problems.append(f"{rule.hf_key} {_shape(expected)} is missing")
            continue
        stored = stored_as[rule.hf_key]
        shape, dtype = specs[stored]
        rows.append(Row(stored, shape, dtype, "/".join(rule.path), shapes[rule.path]))
        if shape != expected:
            problems.append(f"{stored} is {_shape(shape)}, config.json implies {_shape(expected)}")
    used = {row.stored for row in rows}
    ignored = {stored_as[k] for k in table.ignorable_keys(config) if k in stored_as}
    ignored |= set(specs) - set(stored_as.values())  # buffers the loader drops
    ignored -= used
    if weights.name == "model.safetensors.index.json":
        where = f"{weights.name} ({len(set(read_weight_map(weights).values()))} shards)"
    else:
        where = weights.name
    return Inspection(path, "hf", where, config, _count(shapes), rows,
                      table.tied_weights(config, set(specs)), sorted(ignored),
                      sorted(set(specs) - used - ignored), new, problems)


def _inspect_orbax(path: Path, config) -> Inspection:
    table = family_of_config(config).mapping
    specs = orbax_dir.params_metadata(path)
    shapes = hf_dir.param_shapes(config)
    rows, problems = [], []
    for rule in table.rules(config):
        name = "/".join(rule.path)
        if rule.path not in specs:
            problems.append(f"{name} {_shape(shapes[rule.path])} is missing")
            continue
        shape, dtype = specs[rule.path]
        keys = ", ".join(table.hf_keys_for_save(config, rule.hf_key))
        rows.append(Row(name, shape, dtype, keys, hf_shape(rule, shapes[rule.path])))
        if shape != shapes[rule.path]:
            problems.append(f"{name} is {_shape(shape)}, config.json implies "
                            f"{_shape(shapes[rule.path])}")
    hf_keys = {rule.hf_key for rule in table.rules(config) if rule.path in specs}
    unused = sorted("/".join(p) for p in set(specs) - {rule.path for rule in table.rules(config)})
    return Inspection(path, "orbax", f"{orbax_dir.PARAMS_DIR}/", config, _count(shapes), rows,
                      table.tied_weights(config, hf_keys), [], unused, [], problems)


def _count(shapes: dict[tuple[str, ...], Shape]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
