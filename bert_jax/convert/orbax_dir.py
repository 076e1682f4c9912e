"""bert_jax's own model directories: `config.json` (the HF config, so the architecture is
known without the weights), `params/` (an Orbax checkpoint of the param pytree) and the
tokenizer files. `bert_jax.from_pretrained` reads one like an HF directory."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bert_jax.convert.families import family_of_config
from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, copy_tokenizer_files

PARAMS_DIR = "params"


def is_orbax_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / PARAMS_DIR).is_dir()


def _params_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's handler for a model directory's params, tuned for `bert-jax convert`'s speed.

    Uncompressed zarr3: on BERT-large (2 cores) zstd cost ~4 s for ~8% less disk, and the
    default zarr2 layout ~6 s more disk waits. Host (NumPy) arrays are written as they are:
    Orbax deep-copies them by default, against their change during an asynchronous save, but
    this save is synchronous, and the copy of a transposed view (every kernel converted from
    HF) is element by element: without it HF -> Orbax takes 2.3 s instead of 6.0 s (warm).
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    return ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True,
                                       type_handler_registry=registry)


def save_params(config, params, out_dir: str | os.PathLike, *,
                tokenizer_dir: Path | None = None, overwrite: bool = True) -> epath.Path:
    """Write `config`'s params (layers unrolled) as a model directory; a padded vocabulary
    (`config.vocab_multiple`) is cut to `vocab_size`, as config.json describes the model."""
    params = family_of_config(config).unpad_vocab(config, params)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        config.save_json(staging / "config.json")
        with ocp.Checkpointer(_params_handler()) as checkpointer:
            checkpointer.save((staging / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(params))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, staging)
    return epath.Path(out_dir)


def load_params(model_dir: Path, abstract_params, *, on_device: bool = True):
    """Restore params into the shapes, dtypes and shardings of `abstract_params`; with
    on_device=False as NumPy arrays on the host (for writing them to another file: no copy
    to a device and back). Shapes are checked first, from the metadata, so a checkpoint
    that does not fit its config.json gets one message naming the param."""
    path = (model_dir / PARAMS_DIR).absolute()
    stored = params_metadata(model_dir)
    for key, (shape, _) in _shapes_and_dtypes(abstract_params).items():
        if key not in stored or stored[key][0] != shape:
            found = f"has shape {stored[key][0]}" if key in stored else "is not in the checkpoint"
            raise BertJaxError(f"{path}: does not fit config.json: {'.'.join(key)} {found}, "
                               f"the config implies {shape}")
    try:
        if on_device:
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(path, abstract_params)
        as_numpy = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                                abstract_params)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                abstract_params, restore_args=as_numpy))
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise BertJaxError(f"{path}: not a readable bert_jax Orbax checkpoint for this "
                           f"config.json ({err})") from None


def params_metadata(model_dir: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """Param path -> (shape, dtype name) as stored, from the checkpoint's metadata alone."""
    path = (model_dir / PARAMS_DIR).absolute()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return _shapes_and_dtypes(checkpointer.metadata(path).item_metadata.tree)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise BertJaxError(f"{path}: not a readable bert_jax Orbax checkpoint ({err})") from None


def _shapes_and_dtypes(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    return {tuple(k.key for k in keys): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
