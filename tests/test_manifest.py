"""aquila.manifest: what it catches, its once-per-process check, and `python -m aquila.manifest`."""

from __future__ import annotations

import json

import pytest

from aquila import manifest
from aquila.errors import AquilaError


def _dir(tmp_path):
    d = tmp_path / "step"
    (d / "optim").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights" * 100)
    (d / "config.json").write_text("{}")
    (d / "optim" / "0.distcp").write_bytes(b"adam" * 10)
    manifest.write_manifest(d)
    return d


def test_manifest_catches_truncation_a_flipped_bit_and_a_bad_manifest(tmp_path):
    d = _dir(tmp_path)
    assert manifest.verify_manifest(d) and manifest.verify_manifest(d, top_level_only=True)
    assert not manifest.verify_manifest(tmp_path)  # no manifest: nothing to check
    (d / "optim" / "0.distcp").write_bytes(b"ADAM" * 10)  # same size, other bytes
    assert manifest.verify_manifest(d, top_level_only=True)  # a model loader's files are intact
    with pytest.raises(AquilaError, match=r"0.distcp: checksum differs from .*manifest.json \(corrupt file\)"):
        manifest.verify_manifest(d)
    (d / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(AquilaError, match=r"model.safetensors: 7 bytes, expected 700 \(truncated or overwritten\)"):
        manifest.verify_manifest(d, top_level_only=True)
    (d / "manifest.json").write_text(json.dumps({"files": {"a": {"bytes": "1"}}}))
    with pytest.raises(AquilaError, match="corrupt manifest"):
        manifest.verify_manifest(d)


def test_a_verified_directory_is_not_read_again_until_it_changes(tmp_path, monkeypatch):
    d = _dir(tmp_path)
    assert manifest.verify_manifest(d)
    real = manifest.crc32s
    monkeypatch.setattr(manifest, "crc32s", lambda paths: pytest.fail("read again"))
    assert manifest.verify_manifest(d) and manifest.verify_manifest(d, top_level_only=True)
    monkeypatch.setattr(manifest, "crc32s", real)
    (d / "config.json").write_text("[]")  # same size, new mtime: checked again
    with pytest.raises(AquilaError, match="config.json: checksum differs"):
        manifest.verify_manifest(d)


def test_top_level_only_also_checks_the_named_subdirs(tmp_path):
    d = _dir(tmp_path)
    (d / "model").mkdir()
    (d / "model" / "__0_0.distcp").write_bytes(b"shard" * 10)
    manifest.write_manifest(d)
    (d / "model" / "__0_0.distcp").write_bytes(b"SHARD" * 10)  # a sharded step's weights, same size
    (d / "optim" / "0.distcp").write_bytes(b"ADAM" * 10)
    assert manifest.verify_manifest(d, top_level_only=True)  # neither is a plain model directory's file
    with pytest.raises(AquilaError, match=r"model/__0_0.distcp: checksum differs"):
        manifest.verify_manifest(d, top_level_only=True, subdirs=("model",))


def test_manifest_cli_writes_and_verifies(tmp_path, capsys):
    d = _dir(tmp_path)
    (d / "manifest.json").unlink()
    assert manifest.main(["verify", str(d)]) == 2
    assert capsys.readouterr().err == f"error: {d}: no manifest.json\n"
    assert manifest.main(["write", str(d)]) == 0 and manifest.main(["verify", str(d)]) == 0
    assert capsys.readouterr().out == f"wrote {d / 'manifest.json'}\n{d}: every file matches manifest.json\n"
