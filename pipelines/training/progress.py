"""Training progress while it runs: each trainer log (loss, learning rate, validation scores) to the log and a sink."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# (metrics named "<stage>.<name>", global step): the steps module points it at the MLflow run, so the curves fill in
# while a task trains instead of arriving when it ends.
MetricsSink = Callable[[dict[str, float], int], None]


def progress_callback(stage: str, sink: MetricsSink | None = None) -> Any:
    """A transformers TrainerCallback that prints "<stage>: step n/N, elapsed, loss" and hands the numbers to `sink`."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        started = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            numbers = {
                k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k != "epoch")
            elapsed = time.perf_counter() - self.started
            print(f"{stage}: step {state.global_step}/{state.max_steps}, {elapsed:.0f} s: {shown}", flush=True)
            if sink is not None and numbers:
                sink({f"{stage}.{k}": v for k, v in numbers.items()}, int(state.global_step))

    return Progress()
