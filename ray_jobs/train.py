"""Entry point for `ray job submit --working-dir . -- python ray_jobs/train.py [options]`.

Same options as `protein-ray train` (see `--help`); the last line printed is the
URI of the best checkpoint.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir
    from protein_ray.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
