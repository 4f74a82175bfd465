"""Logging: every module logs through ``logging.getLogger(__name__)`` (under the "latentdiff" logger);
the command line shows INFO messages as plain lines on stdout, and warnings as one
``latentdiff: warning: ...`` line on stderr."""

from __future__ import annotations

import logging
import sys

ROOT = "latentdiff"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach the command line's two handlers to the "latentdiff" logger (idempotent). They look up
    sys.stdout / sys.stderr on every message, so redirected streams (tests, notebooks) are honoured."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_latentdiff", False):
            logger.removeHandler(h)
    info = _StreamHandler("stdout")
    info.addFilter(_Below(logging.WARNING))
    info.setFormatter(logging.Formatter("%(message)s"))
    warn = _StreamHandler("stderr")
    warn.setLevel(logging.WARNING)
    warn.setFormatter(logging.Formatter("latentdiff: warning: %(message)s"))
    for h in (info, warn):
        h._latentdiff = True
        logger.addHandler(h)
    return logger


class _StreamHandler(logging.StreamHandler):
    """A StreamHandler bound to the *current* sys.stdout or sys.stderr at each emit."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the live stream is looked up instead
        pass
