"""Resolve a model spec to an open_clip model, its preprocess and its tokenizer.

A spec is one of:

- an open_clip architecture name, with a pretrained tag: ``ViT-B-32-quickgelu`` + ``openai``;
- a Hugging Face style name of an OpenAI CLIP, mapped through `HF_NAME_TABLE`
  (``openai/clip-vit-base-patch32`` -> ``ViT-B-32-quickgelu`` + ``openai``). The table names the
  ``-quickgelu`` configs on purpose: since open_clip 2.29 plain ``ViT-B-32`` builds GELU, while
  OpenAI's weights were trained with QuickGELU, and the mismatch costs accuracy;
- ``hf-hub:org/repo`` (an open_clip model published on the Hugging Face hub);
- ``local-dir:/path`` (open_clip's own local folder format);
- a path to an open_clip model-config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered
  with open_clip under the file's stem; ``tiny-clip`` is such a config shipped with this package,
  small enough for a CPU, for tests and the demo.

Weights come from the pretrained tag, or from ``checkpoint=PATH`` (a local state dict, for offline
use; its sha256 is recorded). Weights that are not in the local cache are downloaded only when the
hub is reachable: with ``HF_HUB_OFFLINE`` set or no network, `load_model` fails within seconds
with a `UserError` that suggests ``--checkpoint``, instead of retrying for minutes.

Device ``auto`` picks cuda, then mps, then cpu. The model is always in eval mode; encoders run
under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from toolkit.embed.devices import resolve_device
from toolkit.errors import UserError
from toolkit.store.paths import sha256_file  # the one file checksum (also reached as models.sha256_file)

PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_INIT_SEED = 0  # a model built without any weights is initialised from this seed
TINY_CONFIG = "tiny-clip"

# Hugging Face style names of OpenAI's CLIP models -> (open_clip architecture, pretrained tag).
# The architectures are the QuickGELU variants, which is how OpenAI trained these weights.
HF_NAME_TABLE: dict[str, tuple[str, str]] = {
    "openai/clip-vit-base-patch32": ("ViT-B-32-quickgelu", "openai"),
    "openai/clip-vit-base-patch16": ("ViT-B-16-quickgelu", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14-quickgelu", "openai"),
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336-quickgelu", "openai"),
}

_WEIGHTS_HINT = (
    "Download the weights on a machine with internet access and pass the file with --checkpoint PATH "
    "(or pre-populate the Hugging Face cache, $HF_HOME)."
)


@dataclass
class ModelSpec:
    """What a spec resolves to before anything is built or downloaded."""

    spec: str  # as given
    kind: str  # 'open_clip' | 'hf-name' | 'hf-hub' | 'local-dir' | 'config-json'
    model_name: str  # the open_clip name (or 'hf-hub:...' / 'local-dir:...')
    pretrained: str | None
    config_path: str | None = None  # for 'config-json'


@dataclass
class ModelBundle:
    model: object  # open_clip CLIP / CustomTextCLIP, in eval mode on `device`
    preprocess: object  # PIL image -> tensor (open_clip's eval transform)
    tokenizer: object
    model_name: str
    pretrained: str | None
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    device: str
    precision: str
    context_length: int
    spec: str
    image_size: tuple[int, int] = (224, 224)
    notes: list[str] = field(default_factory=list)

    @property
    def input_dtype(self):
        """The dtype the vision tower expects its pixels in.

        With fp16/bf16, open_clip converts the convolution and linear weights but keeps some
        parameters (class and positional embeddings, LayerNorms) in float32, so the first
        parameter says nothing: the patch embedding's (or else any half) dtype is the input's."""
        import torch

        visual = self.model.visual
        conv = getattr(visual, "conv1", None)
        if isinstance(getattr(conv, "weight", None), torch.Tensor):
            return conv.weight.dtype
        dtypes = {p.dtype for p in visual.parameters() if p.is_floating_point()}
        for low in (torch.float16, torch.bfloat16):
            if low in dtypes:
                return low
        return torch.float32

    def describe(self) -> dict:
        """Plain provenance: what made the embeddings (goes into run configs)."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "precision": self.precision,
            "spec": self.spec,
        }


# --------------------------------------------------------------------------- spec resolution


def tiny_config_path() -> Path:
    """The packaged tiny open_clip config (tests and the offline demo)."""
    return Path(str(resources.files("toolkit") / "data" / f"{TINY_CONFIG}.json"))


_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip needs to see a model config


def _read_config(path: Path) -> dict:
    """A model-config JSON file's content (a FIFO or a device refused before it is opened, see userfiles)."""
    from toolkit.userfiles import load_json

    cfg = load_json(path, "Model config", "Give --model an open_clip model-config JSON file.")
    missing = [k for k in _CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UserError(
            f"{path} is not an open_clip model config: it lacks {', '.join(missing)}. "
            "See open_clip's model_configs/*.json for the format."
        )
    return cfg


def _builtin_config(name: str) -> dict | None:
    """open_clip's own model config of that name, read from its package folder without importing open_clip
    (what open_clip's registry holds in a fresh process); None when it ships none."""
    import importlib.util

    try:
        found = importlib.util.find_spec("open_clip")  # finds the package; imports nothing
    except (ImportError, ValueError):
        return None
    for folder in (found.submodule_search_locations or []) if found else []:
        f = Path(folder) / "model_configs" / f"{name}.json"
        if f.is_file():
            try:
                cfg = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return cfg if isinstance(cfg, dict) and all(k in cfg for k in _CONFIG_KEYS) else None
    return None


def _register_config(path: Path) -> str:
    """Register an open_clip model-config JSON under its stem; return that name."""
    import open_clip

    cfg = _read_config(path)
    name = path.stem
    known = open_clip.get_model_config(name)
    if known is not None and known != cfg:
        raise UserError(
            f"The model config {path} is named {name!r}, which open_clip already knows with a different "
            "architecture. Rename the file."
        )
    if known is None:
        open_clip.add_model_config(path)
    return name


def _refuse_pretrained_file(pretrained: str | None) -> None:
    """A weights file goes to --checkpoint (recorded by its sha256), never to --pretrained: open_clip loads a
    file given as a pretrained tag, but the embeddings' identity would then hold only the path's text, so
    other weights written at that path later would be answered with the old cached embeddings."""
    if pretrained and os.path.isfile(os.path.expanduser(str(pretrained))):
        raise UserError(
            f"--pretrained {pretrained} is a file; --pretrained takes an open_clip tag (such as openai). Give a "
            f"weights file with --checkpoint {pretrained} instead: its sha256 is then recorded with the embeddings."
        )


def resolve_spec(spec: str, pretrained: str | None = None) -> ModelSpec:
    """Turn a model spec (and optional pretrained tag) into what open_clip needs. Touches no network."""
    import open_clip

    spec = str(spec).strip()
    if not spec:
        raise UserError("Give a model with --model (for example openai/clip-vit-base-patch32).")
    _refuse_pretrained_file(pretrained)
    if spec.startswith("hf-hub:"):
        if pretrained:
            raise UserError(f"{spec} names its own weights; drop --pretrained (or use --checkpoint PATH).")
        return ModelSpec(spec, "hf-hub", spec, None)
    if spec.startswith("local-dir:"):
        return ModelSpec(spec, "local-dir", spec, None)
    if spec.lower() in HF_NAME_TABLE:
        arch, tag = HF_NAME_TABLE[spec.lower()]
        if pretrained and pretrained != tag:
            raise UserError(
                f"{spec} means open_clip {arch} with {tag!r} weights; it cannot take --pretrained {pretrained}. "
                f"Use --model {arch} --pretrained {pretrained} instead."
            )
        return ModelSpec(spec, "hf-name", arch, tag)
    if spec.endswith(".json") or os.sep in spec or (os.altsep and os.altsep in spec):
        path = Path(spec).expanduser()
        if spec.endswith(".json") or path.exists():
            from toolkit.userfiles import check_regular

            check_regular(path, "Model config file")  # missing, a folder, a FIFO or a device: named, not opened
            name = _register_config(path.resolve())
            return ModelSpec(spec, "config-json", name, pretrained, str(path.resolve()))
    if spec == TINY_CONFIG and open_clip.get_model_config(spec) is None:
        _register_config(tiny_config_path())
        return ModelSpec(spec, "config-json", spec, pretrained, str(tiny_config_path()))
    if open_clip.get_model_config(spec) is not None:
        name = spec
        if pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                shown = ", ".join(tags) if tags else "none"
                raise UserError(f"open_clip has no pretrained tag {pretrained!r} for {name}. Known tags: {shown}.")
            cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            model_cfg = open_clip.get_model_config(name)
            if cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
                # OpenAI-style weights trained with QuickGELU: use the matching architecture.
                qg = f"{name}-quickgelu"
                if open_clip.get_model_config(qg) is not None:
                    name = qg
        return ModelSpec(spec, "open_clip", name, pretrained)
    hf_like = [k for k in HF_NAME_TABLE if spec.lower().split("/")[-1] in k]
    hint = f" Known Hugging Face style names: {', '.join(HF_NAME_TABLE)}." if "/" in spec or hf_like else ""
    raise UserError(
        f"Unknown model {spec!r}: not an open_clip architecture (see open_clip.list_models()), a Hugging Face "
        f"style name from the mapping table, an hf-hub: name, or a model-config JSON file.{hint}"
    )


# --------------------------------------------------------------------------- weights, offline handling


_PROBED: dict[tuple[str, str], str | None] = {}


def check_precision(device: str, precision: str) -> None:
    """Refuse, with a clear message, a half precision that this torch cannot run on `device`.

    A few tiny ops of the kinds a CLIP tower runs (convolution, matmul, LayerNorm, attention,
    GELU) are tried once per (device, precision) in that dtype; any failure becomes a UserError.
    """
    if precision == "fp32":
        return
    key = (str(device), precision)
    if key not in _PROBED:
        _PROBED[key] = _probe_precision(str(device), precision)
    problem = _PROBED[key]
    if problem:
        raise UserError(
            f"--precision {precision} is not supported on {device} by this PyTorch: {problem}. "
            "Use --precision fp32" + (" or bf16" if precision == "fp16" else "") + ", or another --device."
        )


def _probe_precision(device: str, precision: str) -> str | None:
    import torch
    import torch.nn.functional as F

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device.startswith("cuda") and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support"
    try:
        with torch.inference_mode():
            x = torch.randn(2, 3, 8, 8).to(device=device, dtype=dtype)
            w = torch.randn(4, 3, 4, 4).to(device=device, dtype=dtype)
            y = F.conv2d(x, w, stride=4).flatten(1)  # 2 x 16
            y = F.gelu(F.linear(y, torch.randn(8, 16).to(device=device, dtype=dtype)))
            y = F.layer_norm(y, (8,))
            q = y.reshape(1, 1, 2, 8)
            y = F.scaled_dot_product_attention(q, q, q).float().cpu()
        if not bool(torch.isfinite(y).all()):
            return "a test computation gave NaN"
    except Exception as exc:  # RuntimeError "not implemented for 'Half'", and the like
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return None


def _offline_env() -> bool:
    v = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to host within `timeout` s (DNS included)?"""
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


@contextlib.contextmanager
def _seeded(enabled: bool, seed: int = 0):
    """Seed torch's CPU generator for the block without disturbing the caller's random state."""
    if not enabled:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'initialized randomly' warnings on the root logger even when we load a
    checkpoint right after; keep them off the user's terminal (errors still show)."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _hf_offline(enabled: bool = True):
    """Make huggingface_hub serve from its cache without any HTTP request."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old_const, old_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _hf_cached(repo_id: str, filenames, cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for fn in filenames:
        hit = try_to_load_from_cache(repo_id, fn, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _need_download(what: str, host: str) -> None:
    """Raise quickly if `what` cannot be downloaded (offline mode or no network)."""
    if _offline_env():
        raise UserError(
            f"{what}: not in the local cache, and HF_HUB_OFFLINE is set, so nothing can be downloaded. " + _WEIGHTS_HINT
        )
    if not _reachable(host):
        raise UserError(f"{what}: not in the local cache, and {host} cannot be reached (no network?). " + _WEIGHTS_HINT)


def _tag_weights_file(model_name: str, pretrained: str, cache_dir: str | None) -> str:
    """Local path of the weights for an open_clip pretrained tag, downloading them if possible."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:  # a file given as --pretrained was refused by resolve_spec
        raise UserError(f"open_clip has no pretrained tag {pretrained!r} for {model_name}.")
    if cfg.get("file"):
        return cfg["file"]
    what = f"The {pretrained!r} weights of {model_name}"
    hub = cfg.get("hf_hub", "")
    if hub:
        if hub.endswith("/"):
            repo_id, names = hub.rstrip("/"), list(_HF_WEIGHT_FILES)
        else:
            repo_id, filename = os.path.split(hub)
            names = [filename[: -len(".bin")] + ".safetensors", filename] if filename.endswith(".bin") else [filename]
        hit = _hf_cached(repo_id, names, cache_dir)
        if hit:
            return hit
        _need_download(what, "huggingface.co")
        try:
            return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as exc:
            raise UserError(
                f"{what} could not be downloaded from the Hugging Face hub ({exc}). " + _WEIGHTS_HINT
            ) from None
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return str(target)
        host = url.split("/")[2]
        _need_download(what, host)
        try:
            return open_clip.download_pretrained(cfg, prefer_hf_hub=False, cache_dir=cache_dir)
        except Exception as exc:
            raise UserError(f"{what} could not be downloaded from {url} ({exc}). " + _WEIGHTS_HINT) from None
    raise UserError(f"open_clip's pretrained config for {model_name}/{pretrained} names no download source.")


def _tag_preprocess_overrides(model_name: str, pretrained: str) -> dict:
    """The tag's preprocess settings, which open_clip applies only when it downloads by tag itself."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    out = {}
    for key, arg in (
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ):
        if cfg.get(key) is not None:
            out[arg] = cfg[key]
    return out


def _resolve_light(spec: str, pretrained: str | None) -> ModelSpec | None:
    """`resolve_spec` for the specs that need no open_clip import (the reference HF-style names,
    hf-hub:, local-dir:, the packaged tiny config, a model-config JSON file), else None. The same model_name
    and pretrained as `resolve_spec`; it lets a run with nothing to compute skip importing open_clip and torch."""
    spec = str(spec).strip()
    _refuse_pretrained_file(pretrained)
    if spec.startswith("hf-hub:") and not pretrained:
        return ModelSpec(spec, "hf-hub", spec, None)
    if spec.startswith("local-dir:"):
        return ModelSpec(spec, "local-dir", spec, None)
    if spec.lower() in HF_NAME_TABLE and pretrained in (None, HF_NAME_TABLE[spec.lower()][1]):
        arch, tag = HF_NAME_TABLE[spec.lower()]
        return ModelSpec(spec, "hf-name", arch, tag)
    if spec == TINY_CONFIG and not pretrained:
        return ModelSpec(spec, "config-json", spec, None, str(tiny_config_path()))
    if (
        spec.endswith(".json") or os.sep in spec or (os.altsep and os.altsep in spec)
    ) and "open_clip" not in sys.modules:
        # a model-config JSON: named by its file's stem, as `resolve_spec` registers it, unless open_clip ships
        # another architecture under that name (then `resolve_spec` says so). With open_clip imported, its
        # registry may hold configs registered in this process: `resolve_spec` answers.
        path = Path(spec).expanduser()
        if (spec.endswith(".json") or path.exists()) and path.is_file():
            try:
                cfg = _read_config(path.resolve())
            except UserError:
                return None  # resolve_spec gives the message
            name = path.resolve().stem
            builtin = _builtin_config(name)
            if builtin is None or builtin == cfg:
                return ModelSpec(spec, "config-json", name, pretrained, str(path.resolve()))
    return None


def checkpoint_sha256(path: str | Path, sums_file: str | Path | None = None) -> tuple[str, dict | None]:
    """The sha256 of a checkpoint file, and what `remember_checkpoint_sha256` should write (None when the
    sum came from `sums_file`).

    `sums_file` (JSON) remembers sums by the file's resolved path, size, mtime, ctime and inode, so a
    run with nothing to compute does not hash a 600 MB file again. Any change to the file (rewritten,
    replaced, touched) changes its ctime, so its sum is then computed again. An unreadable
    `sums_file` only means hashing again."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
    if sums_file is not None:
        hit = _read_sums(sums_file).get(str(path))
        if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"], None
    sha = sha256_file(path)
    return sha, {"path": str(path), **stamp, "sha256": sha}


def _read_sums(sums_file) -> dict:
    try:
        sums = json.loads(Path(sums_file).read_text())
    except (OSError, ValueError):
        return {}
    return sums if isinstance(sums, dict) else {}


def remember_checkpoint_sha256(sums_file: str | Path, record: dict | None) -> None:
    """Add a `checkpoint_sha256` record to `sums_file` (atomically; a failure to write is ignored)."""
    if record is None:
        return
    sums = _read_sums(sums_file)
    sums[record["path"]] = {k: v for k, v in record.items() if k != "path"}
    tmp = Path(sums_file).with_name(Path(sums_file).name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(sums, sort_keys=True, indent=1))
        os.replace(tmp, sums_file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def weights_identity(
    spec: str,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    sums_file: str | Path | None = None,
) -> dict:
    """What `load_model` would record as model, pretrained and checkpoint_sha256, without building it.

    `sums_file`: where `checkpoint_sha256` looks the checkpoint's sum up (None: hash it). A sum it had
    to compute is returned under the key ``_remember`` (for `remember_checkpoint_sha256`, once the run
    has succeeded)."""
    resolved = _resolve_light(spec, pretrained) or resolve_spec(spec, pretrained)
    sha = record = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise UserError(f"Checkpoint file {ckpt} does not exist.")
        sha, record = checkpoint_sha256(ckpt, sums_file)
    out = {"model": resolved.model_name, "pretrained": None if sha else resolved.pretrained, "checkpoint_sha256": sha}
    if record is not None and sums_file is not None:
        out["_remember"] = record
    return out


# --------------------------------------------------------------------------- building


def load_model(
    spec: str,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> ModelBundle:
    """Build the model a spec names, load its weights, and return it with preprocess and tokenizer.

    With neither a pretrained tag nor a checkpoint the model is randomly initialised from
    `RANDOM_INIT_SEED` (only sensible for tests and benchmarks; recorded as pretrained None,
    checkpoint None), so the same spec always gives the same weights.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    resolved = resolve_spec(spec, pretrained)
    dev = resolve_device(device)
    check_precision(dev, precision)
    notes: list[str] = []
    if resolved.model_name != spec and resolved.kind == "open_clip":
        notes.append(f"{spec} + {resolved.pretrained} uses the QuickGELU architecture {resolved.model_name}.")
    ckpt_path = ckpt_sha = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise UserError(f"Checkpoint file {ckpt} does not exist.")
        ckpt_path, ckpt_sha = str(ckpt.resolve()), sha256_file(ckpt)
        check_checkpoint_file(ckpt_path)

    kwargs = dict(precision=precision, device=dev, cache_dir=cache_dir)
    create_name, create_pretrained, offline = _create_args(resolved, ckpt_path, cache_dir, kwargs)

    # No weights at all: random initialisation, seeded so that the same spec always gives the same
    # model (its embeddings are then reproducible and safe to cache under the same identity).
    random_weights = ckpt_path is None and create_pretrained is None and resolved.kind not in ("hf-hub", "local-dir")
    if random_weights:
        notes.append(f"{resolved.model_name} has random weights (seed {RANDOM_INIT_SEED}): for tests and benchmarks.")
    try:
        with _hf_offline(offline), _quiet_open_clip(), warnings.catch_warnings(), _seeded(random_weights):
            warnings.simplefilter("ignore")
            model, _, preprocess = open_clip.create_model_and_transforms(
                create_name, pretrained=create_pretrained, **kwargs
            )
            if ckpt_path:
                load_checkpoint_into(model, ckpt_path, create_name)
                model.to(dev)
            tokenizer = open_clip.get_tokenizer(create_name, cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as exc:
        msg = _first_line(exc)
        hint = " " + _WEIGHTS_HINT if resolved.kind == "hf-hub" or create_pretrained else ""
        raise UserError(f"Could not build model {spec!r} on {dev} ({precision}): {msg}.{hint}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    ctx = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None) or 77
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    size = tuple(size) if isinstance(size, list | tuple) else (int(size), int(size))
    # With --checkpoint the weights are the file's (recorded by sha256), whatever tag the name implies.
    label = None if ckpt_path else resolved.pretrained
    return ModelBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_name=resolved.model_name,
        pretrained=label,
        checkpoint_path=ckpt_path,
        checkpoint_sha256=ckpt_sha,
        device=dev,
        precision=precision,
        context_length=int(ctx),
        spec=spec,
        image_size=size,
        notes=notes,
    )


def _create_args(resolved, ckpt_path: str | None, cache_dir, kwargs: dict) -> tuple[str, str | None, bool]:
    """How open_clip is to build the model: (model name, pretrained weights file or None, whether everything it
    needs is local, so the hub is not asked). `kwargs` (create_model_and_transforms') gets what the weights
    imply: a tag's preprocess, or no hub weights under a checkpoint."""
    import open_clip

    offline = False
    if resolved.kind in ("hf-hub",):
        repo_id = resolved.model_name[len("hf-hub:") :]
        have_cfg = _hf_cached(repo_id, ["open_clip_config.json"], cache_dir)
        have_weights = ckpt_path is not None or _hf_cached(repo_id, _HF_WEIGHT_FILES, cache_dir)
        if have_cfg and have_weights:
            offline = True
        else:
            _need_download(f"The hub model {repo_id}", "huggingface.co")
        create_name, create_pretrained = resolved.model_name, None
        if ckpt_path:
            kwargs["load_weights"] = False
    else:
        create_name = resolved.model_name
        create_pretrained = None
        if ckpt_path is None and resolved.pretrained and resolved.kind != "local-dir":
            create_pretrained = _tag_weights_file(resolved.model_name, resolved.pretrained, cache_dir)
            kwargs.update(_tag_preprocess_overrides(resolved.model_name, resolved.pretrained))
        elif (
            ckpt_path and resolved.pretrained and open_clip.get_pretrained_cfg(resolved.model_name, resolved.pretrained)
        ):
            kwargs.update(_tag_preprocess_overrides(resolved.model_name, resolved.pretrained))
        offline = True  # everything is local from here on
    return create_name, create_pretrained, offline


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without PyTorch's advice to unpickle untrusted
    code (``weights_only=False``), which clipfail never follows and never passes on."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip()[:300] if lines else type(exc).__name__


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a file that cannot be a checkpoint, saying what it is (cheap: reads its first bytes).

    Accepted: a ``.safetensors`` file with a readable header; a ``torch.save`` file (zip format or
    the legacy pickle format); open_clip's ``.npz``/``.npy`` big_vision weights (not checked here).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(
            f"The checkpoint {path} is empty (0 bytes): a download or copy did not finish. Copy the file again."
        )
    if path.suffix in (".npz", ".npy"):
        return
    with open(path, "rb") as f:
        head = f.read(8)
    is_safetensors = _safetensors_header_ok(path, size)
    if path.suffix == ".safetensors":
        if not is_safetensors:
            raise UserError(
                f"The checkpoint {path} is not a valid .safetensors file (its header is damaged or the file is "
                "truncated). Copy or download it again."
            )
        return
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        if not zipfile.is_zipfile(path):
            raise UserError(
                f"The checkpoint {path} is a damaged or truncated torch.save file. Copy or download it again."
            )
        return
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy format
        return
    if is_safetensors:
        raise UserError(
            f"The checkpoint {path} is a safetensors file without the .safetensors suffix. "
            "Rename it to end in .safetensors."
        )
    raise UserError(
        f"{path} is not a model checkpoint: neither a torch.save file (.pt/.bin) nor a .safetensors file "
        f"(it starts with {head!r}). Pass the weights file with --checkpoint."
    )


def _safetensors_header_ok(path: Path, size: int) -> bool:
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 100_000_000):
                return False
            header = json.loads(f.read(n))
        return isinstance(header, dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def load_checkpoint_into(model, ckpt_path: str, model_name: str) -> None:
    """open_clip.load_checkpoint(strict=True), with a message that says what is wrong with the file."""
    import pickle

    import open_clip

    try:
        open_clip.load_checkpoint(model, ckpt_path, strict=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UserError(
                f"The checkpoint {ckpt_path} holds pickled Python objects, not only weights (for example a whole "
                "model saved with torch.save(model)). clipfail loads weights only, so that a file cannot run code: "
                "save the model's state_dict() (or a .safetensors file) and pass that."
            ) from None
        raise UserError(
            f"The checkpoint {ckpt_path} cannot be read as a torch.save file ({_first_line(exc)}): it is damaged or "
            "not a checkpoint. Copy or download it again."
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "Error(s) in loading state_dict" in text:
            raise UserError(
                f"The checkpoint {ckpt_path} does not fit {model_name}: {_state_dict_problems(text)}."
            ) from None
        raise UserError(
            f"The checkpoint {ckpt_path} cannot be loaded ({_first_line(exc)}): it is damaged or not a checkpoint. "
            "Copy or download it again."
        ) from None
    except (AttributeError, TypeError, KeyError, StopIteration, IndexError) as exc:
        raise UserError(
            f"The checkpoint {ckpt_path} does not hold a state dict (a mapping of weight names to tensors; "
            f"{_first_line(exc)}). Save the model's state_dict() and pass that."
        ) from None
    except Exception as exc:
        raise UserError(
            f"The checkpoint {ckpt_path} cannot be loaded: {_first_line(exc)}. Copy or download it again."
        ) from None


def _state_dict_problems(text: str) -> str:
    """'N weights missing (e.g. ...), M unexpected (e.g. ...), K of another shape (e.g. ...)' from
    torch's load_state_dict error, plus what it most likely means."""
    import re

    def keys(label):
        m = re.search(label + r" key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n)", text, flags=re.M | re.S)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    missing, unexpected = keys("Missing"), keys("Unexpected")
    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from checkpoint, "
        r"the shape in current model is (torch.Size\(\[[^\]]*\]\))",
        text,
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the file (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        name, got, want = shapes[0]
        fmt = lambda s: s.replace("torch.Size(", "").rstrip(")")  # noqa: E731
        parts.append(
            f"{len(shapes)} weight(s) of another shape (e.g. {name}: {fmt(got)} in the file, {fmt(want)} in the model)"
        )
    detail = "; ".join(parts) or _first_line(RuntimeError(text))
    return (
        f"{detail}. The file is for another architecture (or is not a CLIP checkpoint): pass the --model it was "
        "trained as"
    )


def save_random_checkpoint(path: str | Path, spec: str = TINY_CONFIG, seed: int = 0) -> str:
    """Save a randomly initialised model's weights (seeded) to `path`; return the file's sha256.

    A ``.safetensors`` path gives the same bytes for the same seed; any other suffix is written
    with ``torch.save`` (the same tensors, but not the same bytes).

    The demo uses this so that the checkpoint-loading path is the one exercised.
    """
    import open_clip
    import torch

    resolved = resolve_spec(spec)
    with _seeded(True, seed), _quiet_open_clip(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(resolved.model_name, pretrained=None, device="cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if path.suffix == ".safetensors":  # byte-for-byte reproducible for a given seed
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    else:  # torch.save embeds a random serialization id: same tensors, different bytes
        torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return sha256_file(path)
