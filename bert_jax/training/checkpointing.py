"""All Orbax code of bert_jax.

A model checkpoint directory written by bert_jax holds `config.json` (the HF config, so the
architecture is known without the weights), `params/` (an Orbax checkpoint of the param
pytree) and the tokenizer files. `bert_jax.from_pretrained` reads it like an HF directory.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, copy_tokenizer_files

PARAMS_DIR = "params"


def is_orbax_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / PARAMS_DIR).is_dir()


def save_params(config, params, out_dir: str | Path, *, tokenizer_dir: Path | None = None,
                overwrite: bool = True) -> Path:
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        config.save_json(staging / "config.json")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((staging / PARAMS_DIR).absolute(), params)
            checkpointer.wait_until_finished()
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, staging)
    return Path(out_dir)


def load_params(model_dir: Path, abstract_params):
    """Restore params into the shapes, dtypes and shardings of `abstract_params`."""
    path = (model_dir / PARAMS_DIR).absolute()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract_params)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise BertJaxError(f"{path}: not a readable bert_jax Orbax checkpoint for this "
                           f"config.json ({err})") from None

