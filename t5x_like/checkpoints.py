"""Every Orbax call in the project lives here, so an Orbax API move costs one file.

A checkpoint holds two items: `state` (the sharded TrainState) and `data` (a small
JSON record of the input position, so a resumed run sees the batches an
uninterrupted run would have seen). Saves are asynchronous: the step loop goes on
while the arrays are written in the background.
"""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves whenever asked: *when* to save is the train loop's decision alone."""

    def __init__(self, *, directory: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_position: dict) -> None:
        """Starts an async save of `state` and the data position at `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_position)),
            force=True)

    def restore(self, step: int, *, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by `abstract_state`'s leaves."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore()))
        return restored.state, dict(restored.data)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
