"""Run the generation and extraction stages on a Ray cluster (``pip install personaxis[ray]``).

:class:`RayExecutor` is a :class:`personaxis.pipeline.Executor`: the driver makes the same chunks of units
(condition, system prompt) as a local run and hands them to a pool of Ray actors. Each actor loads the model once
(on the GPUs Ray gives it, or on CPU) and processes a chunk with the very code of the local loop
(:meth:`Pipeline.generate_units` / :meth:`Pipeline.extract_units`), writing each unit's file atomically into the
run directory, which must be the same path on every node (a shared filesystem). Chunks are processed whole and
unchanged, so a Ray run writes the same files as a local run of the same settings; nothing about Ray is recorded
in the run's manifest, and a run started on Ray resumes locally and vice versa. Units whose file exists are skipped,
by the driver and again by the worker (a retried chunk redoes nothing finished).

``address="local"`` starts a Ray instance on this machine (``ray.init(num_cpus=2)`` by default); any other address
joins that cluster (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from personaxis.backends.vllm_backend import ray_in_use
from personaxis.pipeline import Pipeline, Unit
from personaxis.settings import RunSettings

STAGE_METHODS = {"generate": "generate_units", "extract": "extract_units"}
# Object store for a local Ray instance: the workers exchange only unit lists and counts (files go to disk).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


class UnitWorker:
    """A Ray actor's state: one pipeline over the run directory, its model loaded on first use and kept."""

    def __init__(self, out: str, settings: dict[str, Any]) -> None:
        self.pipeline = Pipeline(out, RunSettings.from_manifest(settings), show_progress=False)

    def run(self, stage: str, units: Sequence[Unit]) -> int:
        """Process one chunk of a stage; units already written (by an earlier try) are skipped."""
        path = self.pipeline.rollout_path if stage == "generate" else self.pipeline.activation_path
        todo = [u for u in units if not path(u).is_file()]
        if not todo:
            return 0
        return int(getattr(self.pipeline, STAGE_METHODS[stage])(todo))

    def release_backend(self) -> None:
        self.pipeline.release_backend()

    def ping(self) -> str:
        import socket

        return socket.gethostname()


class RayExecutor:
    """Shards the chunks of a stage over Ray actors; actors persist across stages (the model loads once each)."""

    def __init__(
        self,
        address: str = "local",
        *,
        num_workers: int | None = None,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float = 1.0,
        num_cpus: int = 2,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        self.address = address
        self.num_workers = num_workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.num_cpus = num_cpus
        self.log = log or (lambda message: None)
        self._started_ray = False
        self._workers: list[Any] = []
        self._run_key: tuple[str, str] | None = None

    # ----------------------------------------------------------------------------------------- the cluster
    def connect(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("distributed runs need Ray: pip install 'personaxis[ray]'") from exc
        if not ray.is_initialized():
            if self.address == "local":
                ray.init(
                    address="local",
                    num_cpus=self.num_cpus,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    logging_level="WARNING",
                )
            else:
                ray.init(address=self.address, logging_level="WARNING")
            self._started_ray = True
        return ray

    def _placement(self, ray: Any) -> tuple[int, dict[str, float]]:
        """How many actors the cluster holds and what each asks for."""
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        per_gpu = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        if per_gpu > 0:
            if gpus < per_gpu:
                raise RuntimeError(f"the Ray cluster has {gpus:g} GPU(s); each worker asks for {per_gpu:g}")
            return max(1, int(gpus // per_gpu)), {"num_gpus": per_gpu, "num_cpus": 0}
        cpus = float(resources.get("CPU", 1))
        return max(1, int(cpus // self.cpus_per_worker)), {"num_cpus": self.cpus_per_worker}

    def _ensure_workers(self, pipeline: Pipeline, wanted: int) -> list[Any]:
        ray = self.connect()
        key = (str(pipeline.store.root.resolve()), repr(pipeline.settings.to_manifest()))
        if self._run_key != key:
            self._kill_workers()
            self._run_key = key
        capacity, options = self._placement(ray)
        target = min(self.num_workers or capacity, capacity, max(1, wanted))
        if len(self._workers) < target:
            actor = ray.remote(max_restarts=1, max_task_retries=1, **options)(UnitWorker)
            settings = pipeline.settings.to_manifest()
            root = str(pipeline.store.root.resolve())
            self._workers += [actor.remote(root, settings) for _ in range(target - len(self._workers))]
            hosts = ray.get([w.ping.remote() for w in self._workers])
            self.log(f"ray: {len(self._workers)} worker(s) on {len(set(hosts))} node(s), each with {options}")
        return self._workers

    # ------------------------------------------------------------------------------------------ the stages
    def run_chunks(
        self, pipeline: Pipeline, stage: str, chunks: list[list[Unit]], on_done: Callable[[int], Any]
    ) -> int:
        """Process ``chunks`` of ``stage`` on the cluster; ``on_done(n_units)`` as each chunk finishes."""
        if stage not in STAGE_METHODS:
            raise ValueError(f"stage {stage!r} does not run on Ray; only {', '.join(STAGE_METHODS)} do")
        if not chunks:
            return 0
        ray = self.connect()
        from ray.util import ActorPool

        workers = self._ensure_workers(pipeline, len(chunks))
        pool = ActorPool(workers)
        done = 0
        for n in pool.map_unordered(lambda actor, chunk: actor.run.remote(stage, chunk), chunks):
            done += int(n)
            on_done(int(n))
        if stage == "generate":
            ray.get([w.release_backend.remote() for w in workers])
        return done

    # ---------------------------------------------------------------------------------------------- tidy up
    def _kill_workers(self) -> None:
        if self._workers:
            import ray

            for worker in self._workers:
                ray.kill(worker)
        self._workers = []

    def shutdown(self) -> None:
        """Stop the actors, and the Ray instance if this executor started it."""
        if ray_in_use():
            self._kill_workers()
            if self._started_ray:
                import ray

                ray.shutdown()
        self._workers = []
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
