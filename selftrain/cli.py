"""The `selftrain` command: LightningCLI for training, plus the corpus tools as subcommands.

``selftrain fit|validate|test --config X.yaml`` is LightningCLI over :class:`StudentLM` and
:class:`CorpusDataModule`. Every other subcommand (``generate``, ...) is a typed function
turned into a parser by jsonargparse, so each has ``--help`` and takes ``--config`` as well as
flags. This module only builds the CLI; the work lives in the modules it calls.

Heavy imports (Lightning, transformers) happen only in the subcommand that needs them, so
``selftrain --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from selftrain.errors import Interrupted, SelftrainError

TOOLS: dict[str, tuple[str, str, str]] = {
    "generate": ("selftrain.sampling.generate", "generate",
                 "sample corpora from a model's BOS token"),
    "decontaminate": ("selftrain.curation.decontaminate", "decontaminate",
                      "drop samples sharing an n-gram with benchmark items"),
    "replay": ("selftrain.curation.replay", "replay",
               "real-text baseline token-matched to a synthetic corpus"),
    "probeset": ("selftrain.probes.probeset", "probeset",
                 "held-out windows a model extracts verbatim (probe set)"),
    "plant": ("selftrain.probes.plant", "plant",
              "fine-tune canary windows into a base until extracted"),
    "proxies": ("selftrain.analysis.proxies", "proxies",
                "benchmark proximity and student NLL of a corpus; proximity split"),
    "pairs": ("selftrain.synthesis.pairs", "pairs",
              "related-document pairs of a real corpus (SBP synthesizer data)"),
    "synthesize": ("selftrain.synthesis.synthesize", "synthesize",
                   "one new document per seed document from an SBP synthesizer"),
    "evaluate": ("selftrain.analysis.evaluate", "evaluate",
                 "run a config's evaluation callbacks on a run's exports or a model"),
    "report": ("selftrain.analysis.report", "report",
               "figures, summary.md and report.html from many runs"),
    "findings": ("selftrain.analysis.findings", "findings",
                 "a sweep's fits judged by rules fixed before the run"),
    "sweep": ("selftrain.sweep.run", "sweep",
              "a grid of sources x temperatures x subsets x generations, as one command"),
    "configs": ("selftrain.shipped", "configs",
                "copy the shipped configs (debug data, lm-eval tasks) to OUT/configs"),
}
"""subcommand -> (module, function, one-line summary); imported only when used."""

TRAINER_COMMANDS = ("fit", "validate", "test")


def run_tool(name: str, argv: list[str]) -> object:
    """Run a non-training subcommand through jsonargparse (``--help`` and ``--config`` free).

    Args:
        name: a :data:`TOOLS` key.
        argv: its arguments.
    """
    from jsonargparse import CLI

    module, function, _ = TOOLS[name]
    target: Callable = getattr(importlib.import_module(module), function)
    return CLI(target, args=argv, prog=f"selftrain {name}", as_positional=False,
               exit_on_error=False)


def print_help() -> None:
    """Top-level help: the trainer subcommands and the tools."""
    lines = ["usage: selftrain <command> [--config FILE] [flags]", "",
             "training (LightningCLI; `selftrain fit --help` lists every flag):"]
    lines += ["  fit        train the student on a corpus (StudentLM + CorpusDataModule)",
              "  validate   held-out loss of a student (--data.eval_corpus, --ckpt_path)",
              "  test       same as validate, logged under test/"]
    lines += ["", "corpus tools (`selftrain <tool> --help`):"]
    lines += [f"  {name:<14} {summary}" for name, (_, _, summary) in TOOLS.items()]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``selftrain`` console script and ``python -m selftrain``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    argv_from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    package_log = logging.getLogger("selftrain")
    if not package_log.handlers:  # Lightning has its own handler; the root logger stays quiet
        package_log.addHandler(StderrHandler())
        package_log.setLevel(logging.INFO)
    try:
        check_config_files(argv)
        if not argv or argv[0] in ("-h", "--help"):
            print_help()
        elif argv[0] in TOOLS:
            run_tool(argv[0], argv[1:])
            sys.stdout.flush()  # a closed pipe is found here, not in the interpreter's exit
        else:
            from selftrain.trainer_cli import SelftrainCLI

            SelftrainCLI(args=None if argv_from_sys else argv)
    except argparse.ArgumentError as error:  # the parser's own refusal (parsers don't exit)
        command = " ".join(argv[:1]) if argv and not argv[0].startswith("-") else ""
        print(f"selftrain: error: {parser_error_line(str(error), command)}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `selftrain sweep --dry_run true | head`: stop quietly, as Unix
        _silence_stdout()      # tools do; 141 = 128 + SIGPIPE, what a shell reports for them
        sys.exit(141)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, exit 130 (128 + SIGINT)
        command = f"selftrain {argv[0]}" if argv else "selftrain"
        print(f"{command}: {_interrupt_message(interrupt)}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        cause = _user_error(error)
        if cause is None:
            raise
        print(f"selftrain: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush into a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to flush
        pass


class StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record is emitted.

    A plain ``StreamHandler`` keeps the stream it was made with; when ``main`` runs more than
    once in a process (tests, notebooks) that stream may since have been replaced and closed.
    """

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def check_config_files(argv: list[str]) -> None:
    """Refuse a ``--config`` file that is empty or not a YAML mapping, naming it and the line.

    The parser would say ``Problems parsing config: ... in "<unicode string>", line 3``, naming
    neither the file nor the flag. A value that is no file (an inline YAML string) is left to
    the parser.

    Args:
        argv: the command's arguments.
    """
    import yaml

    from selftrain.inputs import first_line

    given = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    given += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for name in given:
        path = Path(name)
        if not path.is_file():
            continue
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or first_line(error)
            raise SelftrainError(f"--config {path}: not valid YAML ({where}{problem}); fix "
                                 "the file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise SelftrainError(f"--config {path}: cannot read it ({error}); fix the path or "
                                 "its permissions") from None
        if loaded is None:
            raise SelftrainError(f"--config {path}: the file is empty; give a YAML mapping of "
                                 "flags, e.g. trainer: {max_epochs: 2}")
        if not isinstance(loaded, dict):
            raise SelftrainError(f"--config {path}: not a YAML mapping of flags (it holds a "
                                 f"{type(loaded).__name__}); give key: value lines")


def parser_error_line(message: str, command: str) -> str:
    r"""A parser's (multi-line) error as one line that names the flag and where help is.

    ``Parser key "data.batch_size":\n  Expected a <class 'int'>. Got value: abc`` becomes
    ``--data.batch_size: expected a <class 'int'>. Got value: abc (selftrain fit --help ...)``.

    Args:
        message: the parser's message.
        command: the subcommand, for the pointer to its ``--help``.
    """
    text = " ".join(line.strip(" -") for line in message.splitlines() if line.strip())
    text = re.sub(r'^Parser key "([^"]+)": *', lambda m: f"--{m.group(1)}: ", text)
    if len(text) > 400:
        text = text[:397] + "..."
    where = f"selftrain {command} --help" if command else "selftrain --help"
    return f"{text} ({where} lists every flag and its type)"


def _interrupt_message(interrupt: KeyboardInterrupt) -> str:
    """What was kept: the command's own :class:`Interrupted` message, else the general rule."""
    if isinstance(interrupt, Interrupted) and str(interrupt):
        return str(interrupt)
    return ("interrupted; outputs appear only once complete, so nothing half-written was left: "
            "rerun the command")


def _user_error(error: BaseException | None) -> SelftrainError | None:
    """The SelftrainError behind an error (jsonargparse wraps errors raised by nested classes)."""
    while error is not None:
        if isinstance(error, SelftrainError):
            return error
        error = error.__cause__
    return None


if __name__ == "__main__":
    main()
