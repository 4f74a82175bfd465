"""Progress display: the one place that knows about tqdm."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img"):
    """A tqdm bar counting `unit`s (call ``update(n)`` and ``close()``), or None when disabled or unavailable."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


class StepProgress:
    """Progress of a loop counted in steps: a tqdm bar when available and wanted, else plain lines."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
            except ImportError:
                pass
        self.desc, self.total, self.last = desc, total, initial

    def update(self, step: int, **fields):
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(fields, refresh=False)
        else:
            print(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
        self.last = step

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
