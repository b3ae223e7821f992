"""What the allocator settings of ``fast_layers`` are worth: the training step with and without them.

Runs the same step (``model.loss``, float32) in two fresh processes, both
calling ``fast_layers.prepare_process_for_training()`` as training does: in
one glibc is told to keep freed memory (``keep_freed_memory_for_reuse``), in
the other the settings cannot be applied (the C library is hidden from
``ctypes``, the path taken off glibc). It prints per step: wall time, system
CPU time and minor page faults (``getrusage``), medians over the repeats.
Linux with glibc only.

Usage:
    python benchmarks/page_faults.py [--layout pixels] [--batch 256] [--steps 10] [--repeats 3]
"""
import argparse
import json
import subprocess
import sys

import numpy as np

import repo_on_path

STEP = '''
import json, resource, sys, time
import numpy as np
if sys.argv[1] == 'without':
    import ctypes
    def no_libc(*args, **kwargs):
        raise OSError('hidden')
    ctypes.CDLL = no_libc
import cnn_rnn_numpy as M
import fast_layers
settings = fast_layers.prepare_process_for_training()
layout, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
X = rng.random((batch, 3, 32, 32), dtype=np.float32)
y = rng.integers(0, 10, batch)
model = M.CNNRNN(seq_layout=layout, seed=0)
model.loss(X, y)
model.loss(X, y)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    model.loss(X, y)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({'tuned': settings.allocator_tuned, 'wall_ms': 1e3 * (t1 - t0) / steps,
                  'sys_ms': 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
                  'faults': (r1.ru_minflt - r0.ru_minflt) / steps}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--layout', default='pixels', choices=['pixels', 'rows'])
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    results = {'with': [], 'without': []}
    for _ in range(args.repeats):
        for mode in results:      # the two side by side in every repeat
            out = subprocess.run([sys.executable, '-c', STEP, mode, args.layout, str(args.batch), str(args.steps)],
                                 capture_output=True, text=True, check=True, cwd=repo_on_path.REPO_ROOT).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f'{args.layout}, batch {args.batch}, {args.steps} steps after 2 warm-up steps, '
          f'medians of {args.repeats} repeats, per step:')
    for mode, runs in results.items():
        med = {k: float(np.median([r[k] for r in runs])) for k in ('wall_ms', 'sys_ms', 'faults')}
        print(f"  {mode:7} the settings (applied: {runs[0]['tuned']}): wall {med['wall_ms']:6.1f} ms, "
              f"system time {med['sys_ms']:6.1f} ms, page faults {med['faults']:8.0f}")
    ratio = [w['wall_ms'] / t['wall_ms'] for t, w in zip(results['with'], results['without'])]
    print(f"  step time without / with: {np.median(ratio):.2f}x (per repeat {', '.join(f'{r:.2f}' for r in ratio)})")


if __name__ == '__main__':
    main()
