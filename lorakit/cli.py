"""``lorakit <command> ...``: a thin dispatcher; each command lives in its own module.

Every command is a module ``lorakit/commands/<name>.py`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status).  Only the chosen command's module is imported, so one command's
heavy or broken imports never block another (and ``lorakit --help`` stays fast).  To add a command, add a
line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from lorakit.atomic import DISK_ERRNOS
from lorakit.errors import LorakitError, WrongBaseModelError
from lorakit.quiet import silence_third_party

#: command -> (module, one-line help for `lorakit --help`; reading each module's HELP would import every
#: command).  A command's own HELP describes it in `lorakit <command> --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lorakit.commands.train", "train an adapter, embedding or model from a folder of images"),
    "inspect": ("lorakit.commands.inspect", "show what an adapter file holds: algorithm, modules, ranks, metadata"),
    "eval": ("lorakit.commands.eval", "judge checkpoints: generate, measure, rank; metrics and an HTML report"),
    "report": ("lorakit.commands.report", "one HTML page for a training run from what its folder holds"),
    "world": ("lorakit.commands.world", "the built-in shapes world: pretrain, quality, dataset, experiment, ..."),
    "sample": ("lorakit.commands.sample", "images from a base model with any number of adapters and embeddings"),
    "merge": ("lorakit.commands.merge", "bake adapters into a base model, or combine them into one adapter file"),
    "extract": ("lorakit.commands.extract", "an adapter from the difference of two models, by SVD"),
    "resize": ("lorakit.commands.resize", "lower an adapter's rank, or convert any adapter to plain LoRA"),
    "convert": ("lorakit.commands.convert",
                "rewrite an adapter in the kohya or diffusers/PEFT key layout, the same ΔW"),
    "interrogate": ("lorakit.commands.interrogate",
                    "the words an adapter changes most: its trigger and caption words, read off the weights"),
}


#: OS errors that are the user's to fix (a missing or protected file, a folder where a file belongs); with a
#: full disk, a file-size limit or a full quota (DISK_ERRNOS) they print a message; any other error, a bug inside
#: lorakit or torch included, a traceback
USER_OS_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                             NotADirectoryError, FileExistsError)


def show_own_warnings(command: str) -> None:
    """Print lorakit's own warnings (about the user's images, captions and settings) as one line naming the
    command, as its errors are; Python's "file:line: Category" header and the echoed source line mean nothing to
    a user.  Other warnings keep Python's format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "lorakit":
            print(f"lorakit {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    # the modules' log warnings (a sample size rounded, an SD2.x file that does not say its prediction) alike; one
    # handler for the process, whose line names the command of the latest call
    _LOG_HANDLER.setFormatter(logging.Formatter(f"lorakit {command}: warning: %(message)s"))
    if _LOG_HANDLER not in logging.getLogger("lorakit").handlers:
        logging.getLogger("lorakit").addHandler(_LOG_HANDLER)


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (pytest's capture replaces it between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_LOG_HANDLER = _StderrHandler()
_LOG_HANDLER.setLevel(logging.WARNING)


def unrecognized(arguments: Sequence[str], parser: argparse.ArgumentParser, aliases: dict[str, str],
                 extra_hint: str | None = None) -> str:
    """argparse's "unrecognized arguments" message, with what was probably meant after each option: lorakit's
    name for a kohya option (``aliases``), the same option written with dashes, or the closest of the command's
    own options; after an argument that is no option, the command's ``extra_hint`` (another tool's argument order,
    say)."""
    options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    said = []
    for argument in arguments:
        name = argument.split("=", 1)[0]
        dashed = "--" + name.lstrip("-").replace("_", "-")
        hint = None
        if name.startswith("-"):
            if dashed in aliases:
                hint = aliases[dashed]
            elif dashed in options:
                hint = dashed
            else:
                close = difflib.get_close_matches(dashed, options, n=1, cutoff=0.7)
                hint = close[0] if close else None
        elif not said or not said[-1].startswith("-") or "=" in said[-1].split(" ", 1)[0]:  # not an option's value
            hint = extra_hint
        said.append(f"{argument} (did you mean {hint}?)" if hint and not hint.startswith("(") else
                    f"{argument} {hint}" if hint else argument)
    return "unrecognized arguments: " + " ".join(said)


def version_line() -> str:
    """lorakit's version and those of the libraries a bug report needs (read from the installed metadata: importing
    torch for ``--version`` would take seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"lorakit {of('lorakit')} (Python {sys.version.split()[0]}; torch {of('torch')}, diffusers "
            f"{of('diffusers')}, transformers {of('transformers')}, safetensors {of('safetensors')})")


class ShowVersion(argparse.Action):
    """``--version``: argparse's own action rewraps the line at the terminal's width, and reads the versions even
    when the flag is not given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_line())
        parser.exit()


def innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand the line chose (``lorakit world dataset``'s, not ``lorakit world``'s), so that an
    error shows the usage of what was run."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return innermost_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose anywhere on the line: the libraries' own warnings and progress bars are shown (for debugging)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not verbose:
        silence_third_party()  # before any command imports transformers or diffusers
    parser = argparse.ArgumentParser(prog="lorakit", description="Train, inspect and use LoRA-family adapters.",
                                     epilog="--verbose (anywhere): also show the libraries' own warnings and bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    parsers = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}
    parser.add_argument("--version", action=ShowVersion, nargs=0, help="lorakit's version and its libraries'")
    if not argv:  # what a first try shows: the commands, not only "the following arguments are required"
        parser.print_help()
        return 2
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        parser.error(f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                     + f"; the commands: {', '.join(COMMANDS)}")
    command = argv[0] if argv and argv[0] in COMMANDS else None
    module = None
    if command is not None:
        try:  # the libraries a command imports take seconds: a Ctrl-C meanwhile is not a crash
            module = importlib.import_module(COMMANDS[command][0])
        except KeyboardInterrupt:
            print(f"lorakit {command}: interrupted", file=sys.stderr)
            return 130
        parsers[command].description = module.HELP
        module.add_arguments(parsers[command])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen = innermost_parser(parsers.get(command, parser), args)
        chosen.error(unrecognized(unknown, chosen, {**getattr(module, "KOHYA_OPTIONS", {}),
                                                    **getattr(module, "GUESSED_OPTIONS", {})},
                                  getattr(module, "EXTRA_ARGUMENT_HINT", None) if chosen is parsers.get(command)
                                  else None))
    if getattr(args, "task", None):  # "lorakit world grid: error: ...", as argparse names a task's own refusals
        command = f"{command} {args.task}"
    show_own_warnings(command)
    try:
        return int(module.run(args))
    except (LorakitError, *USER_OS_ERRORS) as err:  # the user's mistake: a message, not a traceback
        code = getattr(err, "exit_code", 2)
        said = str(err)
        if isinstance(err, OSError) and err.filename is not None and err.strerror:  # "[Errno 13] ...: 'x'"
            said = f"{err.filename}: {err.strerror}" + (f" (and {err.filename2})" if err.filename2 else "")
        if isinstance(err, WrongBaseModelError) and getattr(module, "DEFAULT_MODEL_IS_BUILT_IN", False) \
                and getattr(args, "model", "") is None:  # the user may not know a model was chosen for them
            said += ("; no --model was given, so that was the built-in shapes-world model: give the base model "
                     "the file was made for (--model DIR or FILE)")
        print(f"lorakit {command}: {'' if code == 130 else 'error: '}{said}", file=sys.stderr)
        return code
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise  # anything else is a bug (or a broken system): its traceback helps
        where = f"{err.filename}: " if err.filename else ""
        print(f"lorakit {command}: error: {where}{err.strerror} (a full disk, a file-size limit or a full quota); "
              "lorakit's writes are atomic, so no half-written file was left: free space and run the same command "
              "again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, scanning): nothing to resume
        print(f"lorakit {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
