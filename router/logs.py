"""Logging set-up: structlog to stderr, console or JSON, one line per event, no secrets.

The level is a filter in the processor chain rather than in the bound loggers (which are
cached on first use), so a reload can change it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip
_threshold = logging.INFO


def _by_level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    if _LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event


def set_level(level: str) -> None:
    """Log events of `level` and above from now on."""
    global _threshold
    _threshold = _LEVELS.get(level, logging.INFO)


_process_fields: dict[str, Any] = {}


def _add_process_fields(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    event.update(_process_fields)
    return event


def bind_process(**fields: Any) -> None:
    """Fields every later event of this process carries (a worker's index)."""
    _process_fields.update(fields)


def setup_logging(level: str = "info", fmt: str = "console") -> None:
    set_level(level)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            _by_level,
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
