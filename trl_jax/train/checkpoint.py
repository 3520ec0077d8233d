"""Orbax checkpoints of the whole ``TrainState``: sharded, asynchronous, keep-last-N, atomic.

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only
when every host has finished (on object stores it writes a ``commit_success.txt`` marker instead). A save cut
short (process killed) therefore leaves no directory that orbax lists as a step. :meth:`Checkpointer.restore`
additionally warns about such leftovers and, if a listed step still fails to load (e.g. files removed or
truncated by hand), warns and falls back to the newest older step that loads.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
import warnings

import orbax.checkpoint as ocp
from etils import epath

from trl_jax.train.state import abstract_like

_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


# ---------------------------------------------------------------------- local paths and URLs
def is_url(path) -> bool:
    """``gs://...``, ``s3://...`` and other ``scheme://`` paths (``file://`` URLs are local paths)."""
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def as_path(path) -> epath.Path:
    """A local path or a URL as an ``etils.epath.Path``: ``gs://`` / ``s3://`` / ``az://`` / ``hf://`` (through
    fsspec; orbax writes checkpoints to local paths and ``gs://``), ``file:///abs/path`` (a local path). Local
    paths are made absolute. Join with ``/``, never with ``os.path`` on the string of a URL."""
    if isinstance(path, epath.Path) and is_url(path):
        return path
    s = os.fspath(path)
    if s.startswith("file://"):
        from urllib.parse import unquote, urlparse

        s = unquote(urlparse(s).path)
    if "://" in s:
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def path_str(path) -> str:
    """``as_path(path)`` as a string (a URL stays a URL)."""
    return os.fspath(as_path(path))


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...). Checkpoints committed before it are intact."""


class Checkpointer:
    """Save / restore ``TrainState`` pytrees under ``directory`` (one sub-directory per step).

    ``max_to_keep``: keep only the newest N steps (None: all). ``async_save``: ``save`` returns as soon as the
    device arrays are copied to host; call :meth:`wait` (or :meth:`close`) before exiting. Every process of a
    multi-process run must call ``save`` / ``restore`` together (orbax coordinates the hosts).
    """

    def __init__(
        self, directory, *, max_to_keep: int | None = None, async_save: bool = True, save_interval_steps: int = 1
    ):
        self.directory = path_str(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(as_path(self.directory), options=options)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Start saving ``state`` as ``step``; returns whether a save was started (``save_interval_steps``).

        Raises :class:`CheckpointSaveError` when this save cannot start or an earlier asynchronous save failed."""
        self.check_for_errors()
        try:
            return self._mngr.save(int(step), args=ocp.args.StandardSave(state), force=force)
        except Exception as e:  # noqa: BLE001 - any failure of the write is reported the same way
            raise self._save_error(e, step) from e

    def check_for_errors(self) -> None:
        """Raise :class:`CheckpointSaveError` if an asynchronous save has failed since the last call (cheap)."""
        try:
            self._mngr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from e

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed (:class:`CheckpointSaveError` if one failed)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()

    def _save_error(self, exc: BaseException, step: int | None = None) -> CheckpointSaveError:
        if isinstance(exc, CheckpointSaveError):
            return exc
        try:  # let earlier saves still in flight commit, so that they are kept and listed
            self._mngr.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failed save itself
            pass
        try:
            kept = self.all_steps()
        except Exception:  # noqa: BLE001 - the listing itself may fail on a broken filesystem
            kept = "unknown"
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"saving {what} to {self.directory} failed ({type(exc).__name__}: {reason}). Checkpoints saved "
            f"before it are intact (steps {kept}). Free disk space or fix the directory's permissions, then rerun "
            "with resume_from_checkpoint=True (`--resume_from_checkpoint true`)."
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ query
    def all_steps(self, reload: bool = True) -> list[int]:
        """Committed steps, ascending. ``reload=False``: the manager's own list (no directory scan; includes a save
        in flight). Do not reload while a save is in flight: orbax would lose track of the steps to prune."""
        if reload:
            self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def incomplete_saves(self) -> list[str]:
        """Leftovers of interrupted saves (temporary step directories) in ``directory``."""
        d = as_path(self.directory)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if _TMP.match(p.name))

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
                f"Checkpointer: ignoring incomplete checkpoint {os.fspath(as_path(self.directory) / name)!r} "
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


def committed_steps(directory) -> list[int]:
    """Steps committed in a checkpoint directory (sub-directories named by a step number), without creating it."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


# ---------------------------------------------------------------------- one run per output_dir
LOCK_NAME = "trl_jax.lock"


def _usage_error_class():
    from trl_jax.configs import UsageError

    class NoCheckpointError(UsageError, FileNotFoundError):
        """``resume_from_checkpoint`` finds no checkpoint (a usage error for the CLI, and a ``FileNotFoundError``)."""

    NoCheckpointError.__module__ = __name__
    return NoCheckpointError


NoCheckpointError = _usage_error_class()


class OutputDirInUseError(RuntimeError):
    """Another live run holds the ``output_dir`` lock."""


class StaleLockWarning(UserWarning):
    """A lock left behind by a run that no longer exists was taken over."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # a zombie (exited, not yet reaped) is not a run
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')!r}, started {info.get('started')}"
            + (f", command: {info['command']}" if info.get("command") else ""))


class OutputDirLock:
    """An exclusive lock file ``<output_dir>/trl_jax.lock`` recording pid, host, start time and command.

    ``acquire`` creates it atomically (a complete file is hard-linked into place, so a reader never sees it half
    written). A lock whose process no longer runs on this host (a crashed or killed run) is stale: it is taken over
    with a :class:`StaleLockWarning`. Otherwise :class:`OutputDirInUseError` names the other run. ``release``
    removes the file if this process holds it. Use as a context manager or call ``acquire`` / ``release``.
    """

    def __init__(self, output_dir):
        self.output_dir = path_str(output_dir)
        self.path = os.fspath(as_path(output_dir) / LOCK_NAME)
        self._remote = is_url(self.output_dir)
        self.held = False

    def read(self) -> dict | None:
        """The holder's record, ``{}`` for an unreadable file, ``None`` when there is no lock."""
        try:
            info = json.loads(as_path(self.path).read_text())
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def holder_alive(self, info: dict) -> bool | None:
        """True / False when the holder runs on this host, ``None`` when it cannot be told (another host)."""
        if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
            return None
        return _pid_alive(info["pid"])

    def check(self) -> None:
        """Raise :class:`OutputDirInUseError` if a live (or unverifiable) run holds the lock; no side effects."""
        info = self.read()
        if info is None:
            return
        if not info:
            raise OutputDirInUseError(
                f"output_dir {self.output_dir} has an unreadable lock file {self.path}. If no other run uses this "
                "output_dir, delete that file; otherwise choose another output_dir."
            )
        alive = self.holder_alive(info)
        if alive is False:
            return
        where = "still running" if alive else "on another host, which cannot be checked from here"
        raise OutputDirInUseError(
            f"output_dir {self.output_dir} is in use by another run ({_describe(info)}; {where}). Two runs in one "
            f"output_dir overwrite each other's checkpoints and logs: choose another output_dir, or wait for that "
            f"run to finish. If it is gone, delete {self.path}."
        )

    def acquire(self) -> OutputDirLock:
        as_path(self.output_dir).mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        if self._remote:  # object stores: no hard links nor exclusive create; check, then write
            self.check()
            as_path(self.path).write_text(json.dumps(record))
            self.held = True
            return self
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                except OSError:  # no hard links on this filesystem: exclusive create instead
                    try:
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        pass
                    else:
                        with os.fdopen(fd, "w", encoding="utf-8") as f:
                            json.dump(record, f)
                        self.held = True
                        return self
                info = self.read()
                if info is None:
                    continue  # released meanwhile: try again
                self.check()  # raises unless the holder is dead
                stale = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.rename(self.path, stale)  # atomic: of two runs taking over, one wins
                except FileNotFoundError:
                    continue
                os.remove(stale)
                warnings.warn(
                    f"taking over the lock of output_dir {self.output_dir} from a run that no longer exists "
                    f"({_describe(info)}); it probably crashed or was killed.",
                    StaleLockWarning,
                    stacklevel=2,
                )
            raise OutputDirInUseError(f"could not take the lock {self.path}: other runs keep taking it.")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self.read()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                as_path(self.path).unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_output_dir(output_dir, *, resume_from_checkpoint=None, overwrite_output_dir: bool = False,
                     delete: bool = False, check_lock: bool = True) -> None:
    """The up-front check of a run's ``output_dir`` (before any model is loaded or step taken).

    * another live run holds its lock: :class:`OutputDirInUseError` (``check_lock``; off for the lock's holder);
    * it holds checkpoints and the run neither resumes nor overwrites: ``UsageError`` naming both fixes;
    * ``overwrite_output_dir`` without resuming and ``delete=True``: the old ``checkpoints/``,
      ``log_history.jsonl`` and ``runs/`` are deleted (call it with ``delete=True`` only while holding the lock).
    """
    from trl_jax.configs import UsageError

    output_dir = as_path(output_dir)
    if check_lock:
        OutputDirLock(output_dir).check()
    ckpt_dir = output_dir / "checkpoints"
    steps = committed_steps(ckpt_dir)
    resume = bool(resume_from_checkpoint) and not (
        isinstance(resume_from_checkpoint, str)
        and resume_from_checkpoint.strip().lower() in ("", "false", "no", "0", "none"))
    if resume and overwrite_output_dir:
        raise UsageError("`resume_from_checkpoint` and `overwrite_output_dir` are both set: resume the earlier run "
                         "or delete it, not both; unset one of them.")
    if resume:
        latest = isinstance(resume_from_checkpoint, bool) or str(resume_from_checkpoint).strip().lower() in (
            "true", "latest")
        if latest and not steps:
            raise NoCheckpointError(
                f"resume_from_checkpoint={resume_from_checkpoint!r}: no checkpoint found in {ckpt_dir}; train "
                "without resume_from_checkpoint, or point it at a checkpoints directory (or one step in it)."
            )
        return
    if steps and not overwrite_output_dir:
        raise UsageError(
            f"output_dir {output_dir} already holds checkpoints of an earlier run (steps {steps}). Pass "
            "`--resume_from_checkpoint true` (resume_from_checkpoint=True) to continue it, or "
            "`--overwrite_output_dir true` (overwrite_output_dir=True) to delete them and start over, or choose "
            "another output_dir."
        )
    if overwrite_output_dir and delete:
        removed = []
        for name in ("checkpoints", "runs", "log_history.jsonl"):
            path = output_dir / name
            if path.is_dir():
                path.rmtree()
                removed.append(name + "/")
            elif path.exists():
                path.unlink()
                removed.append(name)
        if removed:
            print(f"[trl_jax] overwrite_output_dir: deleted {', '.join(removed)} in {output_dir}", file=sys.stderr)


__all__ = ["as_path", "is_url", "path_str", "Checkpointer", "CheckpointSaveError", "LOCK_NAME", "NoCheckpointError", "OutputDirInUseError", "OutputDirLock",
           "StaleLockWarning", "check_output_dir", "committed_steps", "restore_or_init"]
