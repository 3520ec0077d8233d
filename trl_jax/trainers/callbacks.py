"""Callbacks with transformers' ``TrainerCallback`` protocol, without importing transformers' trainer (torch).

A callback is any object with some of the methods ``on_train_begin``, ``on_step_end``, ``on_log``,
``on_evaluate``, ``on_save``, ``on_epoch_end``, ``on_train_end``; each is called as
``cb.on_xxx(args, state, control, **kwargs)`` like transformers does, so a ``transformers.TrainerCallback``
subclass works unchanged. Setting ``control.should_training_stop = True`` stops the run after the current step;
``control.should_save`` / ``control.should_evaluate`` / ``control.should_log`` request those actions now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_epoch_end", "on_train_end")


@dataclass
class TrainerState:
    """The subset of ``transformers.TrainerState`` a callback usually reads."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_train_epochs: float = 0.0
    logging_steps: float = 0
    eval_steps: float | None = None
    save_steps: float = 0
    train_batch_size: int = 0
    log_history: list = field(default_factory=list)
    best_metric: float | None = None
    is_world_process_zero: bool = True


@dataclass
class TrainerControl:
    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False


class CallbackHandler:
    def __init__(self, callbacks):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not any(hasattr(cb, e) for e in EVENTS):
                raise TypeError(f"callback {cb!r} has none of the methods {EVENTS}.")

    def add(self, cb) -> None:
        self.callbacks.append(cb)

    def __call__(self, event: str, args, state: TrainerState, control: TrainerControl, **kwargs) -> TrainerControl:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                out = fn(args, state, control, **kwargs)
                if isinstance(out, TrainerControl):
                    control = out
        return control
