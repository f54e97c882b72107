"""Structured logs (structlog), to stderr, console or JSON.

Tokens never reach a log call (they travel inside :class:`~rotator.model.Secret`, which prints
as a fingerprint). As a second line of defence a processor masks anything token-shaped
(:func:`rotator.scrub.mask`) in every string value before it is rendered, exception text
included.

The standard library's loggers (uvicorn, starlette, httpx, ...) write through the same
processors: the root handler renders their records with structlog (same format, same masking,
an exception as one masked field), and uvicorn's loggers keep no handler of their own, so
nothing, not even a traceback uvicorn logs for an exception that reached it, is written raw.
``rotator serve`` builds uvicorn with ``log_config=None`` so that uvicorn leaves this alone.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from rotator.scrub import mask

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _mask_values(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = mask(value)
    return event


def _logger_name(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """For a standard library record: which logger wrote it (and its message without the
    trailing newline some add, uvicorn's "Exception in ASGI application" for one)."""
    record = event.get("_record")
    if record is not None:
        event["logger"] = record.name
        event["event"] = str(event.get("event", "")).rstrip()
    return event


class _SafeWriter(structlog.WriteLogger):
    """structlog's writer, minus the exception when stderr is gone (a closed pipe: the
    process that read it died). A log line must never stop what it reports on, least of all
    a shutdown: the line is dropped."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # BrokenPipeError, a closed file
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SafeWriterFactory:
    def __init__(self, file: Any) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _SafeWriter:
        return _SafeWriter(self._file)


def configure(level: str = "info", fmt: str = "console") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            _mask_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # one write per line: processes sharing stderr (run-due's workers) never split a line
        logger_factory=_SafeWriterFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # the standard library's records: rendered by the same processors (masking included); an
    # exception becomes one masked field (format_exc_info), never a raw traceback
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.processors.add_log_level, stamp, _logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _mask_values,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for name in UVICORN_LOGGERS:  # a uvicorn configured earlier in the process had its own
        uvicorn = logging.getLogger(name)
        uvicorn.handlers.clear()
        uvicorn.propagate = True
    for noisy in ("httpx", "httpcore", "apscheduler", "botocore", "urllib3", "azure", "alembic"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
