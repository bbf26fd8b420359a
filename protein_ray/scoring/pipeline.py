"""The Ray Data pipeline and its resources: on GPUs, decode tasks feeding a model actor
pool; on CPUs, model actors that decode their own images (the actors' classes are in
``stages``)."""

from __future__ import annotations

from dataclasses import dataclass

import ray
import ray.data

from protein_ray.imaging import Preprocessing
from protein_ray.runtime import HEAP_GROWTH_BYTES
from protein_ray.scoring.decode import decode_chunks
from protein_ray.scoring.options import PredictJobError, PredictOptions
from protein_ray.scoring.stages import DecodeAndModelStage, ModelStage


@dataclass
class Resources:
    actors: int
    num_gpus: float
    cpus_per_actor: float
    actor_memory: int
    decode_in_actors: bool  # CPU actors decode their own images; else decode tasks feed them


def plan_resources(options: PredictOptions, cluster: dict, checkpoint_bytes: int, spec: Preprocessing,
                   batches: int) -> Resources:
    """Defaults from the cluster's resources (``ray.cluster_resources()``) and the
    model ``batches`` to run (no chunk split across two). With GPUs: one actor per GPU, fed by decode tasks, which must
    keep at least one CPU. Without: one actor per CPU (no more than there are model
    batches), each decoding its own images on one thread, unless ``--decode-tasks``
    asks for decode tasks (then one actor). One-thread actors are the cheapest way to
    run a CNN on CPU: measured on 2 cores on 2026-12-05, resnet18 cost 80 ms of CPU
    per image on one thread and 100 ms on two."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus > gpus:
        raise PredictJobError(f"--num-gpus {num_gpus} per actor, but the cluster has {gpus:g} GPU(s)")
    decode_in_actors = num_gpus == 0 and options.decode_tasks is None
    if options.actors:
        actors = options.actors
    elif num_gpus > 0:
        actors = max(1, int(gpus // num_gpus))
    elif decode_in_actors:
        actors = max(1, min(int(cpus // options.cpus_per_actor), batches))
    else:
        actors = 1
    wanted = actors * options.cpus_per_actor
    if decode_in_actors and wanted > cpus:
        raise PredictJobError(f"{actors} actor(s) x {options.cpus_per_actor:g} CPU(s) need more than the cluster's "
                              f"{cpus:g} CPU(s); lower --actors or --cpus-per-actor")
    if not decode_in_actors and wanted > cpus - 1:
        raise PredictJobError(
            f"{actors} actor(s) x {options.cpus_per_actor:g} CPU(s) leave no CPU of {cpus:g} for decoding; "
            "lower --actors or --cpus-per-actor"
        )
    # Room for the weights (and their copy while loading) and a batch with its TTA views.
    batch_bytes = options.batch_size * spec.channels * spec.image_size**2 * 4 * (5 if options.tta else 2)
    memory = 3 * checkpoint_bytes + batch_bytes + 768 * 2**20  # torch and timm alone take ~500 MB
    if num_gpus == 0:
        memory += HEAP_GROWTH_BYTES  # a CPU actor keeps freed memory for its next batch
    return Resources(actors, num_gpus, options.cpus_per_actor, int(memory), decode_in_actors)


def scoring_dataset(work_items: list[dict], options: PredictOptions, preprocessing: Preprocessing,
                    resources: Resources):
    """The lazy Ray Dataset: chunk items -> decoded rows (tasks) -> probabilities (actors),
    or items of one model batch -> probabilities (actors that decode)."""
    items = ray.data.from_items(work_items, override_num_blocks=len(work_items))
    decode = {"preprocessing": preprocessing, "max_pixels": options.max_pixels, "measure_qc": options.qc}
    model = {"checkpoint": options.checkpoint, "tta": options.tta, "threads": options.threads_per_actor,
             "actors": resources.actors, "embeddings": options.embeddings}
    actor_resources = {"num_cpus": resources.cpus_per_actor, "num_gpus": resources.num_gpus or None,
                       "memory": resources.actor_memory}
    if resources.decode_in_actors:
        # Work starts as soon as one actor is up (the others join when they are, or when
        # the CPUs they wait for are freed). Two items per actor: one running, one
        # waiting, so an actor never idles for a round trip, and at the end no actor
        # holds a queue that another could share.
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=resources.actors, initial_size=resources.actors,
                                          max_tasks_in_flight_per_actor=2)
        return items.map_batches(DecodeAndModelStage, batch_size=1, batch_format="numpy", compute=pool,
                                 fn_constructor_kwargs={"decode": decode | {"decode_batch": options.batch_size},
                                                        **model},
                                 **actor_resources)
    decoded = items.map_batches(
        decode_chunks,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs=decode | {"decode_batch": options.decode_batch},
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=options.decode_tasks) if options.decode_tasks else None,
    )
    # The model stage's memory request also differs from the decode tasks' resources,
    # which keeps Ray Data from fusing decoding into the actors (it fuses adjacent maps
    # with equal resources), where the GPU would wait for every decode.
    return decoded.map_batches(ModelStage, batch_size=options.batch_size, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=resources.actors),
                               fn_constructor_kwargs=model, **actor_resources)
