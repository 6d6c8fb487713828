"""One function gives every Kafka client its settings: a cluster's security reaches all."""

from __future__ import annotations

import pytest

from ingestd import kafka
from ingestd.config import load

SECURITY = ["security.protocol=SASL_SSL", "sasl.mechanism=SCRAM-SHA-512", "sasl.username=u",
            "sasl.password=p", "ssl.ca.location=/ca.pem",
            "enable.ssl.certificate.verification=true",
            "ssl.endpoint.identification.algorithm=https", "https.ca.location=/ca.pem",
            "https.ca.pem=PEM", "enable.sasl.oauthbearer.unsecure.jwt=false",
            "sasl.oauthbearer.method=oidc", "sasl.oauthbearer.extensions=a=1,b=2",
            "socket.keepalive.enable=true", "client.rack=r1", "message.max.bytes=2000000"]


@pytest.mark.parametrize("kind", ["consumer", "producer", "admin"])
def test_every_client_gets_every_property_that_applies_to_it(kind: str) -> None:
    config = load(["--bootstrap-servers", "k1:9093", *(f"-X{p}" for p in SECURITY),
                   "-X", "fetch.wait.max.ms=50", "-X", "linger.ms=20"]).config
    props = kafka.client_config(config, kind)
    assert props["bootstrap.servers"] == "k1:9093"
    for key, _, value in (p.partition("=") for p in SECURITY):
        assert props[key] == value, key
    assert ("fetch.wait.max.ms" in props) is (kind == "consumer")  # librdkafka: C
    assert ("linger.ms" in props) is (kind == "producer")  # librdkafka: P


def test_the_dead_letter_producer_and_the_consumer_share_them() -> None:
    config = load([*(f"-X{p}" for p in SECURITY)]).config
    producer, consumer = kafka.producer_config(config), kafka.consumer_config(config, 0)
    for key, _, value in (p.partition("=") for p in SECURITY):
        assert producer[key] == consumer[key] == value
    assert producer["enable.idempotence"] is True and consumer["enable.auto.commit"] is True
    assert producer["acks"] == "all"  # neither can -X change (PROTECTED_PROPERTIES)
