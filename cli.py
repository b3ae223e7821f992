"""What the command-line tools (main.py, viz.py, compare.py, claims.py) share: exit codes,
a clean exit on an interrupt while starting, and the one-line report of a crash.

Exit codes, the same for every tool:

    0    done (main.py: also when stopped early by the time budget or Ctrl-C)
    1    the training diverged (main.py only: the loss became NaN or infinite)
    2    bad input or a file-system problem; the message says which and how to fix it
    3    crashed: an unexpected error, a bug; the message says where the traceback went
    130  interrupted before anything was changed, or aborted by a second Ctrl-C

This module imports nothing but the standard library, so a tool can install the
start-up interrupt handler before its slow imports (NumPy, matplotlib).
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_CRASHED = 3
EXIT_ABORTED = 130
# Set to 1 to have a crash print its traceback on stderr as well.
TRACEBACK_ENV = 'CNNRNN_TRACEBACK'


class StartupInterrupted(BaseException):
    """SIGINT or SIGTERM arrived before the tool began its work; nothing was changed.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` clauses let it pass.
    """


# The signal that arrived while starting. The handler raises StartupInterrupted at once, but Python
# discards an exception raised while it runs some of its own callbacks (e.g. the import system's
# weakref callbacks: "Exception ignored in ..."), so the signal is also kept here, and every tool
# calls raise_if_interrupted_while_starting() where its start-up ends.
_interrupted_by = None


def _interrupted_while_starting(signum, frame):
    global _interrupted_by
    _interrupted_by = signal.Signals(signum).name
    raise StartupInterrupted(_interrupted_by)


def raise_if_interrupted_while_starting():
    """Raise StartupInterrupted if SIGINT or SIGTERM arrived while starting, even if the
    exception the handler raised then was discarded."""
    if _interrupted_by is not None:
        raise StartupInterrupted(_interrupted_by)


def exit_cleanly_on_interrupt_while_starting():
    """Make Ctrl-C or SIGTERM during start-up (imports, argument checks) end the process
    with one line and exit code 130, instead of a KeyboardInterrupt traceback.

    Call it first thing in a tool's ``__main__`` path; the tool later replaces the
    handlers with its own (main.py's Stopper), or keeps them.
    """
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupted_while_starting)
    sys.excepthook = _exit_quietly_if_interrupted_while_starting
    sys.unraisablehook = _quiet_if_interrupted_while_starting


def _quiet_if_interrupted_while_starting(unraisable, _default=sys.unraisablehook):
    """An interrupt whose exception Python discarded (it arrived while the import system ran one
    of its weakref callbacks) is not a crash: _interrupted_by keeps it, and the tool ends with its
    one line where start-up ends, so nothing is printed here ("Exception ignored in ...", with a
    traceback, would be). Any other discarded exception is reported as Python reports it."""
    if isinstance(unraisable.exc_value, StartupInterrupted):
        return
    _default(unraisable)


def _exit_quietly_if_interrupted_while_starting(exc_type, exc, tb, _default=sys.excepthook):
    """What escapes every try block happened while importing: an interrupt (one line, exit 130),
    a package that is not installed or a Python too old (one line, exit 2), or a bug
    (report_crash, exit 3)."""
    tool = os.path.basename(sys.argv[0] or 'python')
    if issubclass(exc_type, StartupInterrupted):
        print(interrupted_message(tool, exc), file=sys.stderr, flush=True)
        os._exit(EXIT_ABORTED)
    if issubclass(exc_type, ModuleNotFoundError):
        print(f'error: {tool} needs the Python package {exc.name!r}, which is not installed for '
              f'{sys.executable}; install the requirements (make venv, or pip install -r requirements.txt) '
              f'and run it with that interpreter', file=sys.stderr, flush=True)
        os._exit(EXIT_BAD_INPUT)
    if issubclass(exc_type, ImportError):   # e.g. data_utils's check of the Python version
        print(f'error: {exc}', file=sys.stderr, flush=True)
        os._exit(EXIT_BAD_INPUT)
    if issubclass(exc_type, Exception):
        sys.stderr.flush()
        os._exit(report_crash(tool, exc.with_traceback(tb)))
    _default(exc_type, exc, tb)


def interrupted_message(tool, exc):
    """The line printed for a StartupInterrupted."""
    return f'{tool}: interrupted by {exc} while starting; nothing was changed'


def report_crash(tool, exc, log_path=None):
    """Print one line for an unexpected exception; put the traceback in ``log_path``.

    The traceback is appended to ``log_path`` (a run's train.log) when there is one
    and it can be written; else it goes to stderr only if CNNRNN_TRACEBACK=1 is set.
    Returns EXIT_CRASHED.
    """
    import traceback   # here, not at the top: the start-up handler must be installed as early as possible
    text = ''.join(traceback.format_exception(exc))
    where = None
    if log_path is not None:
        try:
            from runfiles import append_line   # stdlib-only at import time; runfiles is light
            append_line(log_path, f'crash: {type(exc).__name__}: {exc}\n{text.rstrip()}')
            where = f'the traceback is in {log_path}'
        except Exception:
            where = None
    if os.environ.get(TRACEBACK_ENV) == '1':
        print(text, file=sys.stderr, end='')
        where = where or 'the traceback is above'
    where = where or f'run it again with {TRACEBACK_ENV}=1 to see the traceback'
    print(f'error: {tool} crashed ({type(exc).__name__}: {exc}); this is a bug, not your input: '
          f'{where}; please report it (exit code {EXIT_CRASHED})', file=sys.stderr)
    return EXIT_CRASHED


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals are one line like every other refusal of the tools
    (``<tool>: <problem>; see python <tool> --help``, exit code 2), not a usage block."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f'{self.prog}: {message}; see {help_command(self.prog)}\n')


def help_command(tool):
    """'python <the script as it was run> --help', a command that works from the current folder."""
    script = sys.argv[0] if os.path.basename(sys.argv[0] or '') == tool else tool
    return f'python {script} --help'


def format_duration(seconds):
    """'42.0 s', '125 s (2 min 05 s)', '3725 s (1 h 02 min 05 s)'; '-' for None."""
    if seconds is None:
        return '-'
    seconds = float(seconds)
    if seconds < 60:
        return f'{seconds:.1f} s'
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f'{seconds:.0f} s ({h} h {m:02d} min {s:02d} s)' if h else f'{seconds:.0f} s ({m} min {s:02d} s)'


def typed_path(path):
    """A path as it can be typed in the current folder: relative when it lies below it, else
    absolute; shell-quoted if it holds spaces or the like. For commands in messages."""
    path = Path(path)
    try:
        rel = os.path.relpath(path)
    except (ValueError, OSError):    # another drive, or the current folder has vanished
        rel = str(path)
    return shlex.quote(rel if not rel.startswith('..') else str(path.absolute()))


def python_command(script, *args, interpreter='python'):
    """'python <script> ARGS' as it works when typed in the current folder: Paths (the script
    and any argument that is a Path) made typeable by typed_path, other arguments shell-quoted."""
    words = [typed_path(a) if isinstance(a, Path) else shlex.quote(str(a)) for a in args]
    return ' '.join([interpreter, typed_path(script), *words])


# The commit of the code, for a copy of it outside git: sweep.py sets it for the runs it sends to
# Ray, whose workers run the project from a copy (Ray's working_dir) that has no .git.
CODE_COMMIT_ENV = 'CNNRNN_CODE_COMMIT'


def code_commit(folder=Path(__file__).resolve().parent):
    """The short hash of the git commit checked out in ``folder`` (default: this project's code),
    with '+changes' when tracked files differ from it; outside a git work tree (or without git)
    the environment's CNNRNN_CODE_COMMIT, else None.

    main.py records it in each run (metrics.json's code_commits), so that a figure can name the
    code that measured it; docs/tables.py stamps its tables with it."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=folder, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        rev = git('rev-parse', '--short', 'HEAD')
        dirty = git('status', '--porcelain', '--untracked-files=no')
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(CODE_COMMIT_ENV) or None
    return (rev + ('+changes' if dirty else '')) or None
