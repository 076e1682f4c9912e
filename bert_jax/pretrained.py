"""`bert_jax.from_pretrained` and the model object it returns.

The object holds the pure pieces (`config`, `params`, `module`) and a jit-compiled forward;
calling it takes NumPy or JAX arrays named as in `transformers` and returns outputs with the
`transformers` field names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from bert_jax import sharding
from bert_jax.convert import hf_dir, orbax_dir
from bert_jax.convert.families import family_of_config
from bert_jax.convert.weight_files import find_weights, read_state_dict
from bert_jax.errors import BertJaxError
from bert_jax.files import is_remote, local_copy
from bert_jax.modeling.scan import to_scanned, to_unrolled, unscanned

# Files worth downloading from the Hub (pytorch_model.bin only where no safetensors exist).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


class PretrainedModel:
    def __init__(self, config, params, source_dir: Path | None = None):
        self.config = config
        self.params = params
        self.module = family_of_config(config).build_module(config)
        self.source_dir = source_dir  # where tokenizer files come from
        self._forward = jax.jit(self._apply, static_argnames=("output_hidden_states",))

    def _apply(self, params, inputs, output_hidden_states):
        return self.module.apply({"params": params}, **inputs,
                                 output_hidden_states=output_hidden_states)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 output_hidden_states: bool = False, **kwargs):
        """Inference forward (dropout off). Labels given as kwargs add `loss` to the output."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": token_type_ids, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        self._check_inputs({k: v if isinstance(v, jax.Array) else np.asarray(v)
                            for k, v in inputs.items()})
        return self._forward(self.params, inputs, output_hidden_states)

    def _check_inputs(self, inputs: dict[str, np.ndarray | jax.Array]) -> None:
        """Catch on the host what JAX would silently clamp or get wrong. Values are checked
        for host inputs only: reading a device array's would copy it back and wait for it."""
        c = self.config
        ids = inputs["input_ids"]
        if not np.issubdtype(ids.dtype, np.integer):
            raise BertJaxError(f"input_ids must be integers, got {ids.dtype}")
        limit_field, limit = c.max_length
        if ids.shape[-1] > limit:
            raise BertJaxError(f"input has {ids.shape[-1]} tokens, more than "
                               f"{limit_field}={limit} in config.json")
        for name, size_field in (("input_ids", "vocab_size"),
                                 ("token_type_ids", "type_vocab_size")):
            values = inputs.get(name)
            if isinstance(values, np.ndarray) and values.size and hasattr(c, size_field):
                size = getattr(c, size_field)
                low, high = int(values.min()), int(values.max())
                if low < 0 or high >= size:
                    raise BertJaxError(f"{name} contains {low if low < 0 else high}, outside "
                                       f"[0, {size}) ({size_field} in config.json)")
        mask = inputs.get("attention_mask")
        if c.attention_backend == "cudnn" and isinstance(mask, np.ndarray):
            if np.any(np.diff(mask.astype(np.int8), axis=-1) > 0):
                raise BertJaxError("attention_backend 'cudnn' needs right padding "
                                   "(attention_mask of 1s then 0s in every row)")

    def save_pretrained(self, out_dir: str | Path, *, format: str = "hf",
                        max_shard_size: int | None = None):
        """Write a Hugging Face directory (default) or an Orbax checkpoint directory, local or
        gs:// (built locally, then uploaded)."""
        if format == "hf":
            return hf_dir.save_hf_dir(self.config, self.params, out_dir,
                                      tokenizer_dir=self.source_dir, max_shard_bytes=max_shard_size)
        if format == "orbax":  # layers unrolled, as in HF dirs
            return orbax_dir.save_params(self.config, to_unrolled(self.config, self.params),
                                             out_dir, tokenizer_dir=self.source_dir)
        raise BertJaxError(f"unknown format {format!r} (expected 'hf' or 'orbax')")

    def __repr__(self) -> str:
        n = sum(x.size for x in jax.tree.leaves(self.params))
        return (f"PretrainedModel({self.config.architecture}, {n:,} params, "
                f"dtype={self.config.dtype})")


def from_pretrained(name_or_path: str | Path, *, head: str | None = None,
                    num_labels: int | None = None, seed: int = 0, revision: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, **runtime: Any) -> PretrainedModel:
    """Load an HF directory, a bert_jax Orbax directory (either local or gs://, downloaded
    first), or a Hub model id.

    head: another task head than `config.architectures[0]`, e.g. "ForSequenceClassification"
        (missing head weights are initialised from `seed`, as `transformers` does).
    mesh: read the weights on the host and put each parameter straight into its sharding on
        this device mesh (`bert_jax.sharding`'s rules): no device ever holds a whole copy of
        a parameter the mesh splits. Default: one device.
    runtime: `dtype`, `param_dtype`, `attention_backend`, `remat`, `scan_layers`,
        `vocab_multiple` (hold the vocabulary padded to a multiple of it; outputs and saved
        files keep `vocab_size`).
    """
    model_dir = resolve(name_or_path, revision)
    saved_config = load_config(model_dir, **runtime)
    config = saved_config
    if head is not None or num_labels is not None:
        config = saved_config.with_head(head or saved_config.head, num_labels)
    on_device = mesh is None
    stored = unscanned(saved_config).with_vocab_multiple(1)  # the layout files hold
    if orbax_dir.is_orbax_dir(model_dir) and unscanned(config).with_vocab_multiple(1) == stored:
        saved = orbax_dir.load_params(model_dir, abstract_params(stored), on_device=on_device)
        params = to_scanned(config, family_of_config(config).pad_vocab(config, saved))
    else:
        state_dict, source = hf_tensors(model_dir, saved_config)
        params = hf_dir.params_from_hf(config, state_dict, source, seed, on_device)
    return PretrainedModel(config, placed(config, params, mesh), model_dir)


def load_config(model_dir: Path, **runtime):
    """The config of the model in `model_dir` (an HF or bert_jax Orbax directory)."""
    if not (hf_dir.is_hf_dir(model_dir) or orbax_dir.is_orbax_dir(model_dir)):
        raise BertJaxError(f"{model_dir}: no model found (expected config.json with "
                           f"model.safetensors / pytorch_model.bin, or with an Orbax params/ dir)")
    return hf_dir.load_config(model_dir, **runtime)


def hf_tensors(model_dir: Path, saved_config) -> tuple[dict[str, np.ndarray], str]:
    """(The model's tensors as an HF checkpoint holds them, on the host; where they came
    from) for the model `saved_config` in `model_dir`, an HF or Orbax directory."""
    if hf_dir.is_hf_dir(model_dir):
        return read_state_dict(model_dir), str(find_weights(model_dir))
    stored = unscanned(saved_config).with_vocab_multiple(1)
    saved = orbax_dir.load_params(model_dir, abstract_params(stored), on_device=False)
    return hf_dir.hf_state_dict(stored, saved), str(model_dir / orbax_dir.PARAMS_DIR)


def placed(config, params, mesh: jax.sharding.Mesh | None):
    """`params` as they are without a mesh; else host arrays put straight into their
    shardings on `mesh`."""
    if mesh is None:
        return params
    return sharding.place(params, family_of_config(config).param_shardings(config, mesh))


def abstract_params(config):
    """Shapes, dtypes and a single-device sharding of `config`'s params with the layers
    unrolled, as checkpoints hold them (nothing allocated)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        family_of_config(config).unrolled_abstract_params(config))


def resolve(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local directory of a local, gs:// (downloaded) or Hub (downloaded) model."""
    if is_remote(name_or_path):
        return local_copy(name_or_path)
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise BertJaxError(f"{name}: no such directory")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(name, revision=revision)
        patterns = list(_HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in files):
            patterns.append("pytorch_model*.bin")
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated, ...
        raise BertJaxError(f"{name}: not a local directory, and the Hub download failed "
                           f"({type(err).__name__}: {err})") from None

