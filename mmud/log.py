"""structlog setup: JSON lines for journald off a terminal, readable console output on one.

Each JSON line carries a `<N>` syslog-priority prefix, which journald turns into PRIORITY=
(SyslogLevelPrefix= is on by default).  Third-party `logging` records, such as the FUSE
binding's failed-callback tracebacks, go through the same renderer.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")
_PRIO = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>"}
_json = structlog.processors.JSONRenderer()


def _journald_json(logger: WrappedLogger, method: str, event: EventDict) -> str:
    """One JSON line behind its `<N>` priority prefix, for journald to set PRIORITY= from.

    The renderer is typed to return bytes too (for serializers such as orjson); the default
    json.dumps gives str, and bytes would be decoded so the prefix can go in front.
    """
    line = _json(logger, method, event)
    text = line.decode() if isinstance(line, bytes) else line
    return _PRIO.get(event.get("level", ""), "<6>") + text


def setup_logging(level: str = "info") -> None:
    """Configure structlog and stdlib logging once per process (the simulation process too).

    Loggers are not cached on first use: a cached module-level logger would keep this
    configuration for good, where a later `structlog.configure` (a test's capture_logs, a
    process that configures again) must take effect. mmud logs events, not a hot path."""
    numeric = logging.getLevelName(level.upper())
    render: Processor = structlog.dev.ConsoleRenderer() if sys.stdout.isatty() else _journald_json
    shared: list[Processor] = [structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True),
              structlog.processors.format_exc_info]
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, *shared, render],
                        wrapper_class=structlog.make_filtering_bound_logger(numeric),
                        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render]))
    logging.basicConfig(handlers=[handler], level=max(numeric, logging.WARNING), force=True)
