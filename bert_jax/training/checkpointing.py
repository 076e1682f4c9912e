"""Training checkpoints: the whole train state and the data position, through Orbax.

They go wherever the run directory is: Orbax writes gs:// itself (TensorStore's GCS driver, a
commit file instead of a rename), given the URL whole. Model directories (`params/` beside
`config.json`) are `bert_jax.convert.orbax_dir`'s.
"""

from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from bert_jax.errors import BertJaxError
from bert_jax.files import is_remote


class TrainCheckpoints:
    """Training checkpoints: the whole TrainState (params, optimizer, step, dropout key) and a
    JSON record (e.g. the data iterator's position) saved together under `<dir>/<step>/`.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-save leaves nothing that `latest_step` would pick. Saving is asynchronous;
    the last `max_to_keep` steps are kept.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save)
        # Orbax wants local paths absolute (pathlib's absolute() would mangle a gs:// URL).
        self.directory = epath.Path(directory)
        if not is_remote(directory):
            self.directory = self.directory.absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, record: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record),
            layout=ocp.args.JsonSave(_layout(state))))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def incomplete_steps(self) -> list[int]:
        """Steps whose save never finished: the temporary directories a killed run left."""
        names = ocp.path.step.tmp_checkpoints(self.directory)
        return sorted(int(re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, name).group(1))
                      for name in names)

    def restore(self, step: int, abstract_state):
        """(state, record) of `step`, placed as `abstract_state`'s shardings say (which may
        be another mesh, or another device count, than the one that saved it)."""
        saved = self._manager.restore(step, args=ocp.args.Composite(
            layout=ocp.args.JsonRestore())).layout
        expected = _layout(abstract_state)
        for key in sorted(set(saved) | set(expected)):
            if saved.get(key) != expected.get(key):
                raise BertJaxError(
                    f"{self.directory / str(step)}: cannot be restored into this run's model and "
                    f"optimizer: {key} is {saved.get(key, 'absent')} in the checkpoint, "
                    f"{expected.get(key, 'absent')} here (was it saved with another config?)")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def wait(self) -> None:
        """Block until the asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _layout(state) -> dict[str, str]:
    """Path -> "shape dtype" of every leaf: what a compatible restore target must match."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): f"{tuple(leaf.shape)} {leaf.dtype}"
            for path, leaf in leaves}
