"""What ``scripts/stack up --with-kafka-security`` needs besides the broker itself.

    python scripts/kafka_security.py certs DIR
        a CA of its own (DIR/ca.pem), and, signed by it, the broker's key and
        certificate for 127.0.0.1 and localhost (DIR/server.pem, PKCS#8, as Kafka's PEM
        key store wants it) and a client's (DIR/client.pem); kept if DIR/ca.pem exists
    python scripts/kafka_security.py scram BOOTSTRAP USER PASSWORD
        a SCRAM-SHA-512 user, through a listener that needs no login
"""

from __future__ import annotations

import sys
from pathlib import Path


def certs(directory: Path) -> None:
    import trustme
    from cryptography.hazmat.primitives import serialization

    if (directory / "ca.pem").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for name, hosts in (("server", ("127.0.0.1", "localhost")), ("client", ("ingestd",))):
        issued = ca.issue_cert(*hosts)
        key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        (directory / f"{name}.pem").write_bytes(pkcs8 + chain)
    for path in directory.iterdir():
        path.chmod(0o644)


def scram(bootstrap: str, user: str, password: str) -> None:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap})
    upsert = UserScramCredentialUpsertion(
        user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "certs":
        certs(Path(args[0]))
    elif command == "scram":
        scram(*args)
    else:
        sys.exit(f"unknown command {command!r}")
