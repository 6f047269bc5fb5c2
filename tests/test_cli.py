from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.store import open_store


def test_vocab_cli_writes_table_and_summarises(tmp_path, capsys):
    rc = main(["--store", str(tmp_path / "s"), "vocab", "--root", "n02084071", "--max-depth", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "synsets table:" in out and str(tmp_path / "s") in out
    table = open_store(tmp_path / "s").read_table("synsets")
    assert "n02084071" in table.column("wnid").to_pylist()
    assert table.num_rows == 1 + len(set(table.column("wnid").to_pylist()) - {"n02084071"})


def test_vocab_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "w.txt"
    bad.write_text("n00000001\n")
    rc = main(["--store", str(tmp_path / "s"), "vocab", "--wnid-file", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "line 1: 'n00000001'" in err and "Traceback" not in err
    assert not open_store(tmp_path / "s").has_table("synsets")


def test_console_script_help_explains_options():
    exe = [sys.executable, "-m", "pipeline.cli", "vocab", "--help"]
    out = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    for option in ("--root", "--max-depth", "--leaves-only", "--wnid-file", "--exclude"):
        assert option in out


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_top_level_help(argv, capsys):
    try:
        main(argv)
    except SystemExit:
        pass
    assert "vocab" in capsys.readouterr().out
