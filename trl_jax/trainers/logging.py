"""Where training metrics go: a progress bar, stdout, ``log_history.jsonl``, TensorBoard event files and W&B.

``log_history.jsonl`` holds one record per logged step of the run in ``output_dir``: a resumed run first cuts it
back to the step it resumes from (``truncate_jsonl``), a fresh run starts it empty.

``report_to``: ``"tensorboard"``, ``"wandb"`` (when installed), ``"all"`` (both where available) or ``"none"``.

TensorBoard event files hold tensorboardX's ``Event`` protos (scalar summaries) in TFRecord framing, written
through :class:`AppendFile`; ``tensorboard --logdir <output_dir>/runs`` reads them.

Multi-process runs: only process 0 writes (files, stdout, progress bar, W&B); every process keeps the same
in-memory history. ``output_dir`` may be a URL (``gs://...``, any ``etils.epath`` / fsspec filesystem): files there
are rewritten whole on each flush (object stores cannot append), local files are appended to.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from trl_jax.train.checkpoint import as_path, is_url


class AppendFile:
    """A file opened for appending: a local file is appended to; on an object store (no append), the contents
    are kept in memory and the whole object is rewritten on each :meth:`flush`."""

    def __init__(self, path, binary: bool = False):
        self.path = as_path(path)
        self._binary = binary
        self._remote = is_url(self.path)
        if self._remote:
            self._buf = bytearray(self.path.read_bytes()) if self.path.exists() else bytearray()
            self._f = None
        else:
            self._f = open(os.fspath(self.path), "ab" if binary else "a", **({} if binary else {"encoding": "utf-8"}))

    def write(self, data) -> None:
        if self._remote:
            self._buf += data if self._binary else data.encode("utf-8")
        else:
            self._f.write(data)

    def flush(self) -> None:
        if self._remote:
            self.path.write_bytes(bytes(self._buf))
        else:
            self._f.flush()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._f.close()

# ---------------------------------------------------------------------- TensorBoard (tensorboardX protos)


def _record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC32C of the length, payload, masked CRC32C of the payload."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardWriter:
    """Append scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>``: ``Event`` protos built by
    tensorboardX (``summary.scalar``), framed as TFRecords and written through :class:`AppendFile` (so a
    ``gs://`` / epath ``output_dir`` works as a local one does)."""

    def __init__(self, logdir: str):
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        as_path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.trl_jax"
        self.path = os.fspath(as_path(logdir) / name)
        self._f = AppendFile(self.path, binary=True)
        self._write(event_pb2.Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._f.write(_record(event.SerializeToString()))
        self._f.flush()

    def scalars(self, values: dict, step: int) -> None:
        from tensorboardX import summary

        clean = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if clean:
            summ = summary.scalar(next(iter(clean)), float(next(iter(clean.values()))))
            for tag, v in list(clean.items())[1:]:
                summ.value.extend(summary.scalar(tag, float(v)).value)
            self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summ))

    def close(self) -> None:
        self._f.close()


def read_tensorboard_scalars(path: str) -> list[tuple[int, str, float]]:
    """Decode the scalars of an event file: ``[(step, tag, value), ...]`` (tensorboardX's ``Event`` proto)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out = []
    data = as_path(path).read_bytes()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        payload = data[pos + 12:pos + 12 + n]
        crcs = (struct.unpack_from("<I", data, pos + 8)[0], struct.unpack_from("<I", data, pos + 12 + n)[0])
        if crcs != (masked_crc32c(data[pos:pos + 8]), masked_crc32c(payload)):
            raise ValueError(f"{path}: corrupt TFRecord at byte {pos} (CRC mismatch)")
        event = event_pb2.Event.FromString(payload)
        pos += 12 + n + 4
        out.extend((event.step, v.tag, v.simple_value) for v in event.summary.value)
    return out


# ---------------------------------------------------------------------- the logger the loop uses
def _plain(args) -> dict:
    """The config as JSON-friendly values (for W&B's run config)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict)) else str(v)
    return out


def _report_to(args) -> set[str]:
    r = getattr(args, "report_to", None)
    if r in (None, "none"):
        return set()
    r = {r} if isinstance(r, str) else set(r)
    if "all" in r:
        r = {"tensorboard"} | ({"wandb"} if _wandb_available() else set())
    return r


def _wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def truncate_jsonl(path: str, step: int) -> int:
    """Rewrite a ``log_history.jsonl`` to the records of steps ``<= step`` (the step a run resumes from; 0 for a
    fresh run), so that a killed-and-resumed run logs every step once. Lines that do not parse (a write cut short
    by a kill) are dropped. Atomic (written aside, then renamed). Returns the number of records kept."""
    path = as_path(path)
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if is_url(path):  # an object is replaced atomically by a write
        path.write_text("".join(kept), encoding="utf-8")
        return len(kept)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, os.fspath(path))
    return len(kept)


class MetricsLogger:
    """Progress bar (loss, lr, tokens/s, ETA), one stdout line per log, JSONL history and TensorBoard scalars."""

    def __init__(self, args, total_steps: int, *, start_step: int = 0, log_history: list | None = None,
                 enabled: bool | None = None):
        import jax

        self.args = args
        self.history = log_history if log_history is not None else []
        self.jsonl_path = os.fspath(as_path(args.output_dir) / "log_history.jsonl")
        # enabled: this process writes (process 0 of a multi-process run); the others only keep the history
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        truncate_jsonl(self.jsonl_path, start_step)
        self._jsonl = AppendFile(self.jsonl_path)
        targets = _report_to(args)
        unsupported = targets - {"tensorboard", "wandb"}
        if unsupported:
            print(f"[trl_jax] report_to {sorted(unsupported)} is not supported; logging to JSONL/stdout"
                  + (" and TensorBoard" if "tensorboard" in targets else ""), file=sys.stderr)
        if "tensorboard" in targets:
            self._tb = TensorBoardWriter(getattr(args, "logging_dir", None) or os.fspath(as_path(args.output_dir) / "runs"))
        if "wandb" in targets:
            if not _wandb_available():
                raise ImportError("report_to includes 'wandb' but wandb is not installed: `pip install wandb`.")
            import wandb

            self._wandb = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", getattr(args, "project", None)),
                                                  name=getattr(args, "run_name", None), config=_plain(args))
        if not getattr(args, "disable_tqdm", False):
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr)
            except ImportError:  # tqdm comes with datasets; the bar is optional
                self._bar = None

    def progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, record: dict, step: int) -> None:
        rec = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}
        rec["step"] = step
        self.history.append(rec)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars({(k if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()}, step)
        if self._wandb is not None:
            self._wandb.log({(k.replace("eval_", "eval/", 1) if k.startswith("eval_") else f"train/{k}"): v
                             for k, v in record.items()}, step=step)
        if self._bar is not None:
            post = {k: f"{record[k]:.4g}" for k in ("loss", "learning_rate", "train_tokens_per_second") if k in record}
            if post:
                self._bar.set_postfix(post, refresh=False)
            self._bar.write(json.dumps(rec))
        else:
            print(json.dumps(rec), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
