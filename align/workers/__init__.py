"""Ray workers that host the models and serve the drivers' coarse verbs.

- `batch.Experience`: the one batch type that crosses between driver and workers.
- `worker.ModelWorker`: one model replica (generate, annotate, update_actor, update_critic,
  save, load); plain Python, wrapped in a Ray actor by:
- `group.WorkerGroup`: N data-parallel replicas joined by torch.distributed, and
  `group.Placement`: colocated (one group for every role) or split (a group per role).

Importing `align.workers` imports none of these (Ray and transformers load on use).
"""
