"""Static checks of deploy/ (Docker cannot run here): files parse and agree."""

from __future__ import annotations

import ast
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SCHEDULER_PORT, DASHBOARD_PORT = 8786, 8787
DATA = "/data"
TLS_DIR = "/run/secrets/spedflow-tls"
TLS_ENV = {"DASK_CONFIG": f"{TLS_DIR}/dask-tls.yaml",
           "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}


@pytest.fixture(scope="module")
def image():
    """The tag the Dockerfile documents in its build command."""
    text = (DEPLOY / "Dockerfile").read_text()
    tags = set(re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", text))
    assert len(tags) == 1, tags
    return tags.pop()


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def k8s():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text()))
    return {d["kind"]: d for d in docs if d}


def test_dockerfile(image):
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["spedflow"]' in lines
    assert re.search(r"pip install \.", text)
    assert f"EXPOSE {SCHEDULER_PORT} {DASHBOARD_PORT}" in lines
    assert image.startswith("spedflow:")
    # the image's workers get the environment spedflow's local workers get
    m = re.search(r'DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="(\{[^"]*\})"', text)
    from spedflow.cluster import worker_environ
    assert m and ast.literal_eval(m.group(1)) == worker_environ()


_VOLUME = re.compile(r"^(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?$")  # SRC:DEST[:MODE]


def _mounts(service):
    """{container path: (source, mode)} of a compose service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        m = _VOLUME.match(v)
        assert m, v
        out[m.group(2)] = (m.group(1), m.group(3))
    return out


def test_compose_services_agree(compose, image):
    services = compose["services"]
    assert {"scheduler", "worker", "spedflow"} <= set(services)
    for name, svc in services.items():
        assert svc["image"] == image, name
        mounts = _mounts(svc)
        assert DATA in mounts and TLS_DIR in mounts, name
        assert mounts[TLS_DIR][1] == "ro", name
        env = svc["environment"]
        for key, value in TLS_ENV.items():
            assert env.get(key) == value, (name, key)
    # the same data and certificate sources everywhere
    assert len({_mounts(s)[DATA] for s in services.values()}) == 1
    assert len({_mounts(s)[TLS_DIR] for s in services.values()}) == 1


def test_compose_scheduler_and_workers(compose):
    sched, worker = compose["services"]["scheduler"], compose["services"]["worker"]
    cmd = sched["entrypoint"] + sched["command"]
    assert cmd[:2] == ["dask", "scheduler"]
    assert cmd[cmd.index("--protocol") + 1] == "tls"
    assert cmd[cmd.index("--port") + 1] == str(SCHEDULER_PORT)
    assert cmd[cmd.index("--dashboard-address") + 1].endswith(f":{DASHBOARD_PORT}")
    ports = sched["ports"]
    assert f"127.0.0.1:{DASHBOARD_PORT}:{DASHBOARD_PORT}" in ports
    assert all(p.startswith("127.0.0.1:") for p in ports), ports  # nothing on 0.0.0.0
    wcmd = worker["entrypoint"] + worker["command"]
    assert wcmd[:2] == ["dask", "worker"]
    assert wcmd[2] == f"tls://scheduler:{SCHEDULER_PORT}"
    assert wcmd[wcmd.index("--nthreads") + 1] == "1"
    assert "ports" not in worker  # workers are reached only inside the network
    assert int(worker["deploy"]["replicas"]) >= 1
    assert worker["deploy"]["resources"]["limits"]["memory"]
    client = compose["services"]["spedflow"]
    assert client["environment"]["SPEDFLOW_SCHEDULER"] == f"tls://scheduler:{SCHEDULER_PORT}"


def test_kubernetes_manifest(k8s, compose, image):
    assert set(k8s) == {"PersistentVolumeClaim", "DaskCluster"}
    dc = k8s["DaskCluster"]
    assert dc["apiVersion"] == "kubernetes.dask.org/v1"
    pvc = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    name = dc["metadata"]["name"]
    assert dc["spec"]["worker"]["replicas"] >= 1
    for role in ("worker", "scheduler"):
        pod = dc["spec"][role]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["image"] == image
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == TLS_ENV
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[DATA]]["persistentVolumeClaim"]["claimName"] == pvc
        assert "secretName" in volumes[mounts[TLS_DIR]]["secret"]
        assert container["resources"]["limits"]["memory"]
    worker = dc["spec"]["worker"]["spec"]["containers"][0]
    args = [worker["command"][0]] + worker["args"]
    assert args[:3] == ["dask", "worker", f"tls://{name}-scheduler:{SCHEDULER_PORT}"]
    sched = dc["spec"]["scheduler"]["spec"]["containers"][0]
    sargs = sched["args"]
    assert sargs[sargs.index("--protocol") + 1] == "tls"
    assert {p["containerPort"] for p in sched["ports"]} == {SCHEDULER_PORT, DASHBOARD_PORT}
    service = dc["spec"]["scheduler"]["service"]
    assert service["type"] == "ClusterIP"
    assert {p["port"] for p in service["ports"]} == {SCHEDULER_PORT, DASHBOARD_PORT}
    # the same image and mount paths as the compose file
    assert compose["services"]["worker"]["image"] == worker["image"]


def test_slurm_script_compiles(tmp_path):
    path = DEPLOY / "slurm" / "spedflow_slurm.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    text = path.read_text()
    assert "SLURMCluster(" in text and "spedflow.segment(" in text and "client=client" in text
    assert "worker_environ()" in text and "job_script_prologue" in text


def test_make_certs_runs(tmp_path):
    out = tmp_path / "certs"
    run = subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), str(out),
                          "--host", "scheduler,worker", "--config-dir", TLS_DIR],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"ca.pem", "dask-tls.yaml"} | {
        f"{r}{s}.pem" for r in ("scheduler", "worker", "client") for s in ("", "-key")}
    config = yaml.safe_load((out / "dask-tls.yaml").read_text())["distributed"]["comm"]
    assert config["require-encryption"] is True
    assert config["tls"]["ca-file"] == f"{TLS_DIR}/ca.pem"
    assert config["tls"]["worker"]["key"] == f"{TLS_DIR}/worker-key.pem"
    again = subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
