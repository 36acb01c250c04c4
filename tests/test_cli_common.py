"""The commands' shared runner (xfel_spread.cli.common): a user error is one line and status 1; a bug
keeps its traceback and a non-zero status."""

import subprocess
import sys
import textwrap

import pytest

from xfel_spread.cli.common import run_command
from xfel_spread.config import ConfigError
from xfel_spread.errors import USER_PATH_ERRORS, OptionError, UserInputError, error_line, is_user_error
from xfel_spread.hitfind.tables import HitfindFileError
from xfel_spread.io.shard import ShardFormatError
from xfel_spread.mpi import AgreedError
from xfel_spread.stage1.refine import NonFiniteError


def raising(error):
    def action():
        raise error
    return action


def test_a_user_input_error_is_exactly_one_line_and_status_1(capsys):
    assert run_command("spread-x", raising(ConfigError("c.yaml: stage1.device: 'gpu' is not one of ..."))) == 1
    assert capsys.readouterr().err == "spread-x: error: c.yaml: stage1.device: 'gpu' is not one of ...\n"


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    assert run_command("spread-x", lambda: open(missing)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spread-x: error: ") and str(missing) in lines[0]


def test_an_action_that_returns_is_status_0(capsys):
    assert run_command("spread-x", lambda: None) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyError("key"), OSError("disk"), TypeError("type")],
                         ids=["ValueError", "KeyError", "OSError", "TypeError"])
def test_anything_else_is_a_bug_and_propagates(error):
    with pytest.raises(type(error)):
        run_command("spread-x", raising(error))


def test_a_bug_in_a_command_prints_its_traceback_and_fails():
    program = textwrap.dedent("""
        import sys
        from xfel_spread.cli.common import run_command

        def action():
            {}["missing key"]

        sys.exit(run_command("spread-x", action))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "KeyError: 'missing key'" in result.stderr
    assert "spread-x: error:" not in result.stderr


def test_input_error_classes_are_user_errors_and_keep_their_old_base():
    assert issubclass(ConfigError, UserInputError) and issubclass(ConfigError, ValueError)
    assert issubclass(HitfindFileError, UserInputError) and issubclass(HitfindFileError, ValueError)
    assert issubclass(AgreedError, UserInputError) and issubclass(OptionError, ValueError)
    assert issubclass(ShardFormatError, UserInputError)
    assert is_user_error(ShardFormatError("s.h5", "not a shard"))
    assert all(is_user_error(kind("x")) for kind in USER_PATH_ERRORS)
    # A bug is not the user's to fix.
    assert not is_user_error(NonFiniteError("non-finite NLL"))
    assert not is_user_error(ValueError("x")) and not is_user_error(OSError("x"))
    assert error_line("spread-x", OptionError("--shots 3 1: need 0 <= START < STOP")) == \
        "spread-x: error: --shots 3 1: need 0 <= START < STOP"


def test_simulate_refuses_an_empty_shot_range_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xfel_spread.cli.simulate", "--config", tmp_path / "c.yaml",
                             "--amplitudes", tmp_path / "a.h5", "--shots", "3", "1", "--nopsf", tmp_path / "n.h5",
                             "--psf", tmp_path / "p.h5", "--truth", tmp_path / "t.json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["spread-simulate: error: --shots 3 1: need 0 <= START < STOP"]
