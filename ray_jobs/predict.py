"""Entry point for `ray job submit --working-dir . -- python ray_jobs/predict.py [options]`.

Same options as `protein-ray predict` (see `--help`): score shards, a Kaggle root
or plate-scan folders (local or s3://) into per-image predictions, per-well
tables, plate heatmaps and summary.json under --output. Rerun the same command to
continue an interrupted job.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir
    from protein_ray.cli import main

    sys.exit(main(["predict", *sys.argv[1:]]))
