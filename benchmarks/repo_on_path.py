"""Put the repository on sys.path, so that `python benchmarks/<name>.py` imports
the project's modules from any working folder. Every benchmark imports this
first; the tests get the same from pytest.ini's `pythonpath`."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
