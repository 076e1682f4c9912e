"""What a run records: its metrics, written by process 0 only, as `log.jsonl` (one JSON object
per record, the file the loss plot and the tests read) and TensorBoard event files under
`tensorboard/` (through tensorboardX, which needs no TensorFlow), one scalar per key at its
step; and, on request, the example ids every step consumed.

A run directory on remote storage (gs://) gets these files through `SyncedDir`: written
locally (objects cannot be appended to) and uploaded whole at each write, the earlier
`log.jsonl` / example-id file downloaded first when a run resumes."""

from __future__ import annotations

import json
import os

import jax

from bert_jax.files import SyncedDir


class RunLog:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self._jsonl = self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter  # imports torch when present: only if used

            self._dir = SyncedDir(run_dir, resume=("log.jsonl",))
            self._jsonl = (self._dir.local / "log.jsonl").open("a")
            self._tensorboard = SummaryWriter(str(self._dir.local / "tensorboard"))

    def write(self, metrics: dict) -> None:
        """`metrics` holds "step" and numbers."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self._tensorboard.add_scalar(key, value, metrics["step"])
        self._tensorboard.flush()
        self._dir.sync()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._dir.close()


class ExampleIdLog:
    """Which examples each step consumed, per process (`example_ids.process<i>.jsonl`): the
    audit trail that shows a resumed run repeats and skips nothing. A step re-run after a
    crash appears twice; its last line is the one that counts."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self._file = None
        if enabled:
            name = f"example_ids.process{jax.process_index()}.jsonl"
            self._dir = SyncedDir(run_dir, resume=(name,))
            self._file = (self._dir.local / name).open("a")

    def write(self, step: int, example_ids) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "example_ids": example_ids.tolist()}) + "\n")
            self._file.flush()
            self._dir.sync()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._dir.close()
