"""The download path of `spedflow fetch`, against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import threading

import numpy as np
import pytest

from spedflow import datasets
from spedflow.errors import InputError


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_first = 0      # bytes after which the first full response is cut off
    served = None      # list of (range start, bytes sent)

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body = self.payload[start:]
        cut = type(self).cut_first
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if cut and not rng:
            type(self).cut_first = 0
            self.served.append((start, cut))  # before sending: the client may finish first
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True  # the connection ends mid-download (short body)
            return
        self.served.append((start, len(body)))  # before sending (see above)
        self.wfile.write(body)


@pytest.fixture
def server():
    payload = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    handler = type("H", (_Handler,), {"payload": payload, "served": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd, handler
    httpd.shutdown()
    httpd.server_close()


def _url(httpd):
    return f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"


def test_download_verifies_checksum(server, tmp_path):
    httpd, h = server
    md5 = "md5:" + hashlib.md5(h.payload).hexdigest()
    out = datasets.download(_url(httpd), tmp_path / "f.bin", checksum=md5, progress=False)
    assert out.read_bytes() == h.payload
    # a second call finds the verified file and downloads nothing
    n = len(h.served)
    datasets.download(_url(httpd), tmp_path / "f.bin", checksum=md5, progress=False)
    assert len(h.served) == n


def test_wrong_checksum_is_refused_and_nothing_kept(server, tmp_path):
    httpd, _ = server
    with pytest.raises(InputError, match="checksum mismatch"):
        datasets.download(_url(httpd), tmp_path / "f.bin", checksum="md5:" + "0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.part").exists()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    httpd, h = server
    h.cut_first = 100_000
    sha = "sha256:" + hashlib.sha256(h.payload).hexdigest()
    out = datasets.download(_url(httpd), tmp_path / "f.bin", checksum=sha, progress=False)
    assert out.read_bytes() == h.payload
    # (handler threads may record out of order)
    assert (0, 100_000) in h.served
    assert (100_000, 200_000) in h.served  # the rest came with a Range request


def test_unreachable_server_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="failed after 2 attempts"):
        datasets.download("http://127.0.0.1:9/none", tmp_path / "f.bin", checksum=None,
                          progress=False, retries=2, timeout=2)


def test_fetch_unknown_name():
    with pytest.raises(InputError, match="unknown data set"):
        datasets.fetch("no_such_set")


def test_registry_knows_the_paper_data():
    reg = datasets.REGISTRY
    assert reg["mgo_nano"].checksum == "md5:38a03c23cec147a9cffab9ea349cd15a"
    assert "3382874" in reg["mgo_bergh2019"].doi
    assert len(reg) >= 3
    for d in reg.values():
        assert d.checksum is None or d.checksum.split(":")[0] in ("md5", "sha256")
