"""Mutual TLS: a real `dask scheduler --protocol tls` + worker, certificates from
deploy/make_certs.py; only clients holding a certificate from the cluster's CA get in."""

from __future__ import annotations

import importlib.util
import re
import socket
import ssl
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

pytest.importorskip("cryptography")

from cluster_utils import ProcessCluster, TLSFiles  # noqa: E402
from spedflow.cluster import client_for, compute  # noqa: E402
from spedflow.errors import InputError  # noqa: E402

pytestmark = pytest.mark.cluster

MAKE_CERTS = Path(__file__).resolve().parents[1] / "deploy" / "make_certs.py"
TIMEOUT = 3  # seconds: refusals are immediate, this only bounds a hang


def _load_make_certs():
    spec = importlib.util.spec_from_file_location("make_certs", MAKE_CERTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    mc = _load_make_certs()
    root = tmp_path_factory.mktemp("tls")
    good = mc.make_certs(root / "cluster", ["scheduler", "10.1.2.3"])
    other = mc.make_certs(root / "other", ca_name="someone else's CA")
    return good, other


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    good, _ = certs
    # The scheduler gets its certificates as command-line flags plus the
    # require-encryption switch; the worker only the YAML that make_certs wrote.
    with ProcessCluster(
            n_workers=1, protocol="tls", workdir=tmp_path_factory.mktemp("dask-tls"),
            scheduler_tls=TLSFiles(good["ca"], good["scheduler_cert"], good["scheduler_key"]),
            scheduler_env={"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"},
            worker_env={"DASK_CONFIG": str(good["config"])}) as pc:
        yield pc


def _files(paths, role="client", ca=None):
    return {"tls_ca_file": ca or paths["ca"], "tls_cert": paths[f"{role}_cert"],
            "tls_key": paths[f"{role}_key"]}


def test_certificates_chain_to_their_ca(certs):
    good, other = certs
    assert "ca_key" not in good  # the CA key is not left beside the certificates
    for role in ("scheduler", "worker", "client"):
        ctx = ssl.create_default_context(cafile=str(good["ca"]))
        ctx.load_cert_chain(good[f"{role}_cert"], good[f"{role}_key"])  # key matches
        assert oct(good[f"{role}_key"].stat().st_mode & 0o777) == "0o600"
    x509 = pytest.importorskip("cryptography.x509")
    cert = x509.load_pem_x509_certificate(good["worker_cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "scheduler"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    config = dask.config.collect([str(good["config"])], env={})
    tls = config["distributed"]["comm"]["tls"]
    assert config["distributed"]["comm"]["require-encryption"] is True
    assert tls["ca-file"] == str(good["ca"])
    assert tls["client"] == {"cert": str(good["client_cert"]), "key": str(good["client_key"])}


def test_valid_client_certificate_computes(tls_cluster, certs, capsys):
    good, _ = certs
    assert tls_cluster.address.startswith("tls://127.0.0.1:")
    x = da.from_array(np.arange(600.0).reshape(20, 30), chunks=(6, 7))
    with client_for(tls_cluster.address, timeout=TIMEOUT, **_files(good)) as client:
        assert client.scheduler.address.startswith("tls://")
        assert len(client.scheduler_info()["workers"]) == 1
        (total,) = compute(x.sum(), label="tls")
    assert total == np.arange(600.0).sum()
    assert "tls: [" in capsys.readouterr().err


def _flat_tls_config(paths):
    """The settings make_certs' YAML holds, as flat keys for dask.config.set."""
    flat = {"distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": str(paths["ca"])}
    for role in ("scheduler", "worker", "client"):
        flat[f"distributed.comm.tls.{role}.cert"] = str(paths[f"{role}_cert"])
        flat[f"distributed.comm.tls.{role}.key"] = str(paths[f"{role}_key"])
    return flat


def test_dask_config_certificates_are_used(tls_cluster, certs):
    """No files passed: Security() picks the client cert from dask's config."""
    good, _ = certs
    with dask.config.set(_flat_tls_config(good)):
        with client_for(tls_cluster.address, timeout=TIMEOUT, quiet=True):
            assert da.ones(50, chunks=7).sum().compute() == 50


def _probe(address, ca, cert=None, key=None) -> bytes:
    """Open a raw TLS connection to the scheduler and read its first byte."""
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw) as conn:
            conn.settimeout(TIMEOUT)
            return conn.recv(1)


def test_client_without_certificate_is_refused(tls_cluster, certs):
    good, _ = certs
    # spedflow refuses to try ...
    with pytest.raises(InputError, match="uses TLS but no client certificate"):
        with client_for(tls_cluster.address, timeout=TIMEOUT):
            pass
    # ... and the scheduler refuses a client that trusts it but shows no certificate
    # (TLS 1.3 reports it after the handshake, on the first read), while it talks
    # to the same client holding a certificate.
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        _probe(tls_cluster.address, good["ca"])
    assert _probe(tls_cluster.address, good["ca"], good["client_cert"], good["client_key"])


@pytest.mark.parametrize("trust", ["cluster CA", "other CA"])
def test_certificate_from_another_ca_is_refused(tls_cluster, certs, trust):
    """A client certificate signed by a different CA: the scheduler rejects it even
    when the client trusts the scheduler ('cluster CA'), and vice versa."""
    good, other = certs
    ca = good["ca"] if trust == "cluster CA" else other["ca"]
    with pytest.raises(InputError, match=r"cannot connect .*certificates are signed"):
        with client_for(tls_cluster.address, timeout=TIMEOUT, **_files(other, ca=ca)):
            pass


def test_plain_tcp_to_tls_port_is_refused(tls_cluster):
    tcp = tls_cluster.address.replace("tls://", "tcp://")
    with pytest.raises(InputError, match=r"cannot connect to the dask scheduler at tcp://"):
        with client_for(tcp, timeout=TIMEOUT):
            pass


def test_worker_certificate_from_another_ca_cannot_join(tls_cluster, certs, tmp_path):
    from cluster_utils import start_worker, wait_registered

    _, other = certs
    rogue = TLSFiles(other["ca"], other["worker_cert"], other["worker_key"])
    proc = start_worker(tls_cluster.address, tmp_path, name="rogue", tls=rogue, wait=False)
    try:
        with pytest.raises((TimeoutError, RuntimeError)):
            wait_registered(proc, timeout=TIMEOUT)
        log = proc.log()
        assert "Registered to" not in log
        assert re.search(r"SSL|certificate", log), log[-2000:]
    finally:
        proc.stop(grace=1.0)
