"""The classification worker: claim → check → normalise → infer → record, pipelined.

The *preparer* thread claims a batch (up to ``batch_size`` jobs), and has a bounded pool
of :func:`decode_threads` threads check eligibility and normalise the pixels of its files
side by side (NumPy and the C decoders release the interpreter for part of their work); the
*inferer* runs the model on the previous batch meanwhile and records the predictions. A
bounded hand-over queue of one batch keeps leases short and memory flat under a burst: at
most two batches are held beyond the one being inferred, whatever the backlog.

Batches form while the model is busy: each job starts decoding the moment it is claimed,
and while the inferer has work the preparer keeps claiming for up to ``max_batch_wait_ms``
or ``batch_size`` jobs (the wait costs nothing, the model could not take them sooner);
when the inferer is idle, what was claimed goes at once, so an image that arrives alone is
not held back for company, and under a burst the next batch is decoded by the time the
model is free. An idle worker waits for the next job on the host's job doorbell
(:mod:`pacs_classifier.queue.doorbell`, rung by the listener), polling the database every
``poll_interval_ms`` as well.

A job that was claimed before and came back without an outcome (its worker died holding
it, or a retry) is claimed alone (:meth:`~pacs_classifier.queue.jobs.JobQueue.claim`): a
file that crashes the decoder then takes down only itself, not the batch it arrived in.

Outcomes per job:

- eligible and normalised → one prediction with the active model, job ``done``;
- :class:`NotAssessable` (not a chest radiograph, or pixels that cannot become one) →
  ``not_assessed`` with its reason code, at once;
- eligible, but the model's own features of the image are far from its training chest
  radiographs (the bundle's ``ood.npz``, :mod:`pacs_classifier.model.ood`) →
  ``not_assessed`` with reason ``out_of_distribution``, its score and threshold audited,
  no prediction; a bundle without ``ood.npz`` serves as before (logged once per load);
- :class:`RetryableError` or an unexpected error → back to the queue with backoff, then
  ``failed`` after ``max_attempts``; any other :class:`PermanentError` → ``failed`` at once.

The active model is read from the registry before each claim and loaded once; when another
model is activated the next batch loads it. Stopping (SIGTERM) stops claiming, finishes
the batches already prepared and releases anything claimed but not prepared.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.config import Config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import JobState, Label
from pacs_classifier.errors import NotAssessable, PermanentError, RetryableError
from pacs_classifier.model.ood import OOD_FILE, OodModel, read_ood
from pacs_classifier.model.registry import active_model
from pacs_classifier.model.runtime import Inference, Predictor, load_predictor
from pacs_classifier.preprocess import reasons
from pacs_classifier.queue.doorbell import Bell
from pacs_classifier.queue.jobs import ClaimedJob, JobQueue, ended_job
from pacs_classifier.record.predictions import ModelRef, label_for, record_prediction
from pacs_classifier.results.outbound import PlanItem, plan_results

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: Loads a predictor for a registered model (the bundle path and runtime name).
PredictorLoader = Callable[[str, str], Predictor]

#: Test hook: the worker process aborts (SIGABRT, as a crashing codec would) when it is
#: about to decode the instance with this SOP Instance UID. Inert when unset.
ABORT_ON_UID_ENV = "PACS_CLASSIFIER_TEST_ABORT_ON_UID"
#: The most decode threads a worker uses, however many cores it is given.
MAX_DECODE_THREADS = 4


def decode_threads() -> int:
    """Decode threads for this process: the cores it may run on, at most
    :data:`MAX_DECODE_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DECODE_THREADS))


def _default_loader(path: str, runtime: str) -> Predictor:
    return load_predictor(path, runtime)


@dataclass
class PreparedBatch:
    """Jobs whose tensors are ready, all for one model."""

    model: ModelRef
    model_path: str
    jobs: list[ClaimedJob]
    tensors: npt.NDArray[np.float32]
    #: A job claimed before, run with nothing else in flight (see the module docstring).
    alone: bool = False


@dataclass
class WorkerStats:
    """Counters for logs, tests and benchmarks."""

    done: int = 0
    not_assessed: int = 0
    retried: int = 0
    failed: int = 0
    batches: int = 0
    #: Checking and normalising files, summed over jobs (each job's time on its decode
    #: thread: the cost of one image on one core, whatever the pool's overlap); then the
    #: wall time of inference and of recording the outcomes, summed over batches.
    decode_seconds: float = 0.0
    infer_seconds: float = 0.0
    record_seconds: float = 0.0


class Worker:
    """One worker: a preparer thread and an inferer loop sharing a bounded hand-over.

    Built by :meth:`pacs_classifier.wiring.App.worker`, which gives it its job queue.
    """

    def __init__(
        self,
        db: Database,
        config: Config,
        jobs: JobQueue,
        *,
        run_id: int | None = None,
        job_ids: list[int] | None = None,
        loader: PredictorLoader = _default_loader,
        bell: Bell | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.jobs = jobs
        #: When set, only this reclassification run's jobs are claimed (``reclassify``).
        self.run_id = run_id
        #: When set, only these jobs are claimed (``classify --record``).
        self.job_ids = job_ids
        self._loader = loader
        self._predictor: Predictor | None = None
        self._predictor_model_id: int | None = None
        #: The loaded model's out-of-distribution check; None when it has none.
        self._ood: OodModel | None = None
        self.stats = WorkerStats()
        self._stats_lock = threading.Lock()
        self._handover: queue.Queue[PreparedBatch | None] = queue.Queue(maxsize=1)
        self._no_model_logged = False
        self._decode_threads = decode_threads()
        #: Batches handed to the inferer and not yet recorded, under ``_idle``.
        self._unfinished = 0
        self._idle = threading.Condition()
        self._abort_on = os.environ.get(ABORT_ON_UID_ENV)
        #: Rung when a job is queued on this host; None: poll only.
        self._bell = bell

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; then finish prepared batches and release the rest."""
        locks = self.jobs.locks
        if locks is not None:
            # Held while this worker may hold leases: others can tell at once it is gone.
            locks.hold(self.jobs.worker_id)
        try:
            self._run(stop)
        finally:
            if self._bell is not None:
                self._bell.close()
            if locks is not None:
                locks.release()

    def _run(self, stop: threading.Event) -> None:
        self.jobs.reclaim_dead_local()
        pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="worker-decode")
        preparer = threading.Thread(
            target=self._prepare_loop, args=(stop, pool), name="worker-prepare", daemon=True
        )
        preparer.start()
        try:
            self._infer_loop()
        finally:
            stop.set()
            # If the inferer died, the preparer may wait to hand over: take and release.
            while preparer.is_alive():
                try:
                    left = self._handover.get(timeout=0.1)
                except queue.Empty:
                    continue
                if left is not None:
                    self.jobs.release(left.jobs)
            preparer.join()
            pool.shutdown()
        st = self.stats
        log.info(
            "worker %s stopped: %d done, %d not assessed, %d failed; in %d batch(es) "
            "decode %.2f thread-s, infer %.2f s, record %.2f s (%d decode thread(s))",
            self.jobs.worker_id,
            st.done,
            st.not_assessed,
            st.failed,
            st.batches,
            st.decode_seconds,
            st.infer_seconds,
            st.record_seconds,
            self._decode_threads,
        )

    def _prepare_loop(self, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        try:
            while not stop.is_set():
                try:
                    batch = self._next_batch(stop, pool)
                except RetryableError as exc:
                    log.warning("worker: %s; retrying", exc)
                    stop.wait(self._poll_s)
                    continue
                if batch is None:
                    self._wait_for_jobs(stop, self._poll_s)
                    continue
                if not batch.jobs:
                    continue
                if not self._hand_over(batch, stop):
                    self.jobs.release(batch.jobs)
                elif batch.alone:
                    self._wait_idle(stop)  # claim nothing while it runs
        finally:
            self._handover.put(None)  # the inferer drains what is queued, then stops

    def _hand_over(self, batch: PreparedBatch, stop: threading.Event) -> bool:
        with self._idle:
            self._unfinished += 1
        while not stop.is_set():
            try:
                self._handover.put(batch, timeout=0.1)
                return True
            except queue.Full:
                continue
        with self._idle:
            self._unfinished -= 1
        return False

    def _wait_idle(self, stop: threading.Event) -> bool:
        """Wait until the inferer has recorded every batch handed over; False: stopping."""
        with self._idle:
            while self._unfinished and not stop.is_set():
                self._idle.wait(0.1)
        return not stop.is_set()

    def _infer_loop(self) -> None:
        while True:
            batch = self._handover.get()
            if batch is None:
                return
            try:
                self.process(batch)
            except RetryableError as exc:
                # The database went away mid-batch: the leases run out and the jobs are
                # claimed again; the unique prediction key makes a second pass harmless.
                log.error("worker: batch of %d not recorded: %s", len(batch.jobs), exc)
            finally:
                with self._idle:
                    self._unfinished -= 1
                    self._idle.notify_all()

    @property
    def _poll_s(self) -> float:
        return self.config.worker.poll_interval_ms / 1000

    def _wait_for_jobs(self, stop: threading.Event, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the doorbell (a job was queued); True when rung.
        Without a bell, or when another process holds it, this is the poll's sleep.
        Returns within 50 ms of ``stop``."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._bell is None:
                stop.wait(min(left, 0.05))
            elif self._bell.wait(min(left, 0.05)):
                return True
        return False

    def _inferer_busy(self) -> bool:
        """Whether a batch is being inferred or waits to be."""
        with self._idle:
            return self._unfinished > 0

    # ------------------------------------------------------------------ steps

    def current_model(self) -> tuple[ModelRef, str] | None:
        """The active model (and its bundle path), or None when none is active."""
        with self.db.read_session() as session:
            row = active_model(session)
            if row is None:
                return None
            return ModelRef(row.id, row.version, row.threshold, row.image_size), row.path

    def _next_batch(self, stop: threading.Event, pool: ThreadPoolExecutor) -> PreparedBatch | None:
        current = self.current_model()
        if current is None:
            if not self._no_model_logged:
                log.warning("no active model: jobs stay queued until one is activated")
                self._no_model_logged = True
            return None
        self._no_model_logged = False
        model, path = current
        claimed = self.jobs.claim(
            self.config.worker.batch_size, run_id=self.run_id, job_ids=self.job_ids
        )
        if not claimed:
            return None
        alone = claimed[0].attempts > 1
        if alone and not self._wait_idle(stop):
            self.jobs.release(claimed)
            return None
        pending = [pool.submit(self._attempt, job, model) for job in claimed]
        if not alone:
            self._fill(stop, claimed, pending, pool, model)
        outcomes = [f.result() for f in pending]
        batch = self.sort_outcomes(claimed, outcomes, model, path)
        batch.alone = alone
        return batch

    def _fill(
        self,
        stop: threading.Event,
        claimed: list[ClaimedJob],
        pending: list[Future[npt.NDArray[np.float32] | Exception]],
        pool: ThreadPoolExecutor,
        model: ModelRef,
    ) -> None:
        """While the inferer is busy, claim more jobs for this batch (up to ``batch_size``,
        for at most ``max_batch_wait_ms``), each decoding from the moment it is claimed."""
        size = self.config.worker.batch_size
        deadline = time.monotonic() + self.config.worker.max_batch_wait_ms / 1000
        while len(claimed) < size and not stop.is_set() and self._inferer_busy():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Claim again as soon as a job is queued (or every 50 ms without the bell).
            self._wait_for_jobs(stop, min(left, 0.05))
            more = self.jobs.claim(
                size - len(claimed), run_id=self.run_id, job_ids=self.job_ids, fresh_only=True
            )
            claimed += more
            pending += [pool.submit(self._attempt, job, model) for job in more]

    def _attempt(self, job: ClaimedJob, model: ModelRef) -> npt.NDArray[np.float32] | Exception:
        """One job's tensor, or what went wrong (sorted by :meth:`sort_outcomes`)."""
        started = time.perf_counter()
        try:
            return self.tensor_for(job, model.image_size)
        except Exception as exc:  # sorted in the preparer's thread
            return exc
        finally:
            with self._stats_lock:
                self.stats.decode_seconds += time.perf_counter() - started

    def sort_outcomes(
        self,
        claimed: list[ClaimedJob],
        outcomes: Sequence[npt.NDArray[np.float32] | Exception],
        model: ModelRef,
        path: str,
    ) -> PreparedBatch:
        """The batch of the jobs whose tensors are ready; record the jobs that end here
        (not assessed, failed, retried)."""
        ready: list[ClaimedJob] = []
        tensors: list[npt.NDArray[np.float32]] = []
        not_assessed: list[tuple[ClaimedJob, str]] = []
        failures: list[tuple[ClaimedJob, str, bool]] = []
        for job, outcome in zip(claimed, outcomes, strict=True):
            if isinstance(outcome, np.ndarray):
                tensors.append(outcome)
                ready.append(job)
            elif isinstance(outcome, NotAssessable):
                not_assessed.append((job, outcome.reason))
            elif isinstance(outcome, PermanentError):
                failures.append((job, _reason(outcome), False))
            elif isinstance(outcome, RetryableError | OSError):
                failures.append((job, _reason(outcome), True))
            else:  # a decoder bug must not kill the worker
                log.error("job %d: unexpected error while preparing", job.id, exc_info=outcome)
                failures.append((job, _reason(outcome), True))
        self.jobs.mark_not_assessed(
            not_assessed,
            plan=lambda session, held: self.plan_not_assessed(session, held, model),
        )
        for job, reason in not_assessed:
            log.info("job %d (instance %d): not assessed, %s", job.id, job.instance_id, reason)
        self.stats.not_assessed += len(not_assessed)
        self._count_failures(self.jobs.fail(failures))
        size = model.image_size
        array = (
            np.stack(tensors).astype(np.float32, copy=False)
            if tensors
            else np.zeros((0, size, size, 3), dtype=np.float32)
        )
        return PreparedBatch(model, path, ready, array)

    def plan_not_assessed(
        self, session: Session, held: Sequence[tuple[ClaimedJob, str]], model: ModelRef
    ) -> list[dict[str, object]]:
        """``[results] sr_not_assessed``: queue the SRs, in the transaction ending the jobs."""
        items = [
            PlanItem(instance_id=job.instance_id, job_id=job.id, model_id=model.id)
            for job, reason in held
            # Our own objects coming back are never reported on (and never reach here).
            if reason != reasons.OWN_OUTPUT
        ]
        planned = iter(plan_results(session, self.config.results, items))
        return [
            {"result_objects": [o.detail() for o in next(planned)]}
            if reason != reasons.OWN_OUTPUT
            else {}
            for _, reason in held
        ]

    def tensor_for(self, job: ClaimedJob, image_size: int) -> npt.NDArray[np.float32]:
        """Eligibility first (metadata), then the pixels; raises NotAssessable."""
        from pacs_classifier.preprocess import serving_tensor

        if self._abort_on is not None and job.sop_instance_uid == self._abort_on:
            log.critical("%s: aborting on job %d", ABORT_ON_UID_ENV, job.id)
            os.abort()

        return serving_tensor(
            self.resolve(job.file_path), image_size, rules=self.config.eligibility
        )

    def resolve(self, file_path: str) -> Path:
        """Instance paths are stored relative to the storage root (or absolute)."""
        p = Path(file_path)
        return p if p.is_absolute() else self.config.storage_root / p

    def process(self, batch: PreparedBatch) -> None:
        """Infer one prepared batch and record every outcome."""
        if not batch.jobs:
            return
        try:
            predictor = self._predictor_for(batch.model, batch.model_path)
            started = time.perf_counter()
            out = predictor.infer(batch.tensors)
            self.stats.infer_seconds += time.perf_counter() - started
            batch, probs = self._refuse_out_of_distribution(batch, out)
        except (PermanentError, RetryableError) as exc:
            # A model that will not load or run is not the images' fault: retry them.
            log.error("model %s failed on a batch: %s", batch.model.version, exc)
            self._count_failures(self.jobs.fail([(j, _reason(exc), True) for j in batch.jobs]))
            return
        self.record(batch, probs)

    def _refuse_out_of_distribution(
        self, batch: PreparedBatch, out: Inference
    ) -> tuple[PreparedBatch, npt.NDArray[np.float64]]:
        """End the jobs whose features the model's OOD check refuses; return the rest."""
        ood = self._ood
        if ood is None or out.features is None:
            return batch, out.probability
        scores = ood.score(out.features)
        refused = scores > ood.threshold
        if not refused.any():
            return batch, out.probability
        ended = [j for j, r in zip(batch.jobs, refused, strict=True) if r]
        details = {
            j.id: {"ood_score": round(float(s), 4), "ood_threshold": round(ood.threshold, 4)}
            for j, s, r in zip(batch.jobs, scores, refused, strict=True)
            if r
        }
        self.jobs.mark_not_assessed(
            [(j, reasons.OUT_OF_DISTRIBUTION) for j in ended],
            details,
            plan=lambda session, held: self.plan_not_assessed(session, held, batch.model),
        )
        for job in ended:
            log.info(
                "job %d (instance %d): not assessed, %s (score %.3f > %.3f, model %s)",
                job.id,
                job.instance_id,
                reasons.OUT_OF_DISTRIBUTION,
                details[job.id]["ood_score"],
                ood.threshold,
                batch.model.version,
            )
        self.stats.not_assessed += len(ended)
        keep = ~refused
        kept = [j for j, k in zip(batch.jobs, keep, strict=True) if k]
        return (
            PreparedBatch(batch.model, batch.model_path, kept, batch.tensors[keep]),
            out.probability[keep],
        )

    def record(self, batch: PreparedBatch, probs: npt.NDArray[np.float64]) -> None:
        """Predictions, job states and audit events of one batch, in one transaction."""
        model = batch.model
        started = time.perf_counter()
        results: list[tuple[ClaimedJob, str, float]] = []
        held: list[ClaimedJob] = []
        with self.db.session() as session:
            recorded: list[tuple[ClaimedJob, float, Label, int | None]] = []
            for job, p in zip(batch.jobs, probs, strict=True):
                probability = float(p)
                label = label_for(probability, model.threshold)
                results.append((job, str(label), probability))
                pred_id = record_prediction(
                    session,
                    instance_id=job.instance_id,
                    model=model,
                    probability=probability,
                    run_id=job.run_id,
                    job_id=job.id,
                )
                recorded.append((job, probability, label, pred_id))
            # One plan for the whole batch (a few statements, whatever its size); each
            # job's audit event names the objects its prediction yielded.
            fresh = [r for r in recorded if r[3] is not None]
            planned = plan_results(
                session,
                self.config.results,
                [PlanItem(j.instance_id, prediction_id=pid, label=lab) for j, _, lab, pid in fresh],
            )
            objects = {r[0].id: objs for r, objs in zip(fresh, planned, strict=True)}
            for job, probability, label, pred_id in recorded:
                if self.jobs.mark_done(
                    session,
                    job,
                    {
                        "prediction_id": pred_id,
                        "duplicate": pred_id is None,
                        "model_version": model.version,
                        "probability": round(probability, 6),
                        "label": str(label),
                        "threshold": model.threshold,
                        "run_id": job.run_id,
                        "result_objects": [o.detail() for o in objects.get(job.id, [])],
                    },
                ):
                    held.append(job)
        # Identifiers only: a log line must not carry a patient's name or ID (STYLE.md).
        for job, label_text, probability in results:
            log.info(
                "job %d (instance %d): %s, p=%.4f (threshold %.4f, model %s)",
                job.id,
                job.instance_id,
                label_text,
                probability,
                model.threshold,
                model.version,
            )
        self.stats.done += len(batch.jobs)
        self.stats.batches += 1
        self.jobs.ended([ended_job(j, JobState.DONE) for j in held])
        self.stats.record_seconds += time.perf_counter() - started

    def _predictor_for(self, model: ModelRef, path: str) -> Predictor:
        if self._predictor is None or self._predictor_model_id != model.id:
            log.info("loading model %s from %s", model.version, path)
            self._predictor = None  # free the old one before building the new
            self._ood = None
            self._predictor = self._loader(path, self.config.model.runtime)
            self._predictor_model_id = model.id
            self._ood = self._ood_check(model, self._predictor)
            if self._predictor.info.image_size != model.image_size:
                raise PermanentError(
                    f"model {model.version}: bundle image_size "
                    f"{self._predictor.info.image_size} differs from the registry's "
                    f"{model.image_size}"
                )
        return self._predictor

    def _ood_check(self, model: ModelRef, predictor: Predictor) -> OodModel | None:
        """The model's out-of-distribution check, said once per load when it is off.

        An ``ood.npz`` that is unreadable or fitted for another model is a
        :class:`ModelError` (the batch is retried): a check is never dropped silently.
        """
        ood = read_ood(predictor.info)
        if ood is None:
            log.warning(
                "model %s has no %s: the image out-of-distribution check is off",
                model.version,
                OOD_FILE,
            )
            return None
        probe = predictor.infer(
            np.zeros((1, model.image_size, model.image_size, 3), dtype=np.float32)
        )
        if probe.features is None:
            log.warning(
                "model %s: runtime %s returns no features (exported before they were an "
                "output; register the model again): the out-of-distribution check is off",
                model.version,
                predictor.runtime,
            )
            return None
        log.info(
            "model %s: out-of-distribution check on (threshold %.3f, fitted on %d images)",
            model.version,
            ood.threshold,
            ood.fitted_on,
        )
        return ood

    def _count_failures(self, outcomes: list[Any]) -> None:
        for o in outcomes:
            if o.state == JobState.FAILED:
                self.stats.failed += 1
            else:
                self.stats.retried += 1

    # ------------------------------------------------------------------ helpers

    def drain(self, *, until: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Run the pipeline until ``until()`` is true (``reclassify``, ``classify``, tests)."""
        stop = threading.Event()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def watch() -> None:
            while not stop.is_set():
                if until() or (deadline is not None and time.monotonic() > deadline):
                    stop.set()
                    return
                stop.wait(0.2)

        watcher = threading.Thread(target=watch, name="worker-watch", daemon=True)
        watcher.start()
        self.run(stop)
        watcher.join()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
