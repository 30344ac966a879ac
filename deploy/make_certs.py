#!/usr/bin/env python
"""Create a private CA and mutual-TLS certificates for a spedflow/dask cluster.

Writes into OUT_DIR::

    ca.pem                          the CA certificate (trusted by every role)
    scheduler.pem / scheduler-key.pem
    worker.pem / worker-key.pem
    client.pem / client-key.pem
    dask-tls.yaml                   dask config: require-encryption + the paths

Every process of the cluster presents a certificate signed by the CA and accepts only
peers whose certificates the CA signed (dask's TLS always requires client
certificates), so only holders of a certificate can submit work or join as a
worker. Scheduler and worker certificates allow server *and* client use (workers
and the scheduler connect to each other both ways); the client certificate only
client use. Subject alternative names cover 127.0.0.1, ::1, localhost and the
``--host`` names (IP addresses or DNS names, e.g. the compose service names
``scheduler`` and ``worker``).

The CA private key is needed only to sign certificates, never by the cluster, so it
is not written next to them (the whole OUT_DIR gets mounted into containers): it is
discarded unless ``--ca-key PATH`` names a file outside OUT_DIR to keep it in.

Usage::

    python deploy/make_certs.py OUT_DIR [--host NAME ...] [--days 365]
           [--config-dir /run/secrets/spedflow-tls] [--ca-key PATH] [--force]

``--config-dir`` is where the files will be *mounted* in containers; the YAML then
points there instead of at OUT_DIR. Keys are ECDSA P-256, written with mode 0600.
Requires the ``cryptography`` package (in spedflow's ``test`` extra).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import sys
from pathlib import Path

ROLES = ("scheduler", "worker", "client")
_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _x509():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit("make_certs.py needs the 'cryptography' package: pip install cryptography")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _san(hosts):
    x509 = _x509()[0]
    names, seen = [], set()
    for h in hosts:
        if h in seen:
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key) -> None:
    _, _, serialization, *_ = _x509()
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert) -> None:
    _, _, serialization, *_ = _x509()
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(name: str, days: int):
    x509, hashes, _, ec, _, NameOID = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spedflow"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_leaf(role: str, ca_key, ca_cert, hosts, days: int):
    x509, hashes, _, ec, EKU, NameOID = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    usages = [EKU.CLIENT_AUTH] if role == "client" else [EKU.SERVER_AUTH, EKU.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spedflow"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"spedflow-{role}")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_san(list(_DEFAULT_HOSTS) + list(hosts)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def dask_tls_yaml(config_dir: str | os.PathLike) -> str:
    """The dask config snippet pointing at the files in ``config_dir``."""
    d = str(config_dir).rstrip("/") or "/"
    lines = ["# dask config written by spedflow deploy/make_certs.py",
             "# use: export DASK_CONFIG=<dir with this file>, or copy to ~/.config/dask/",
             "distributed:", "  comm:", "    require-encryption: true", "    tls:",
             f"      ca-file: {d}/ca.pem"]
    for role in ROLES:
        lines += [f"      {role}:", f"        cert: {d}/{role}.pem",
                  f"        key: {d}/{role}-key.pem"]
    return "\n".join(lines) + "\n"


def make_certs(out_dir: str | os.PathLike, hosts=(), *, days: int = 365,
               config_dir: str | os.PathLike | None = None,
               ca_key_path: str | os.PathLike | None = None,
               ca_name: str = "spedflow cluster CA", force: bool = False) -> dict[str, Path]:
    """Create the CA, the three role certificates and ``dask-tls.yaml``.

    Parameters
    ----------
    out_dir : path
        Directory to write into (created).
    hosts : iterable of str
        Extra SAN entries (IP addresses or DNS names) for the certificates.
    days : int
        Validity in days.
    config_dir : path, optional
        Where the files will be found at run time (a container mount); default
        ``out_dir`` (absolute).
    ca_key_path : path, optional
        Keep the CA private key in this file (mode 0600); by default it is
        discarded. Must lie outside ``out_dir``.
    force : bool
        Overwrite existing files.

    Returns
    -------
    dict
        ``{"ca": ..., "<role>_cert": ..., "<role>_key": ..., "config": ...}`` paths
        (and ``"ca_key"`` if kept).
    """
    if int(days) < 1:
        raise ValueError(f"`days` must be >= 1 (got {days!r})")
    out = Path(out_dir).absolute()
    if ca_key_path is not None:
        ca_key_path = Path(ca_key_path).absolute()
        if out in ca_key_path.parents:
            raise ValueError(f"keep the CA key outside {out} (got {ca_key_path})")
    if not force and (out / "ca.pem").exists():
        raise FileExistsError(f"{out / 'ca.pem'} exists; pass --force to replace the CA")
    out.mkdir(parents=True, exist_ok=True)
    hosts = [h.strip() for h in hosts if h and h.strip()]
    ca_key, ca_cert = _make_ca(ca_name, int(days))
    paths = {"ca": out / "ca.pem"}
    _write_cert(paths["ca"], ca_cert)
    if ca_key_path is not None:
        ca_key_path.parent.mkdir(parents=True, exist_ok=True)
        paths["ca_key"] = ca_key_path
        _write_key(ca_key_path, ca_key)
    for role in ROLES:
        key, cert = _make_leaf(role, ca_key, ca_cert, hosts, int(days))
        paths[f"{role}_cert"] = out / f"{role}.pem"
        paths[f"{role}_key"] = out / f"{role}-key.pem"
        _write_cert(paths[f"{role}_cert"], cert)
        _write_key(paths[f"{role}_key"], key)
    paths["config"] = out / "dask-tls.yaml"
    paths["config"].write_text(dask_tls_yaml(config_dir if config_dir else out))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory for the CA, certificates and dask-tls.yaml")
    ap.add_argument("--host", action="append", default=[],
                    help="extra SAN host name or IP (repeatable, or comma-separated)")
    ap.add_argument("--days", type=int, default=365, help="validity in days (365)")
    ap.add_argument("--config-dir", default=None,
                    help="path where the files are mounted at run time (for dask-tls.yaml)")
    ap.add_argument("--ca-key", default=None,
                    help="keep the CA private key in this file (outside OUT_DIR); "
                         "default: discard it")
    ap.add_argument("--force", action="store_true", help="replace an existing CA")
    args = ap.parse_args(argv)
    hosts = [h for arg in args.host for h in arg.split(",")]
    try:
        paths = make_certs(args.out_dir, hosts, days=args.days, config_dir=args.config_dir,
                           ca_key_path=args.ca_key, force=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"make_certs.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote CA, scheduler/worker/client certificates and {paths['config']}")
    if "ca_key" in paths:
        print(f"CA key kept in {paths['ca_key']}: keep it off the cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
