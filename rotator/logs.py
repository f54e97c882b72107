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

Importing structlog costs a command more than its own work does (``rotator get`` is called in
loops), so :func:`configure` imports it only when something logs: the standard library's
handler builds its formatter at its first record, and structlog itself is configured the moment
a module imports it (or at once, when one already has).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable, MutableMapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

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


def _renderer(fmt: str) -> Any:
    import structlog

    if fmt == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


def _safe_writer_factory(file: Any) -> Callable[..., Any]:
    import structlog

    class SafeWriter(structlog.WriteLogger):
        """structlog's writer, minus the exception when stderr is gone (a closed pipe: the
        process that read it died). A log line must never stop what it reports on, least of
        all a shutdown: the line is dropped."""

        def msg(self, message: str) -> None:
            with contextlib.suppress(OSError, ValueError):  # BrokenPipeError, a closed file
                super().msg(message)

        log = debug = info = warn = warning = msg
        fatal = failure = err = error = critical = exception = msg

    return lambda *_args: SafeWriter(file)


def _configure_structlog(lvl: int, fmt: str) -> None:
    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _mask_values,
            _renderer(fmt),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # one write per line: processes sharing stderr (run-due's workers) never split a line
        logger_factory=_safe_writer_factory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler: the standard library's records rendered by structlog's processors
    (masking included; an exception becomes one masked field, never a raw traceback). The
    formatter is made at the first record, so a command that logs nothing imports no
    structlog."""

    def __init__(self, stream: Any, fmt: str) -> None:
        super().__init__(stream)
        self._fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        if self.formatter is None:
            import structlog

            stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
            self.setFormatter(
                structlog.stdlib.ProcessorFormatter(
                    foreign_pre_chain=[structlog.processors.add_log_level, stamp, _logger_name],
                    processors=[
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        _mask_values,
                        _renderer(self._fmt),
                    ],
                )
            )
        return super().format(record)


class _ThenLoader(importlib.abc.Loader):
    """A module's own loader, plus something to run once the module is loaded."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then()


class _ConfigureOnImport(importlib.abc.MetaPathFinder):
    """Configures structlog (as the last :func:`configure` asked) as soon as it is imported,
    before the module that imports it can log."""

    pending: tuple[int, str] | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "structlog":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenLoader(spec.loader, self._configure)
        return spec

    def _configure(self) -> None:
        if self.pending is not None:
            _configure_structlog(*self.pending)


_on_import = _ConfigureOnImport()


def configure(level: str = "info", fmt: str = "console") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    if "structlog" in sys.modules:
        _configure_structlog(lvl, fmt)
    else:
        _on_import.pending = (lvl, fmt)
        if _on_import not in sys.meta_path:
            sys.meta_path.insert(0, _on_import)
    root = logging.getLogger()
    root.handlers[:] = [_Handler(sys.stderr, fmt)]
    root.setLevel(lvl)
    for name in UVICORN_LOGGERS:  # a uvicorn configured earlier in the process had its own
        uvicorn = logging.getLogger(name)
        uvicorn.handlers.clear()
        uvicorn.propagate = True
    for noisy in ("httpx", "httpcore", "apscheduler", "botocore", "urllib3", "azure", "alembic"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
