"""`loraplex generate`: answers on the default model, streams, and reports a user's mistake without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.cli import main


def test_generate_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    """The default model answers the capital-of-France question with Paris (greedy)."""
    main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "12"])
    assert "Paris" in capsys.readouterr().out


def test_generate_with_adapter_dir(capsys: pytest.CaptureFixture[str], adapter_factory) -> None:  # type: ignore[no-untyped-def]
    """--adapter accepts a PEFT directory directly."""
    path = adapter_factory("cli", r=4, seed=21)
    main(["generate", "--prompt", "Say hello.", "--adapter", str(path), "--max-tokens", "6"])
    assert capsys.readouterr().out.strip()


def test_generate_bad_adapter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A broken adapter directory exits with status 2 and a one-line error naming the problem."""
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", "--adapter", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "adapter_config.json is not valid JSON" in err and "Traceback" not in err


def test_cluster_flags_are_checked_before_ray_starts(capsys: pytest.CaptureFixture[str]) -> None:
    """`loraplex cluster` shares serve's flags; a claim larger than the host tier, or joining a cluster without a
    shared adapter store, is a one-line error (and no Ray instance is started)."""
    with pytest.raises(SystemExit) as exc:
        main(["cluster", "--max-cpu-loras", "8", "--max-adapters-per-replica", "16"])
    assert exc.value.code == 2 and "raise --max-cpu-loras" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--adapter-dir is required with --ray-address"):
        main(["cluster", "--ray-address", "auto"])
