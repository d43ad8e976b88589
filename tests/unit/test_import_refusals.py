"""`fhe-bento import` refuses, with a message and no traceback, folders it cannot serve."""

from __future__ import annotations

from click.testing import CliRunner

from fhe_bento.modelkit.cli import main


def test_a_hybrid_folder_of_glwe_layers_is_refused_with_the_reason(tmp_path) -> None:
    """What `HybridFHEModel.save_and_clear_private_info` writes when every layer runs on concrete-ml's
    GLWE executor: the weights, and no circuit folder."""
    (tmp_path / "model.pth").write_bytes(b"weights")
    (tmp_path / "complete_model.pth").write_bytes(b"private weights")
    result = CliRunner().invoke(main, ["import", str(tmp_path), "--name", "big-lora"])
    assert result.exit_code == 1
    assert "GLWE executor" in result.output and "512x512" in result.output
    assert "Traceback" not in result.output


def test_a_folder_without_circuits_is_refused_with_what_is_missing(tmp_path) -> None:
    result = CliRunner().invoke(main, ["import", str(tmp_path), "--name", "nothing"])
    assert result.exit_code == 1
    assert "client.zip is missing" in result.output
