"""Results are not silently corrupted; configuration is data only."""

from __future__ import annotations

import pytest

import spedflow
from spedflow.cli import main
from spedflow.errors import ParameterError
from spedflow.io import verify_store


@pytest.fixture(scope="module")
def result(tmp_path_factory, sim_store):
    out = tmp_path_factory.mktemp("sec") / "r.zarr"
    return spedflow.segment(sim_store, method="vdf", out=out, local=True, progress=False)


def test_every_written_array_is_checksummed(result):
    import zarr
    g = zarr.open_group(str(result), mode="r")
    from spedflow.io._store import _walk_arrays
    for name, arr in _walk_arrays(g):
        codecs = [type(c).__name__ for c in arr.metadata.codecs]
        assert "Crc32cCodec" in codecs, (name, codecs)


def test_a_flipped_byte_is_reported_by_info_verify(tmp_path, result, capsys):
    import shutil
    copy = tmp_path / "copy.zarr"
    shutil.copytree(result, copy)
    assert verify_store(copy) == []
    chunk = sorted((copy / "segments" / "maps" / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    bad = verify_store(copy)
    assert len(bad) == 1 and bad[0].startswith("segments/maps chunk")
    assert main(["info", str(copy), "--verify"]) == 2  # as every other error
    out = capsys.readouterr()
    assert "CORRUPT segments/maps" in out.out
    assert "1 chunk(s) failed verification" in out.err


def test_config_is_data_and_unknown_keys_are_named(tmp_path):
    from spedflow.api import load_config
    evil = tmp_path / "evil.toml"
    marker = tmp_path / "executed"
    evil.write_text(f'[peaks]\nthreshold = "__import__(\'os\').system(\'touch {marker}\')"\n')
    with pytest.raises(ParameterError):
        load_config("vdf", evil)
    assert not marker.exists()
    (tmp_path / "typo.toml").write_text("[watershed]\nmin_sizes = 3\n")
    with pytest.raises(ParameterError, match="min_sizes"):
        load_config("vdf", tmp_path / "typo.toml")
