"""kvmmmu tracepoints: the events (events.py), the ring buffers (ring.py), event filters
(filter.py), and recording and reading them (tracer.py). docs/tracing.md describes them."""
