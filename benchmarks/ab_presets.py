"""Does every preset still train bit-identically to an earlier revision? A short run of each.

    python benchmarks/ab_presets.py ea53f72 [--presets fast best gated smoke] [--epochs 1]
                                    [--subset 0.02] [--data-dir data] [--new-rev HEAD]

For each preset, ``main.py --preset P --epochs E --subset S`` runs once with the code of REV
(a temporary ``git worktree``) and once with the working tree, each in its own process on the
same data, and the two run folders are compared: metrics.json's test_acc, test_loss and ece
must be equal, and predictions.npz's probs, labels and hidden equal bit for bit. Prints one
line per preset and exits 1 if any differs. The epochs and subset are shortened so that a
preset takes seconds to a minute; every other setting is the preset's own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def train(repo, preset, out, args):
    """Run main.py of ``repo`` for a preset into ``out``; raise on failure."""
    cmd = [sys.executable, str(Path(repo) / 'main.py'), '--preset', preset, '--epochs', str(args.epochs),
           '--subset', str(args.subset), '--data-dir', str(Path(args.data_dir).resolve()), '--out', str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed with exit {proc.returncode}:\n{proc.stderr[-2000:]}')


def differences(a, b):
    """Names of the figures and arrays that differ between two run folders."""
    ma, mb = (json.loads((d / 'metrics.json').read_text()) for d in (a, b))
    diff = [k for k in ('test_acc', 'test_loss', 'ece') if ma[k] != mb[k]]
    with np.load(a / 'predictions.npz') as pa, np.load(b / 'predictions.npz') as pb:
        diff += [k for k in ('probs', 'labels', 'hidden') if not np.array_equal(pa[k], pb[k])]
    return diff, ma


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('rev', help='the git revision to compare with, e.g. ea53f72')
    ap.add_argument('--presets', nargs='+', default=['fast', 'best', 'gated', 'smoke'])
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--subset', type=float, default=0.02)
    ap.add_argument('--data-dir', default=str(REPO_ROOT / 'data'))
    ap.add_argument('--new-rev', help='compare with this revision instead of the working tree')
    args = ap.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix='ab-presets-') as tmp:
        old, new = Path(tmp) / 'old', (Path(tmp) / 'new' if args.new_rev else REPO_ROOT)
        trees = [(old, args.rev)] + ([(new, args.new_rev)] if args.new_rev else [])
        for tree, rev in trees:
            subprocess.run(['git', 'worktree', 'add', '--detach', '-q', str(tree), rev], cwd=REPO_ROOT, check=True)
        try:
            for preset in args.presets:
                runs = {name: Path(tmp) / f'{preset}-{name}' for name in ('old', 'new')}
                train(old, preset, runs['old'], args)
                train(new, preset, runs['new'], args)
                diff, m = differences(runs['old'], runs['new'])
                failed |= bool(diff)
                print(f"{preset:6} {'DIFFERENT: ' + ', '.join(diff) if diff else 'identical'}  "
                      f"(test_acc {m['test_acc']:.4f}, test_loss {m['test_loss']:.6f}, ece {m['ece']:.6f})",
                      flush=True)
        finally:
            for tree, _ in trees:
                subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=REPO_ROOT)
            subprocess.run(['git', 'worktree', 'prune'], cwd=REPO_ROOT)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
