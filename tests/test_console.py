"""The one progress display: a tqdm bar on a terminal (also one that reports no size), a plain line without one."""

import io

from fetalpipe.runtime.console import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_progress_is_a_bar_with_the_counters():
    terminal = FakeTerminal()
    progress = Progress(10, unit="img", description="infer", stream=terminal)
    progress.update(4, {"errors": 1, "need review": 0})
    progress.update(6, {"errors": 0, "need review": 2})
    progress.close()
    last = terminal.getvalue().split("\r")[-1]
    assert "infer: 100%|" in last and "10/10" in last and "1 errors, 2 need review" in last


def test_without_a_terminal_it_prints_lines_at_most_every_interval_and_at_the_end():
    stream = io.StringIO()
    progress = Progress(100, unit="img", description="infer", stream=stream, interval_s=3600)
    for _ in range(10):
        progress.update(10, {"errors": 0})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: 100/100 img (100 %)") and lines[0].endswith("0 errors")
    assert "\r" not in stream.getvalue()


def _subcommand_parsers(parser):
    """(name, parser) for every subcommand, nested ones (`study run`) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield name, subparser
                yield from _subcommand_parsers(subparser)


def test_every_cli_option_says_what_it_does():
    from fetalpipe.cli import build_parser

    import argparse

    undocumented = [f"{name} {action.option_strings or action.dest}" for name, subparser in _subcommand_parsers(build_parser())
                    for action in subparser._actions
                    if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert undocumented == []


def test_train_defaults_to_the_shipped_recipe():
    from fetalpipe.cli import build_parser
    from fetalpipe.model.model_file import DEFAULT_MODEL_PATH, read_model_header

    args = build_parser().parse_args(["train", "--manifest", "m.csv", "--output", "run"])
    assert args.config == "ellipse_refine"
    assert "refinement" in read_model_header(DEFAULT_MODEL_PATH)["train_config"]  # the shipped file is that recipe's
