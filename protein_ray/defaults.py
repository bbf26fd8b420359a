"""Defaults that more than one module uses, declared once.

No heavy imports here: the command line reads these for ``--help``.
"""

# Files decoded by bulk scoring and training: room for large plate fields while
# refusing decompression bombs before any pixel is allocated.
MAX_PIXELS = 40_000_000

# Serve: one uploaded image. Tighter than for files, because a replica holds the
# images of many requests at once.
SERVE_MAX_PIXELS = 4096 * 4096
SERVE_MAX_BODY_BYTES = 64 * 1024 * 1024
SERVE_MAX_IMAGES = 16  # per multipart request
SERVE_MAX_BATCH_SIZE = 16  # images per model call (@serve.batch)
SERVE_BATCH_WAIT_S = 0.01
SERVE_MAX_ONGOING_REQUESTS = 64
# Per replica: requests allowed to wait for a decode slot (a replica decodes as many images
# at once as it reserves CPUs, each up to SERVE_MAX_PIXELS x 8 bytes plus its float copy:
# ~400 MiB at the limit).
SERVE_MAX_WAITING = 32
SERVE_BODY_TIMEOUT_S = 30.0
CLASSIFIER_MAX_REPLICAS = 2
GPU_REPLICA_CPUS = 4  # CPUs (= concurrent decodes) of a Serve replica that has a GPU
