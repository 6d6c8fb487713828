"""TLS to the Celery broker: verified by default, chain and host name.

kombu leaves a ``rediss://`` broker unverified unless told otherwise (it takes
``ssl_cert_reqs`` as none), so the broker's password goes to whoever answers;
and it checks an ``amqps://`` broker's chain but not its name. ingestd gives
kombu its own settings for both: the certificate must chain to the system's CAs
(or ``--broker-tls-ca``) and name the broker's host. ``--broker-tls-cert`` and
``--broker-tls-key`` answer a broker that asks for a client certificate.
``--broker-tls-insecure`` turns verification off, for tests, and warns.

kombu's own spelling in the URL's query (``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``) works too, where the
options do not say otherwise; it is taken out of the URL kombu is given.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ingestd.config import Config, broker_urls
from ingestd.errors import ConfigError

TLS_SCHEMES = ("rediss", "amqps")
# kombu's URL spelling, and the option each stands for.
QUERY = {"ssl_ca_certs": "broker_tls_ca", "ssl_certfile": "broker_tls_cert",
         "ssl_keyfile": "broker_tls_key", "ssl_cert_reqs": "", "ssl_check_hostname": ""}
_NONE = ("none", "cert_none")


@dataclass(frozen=True)
class BrokerTLS:
    """How to verify the broker, and what to show it."""

    ca: str | None  # None: the system's CAs
    cert: str | None
    key: str | None
    verify: bool

    def for_redis(self) -> dict[str, Any]:
        """kombu's Redis transport passes these to redis-py's SSLConnection, which loads a
        client certificate only given both files (one may hold both)."""
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE,
                "ssl_check_hostname": self.verify, "ssl_ca_certs": self.ca,
                "ssl_certfile": self.cert, "ssl_keyfile": self.key or self.cert}

    def for_amqp(self) -> dict[str, Any]:
        """py-amqp's TLS options; ``server_hostname`` None becomes the URL's host in kombu,
        and turns the host name check on."""
        opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE,
                                "ca_certs": self.ca, "certfile": self.cert, "keyfile": self.key}
        if self.verify:
            opts["server_hostname"] = None
        return opts


def _without_tls_query(url: str) -> tuple[str, dict[str, str]]:
    """``url`` less kombu's TLS query parameters, and those parameters."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    return (urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query
                                                       if k not in QUERY]))),
            {k: v for k, v in query if k in QUERY})


def resolve(config: Config) -> tuple[str, BrokerTLS | None]:
    """The URL to give kombu (without kombu's TLS query parameters), and the TLS to use:
    None for a plain ``redis://`` or ``amqp://`` broker. The URLs of a failover list
    share one TLS setting."""
    urls = broker_urls(config.broker_url)
    stripped = [_without_tls_query(u) for u in urls]
    url = ";".join(u for u, _ in stripped)
    tls = {urlsplit(u).scheme in TLS_SCHEMES for u in urls}
    if len(tls) > 1:
        raise ConfigError("broker-url: every URL of a failover list uses TLS (amqps://), "
                          "or none does")
    queries = {tuple(sorted(q.items())) for _, q in stripped if q}
    if len(queries) > 1:
        raise ConfigError("broker-url: the URLs of a failover list give different TLS "
                          "parameters; give them once, as --broker-tls-* options")
    if tls != {True}:
        return url, None
    given = dict(next(iter(queries), ()))
    reqs = given.get("ssl_cert_reqs", "required").lower()
    check = given.get("ssl_check_hostname", "true").lower()
    if reqs not in ("required", "cert_required", *_NONE) or check not in ("true", "false"):
        raise ConfigError("broker-url: ssl_cert_reqs must be required or none, and "
                          "ssl_check_hostname true or false")
    verify = not config.broker_tls_insecure and reqs not in _NONE and check == "true"
    return url, BrokerTLS(config.broker_tls_ca or given.get("ssl_ca_certs") or None,
                          config.broker_tls_cert or given.get("ssl_certfile") or None,
                          config.broker_tls_key or given.get("ssl_keyfile") or None, verify)


def use_ssl(config: Config) -> tuple[str, dict[str, Any] | None]:
    """The URL for kombu and Celery's ``broker_use_ssl`` for it."""
    url, tls = resolve(config)
    if tls is None:
        return url, None
    return url, tls.for_redis() if config.broker_is_redis else tls.for_amqp()


def insecure(config: Config) -> bool:
    """Whether a TLS broker goes unverified: what the start and --check warn about."""
    tls = resolve(config)[1]
    return tls is not None and not tls.verify
