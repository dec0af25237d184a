"""Every Orbax call in the project lives here, so an Orbax API move costs one file.

A checkpoint holds four items (five in an adapter run, whose `base_model` records
which frozen base its adapters belong to): `state` (the sharded TrainState), `data` (a small
JSON record of the data settings: step, global batch, seed, number of data shards),
`data_positions` (one file per data shard: where that shard's input pipeline
is, so a resumed run continues it in constant time and sees the batches an
uninterrupted run would have seen) and `integrity` (a fingerprint of every array of
the state, checkpointing/integrity.py). All four are written into the same step directory and
committed by the same atomic rename. Each process writes the
positions of the shards it owns and, on restore, reads those it owns now, so a run
can resume on any process count that divides the number of shards (the layout
Grain's Orbax handler uses). Saves are asynchronous: the step loop goes on while the
arrays are written in the background; positions are small and written at once.

Never losing a run:
- Orbax writes each step into a temporary directory and renames it when complete,
  so a crash mid-write leaves no step directory that looks finished.
- Every restore recomputes the fingerprints of what it read and compares them with
  the saved ones, so flipped bytes are caught, not trained on.
- `restore_latest` walks back from the newest step and decides by the cause of a
  failure (checkpointing/restore_causes.py has the exact list). Only a checkpoint proven corrupt
  (missing or truncated files, undecodable metadata or chunks, or fingerprints that
  differ) is moved aside to `<dir>.corrupt/` with a warning naming it, and the
  previous one is used. A transient storage error (EIO, timeouts, `UNAVAILABLE`) is
  retried with exponential backoff; if it persists, the run stops. Anything else
  (out of memory, a checkpoint that does not fit the model because the config
  changed, a bug) stops the run with one CheckpointRestoreError (or
  CheckpointMismatchError) and moves nothing: recovery must not throw away valid
  work. With several processes, all exchange their outcome for each step and act on
  the worst one, so they stop together or set the step aside together.
- A failed write (disk full, read-only directory) is a CheckpointWriteError naming
  the step whose write failed, raised at the first step after the failure
  (`raise_if_save_failed`), not at the next save. Step directories are created
  before `save` returns, so an unwritable directory fails at once, in the caller,
  instead of leaving Orbax's background threads waiting for a directory that never
  appears.
- `protect(step)` keeps a step out of the `max_to_keep` rotation (train() protects
  the last checkpoint saved before updates started being skipped).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from t5x_like import errors, storage, tree_paths
from t5x_like.checkpointing import integrity
from t5x_like.checkpointing import restore_causes
from t5x_like.parallel import collective_failures

log = logging.getLogger(__name__)


class CheckpointMismatchError(errors.RunError, ValueError):
    """A checkpoint is readable but its tree does not match what is being restored."""


class CheckpointWriteError(errors.RunError, RuntimeError):
    """Writing a checkpoint failed (disk full, no permission...)."""


class CheckpointCorruptError(errors.RunError, ValueError):
    """A checkpoint was read, but its arrays are not what was saved."""


class CheckpointRestoreError(errors.RunError, RuntimeError):
    """Restoring failed for a cause that does not mean the checkpoint is corrupt
    (out of memory, storage unavailable, a bug): nothing was set aside."""


DATA_POSITIONS = "data_positions"
INTEGRITY = "integrity"
# An adapter run's frozen base: where it came from and its fingerprint
# (checkpointing/base_model.py); its arrays are not in the checkpoint.
BASE_MODEL = "base_model"


def _shard_file(shard: int, num_shards: int) -> str:
    return f"shard_{shard:05d}_of_{num_shards:05d}.position"


class ShardPositionsHandler(ocp.CheckpointHandler):
    """Writes and reads data-shard positions (opaque bytes), one file per shard.

    Every process calls `save` with the shards it owns; `restore` reads the shards
    asked for, whichever process wrote them.
    """

    def save(self, directory, args: "ShardPositionsSave") -> None:
        for shard, position in args.positions.items():
            (directory / _shard_file(shard, args.num_shards)).write_bytes(position)

    def restore(self, directory, args: "ShardPositionsRestore") -> dict[int, bytes]:
        return {shard: (directory / _shard_file(shard, args.num_shards)).read_bytes()
                for shard in args.shards}


@ocp.args.register_with_handler(ShardPositionsHandler, for_save=True)
@dataclasses.dataclass
class ShardPositionsSave(ocp.args.CheckpointArgs):
    positions: Mapping[int, bytes]
    num_shards: int


@ocp.args.register_with_handler(ShardPositionsHandler, for_restore=True)
@dataclasses.dataclass
class ShardPositionsRestore(ocp.args.CheckpointArgs):
    shards: Sequence[int]
    num_shards: int


def item_handlers(state_handler: ocp.CheckpointHandler | None = None) -> dict:
    return {"state": state_handler or ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            DATA_POSITIONS: ShardPositionsHandler(),
            INTEGRITY: ocp.JsonCheckpointHandler(),
            BASE_MODEL: ocp.JsonCheckpointHandler()}


def _read_json_item(manager: ocp.CheckpointManager, directory: str, step: int,
                    item: str) -> dict | None:
    """A small JSON item of `step`, or None when the checkpoint has none."""
    if not (epath.Path(directory) / str(step) / item).exists():
        return None
    return dict(manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item])


@dataclasses.dataclass
class _ProtectedSteps:
    """An Orbax preservation policy: keeps the steps in `steps` (a live set)."""
    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [info.step in self.steps for info in checkpoints]


def committed_steps(directory: str) -> list[int]:
    """Steps whose checkpoint is complete in `directory` (a read-only listing, safe
    from any thread)."""
    return sorted(ocp.path.step.checkpoint_steps(storage.resolve(directory)))


def existing_steps(directory: str) -> list[int]:
    """`committed_steps`, or [] when `directory` does not exist."""
    try:
        return committed_steps(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def latest_committed_step(directory: str) -> int | None:
    """The newest complete step in `directory`; None if it has none (or is missing)."""
    steps = existing_steps(directory)
    return steps[-1] if steps else None


class Checkpointer:
    """Saves whenever asked: *when* to save is the train loop's decision alone."""

    def __init__(self, *, directory: str, max_to_keep: int | None = 3,
                 keep_period: int | None = None, async_save: bool = True,
                 restore_attempts: int = 4, restore_backoff_s: float = 2.0):
        """`max_to_keep` latest checkpoints are kept, plus forever every step that is
        a multiple of `keep_period` (e.g. for later evaluation). A restore that fails
        with a transient storage error is tried `restore_attempts` times in all,
        waiting `restore_backoff_s`, then twice, four times as long... in between
        (by default 2 + 4 + 8 = 14 s at most). `directory` is a local path or a URL
        (storage.py)."""
        self.directory = directory = storage.resolve(directory)
        self._restore_attempts = max(1, restore_attempts)
        self._restore_backoff_s = restore_backoff_s
        self._protected = _ProtectedSteps()
        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep), self._protected]
        if keep_period:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_period))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
            enable_async_checkpointing=async_save,
            # Create the step directory in save() itself: if that fails (read-only or
            # full disk), the error is raised there. Created in the background, a
            # failure left the other writer threads waiting for the directory for
            # Orbax's 5-minute coordination timeout, and the process hung.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        try:
            self._manager = ocp.CheckpointManager(directory, options=options,
                                                  item_handlers=item_handlers())
        except OSError as e:
            raise CheckpointWriteError(
                f"Cannot create or read the checkpoint directory {directory} "
                f"({type(e).__name__}: {e})",
                fix="check MODEL_DIR's path and permissions") from e
        self._pending_step: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, *, data_position: dict,
             shard_positions: Mapping[int, bytes] | None = None,
             num_data_shards: int | None = None,
             base_model: Mapping[str, Any] | None = None) -> None:
        """Starts an async save of `state` and the data position at `step`.

        `shard_positions`: {shard: position} of the data shards this process owns
        (out of `num_data_shards`), saved alongside. `base_model`: an adapter run's
        record of its frozen base (checkpointing/base_model.py). An error of the previous async
        save is raised first, naming that save's step (CheckpointWriteError);
        `raise_if_save_failed` raises it as soon as the save has ended.
        """
        self.wait_until_finished()        # the previous save's error is that save's
        fingerprints = {"version": integrity.VERSION,
                        "arrays": integrity.fingerprints(tree_paths.flatten(state))}
        items = {"state": ocp.args.StandardSave(state),
                 "data": ocp.args.JsonSave(data_position),
                 INTEGRITY: ocp.args.JsonSave(fingerprints)}
        if base_model is not None:
            items[BASE_MODEL] = ocp.args.JsonSave(dict(base_model))
        if shard_positions is not None:
            items[DATA_POSITIONS] = ShardPositionsSave(positions=dict(shard_positions),
                                                       num_shards=num_data_shards)
        self._pending_step = step
        self._raise_write_error_from(lambda: self._manager.save(
            step, args=ocp.args.Composite(**items), force=True), step)

    def raise_if_save_failed(self) -> None:
        """Raises the CheckpointWriteError of a background save that has ended in
        failure; returns at once otherwise (cheap enough for every step)."""
        if self._pending_step is not None and not self._manager.is_saving_in_progress():
            self.wait_until_finished()

    def wait_until_finished(self) -> None:
        step, self._pending_step = self._pending_step, None
        self._raise_write_error_from(self._manager.wait_until_finished, step)

    def protect(self, step: int) -> None:
        """Never delete `step` in the max_to_keep rotation (it stays on disk)."""
        self._protected.steps.add(step)

    def check_writable(self) -> None:
        """Raises NotWritableError now if this process cannot create files in the
        directory, rather than at the first save."""
        if "://" in self.directory:       # object stores: no cheap probe; saves will tell
            return
        probe = epath.Path(self.directory) / f".write_probe.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            complete = committed_steps(self.directory)
            raise errors.NotWritableError(
                f"the checkpoint directory {self.directory} is not writable "
                f"({e.strerror or e}); its checkpoints"
                + (f" (latest: step {complete[-1]}) are intact" if complete
                   else " are untouched"),
                fix="make it writable (or use another MODEL_DIR), then rerun to resume"
            ) from e

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def _raise_write_error_from(self, fn, step: int | None) -> None:
        try:
            fn()
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, errors.RunError):
                raise
            complete = [s for s in self._list_complete_steps() if s != step]
            kept = (f"the last complete checkpoint is step {complete[-1]}, intact"
                    if complete else "no earlier checkpoint exists")
            cause = " ".join(str(e).split())
            fix = ("check that every process of the run is running and can reach the "
                   "others, then rerun to resume"
                   if collective_failures.collective_failure_in(e) is not None
                   else "free disk space or fix permissions, then rerun to resume")
            raise CheckpointWriteError(
                f"Writing the checkpoint for step {step} to {self.directory} failed "
                f"({type(e).__name__}: {cause[:300]}{'...' if len(cause) > 300 else ''}); "
                f"{kept}", fix=fix) from e

    def _list_complete_steps(self) -> list[int]:
        try:
            return committed_steps(self.directory)
        except Exception:   # the directory itself may be the problem
            return []

    # ------------------------------------------------------------------ restore

    def restore(self, step: int, *, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by `abstract_state`'s leaves."""
        check_tree_matches(self._state_metadata(step), abstract_state,
                            what=f"checkpoint step {step} in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore()))
        self._verify(step, restored.state)
        return restored.state, dict(restored.data)

    def _verify(self, step: int, state: Any) -> None:
        """Raises CheckpointCorruptError unless `state` has the fingerprints saved
        with it (a checkpoint written before they were saved is only logged)."""
        if not (epath.Path(self.directory) / str(step) / INTEGRITY).exists():
            log.info("Checkpoint step %d has no integrity record (written by an older "
                     "version): not verified.", step)
            return
        saved = self._manager.restore(step, args=ocp.args.Composite(
            **{INTEGRITY: ocp.args.JsonRestore()}))[INTEGRITY]
        if saved.get("version") != integrity.VERSION:
            log.warning("Checkpoint step %d: integrity record of version %s, not %d: not "
                        "verified.", step, saved.get("version"), integrity.VERSION)
            return
        bad = integrity.mismatches(saved["arrays"], tree_paths.flatten(state))
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint step {step} in {self.directory} is corrupt: {len(bad)} "
                f"array(s) differ from what was saved ({', '.join(bad[:4])}"
                f"{', ...' if len(bad) > 4 else ''})",
                fix="it is set aside; resume from an earlier checkpoint")

    def read_shard_positions(self, step: int, *, shards: Sequence[int],
                             num_data_shards: int) -> dict[int, bytes] | None:
        """The saved positions of `shards` at `step`; None if the checkpoint has none
        (written before positions were saved, or by a run with other data shards)."""
        item = epath.Path(self.directory) / str(step) / DATA_POSITIONS
        if not all((item / _shard_file(s, num_data_shards)).exists() for s in shards):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            DATA_POSITIONS: ShardPositionsRestore(shards=list(shards),
                                                  num_shards=num_data_shards)}))
        return dict(restored[DATA_POSITIONS])

    def read_base_model(self, step: int) -> dict | None:
        """An adapter run's record of its frozen base at `step`; None in a full run."""
        return _read_json_item(self._manager, self.directory, step, BASE_MODEL)

    def read_state(self, step: int) -> Any:
        """The saved state as a tree of arrays on one device, for inspection/export."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = self._manager.item_metadata(step)["state"]
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        state = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
        self._verify(step, state)
        return state

    def restore_latest(self, *, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest readable, intact checkpoint; None when there is none.

        Decides by cause (checkpointing/restore_causes.py), the same way on every process: a
        corrupt step is set aside and the previous one tried; a transient error is
        retried with backoff; anything else raises (CheckpointMismatchError or
        CheckpointRestoreError) and moves nothing.
        """
        for step in reversed(self.all_steps()):
            for attempt in range(self._restore_attempts):
                result, error, outcome = self._try_restore(step, abstract_state)
                worst, where = restore_causes.agree(outcome)
                if outcome != worst:      # another process's error decides; ours misleads
                    error = None
                if worst != restore_causes.TRANSIENT or attempt + 1 == self._restore_attempts:
                    break
                delay = self._restore_backoff_s * 2 ** attempt
                log.warning("Checkpoint step %d: transient read error on process %d (%s); "
                            "retrying in %.3g s (attempt %d of %d).", step, where,
                            _describe(error) if error else "see its log", delay,
                            attempt + 2, self._restore_attempts)
                time.sleep(delay)
            if worst == restore_causes.OK:
                return (step, *result)
            if worst == restore_causes.CORRUPT:
                self._quarantine(step, error, where)
                continue
            raise self._restore_error(step, error, worst, where)
        return None

    def _try_restore(self, step: int, abstract_state: Any):
        """(result, None, OK) or (None, error, its restore_causes outcome)."""
        try:
            result = self.restore(step, abstract_state=abstract_state)
            if step == self.all_steps()[-1]:
                fault = restore_causes.injected_fault(CheckpointCorruptError)
                if fault is not None:
                    raise fault
            return result, None, restore_causes.OK
        except Exception as e:  # noqa: BLE001 - classified, and re-raised unless corrupt
            outcome = restore_causes.classify(e, corrupt_types=(CheckpointCorruptError,),
                                              fatal_types=(CheckpointMismatchError,))
            if outcome != restore_causes.CORRUPT:
                log.warning("Checkpoint step %d: restore failed (%s; %s).", step,
                            restore_causes.NAMES[outcome], _describe(e))
            return None, e, outcome

    def _restore_error(self, step: int, error: Exception | None, worst: int,
                       where: int) -> Exception:
        if isinstance(error, CheckpointMismatchError):
            return error
        source = (f"on process {where} of {jax.process_count()}"
                  if jax.process_count() > 1 else "")
        cause = _describe(error) if error is not None else "see that process's log"
        if worst == restore_causes.TRANSIENT:
            what = (f"could not read checkpoint step {step} in {self.directory} after "
                    f"{self._restore_attempts} attempts {source} ({cause}); it is not "
                    "corrupt, so it was not set aside and nothing was moved")
            fix = "check that the storage is reachable, then rerun to resume"
        else:
            what = (f"restoring checkpoint step {step} in {self.directory} failed "
                    f"{source} ({cause}); this does not show the checkpoint is corrupt, "
                    "so nothing was moved")
            fix = ("free memory or use more devices, then rerun to resume"
                   if "memory" in cause.lower() or "RESOURCE_EXHAUSTED" in cause else
                   "fix the cause (the traceback is in the log), then rerun to resume")
        raised = CheckpointRestoreError(" ".join(what.split()), fix=fix)
        raised.__cause__ = error
        return raised

    def _state_metadata(self, step: int) -> dict[str, Any]:
        metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise FileNotFoundError(f"no state metadata for step {step}")
        return tree_paths.flatten(metadata)

    def _quarantine(self, step: int, error: Exception | None, where: int) -> None:
        """Moves `step` to `<directory>.corrupt/<step>-<time>`; every process calls it
        (process 0 moves, then all meet at a barrier)."""
        source = epath.Path(self.directory) / str(step)
        target = (epath.Path(f"{self.directory.rstrip('/')}.corrupt")
                  / f"{step}-{int(time.time())}")
        log.warning("Checkpoint step %d at %s is unreadable or corrupt (%s, seen by process "
                    "%d). Moving it to %s and trying the previous one.", step, source,
                    _describe(error) if error else "see that process's log", where,
                    target.parent)
        if jax.process_index() == 0:
            _move_tree(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.reload()


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves a directory. A local (POSIX) path is renamed, atomically. Object stores
    (gs://, s3://) have no directory rename: each file is copied, then the source is
    deleted, so a crash in between leaves both copies, never neither."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in os.fspath(source):
        source.rename(target)
        return
    for path in _walk_files(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.copy(destination)
    source.rmtree()


def _walk_files(root: epath.Path):
    """Every file below `root`. epath refuses `**` globs on gs:// (one listing per
    folder is what happens here anyway), and its walk() drops the URL scheme."""
    for item in root.iterdir():
        if item.is_dir():
            yield from _walk_files(item)
        else:
            yield item


def check_tree_matches(saved: Mapping[str, Any], abstract_state: Any, *, what: str) -> None:
    wanted = tree_paths.flatten(abstract_state)
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    reshaped = sorted(k for k in set(wanted) & set(saved)
                      if tuple(saved[k].shape) != tuple(wanted[k].shape))
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            f"{what} does not match this run's train state (did the model, optimizer or "
            f"partitioning config change?); missing in checkpoint: {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}; unexpected: {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}; shape changed: "
            + (", ".join(f"{k} {tuple(saved[k].shape)}->{tuple(wanted[k].shape)}"
                         for k in reshaped[:8]) or "none"),
            fix="use a new MODEL_DIR, or start from it with `init_from` (parameters only)")


# ---------------------------------------------------------------------- reading only

class CheckpointReader:
    """A read-only view of a run's checkpoints, for evaluating them (launch.eval).

    It never creates, deletes or moves anything, so it can watch the directory of a
    training job that is writing to it: `steps()` lists what the job has committed
    so far (Orbax renames a step into place only once it is complete).
    """

    def __init__(self, directory: str):
        directory = storage.resolve(directory)
        if not epath.Path(directory).is_dir():
            raise FileNotFoundError(f"no checkpoint directory {directory}")
        self.directory = directory
        self._manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers=item_handlers(ocp.PyTreeCheckpointHandler()))

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore_params(self, step: int, *, abstract_params: Any) -> Any:
        """The parameters at `step`, each read straight into the sharding its
        `abstract_params` leaf carries; the optimizer state is not read."""
        saved = {k[len("params/"):]: v for k, v in self._state_metadata(step).items()
                 if k.startswith("params/")}
        check_tree_matches(saved, abstract_params,
                            what=f"the parameters of checkpoint step {step} in {self.directory}")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
            sharding=a.sharding, dtype=a.dtype, global_shape=a.shape), abstract_params)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                         restore_args={"params": restore_args},
                                         partial_restore=True)))
        return restored.state["params"]

    def read_base_model(self, step: int) -> dict | None:
        """An adapter run's record of its frozen base at `step`; None in a full run."""
        return _read_json_item(self._manager, self.directory, step, BASE_MODEL)

    def _state_metadata(self, step: int) -> dict[str, Any]:
        return tree_paths.flatten(self._manager.item_metadata(step)["state"])

    def close(self) -> None:
        self._manager.close()
