"""The method's claims suite, by its short name: sweep.py with sweeps/claims.json.

    python claims.py [--runs-dir runs/claims] [--seeds 0 1 2] [--only VARIANT ...] [--dry-run]
                     [--jobs N] [--threads T] [--ray [ADDRESS]] [--preset fast] [--extra "..."]

is ``python sweep.py sweeps/claims.json`` with the same options: the baseline and one variant per
claim (sweeps/claims.json says which claim each tests), 3 seeds each, on the `fast` protocol (15
epochs on 40% of the training set), then compare.py over the runs. sweep.py's docstring says what
it does with each run folder and what its exit codes mean.
"""
import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    cli.exit_cleanly_on_interrupt_while_starting()

import sys
from pathlib import Path

import sweep

CLAIMS_SWEEP = Path(__file__).resolve().parent / 'sweeps' / 'claims.json'


def main(argv=None):
    """CLI entry point; returns the exit code (sweep.py's)."""
    return sweep.main(argv, prog='claims.py', sweep_file=str(CLAIMS_SWEEP))


if __name__ == '__main__':
    sys.exit(main())
