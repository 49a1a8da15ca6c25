"""`clipfail embed --engine ray`: the embed stage's rows computed on a Ray cluster (optional extra).

Install with ``pip install 'clipfail[ray]'`` on the driver and on every node of the cluster (the
same clipfail version: the workers import `toolkit` to decode, preprocess and encode).

What runs where.

* The driver (the ``clipfail embed`` process) reads the subset's rows from the database, closes it,
  and plans the shards exactly as the local engine does (`toolkit.embed.stage`). Workers never open the
  DuckDB file. The driver also loads the model once on its CPU, only to tokenize the captions (once,
  as the local engine does) and to record the preprocess in the set's config.
* Ray Data carries the row numbers still to compute (blocks of one model batch of images, or one
  shard of captions) to an actor pool of model replicas (`map_batches` with the callable class
  `Encoder`): one actor per GPU (``--gpus-per-worker G``: G GPUs each, fractions allowed) or
  ``--workers N`` CPU actors. Each replica loads the model with `toolkit.embed.models.load_model`, checks
  that its weights are the ones the driver planned with (model, tag, checkpoint sha256), reads and
  decodes its images with `toolkit.embed.encode.encode_images` (the same ``convert("RGB")`` + open_clip
  preprocess, the same ``--draft-decode``) and encodes the driver's token ids with
  `toolkit.embed.encode.encode_texts_with_info` (the same exact text fast path). Image paths and token ids
  travel once, through the object store.
* The driver writes what it gathers: every result row comes back to the driver, which cuts the
  shards (`toolkit.embed.stage.ShardGather`) and saves each one, checksummed, into the manifest of the
  usual ``.partial`` folder under the usual lock. So only the driver needs the cache folder; the
  workers need the IMAGE files, at the same absolute paths as the driver's database resolves them
  (shared storage: NFS, a parallel file system, or a copy at the same path on every node).

Fault tolerance: the actors are created with ``max_restarts=-1`` and ``max_task_retries=-1``: an actor
that dies (node lost, ``ray.kill``, out of memory) is restarted and its batch is run again; a row that
comes back twice is counted once. An interrupted driver (Ctrl-C) leaves its complete shards, which the
next run with either engine reuses.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import UserError, list_offenders

EXTRA_HINT = "pip install 'clipfail[ray]'"
CONNECT_TIMEOUT_S = 5.0


def require_ray():
    """The ray module (with Ray Data), or one UserError that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--engine ray needs Ray (with Ray Data), which is not installed here ({exc}). Install the extra: "
            f"{EXTRA_HINT} (on the driver and on every node of the cluster), or use --engine local."
        ) from None
    return ray


def check_options(*, decode: str, device: str, gpus_per_worker, workers) -> None:
    """Refuse options the Ray engine cannot honour, before anything is read or written."""
    require_ray()
    if decode != "cpu":
        raise UserError("--decode gpu is for --engine local; with --engine ray drop --decode (the exact CPU decode).")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise UserError("--gpus-per-worker must be 0 or more.")
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1.")
    dev = str(device).strip().lower()
    if dev == "mps":
        raise UserError("--device mps is not available on a Ray cluster; use --device auto, cpu or cuda.")
    if dev == "cpu" and gpus_per_worker:
        raise UserError("--device cpu with --gpus-per-worker > 0 would hold GPUs it does not use; drop one of them.")


def _reachable(address: str) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) that does not accept a TCP connection within a few
    seconds, instead of letting ray.init retry for minutes."""
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(
            f"--ray-address {address!r} is not HOST:PORT (for example 10.0.0.5:6379, or ray://10.0.0.5:10001 "
            "for Ray Client), nor 'auto'."
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            f"Cannot reach the Ray cluster at {address} ({exc.strerror or exc}). Start it there with "
            "`ray start --head`, check the address and port (the head's GCS port, 6379 by default) and the firewall, "
            "or leave out --ray-address to start a local Ray instance. Nothing was written."
        ) from None


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a worker raised, found in the chain of Ray's wrapper exceptions (or None)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e).splitlines()[0] if "\n" in str(e) else str(e))
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


KIND_CODES = {"image": 0, "text": 1}


class Encoder:
    """A model replica (the callable class of Ray Data's actor pool): a block of (kind, row) pairs in,
    their L2-normalised embeddings out ({"kind", "row", "emb", "pid", "device"}), computed by
    `toolkit.embed.encode` exactly as the local engine computes them."""

    def __init__(self, payloads, model, pretrained, checkpoint, device, precision, weights, batch_sizes,
                 draft, num_workers, threads):  # fmt: skip
        self.error = ""  # a UserError of the constructor, reported by the first call (see __call__)
        try:
            self._setup(payloads, model, pretrained, checkpoint, device, precision, weights, batch_sizes, draft,
                        num_workers, threads)  # fmt: skip
        except UserError as exc:
            self.error = str(exc)

    def _setup(self, payloads, model, pretrained, checkpoint, device, precision, weights, batch_sizes,
               draft, num_workers, threads):  # fmt: skip
        import ray
        import torch

        from toolkit.embed import models

        if threads:
            torch.set_num_threads(int(threads))
        self.batch_sizes, self.draft, self.num_workers = batch_sizes, draft, num_workers
        # image paths (object array) and token ids [N, context] (int32), from the object store
        self.paths, self.tokens = (ray.get(r) if r is not None else None for r in payloads)
        self.bundle = models.load_model(
            model, pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision
        )
        got = {
            "model": self.bundle.model_name,
            "pretrained": self.bundle.pretrained,
            "checkpoint_sha256": self.bundle.checkpoint_sha256,
        }
        if got != weights:
            raise UserError(
                f"A Ray worker (pid {os.getpid()}) loaded other weights than the driver planned with: {got} is not "
                f"{weights}. Make the same --checkpoint file (or pretrained cache) reachable at the same path on every "
                "node, then run the command again."
            )

    def __call__(self, batch: dict) -> dict:
        """A UserError (a file that does not decode, other weights) comes back as one row whose "error"
        the driver raises as it is: an exception would reach it only as Ray's wrapped traceback."""
        data = np.asarray(batch["data"], dtype=np.int64)
        code, rows = int(data[0, 0]), data[:, 1]
        if not self.error:
            try:
                return self._encode(code, rows)
            except UserError as exc:
                self.error = str(exc)
        return {
            "kind": np.array([code]),
            "row": np.array([-1]),
            "emb": np.zeros((1, 1), np.float32),
            "pid": np.array([os.getpid()]),
            "device": np.array([""]),
            "error": np.array([self.error]),
        }

    def _encode(self, code: int, rows: np.ndarray) -> dict:
        import torch

        from toolkit.embed import encode

        if code == KIND_CODES["image"]:
            feats = encode.encode_images(
                self.bundle,
                [self.paths[r] for r in rows],
                batch_size=self.batch_sizes["image"],
                num_workers=self.num_workers,
                draft=self.draft,
                progress=False,
            )
        else:
            ids = torch.from_numpy(np.ascontiguousarray(self.tokens[rows], dtype=np.int64))
            feats = encode.encode_texts_with_info(
                self.bundle, [""] * len(rows), self.batch_sizes["text"], progress=False,
                tokens=encode.Tokens(ids, None, None),
            ).embeddings  # fmt: skip
        n = len(rows)
        return {
            "kind": np.full(n, code, dtype=np.int64),
            "row": rows,
            "emb": feats,
            "pid": np.full(n, os.getpid(), dtype=np.int64),
            "device": np.full(n, self.bundle.device),
            "error": np.full(n, ""),
        }


def _missing_files(paths: list) -> list:
    return [p for p in paths if not os.path.isfile(p)]


# The class the actor pool runs (tests substitute a subclass that gets itself killed once).
ENCODER = Encoder


@dataclass
class RayEngine:
    """A connection to a Ray cluster and how to run the replicas on it."""

    started: bool  # True when this process started Ray (and shuts it down on close)
    address: str | None
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    options: dict  # model, pretrained, checkpoint, device, precision, weights, draft, num_workers
    devices: set
    ray_version: str

    @classmethod
    def connect(cls, address, *, gpus_per_worker=None, workers=None, **options) -> RayEngine:
        """Join the cluster at `address` ('auto', HOST:PORT, ray://HOST:PORT; None: RAY_ADDRESS or a
        new local instance), or use the Ray instance this process is already connected to."""
        ray = require_ray()
        if options.get("checkpoint") is not None:  # the workers' working folder is not the driver's
            options["checkpoint"] = str(Path(options["checkpoint"]).expanduser().resolve())
        started = False
        if not ray.is_initialized():
            if address and address != "auto":
                _reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(
                    f"Cannot connect to the Ray cluster at {address or 'RAY_ADDRESS / a new local instance'}: "
                    f"{str(exc).splitlines()[0]}. Start one with `ray start --head`, or pass its --ray-address. "
                    "Nothing was written."
                ) from None
            started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        res = ray.cluster_resources()
        gpus_total, cpus_total = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        device = str(options.get("device", "auto")).strip().lower()
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus_total and device != "cpu" else 0.0
        if gpus_per_worker and gpus_per_worker > gpus_total:
            if started:
                ray.shutdown()
            raise UserError(
                f"--gpus-per-worker {gpus_per_worker:g} asks for more GPUs than the Ray cluster has ({gpus_total:g}). "
                "Add GPU nodes, or lower --gpus-per-worker (0 for CPU actors)."
            )
        if not gpus_per_worker and device.startswith("cuda"):
            if started:
                ray.shutdown()
            raise UserError(
                f"--device {device} with --engine ray needs GPU replicas, and "
                + ("the Ray cluster has no GPUs" if not gpus_total else "--gpus-per-worker is 0")
                + ". Add GPU nodes (or pass --gpus-per-worker), or drop --device for CPU replicas."
            )
        if workers is None:
            workers = max(1, int(gpus_total // gpus_per_worker)) if gpus_per_worker else 1
        if gpus_per_worker:
            # A GPU replica decodes its images with --num-workers processes (default: up to 8, as the CPUs
            # of the cluster per replica allow) and reserves that many CPUs.
            if options.get("num_workers") is None:
                options["num_workers"] = max(0, min(8, int(cpus_total // workers) - 1))
            cpus = float(max(1, options["num_workers"]))
            if device in ("auto", ""):
                options["device"] = "cuda"
        else:
            cpus = float(max(1, int(cpus_total // workers))) if cpus_total else 1.0
            options["device"] = "cpu"
        return cls(started, address, int(workers), float(gpus_per_worker), cpus, options, set(), ray.__version__)

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def check_images(self, paths: list, subset: str) -> None:
        """Refuse, naming them, image files that the workers cannot open at the driver's paths."""
        import ray

        probe = ray.remote(num_cpus=0.25)(_missing_files)
        step = max(1, -(-len(paths) // (4 * max(1, self.workers))))
        missing = [p for part in ray.get([probe.remote(paths[a : a + step]) for a in range(0, len(paths), step)])
                   for p in part]  # fmt: skip
        if missing:
            raise UserError(
                f"{len(missing)} image file(s) of subset {subset!r} are missing on the Ray workers' filesystem: "
                f"{list_offenders(missing, limit=3)}. The workers read the images at the paths the database gives; "
                "put the image folder on storage every node mounts at the same path (or copy it there), then run the "
                "command again. Nothing was written."
            )

    def compute(self, gathers: dict, bars: dict, *, paths, tokens, batch_sizes: dict) -> None:
        """Compute the rows of every `gathers[kind]` (a `toolkit.embed.stage.ShardGather`) in ONE Ray Data pass
        (one actor pool for both kinds): images in blocks of one model batch, captions in blocks of one
        shard (from the driver's token ids). Results are filed as they arrive; `gather.finish` saves
        each shard on the driver as soon as it is complete."""
        import ray

        blocks = []
        for kind, gather in gathers.items():
            rows = gather.rows
            if kind == "image":
                # one model batch per block; 8 with decode processes, whose start is then paid per 8 batches
                step = batch_sizes["image"] * (8 if self.options.get("num_workers") else 1)
                parts = [rows[a : a + step] for a in range(0, len(rows), step)]
            else:
                owner = rows // gather.shards.shard_rows
                parts = [rows[owner == i] for i in np.unique(owner).tolist()]
            blocks += [np.stack([np.full(len(p), KIND_CODES[kind], np.int64), p], axis=1) for p in parts]
        if not blocks:
            return
        refs = {
            "image": ray.put(np.asarray(paths, dtype=object)) if "image" in gathers else None,
            "text": ray.put(np.asarray(tokens, dtype=np.int32)) if "text" in gathers else None,
        }
        with warnings.catch_warnings():  # max_restarts / max_task_retries go as ray_remote_args (deprecated form)
            warnings.simplefilter("ignore")
            ds = self._dataset(ray, blocks, refs, batch_sizes)
        it = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
        quiet = logging.getLogger("ray.data")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # no "execution finished" lines on the CLI's stderr
        kinds = {code: kind for kind, code in KIND_CODES.items()}
        try:
            with warnings.catch_warnings():  # Ray Data's hints on block counts and deprecations
                warnings.simplefilter("ignore")
                for out in it:
                    if len(out["error"]) and out["error"][0]:
                        raise UserError(str(out["error"][0]))
                    kind = kinds[int(out["kind"][0])]
                    rows = np.asarray(out["row"], dtype=np.int64)
                    self.devices.update(str(d) for d in np.unique(out["device"]))
                    gathers[kind].add(rows, np.asarray(out["emb"], dtype=np.float32))
                    bars[kind].update(len(rows))
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:
            err = _user_error_in(exc)
            if err is not None:
                raise err from None
            raise
        finally:
            quiet.setLevel(level)
            close = getattr(it, "close", None)
            if close is not None:
                close()
            del refs
        if not all(g.complete for g in gathers.values()):  # pragma: no cover - every block comes back once
            raise RuntimeError("the Ray dataset ended before every row was computed")

    def _dataset(self, ray, blocks, refs, batch_sizes):
        opts = self.options
        return ray.data.from_numpy(blocks).map_batches(
            ENCODER,
            batch_size=None,  # one block = one call: the blocks are cut to size here
            batch_format="numpy",
            fn_constructor_kwargs=dict(
                payloads=[refs["image"], refs["text"]],
                model=opts["model"],
                pretrained=opts["pretrained"],
                checkpoint=opts["checkpoint"],
                device=opts["device"],
                precision=opts["precision"],
                weights=opts["weights"],
                batch_sizes=batch_sizes,
                draft=bool(opts.get("draft")),
                num_workers=int(opts.get("num_workers") or 0),
                threads=0 if self.on_gpu else int(self.cpus_per_worker),
            ),
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None,
            max_restarts=-1,
            max_task_retries=-1,
        )

    def made_with(self) -> dict:
        """How the rows were computed (recorded in the set's config; not part of its identity)."""
        return {
            "engine": "ray",
            "device": ",".join(sorted(self.devices)) or self.options["device"],
            "ray_workers": self.workers,
            "gpus_per_worker": self.gpus_per_worker,
            "ray_version": self.ray_version,
        }
