"""Orbax checkpoints of the whole ``TrainState``: sharded, asynchronous, keep-last-N, atomic.

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only
when every host has finished (on object stores it writes a ``commit_success.txt`` marker instead). A save cut
short (process killed) therefore leaves no directory that orbax lists as a step. :meth:`Checkpointer.restore`
additionally warns about such leftovers and, if a listed step still fails to load (e.g. files removed or
truncated by hand), warns and falls back to the newest older step that loads.
"""

from __future__ import annotations

import os
import re
import warnings

import orbax.checkpoint as ocp

from trl_jax.train.state import abstract_like

_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class Checkpointer:
    """Save / restore ``TrainState`` pytrees under ``directory`` (one sub-directory per step).

    ``max_to_keep``: keep only the newest N steps (None: all). ``async_save``: ``save`` returns as soon as the
    device arrays are copied to host; call :meth:`wait` (or :meth:`close`) before exiting. Every process of a
    multi-process run must call ``save`` / ``restore`` together (orbax coordinates the hosts).
    """

    def __init__(
        self, directory, *, max_to_keep: int | None = None, async_save: bool = True, save_interval_steps: int = 1
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Start saving ``state`` as ``step``; returns whether a save was started (``save_interval_steps``)."""
        return self._mngr.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ query
    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def incomplete_saves(self) -> list[str]:
        """Leftovers of interrupted saves (temporary step directories) in ``directory``."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if _TMP.match(n))

    # ------------------------------------------------------------------ restore
    def restore(self, target, step: int | None = None, *, shardings=None):
        """Restore into the structure, dtypes and shardings of ``target``.

        ``target``: a ``TrainState`` of arrays or ``ShapeDtypeStruct``s (e.g. ``jax.eval_shape`` of
        ``TrainState.create``). ``shardings``: a matching pytree of ``NamedSharding`` to restore onto a different
        mesh than the one saved from (default: ``target``'s own shardings). ``step``: default the newest step
        that loads; incomplete or unreadable checkpoints are skipped with a warning. Returns ``(step, state)``;
        raises ``FileNotFoundError`` when no checkpoint loads.
        """
        for name in self.incomplete_saves():
            warnings.warn(
                f"Checkpointer: ignoring incomplete checkpoint {os.path.join(self.directory, name)!r} "
                "(a save that never committed, e.g. the process was killed mid-save).",
                stacklevel=2,
            )
        abstract = abstract_like(target, shardings)
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; found {steps}.")
            return step, self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        for s in reversed(steps):
            try:
                return s, self._mngr.restore(s, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 - a damaged step: fall back to an older one
                warnings.warn(
                    f"Checkpointer: ignoring checkpoint step {s} in {self.directory!r}, it does not load "
                    f"({type(e).__name__}: {str(e)[:200]}); trying an older step.",
                    stacklevel=2,
                )
        raise FileNotFoundError(f"no loadable checkpoint in {self.directory} (committed steps: {steps}).")


def restore_or_init(checkpointer: Checkpointer, init_state):
    """``(start_step, state)``: the newest loadable checkpoint restored into ``init_state``'s layout, or
    ``(0, init_state)`` when there is none."""
    if not checkpointer.all_steps():
        return 0, init_state
    try:
        return checkpointer.restore(init_state)
    except FileNotFoundError:
        return 0, init_state


__all__ = ["Checkpointer", "restore_or_init"]
