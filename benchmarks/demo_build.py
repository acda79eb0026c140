"""Build time of the embedded demo data: the image demo and the multilingual corpus.

The first ``mmptm train`` of a recipe on demo data builds its corpus into
``$MMPTM_CACHE`` (see ``mmptm demo --help``); this is that wait. Each corpus is
built ``--repeats`` times from scratch into a fresh temporary folder, and the
median wall time, this process's CPU time and the corpus size on disk are
printed as a Markdown table.

    python benchmarks/demo_build.py
    python benchmarks/demo_build.py --corpus images --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mmptm.data_pipelines.demo import DEMO_VERSION, ensure_demo
from mmptm.data_pipelines.demo_multilingual import MULTILINGUAL_VERSION, ensure_multilingual_demo

CORPORA: dict[str, tuple[str, Callable[..., object]]] = {
    "images": (DEMO_VERSION, ensure_demo),
    "multilingual": (MULTILINGUAL_VERSION, ensure_multilingual_demo),
}


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPORA), action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    print("| corpus | folder | wall s (median) | CPU s (median) | size MiB | repeats |")
    print("|---|---|---|---|---|---|")
    for name in args.corpus or sorted(CORPORA):
        version, build = CORPORA[name]
        walls, cpus, size = [], [], 0
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="mmptm-demo-bench-") as tmp:
                root = Path(tmp) / version
                wall, cpu = time.perf_counter(), time.process_time()
                build(root, seed=args.seed)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
                size = folder_bytes(root)
        print(
            f"| {name} | {version} | {statistics.median(walls):.1f} | {statistics.median(cpus):.1f} "
            f"| {size / 2**20:.1f} | {args.repeats} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
