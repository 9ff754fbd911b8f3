"""Usage errors (issue 27): one line, exit 2, pointing to the help of the command that was
used, in the project's words rather than Typer's validation library's."""

from typing import Annotated

import pytest
from cli_support import invoke
from pydantic import Field, TypeAdapter, ValidationError

from selfextend_cli.options import plain_validation_message


def one_usage_line(result) -> str:
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize(
    "args, command",
    [
        (["ask", "doc.md", "-q"], "selfextend ask"),
        (["ask", "-m"], "selfextend ask"),
        (["summarize", "doc.md", "--style"], "selfextend summarize"),
        (["cache", "list", "--cache-dir"], "selfextend cache list"),
        (["eval", "passkey", "--lengths"], "selfextend eval passkey"),
        (["ask", "doc.md", "--bogus"], "selfextend ask"),
        (["eval", "nosuch"], "selfextend eval"),
        (["nosuch"], "selfextend"),
    ],
)
def test_a_usage_error_points_to_the_help_of_the_command_used(args, command):
    line = one_usage_line(invoke(*args))
    assert line.endswith(f"(see {command} --help)"), line


@pytest.mark.parametrize(
    "args, said",
    [
        (["summarize", "doc.md", "--style", "bulets"], "'bulets' is not one of 'bullets', 'paragraph'"),
        (["ask", "doc.md", "-q", "x", "-G", "abc"], "'abc' is not a whole number"),
        (["ask", "doc.md", "-q", "x", "-G", "0"], "0 must be at least 1"),
        (["ask", "doc.md", "-q", "x", "--seed", "1.5"], "'1.5' is not a whole number"),
        (["eval", "passkey", "--trials", "5000"], "5000 must be at most 1000"),
    ],
)
def test_validation_errors_are_in_the_projects_words(args, said):
    line = one_usage_line(invoke(*args))
    assert said in line, line
    for leaked in ("Value error", "Input should be", "pydantic", "ValidationError"):
        assert leaked not in line, line


def test_rewording_a_validation_error_of_pydantic_itself():
    def message(annotation, value):
        with pytest.raises(ValidationError) as caught:
            TypeAdapter(annotation).validate_python(value)
        return plain_validation_message(str(caught.value), caught.value)

    assert message(Annotated[int, Field(gt=2)], 1) == "1 must be more than 2"
    assert message(float, "many") == "'many' is not a number"
    assert message(list[int], 3).startswith(
        "3 should be a valid list"
    )  # no wording of ours: pydantic's, its value named
    assert plain_validation_message("Value error, 'x' is bad.") == "'x' is bad."
