"""The settings of a celery worker whose queues are RabbitMQ quorum queues, as Celery's
documentation sets them up; a stock worker reads them through ``CELERY_CONFIG_MODULE``."""

task_default_queue_type = "quorum"
task_create_missing_queue_type = "quorum"
