"""The reference tasks in a ``celery worker`` instrumented with OpenTelemetry, as a user
of ingestd runs one to continue the producers' traces.

``opentelemetry-instrumentation-celery`` reads each task's ``traceparent`` and
``tracestate`` from the message headers and starts the task's span in that trace.
Spans go to an in-memory exporter; the task ``traced.finished_spans`` writes what it
holds to Redis (``<prefix>spans``: span name, trace id, parent span id, the task id),
so that a test can read it from outside the worker. Run with ``--pool solo``: one
process, so the exporter the tasks write to is the one that task reads. Celery is
instrumented when the worker starts, not on import: a test that imports
``SPANS_KEY`` must not instrument its own process's ``send_task``.
"""

from __future__ import annotations

import json
from typing import Any

from celery import signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ingestd.celery.reference_tasks import RESULTS_PREFIX, _results, app

SPANS_KEY = RESULTS_PREFIX + "spans"
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))


@signals.worker_init.connect
def _instrument(**_: Any) -> None:
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)


@app.task(name="traced.finished_spans")
def finished_spans() -> int:
    spans = [{"name": s.name, "trace_id": f"{s.context.trace_id:032x}",
              "parent_span_id": f"{s.parent.span_id:016x}" if s.parent else None,
              "task_id": (s.attributes or {}).get("celery.task_id")
              or (s.attributes or {}).get("messaging.message.id")}
             for s in exporter.get_finished_spans()]
    _results().set(SPANS_KEY, json.dumps(spans))
    return len(spans)
