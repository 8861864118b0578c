"""The `kdsearch` command."""

from __future__ import annotations

import _thread
import argparse
import atexit
import difflib
import errno
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from contextlib import suppress
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from kdsearch import __version__
from kdsearch.commands.export import cmd_export
from kdsearch.commands.promote import cmd_promote
from kdsearch.commands.run import cmd_run
from kdsearch.commands.studies import cmd_dashboard, cmd_report, cmd_trials
from kdsearch.commands.train import cmd_train
from kdsearch.display import console
from kdsearch.errors import KdsearchError, KdsearchWarning, NonFiniteLoss
from kdsearch.paths import output_failure
from kdsearch.recipe import MOST
from kdsearch.space import cluster_address, study_name_problem

if TYPE_CHECKING:
    from _typeshed import SupportsWrite


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with status 2, and refuses an option of
    one value given twice (argparse keeps the last without a word: `--trials 20 --trials 4`
    ran 4), and takes options only as spelled in full: argparse's prefixes read `promote
    --seed 1` (meant: seed 1) as `--seeds 1`, and a script's prefix would change meaning, or
    stop working, with each option added later."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        """As argparse's, but a write that fails is not ignored (`--help > /dev/full` ended 0
        with nothing said): where its reader has gone, status 141; else one line and status 2,
        as for a command's output. A write left in the buffer is checked as the command ends
        (`end_now`)."""
        if not message:
            return
        try:
            (file or sys.stderr).write(message)
        except BrokenPipeError:
            sys.exit(141)
        except OSError as err:
            with suppress(OSError):
                sys.stderr.write(f"kdsearch: error: {output_failure(err)}\n")
            sys.exit(2)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but arguments left over are the command's error (`kdsearch trials S
        extra`: see `kdsearch trials --help`), not the top parser's."""
        given = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(given, namespace)
        if extras:
            commands = next(
                (a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)),
                {},
            )
            command = str(getattr(parsed, "command", ""))
            before = given[: given.index(command)] if command in given else given
            # `kdsearch --bogus trials S` is the top parser's error, `kdsearch trials S x` the
            # command's
            owner = self if any(e in before for e in extras) else commands.get(command, self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}{owner.meant(extras)}")
        return parsed

    def meant(self, extras: Sequence[str]) -> str:
        """'; did you mean --seeds?' for each unknown option close to one of this parser's
        (`promote S --seed 1`, which is not read as `--seeds`), else ''."""
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        guesses = [
            (given, close[0])
            for given in (e.partition("=")[0] for e in extras if e.startswith("--"))
            if (close := difflib.get_close_matches(given, known, n=1, cutoff=0.75))
        ]
        if len(guesses) == 1:
            return f"; did you mean {guesses[0][1]}?"
        return (
            f"; did you mean {', '.join(f'{o} (for {g})' for g, o in guesses)}?" if guesses else ""
        )

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if args and str(args[0]).startswith("-") and "action" not in kwargs:
            kwargs["action"] = Once
        return super().add_argument(*args, **kwargs)


class Once(argparse.Action):
    """Store an option's value; the same option a second time is a usage error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given: dict[str, Any] = namespace.__dict__.setdefault("given_once", {})
        if self.dest in given:
            parser.error(
                f"{option_string} given twice ({given[self.dest]}, then {values}); give it once"
            )
        given[self.dest] = values
        setattr(namespace, self.dest, values)


def whole_number(text: str) -> int:
    """An option's value as an int (argparse names the option when this raises)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive(text: str) -> int:
    """A count or budget: at least 1, and at most what a study records (`recipe.MOST`)."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    if value > MOST:
        raise argparse.ArgumentTypeError(f"{value} is more than a study records ({MOST})")
    return value


def ray_address(text: str) -> str:
    """A Ray cluster's address (`space.cluster_address`)."""
    try:
        cluster_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def address_from_environment() -> str | None:
    """$RAY_ADDRESS, as `ray job submit` and Ray's pods set it: `--address`'s default, and what
    `--address auto` means too (Ray reads the variable first). Checked here rather than by
    argparse, so that a bad value is named as the variable it is."""
    text = os.environ.get("RAY_ADDRESS") or None
    if text is None:
        return None
    try:
        cluster_address(text)
    except ValueError as err:
        jobs_api = " (an http address is the Jobs API's, for `ray job submit`)"
        raise KdsearchError(
            f"RAY_ADDRESS={err}{jobs_api if text.startswith('http') else ''}; unset it, or "
            "pass --address HEAD:PORT"
        ) from None
    return text


def port(text: str) -> int:
    """A TCP port, or 0 for any free one."""
    value = whole_number(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return value


def given(text: str) -> str:
    """A file, folder or storage: not empty (`--out ""`, a shell variable that was not set,
    would name this folder, or print where a file was asked for)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value names nothing")
    return text


def study_name(text: str) -> str:
    """A study name as a space file's study.name allows: it names files and folders."""
    if problem := study_name_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable --set PATH=VALUE option."""
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(prog="kdsearch", description="AutoML for knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p: argparse.ArgumentParser = sub.add_parser(
        "train", help="train one student from a recipe YAML"
    )
    p.add_argument("recipe", type=given, help="a recipe YAML file")
    add_set(p, "override a recipe value, e.g. --set distill.kd.temperature=6 (repeatable)")
    p.add_argument(
        "--out", type=given, help="output folder (default: studies/runs/<recipe>-<date>-<time>)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="search a space of distillation recipes")
    p.add_argument("space", type=given, help="a search space YAML file (search_spaces/*.yaml)")
    p.add_argument(
        "--trials", type=positive, help="trials the study should hold (default: the space's)"
    )
    p.add_argument("--study", type=study_name, help="study name (default: the space's study.name)")
    p.add_argument(
        "--storage",
        type=given,
        help="SQLAlchemy URL or SQLite file (default: the space's study.storage, else "
        "sqlite:///studies/<study>.db)",
    )
    add_set(p, "override a value of the base recipe, e.g. --set data.root=DIR (repeatable)")
    p.add_argument(
        "--address",
        type=ray_address,
        help="join the Ray cluster at this address (default: $RAY_ADDRESS where set, else "
        "start a local Ray sized to this machine)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted or killed search of the same study",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check the space, its base and this machine's resources for it, and stop there "
        "(nothing is written, no data loaded)",
    )
    p.set_defaults(func=cmd_run)

    def study_command(command: str, help_text: str) -> _Parser:
        q = sub.add_parser(command, help=help_text)
        q.add_argument("study", help="the study's name")
        promoted = "; for <search>-promoted, studies/<search>.db" if command == "trials" else ""
        q.add_argument(  # (only `trials` reads a promoted study: the others refuse one)
            "--storage",
            type=given,
            help=f"SQLAlchemy URL or SQLite file (default: studies/<study>.db{promoted})",
        )
        return q

    p = study_command("promote", "re-train the best trials at full budget over several seeds")
    p.add_argument(
        "--top-k",
        type=positive,
        help="trials of distinct recipes to promote (default: the space's, else 3)",
    )
    p.add_argument("--seeds", type=positive, help="seeds per recipe (default: the space's, else 3)")
    p.add_argument(
        "--epochs",
        type=positive,
        help="full budget (default: the space's, else the base recipe's schedule.epochs)",
    )
    p.add_argument(
        "--address",
        type=ray_address,
        help="join the Ray cluster at this address (default: $RAY_ADDRESS where set, else "
        "start a local Ray sized to this machine)",
    )
    p.set_defaults(func=cmd_promote)

    p = study_command("export", "write the winner as a folder a training job runs as is")
    p.add_argument("--out", type=given, required=True, help="the folder to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study storage")
    p.add_argument(
        "storage",
        help="SQLAlchemy URL, the path of an SQLite study file, or a study name in ./studies/",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8080, help="port (default: 8080; 0: any free)")
    p.set_defaults(func=cmd_dashboard)

    p = study_command("report", "write a self-contained HTML report of a study")
    p.add_argument(
        "--out",
        type=given,
        help="the HTML file (default: STUDY-report.html beside an SQLite study, else in studies/)",
    )
    p.set_defaults(func=cmd_report)

    p = study_command("trials", "the trials of a study as a table")
    p.add_argument(
        "--csv",
        type=given,
        help="write them to this CSV file instead of printing them ('-': stdout)",
    )
    p.add_argument(
        "--sort",
        choices=("number", "value"),
        default="number",
        help="order: by trial number (default), or the COMPLETE trials best first "
        "(a promoted study's leaderboard is always best first)",
    )
    p.set_defaults(func=cmd_trials)
    return parser


def stop_as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (timeout, a batch scheduler, docker stop) stops a command as Ctrl-C does: a
    search keeps what finished and says how to resume."""
    on_int = signal.getsignal(signal.SIGINT)
    if callable(on_int):  # Python's (KeyboardInterrupt), or Ray Tune's while trials run
        on_int(signal.SIGINT, frame)
    else:  # Ctrl-C ignored (a background job of a script): SIGTERM still stops
        raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM stops the command as Ctrl-C does (`stop_as_ctrl_c`) from here on. Ray's C++ core
    would take SIGTERM for its crash report, and leave it at the system's default once its Ray
    shut down: a SIGTERM after a search (in its promotion, its export, its last lines) killed
    the command without a word. Set before Ray is imported; a user's own setting stays."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    signal.signal(signal.SIGTERM, stop_as_ctrl_c)


def redeliver_lost_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """A Ctrl-C (or SIGTERM) that lands while Python runs a finalizer (SQLAlchemy's weak
    reference callbacks run often) raises its KeyboardInterrupt there, where Python prints it as
    "Exception ignored" and goes on: the search ran to its end. It is delivered again a moment
    later, once the finalizer is done; every other such exception is shown as Python shows it."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        stop = signal.SIGINT if callable(signal.getsignal(signal.SIGINT)) else signal.SIGTERM
        again = threading.Timer(REDELIVER_S, _thread.interrupt_main, args=(stop,))
        again.daemon = True  # a stop lost as the command ends is not waited for at exit
        again.start()
    else:
        PYTHON_UNRAISABLEHOOK(unraisable)


REDELIVER_S = 0.05
PYTHON_UNRAISABLEHOOK = sys.unraisablehook


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """kdsearch's own warnings as one line, as its errors are (not Python's file:line, category
    and source line), each once a command (a teacher file loaded by position warns where the
    search loads it and again where its promotion does); every other warning as Python shows
    it."""
    if issubclass(category, KdsearchWarning):
        if str(message) not in SHOWN:
            SHOWN.add(str(message))
            console.print(f"kdsearch: warning: {message}")
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


PYTHON_SHOWWARNING = warnings.showwarning
SHOWN: set[str] = set()  # the kdsearch warnings this command has shown

# What an interrupted command leaves, by command (the others keep nothing of the interrupted work)
INTERRUPTED = {
    "run": "what had finished is kept; nothing half-done was written",
    "promote": "the runs that had finished are kept, and the same command again trains only "
    "the others; nothing half-done was written",
}


# what the system says of a path that cannot be looked at: pathlib's is_file and the like raise
# these (Python 3.11) for a path the user named, where the commands' own checks give one line
UNREACHABLE = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdsearch` console command."""
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    warnings.showwarning = show_warning
    SHOWN.clear()
    sys.unraisablehook = redeliver_lost_stop
    try:
        if "address" in args and args.address in (None, "auto"):
            args.address = address_from_environment() or args.address
        return int(args.func(args))
    except KdsearchError as err:
        console.print(f"kdsearch: error: {err}")
        return 2
    except NonFiniteLoss as err:
        console.print(f"kdsearch: training diverged: {err}")
        return 1
    except KeyboardInterrupt:
        kept = INTERRUPTED.get(args.command, "nothing half-done was written")
        console.print(f"kdsearch: interrupted ({kept})")
        return 130
    except BrokenPipeError:  # `kdsearch trials S --csv - | head`: the reader had what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no failing last flush
        return 141  # as a command that SIGPIPE ended
    except OSError as err:
        if err.errno not in UNREACHABLE or err.filename is None:
            raise
        paths = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        console.print(f"kdsearch: error: {paths}: {err.strerror}")
        return 2
    finally:
        warnings.showwarning = PYTHON_SHOWWARNING
        sys.unraisablehook = PYTHON_UNRAISABLEHOOK


def entry() -> NoReturn:
    """The `kdsearch` console command: `main`, then its status, even where a Ctrl-C or SIGTERM
    comes as Python runs its exit handlers after the command's last line, where Python would
    end a finished command by SIGINT (status 130) or print a KeyboardInterrupt's traceback: such
    a stop ends it at once, with its status. Once the exit handlers have run, the process ends
    (`last_exit_handler`)."""
    status: list[int] = []  # the command's, once `main` has returned it
    # Registered before torch and Ray register theirs: run last. Where a handler was registered
    # before this one (coverage's, a sitecustomize's), it runs after, so Python ends the process.
    last = getattr(atexit, "_ncallbacks", lambda: 1)() == 0
    atexit.register(last_exit_handler, status, ends=last)
    try:
        status.append(main())
    except SystemExit as exit_:  # argparse's --help, --version and usage errors: ended as a
        if not isinstance(exit_.code, int):  # command is, their output's last flush checked
            raise  # (argparse writes it unchecked, and a full disk was status 0, unsaid)
        status.append(exit_.code)

    def finished(signum: int, frame: FrameType | None) -> None:
        end_now(status[0])

    signal.signal(signal.SIGINT, finished)
    signal.signal(signal.SIGTERM, finished)
    sys.exit(status[0])


def last_exit_handler(status: list[int], *, ends: bool) -> None:
    """Where the command returned its `status` (not a traceback) and this handler `ends` the
    exit handlers, end the process with it, skipping Python's teardown of its modules: 0.4-1 s
    with torch and Ray loaded, on every command, which nothing needs (the command's files are
    closed, its study committed, its Ray shut down). Else ignore SIGINT and SIGTERM from here
    on: past the exit handlers Python stops running its own signal handlers and gives such a
    signal back its default action, which kills."""
    if status and ends:
        end_now(status[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_now(status: int) -> NoReturn:
    """End the process with `status` at once, what it printed flushed. Output that can no
    longer be written is not lost without a word, as Python's own last flush says it (status
    120): where its reader has gone, status 141, as `main` ends; else, for a command that
    succeeded, one line and status 2."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = 141
    except OSError as err:  # a full disk, say; a command that failed has said why already
        if status == 0:  # (perhaps this: what it could not write stays in the buffer)
            with suppress(Exception):
                sys.stderr.write(f"kdsearch: error: {output_failure(err)}\n")
            status = 2
    except Exception:  # (a flush that a stop came in the middle of, while one ran)
        pass
    with suppress(Exception):
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
