"""The settings of a celery worker on Redis Sentinel, as Celery's documentation sets it
up (``CELERY_BROKER_URL=sentinel://...;sentinel://...``); a stock worker reads them
through ``CELERY_CONFIG_MODULE``. The master's name is ``INGESTD_BROKER_MASTER_NAME``.

The visibility timeout is short: when the master dies, the messages the worker had
taken but not yet acknowledged cannot be put back on the dead master (kombu drops
them from the worker, "Restoring N unacknowledged message(s)" fails); their copies in
the replicated unacked hash come back on the new master only once the visibility
timeout has passed (an hour by default). A task must finish well within it, or it runs
twice."""

import os

broker_transport_options = {
    "master_name": os.environ.get("INGESTD_BROKER_MASTER_NAME", "ingestd"),
    "visibility_timeout": 10,
}
