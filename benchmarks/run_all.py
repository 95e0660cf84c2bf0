"""`make bench`: run every benchmark script in turn; each writes bench-out/<name>.json.

Figures and the machine they were measured on go into docs/benchmarks.md by hand,
with the command, so a reader can reproduce them.

    python benchmarks/run_all.py [NAME ...]     # e.g. buffer pipeline
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# training first: pipeline and ota reuse its bundle when it exists
ORDER = ["training", "operating_point", "tiling", "int8_speed", "buffer", "pipeline", "drift", "sync", "ota", "web"]


def main() -> int:
    names = sys.argv[1:] or [n for n in ORDER if (HERE / f"{n}.py").exists()]
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        print(f"\n=== benchmarks/{name}.py", flush=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, str(script)])
        print(f"=== {name}: exit {code} after {time.monotonic() - t0:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
