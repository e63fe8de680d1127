"""Every error the project raises on bad input derives from one base class, GptOssError."""

import importlib
import inspect
import pkgutil

import gptoss_jax
from gptoss_jax.errors import GptOssError


def _project_modules():
    for package in (gptoss_jax,):
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            yield importlib.import_module(info.name)


def test_every_input_error_class_derives_from_the_base():
    input_errors = []
    for module in _project_modules():
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == module.__name__ and issubclass(value, (ValueError, KeyError)):
                input_errors.append(value)
    assert len(input_errors) >= 8, input_errors  # the walk found the modules' error classes
    strays = [e.__qualname__ for e in input_errors if not issubclass(e, GptOssError)]
    assert strays == []


def test_the_cli_reports_any_project_error_as_one_line(capsys, monkeypatch):
    from gptoss_jax import cli

    def fails(args):
        raise GptOssError("bad\n  input")

    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, fails))
    assert cli.main(["demo"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"{cli.PROG}: error: bad input\n"


class _FixedParser:
    def __init__(self, args, run):
        args.run = run
        self.args = args

    def parse_args(self, argv):
        return self.args
