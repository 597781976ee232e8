"""``python -m vmamba.analysis._worker JSON``: one isolated throughput measurement (internal)."""

import sys

from vmamba.analysis.throughput import _worker_main

if __name__ == "__main__":
    sys.exit(_worker_main(["--worker", *sys.argv[1:]]))
