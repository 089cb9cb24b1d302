"""The command line."""

import subprocess
import sys

import pytest

import hf_knowedit
from hf_knowedit.cli import build_parser, main


def test_info_lists_architectures_and_methods(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert hf_knowedit.__version__ in out
    for t in ("gpt2", "llama", "gemma3_text"):
        assert t in out
    for m in hf_knowedit.available_methods():
        assert m in out


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "hf_knowedit", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "architectures:" in done.stdout


def test_parser_requires_subject_and_target():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["edit", "--prompt", "{} is in"])
    args = build_parser().parse_args(
        ["edit", "--prompt", "{} is in", "--subject", "A", "--target", "B", "--layers", "3,4"]
    )
    assert args.model == "bundled" and args.layers == "3,4" and args.method == "rome"
