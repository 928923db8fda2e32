"""Progress in the logs: a tqdm bar on a terminal, one plain line every N steps elsewhere
(``kubectl logs`` is not a terminal, and a bar redrawn per step makes unreadable logs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dreambooth.trainer")


class Progress:
    def __init__(self, total: int, start: int, *, enabled: bool, every_seconds: float = 10.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every_seconds
        self.bar = None
        self._last_line = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, float], images_per_second: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
            return
        now = time.monotonic()
        if step == self.total or now - self._last_line >= self.every:
            self._last_line = now
            speed = f" {images_per_second:.2f} img/s" if images_per_second else ""
            log.info("step %d/%d loss %.4f lr %.2e%s", step, self.total, values["loss"], values["lr"], speed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
