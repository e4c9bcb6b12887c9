"""docs/bad_inputs.md is what the command line does with each class of bad input, done for real."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.py"


@pytest.fixture(scope="module")
def bad_inputs():
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(bad_inputs):
    return bad_inputs.run_cases()


def test_every_class_of_bad_input_gets_its_exit_code_and_a_message(bad_inputs, rows):
    assert len(rows) >= 20
    for case, row in zip(bad_inputs.CASES, rows):
        assert row.code == case.expect, f"{row.what}: exit {row.code}, {row.first_line}"
        assert row.first_line and not row.first_line.startswith("Traceback"), row


def test_the_page_is_current(bad_inputs, rows):
    assert bad_inputs.PAGE.read_text() == bad_inputs.render(rows), "run: python docs/bad_inputs.py"
