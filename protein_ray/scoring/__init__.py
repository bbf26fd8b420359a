"""Bulk scoring of plate scans with Ray Data: ``protein-ray predict``.

::

    inputs     protein_ray.inputs resolves every --input (shards, Kaggle root, image
               or plate folder; local or s3://) -> rows in a stable order
    decode     chunk -> read + decode + preprocess     (Ray tasks: scale with CPUs)
    pipeline   -> model                                (actor pool: a Predictor each;
               without GPUs the actors decode their own batches, no decode tasks)
    stages     the actors' classes: light to import, the model loaded in __init__
    parts      rows of a chunk complete -> parts/part-<chunk>.parquet (atomic)
    outputs    all parts -> predictions, wells, heatmaps, submission.csv, embeddings
    job        the driver: options -> index -> pipeline -> outputs -> summary.json

Nothing is lost (DESIGN.md section 8): every input image yields exactly one row,
with probabilities or with the reason it could not be scored, and the driver
checks count in = count out. Rerunnable: a chunk is the same slice of the same
index on every run, so a rerun on the same output skips the chunks whose part
file exists and writes only the rest; ``--overwrite`` starts afresh.

Decoding and preprocessing call the one path of ``protein_ray.imaging`` with the
checkpoint's ``Preprocessing``, exactly what ``Predictor.preprocess`` does, so a
job's probabilities equal the Predictor's (and Serve's) for the same bytes.

Entry points: ``protein_ray.scoring.job.score(PredictOptions(...))`` with
``protein_ray.scoring.options.PredictOptions`` (the CLI's ``protein-ray predict``).
This package imports nothing itself, so the CLI reads the options without torch.
"""
