"""openaff push: the model folder's three files go to the Hub through huggingface_hub, tested up to the network."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from _mxnet_fixtures import COMPACT
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects

from openaff.cli import main

AFF8 = COMPACT / "aff_cifar_resnet_b1_c1_k10.params"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("push") / "aff8"
    assert main(["convert", str(AFF8), "-o", str(out)]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("openaff push: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_dry_run_lists_the_three_files(converted: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["push", str(converted), "me/aff8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"would upload config.json, model.safetensors, README.md from {converted} (")
    assert out.rstrip().endswith("to the model repository me/aff8")


def test_what_upload_folder_is_given(converted: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # A run folder holds more (last.pt, metrics): huggingface_hub's own filter keeps exactly the three files.
    run = Path(shutil.copytree(converted, tmp_path / "run"))
    for extra in ("last.pt", "metrics.csv", "curves.png", "config.yaml"):
        (run / extra).write_bytes(b"x")
    calls: dict[str, dict] = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", {"id": repo_id,
                                                                                                       **kw}))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw) and
                        type("Info", (), {"commit_url": "https://hub/commit/1"})())
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push", str(run), "me/aff8", "--private"]) == 0
    assert calls["create"] == {"id": "me/aff8", "repo_type": "model", "private": True, "exist_ok": True}
    upload = calls["upload"]
    assert (upload["repo_id"], Path(upload["folder_path"])) == ("me/aff8", run)
    sent = sorted(filter_repo_objects(sorted(p.name for p in run.iterdir()), allow_patterns=upload["allow_patterns"]))
    assert sent == ["README.md", "config.json", "model.safetensors"]
    out = capsys.readouterr().out
    assert "https://hub/commit/1" in out and 'timm.create_model("hf-hub:me/aff8", pretrained=True)' in out


def test_not_a_model_folder_is_one_line(converted: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["push", str(tmp_path), "me/x", "--dry-run"]) == 2
    assert "is not a model folder: it has no config.json, model.safetensors, README.md" in _error_line(capsys)
    no_card = Path(shutil.copytree(converted, tmp_path / "no-card"))
    (no_card / "README.md").unlink()
    assert main(["push", str(no_card), "me/x", "--dry-run"]) == 2
    assert "it has no README.md; write the card with openaff convert or openaff train" in _error_line(capsys)
    assert main(["push", str(tmp_path / "absent"), "me/x"]) == 2
    assert "is not a folder" in _error_line(capsys)
    assert main(["push", str(converted), "me/has space", "--dry-run"]) == 2
    assert "'me/has space' is not a Hugging Face repository id" in _error_line(capsys)


def test_no_token_is_one_line(converted: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    capsys.readouterr()
    assert main(["push", str(converted), "me/aff8"]) == 2
    assert "no Hugging Face token" in _error_line(capsys)


def test_a_refusing_endpoint_is_one_line(converted: Path, monkeypatch, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    # What HF_ENDPOINT sets when huggingface_hub is imported (in this process it already was).
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    capsys.readouterr()
    assert main(["push", str(converted), "me/aff8"]) == 2
    assert _error_line(capsys).startswith(f"openaff push: error: upload to {endpoint}/me/aff8 failed: ")
