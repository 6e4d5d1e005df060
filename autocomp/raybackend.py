"""The Ray backend (``autocomp search --backend ray``): proxy evaluations run in Ray actors.

Each actor loads the model, its calibration data and the teacher outputs once, then scores plans sent to
it. The driver keeps the Optuna study: one driver thread per actor asks a trial, repairs it onto the
budget, sends the plan to its actor and tells the result, so every trial lands in the same study (and
storage) as with the local backend, and ``pareto``, ``plan``, resume and optuna-dashboard work unchanged.

Resume is the study's own: killing the driver leaves at most one RUNNING trial per actor, which the next
run fails and re-enqueues (see :func:`autocomp.search.study.recover_stale`). Ray Tune's experiment restore
was not used because it would keep a second record of the same trials next to the study, and the two
could disagree after a kill.

A local Ray runtime is started with one CPU per worker, its temp files (sockets, logs, session data, the auth
token) in a fresh folder under the system temp dir (socket paths must stay short) that is deleted on
shutdown, usage stats off, no dashboard. ``--address`` joins an existing cluster instead (``auto`` or ``ray://host:port``);
its nodes need autocomp and the model's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError

__all__ = ["RayPool"]


class _Worker:
    """One Ray actor: the model and its proxy evaluator, built once."""

    def __init__(self, model: str, data: str | None, metric: str, threads: int, calibration_dir: str | None = None,
                 store: tuple[str, int] | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        from autocomp.evaluators.proxy import ProxyEvaluator
        from autocomp.models import load_model
        from autocomp.models.introspect import introspect

        loaded = load_model(model, data=data, metric=metric)
        desc = introspect(loaded)
        from autocomp.memory import settle_for

        settle_for(desc.fp32_bytes)  # as the driver's process: a small model's freed activations are kept
        if calibration_dir is not None:  # compensated options: the driver's statistics (its cache file)
            from autocomp.compressors.calibration import ensure

            ensure(loaded, desc, Path(calibration_dir))
        self.evaluator = ProxyEvaluator(loaded, desc)
        if store is not None:  # the driver's weight store: actors share what each compressed
            from autocomp.compressors.store import WeightStore

            self.evaluator.applier.store = WeightStore(*store)

    def ready(self) -> dict[str, Any]:
        import resource

        return {"pid": os.getpid(), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def evaluate(self, plan: dict[str, Any]) -> float:
        from autocomp.plan import Plan

        return float(self.evaluator(Plan.from_dict(plan)))


class _Remote:
    """``evaluator(plan) -> proxy`` like :class:`~autocomp.evaluators.proxy.ProxyEvaluator`, in an actor."""

    batches: tuple = ()  # staged evaluation stays local-only

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, plan: Any) -> float:
        import ray

        return float(ray.get(self.actor.evaluate.remote(plan.to_dict())))


def _absolute(spec: str | None) -> str | None:
    """``file.py:fn`` with a relative path, made absolute (actors do not share the driver's cwd)."""
    if spec and ".py:" in spec and not spec.startswith(("hf:", "/")):
        path, _, fn = spec.rpartition(":")
        return f"{Path(path).resolve()}:{fn}"
    if spec and spec.startswith("hf:") and not spec[3:].startswith("/"):
        return "hf:" + str(Path(spec[3:]).expanduser().resolve())
    return spec


def reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` / ``ray://host:port`` nobody listens on (Ray itself retries for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RuntimeError(f"nothing answers at {hostport} ({getattr(e, 'strerror', None) or e})") from None


class RayPool:
    def __init__(self, cfg: Any, metric: str, study: str, emit: Any, calibration: bool = False) -> None:
        """``calibration``: the space has compensated options; the actors read the driver's statistics."""
        calibration_dir = str((Path(cfg.studies_dir) / "calibration").resolve()) if calibration else None
        from autocomp.search.engine import parse_store_bytes

        limit = parse_store_bytes(getattr(cfg, "weights_cache", "0"))
        store = (str((Path(cfg.studies_dir) / "weights").resolve()), limit) if limit else None
        try:
            import ray
        except ImportError:
            raise AutocompError("--backend ray needs Ray; pip install 'autocomp[distributed]'") from None
        if cfg.workers < 1:
            raise AutocompError(f"--workers must be >= 1, got {cfg.workers}")
        self.workers = cfg.workers
        self.temp_dir: str | None = None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
                  "configure_logging": False}
        t0 = time.perf_counter()
        emit("status", {"message": f"starting Ray ({'address ' + cfg.address if cfg.address else 'local'}) "
                                   f"with {cfg.workers} workers"})
        try:
            if cfg.address:
                reachable(cfg.address)
                ray.init(address=cfg.address, **kwargs)
            else:
                base = tempfile.gettempdir()  # Ray's socket paths must fit in 107 bytes
                self.temp_dir = tempfile.mkdtemp(prefix="acray-", dir=base if len(base) <= 40 else "/tmp")
                # Ray's auth token goes with its other files, not to ~/.ray
                self._env = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN_PATH",)}
                token = os.path.join(self.temp_dir, "auth_token")
                import secrets

                with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                    f.write(secrets.token_hex(32))
                os.environ["RAY_AUTH_TOKEN_PATH"] = token
                ray.init(num_cpus=cfg.workers, _temp_dir=self.temp_dir, **kwargs)
        except Exception as e:
            self._cleanup()
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            where = f"Ray cluster at {cfg.address!r}" if cfg.address else "a local Ray runtime"
            raise AutocompError(f"{where} could not be reached/started: {first[:200]}; check --address "
                                f"(or leave it out to start Ray here)") from None
        self.startup_seconds = time.perf_counter() - t0
        try:
            actor = ray.remote(num_cpus=1)(_Worker)
            threads = max(1, (os.cpu_count() or 1) // cfg.workers)
            self.actors = [actor.remote(_absolute(cfg.model), _absolute(cfg.data), metric, threads, calibration_dir,
                                        store) for _ in range(cfg.workers)]
            self.info = ray.get([a.ready.remote() for a in self.actors])
        except Exception as e:
            self.close()
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AutocompError(f"Ray workers could not load the model: {first[:300]}") from None
        self.ready_seconds = time.perf_counter() - t0
        emit("status", {"message": f"Ray up in {self.startup_seconds:.1f} s, {cfg.workers} workers ready in "
                                   f"{self.ready_seconds:.1f} s (max RSS per worker "
                                   f"{max(i['max_rss_mb'] for i in self.info):.0f} MB)"})

    def evaluator(self, i: int) -> _Remote:
        return _Remote(self.actors[i])

    def close(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for k, v in getattr(self, "_env", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._env = {}
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
