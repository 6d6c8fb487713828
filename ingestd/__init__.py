"""ingestd: Kafka to Celery, fast and at-least-once."""
