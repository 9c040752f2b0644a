"""Loading the released (mmseg-format) checkpoints with their exact parameter names."""
from __future__ import annotations

import hashlib
import importlib
import os
from typing import Mapping, Optional, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import torch.nn as nn


class CheckpointMismatch(RuntimeError):
    """The checkpoint's keys or shapes do not match the model.  The message is one line naming the counts
    and the first few keys of each kind; the full lists are in ``missing``, ``unexpected`` and
    ``shape_errors``."""

    def __init__(self, missing, unexpected, shape_errors, show: int = 3):
        self.missing, self.unexpected, self.shape_errors = list(missing), list(unexpected), list(shape_errors)
        parts = []
        for what, keys in (("mis-shaped", self.shape_errors), ("missing", self.missing),
                           ("unexpected", self.unexpected)):
            if keys:
                more = f", ... {len(keys) - show} more" if len(keys) > show else ""
                parts.append(f"{len(keys)} {what} ({'; '.join(keys[:show])}{more})")
        super().__init__("checkpoint does not match the model: " + ", ".join(parts))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose content or checksum is not what was expected."""


def is_url(path) -> bool:
    return isinstance(path, str) and urlparse(path).scheme in ("http", "https", "file", "ftp", "hf")


def _need(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'lrformer-kernels[{extra}]'") from None


def parse_hf(url: str):
    """``hf://<owner>/<repo>[@<revision>]/<path/in/repo>`` -> (repo_id, filename, revision or None)."""
    parts = url[len("hf://"):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"a Hub checkpoint is hf://<owner>/<repo>[@<revision>]/<file>, got {url!r}")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None


def hf_download(url: str) -> str:
    """The local file of an ``hf://`` checkpoint, through ``huggingface_hub`` (its cache, revision pinning
    with ``@<revision>``, ``HF_HUB_OFFLINE=1``)."""
    repo_id, filename, revision = parse_hf(url)
    hub = _need("huggingface_hub", "hub", f"loading {url}")
    try:
        return hub.hf_hub_download(repo_id, filename, revision=revision)
    except Exception as e:  # noqa: BLE001 - missing repo/file/revision, offline without a cached copy ...
        raise CheckpointError(f"cannot fetch {url} from the Hugging Face Hub: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_name(url: str) -> str:
    """The hub-cache file of a URL: a short hash of the whole URL, then its basename, so two URLs that
    end in the same file name (two ``.../model.pth``) never share a cached file."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{os.path.basename(urlparse(url).path) or 'checkpoint.pth'}"


def fetch_checkpoint(path_or_url: Union[str, os.PathLike], sha256: Optional[str] = None) -> str:
    """A local path for a checkpoint given as a path or a URL: ``hf://<owner>/<repo>[@<revision>]/<file>``
    through ``huggingface_hub`` (extra ``[hub]``; its cache and offline mode); ``file://`` URLs are read in place;
    ``http(s)://`` and ``ftp://`` ones are downloaded once into torch's hub cache
    (``torch.hub.get_dir()/checkpoints/<hash of the URL>-<file name>``).  With ``sha256``, the file's
    SHA-256 must start with it (a full digest or a prefix of at least 8 hex digits)."""
    path = os.fspath(path_or_url)
    if is_url(path) and urlparse(path).scheme == "hf":
        path = hf_download(path)
    elif is_url(path) and urlparse(path).scheme == "file":
        path = url2pathname(urlparse(path).path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (from {path_or_url})")
    elif is_url(path):
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        os.makedirs(cache, exist_ok=True)
        local = os.path.join(cache, _cache_name(path))
        if not os.path.exists(local):
            try:
                torch.hub.download_url_to_file(path, local, progress=True)
            except Exception as e:  # noqa: BLE001 - any network/IO failure, named once
                raise CheckpointError(f"cannot download {path}: {type(e).__name__}: {e}") from e
        path = local
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if sha256:
        if len(sha256) < 8:
            raise ValueError(f"sha256 must be at least 8 hex digits, got {sha256!r}")
        digest = sha256_of(path)
        if not digest.startswith(sha256.lower()):
            raise CheckpointError(f"{path}: SHA-256 {digest} does not match the expected {sha256}")
    return path


def read_checkpoint(path: str, map_location="cpu"):
    """``torch.load`` (weights only), or safetensors' loader for a ``.safetensors`` file, with a one-line
    error naming the file when it is not a checkpoint."""
    if str(path).endswith(".safetensors"):
        st = _need("safetensors.torch", "hub", f"reading {path}")
        try:
            return st.load_file(path, device=str(map_location) if map_location is not None else "cpu")
        except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a zip/pickle, foreign objects ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, or not written by "
                              f"torch.save; {type(e).__name__})") from e


def _unwrap(obj) -> dict:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key])
        return dict(obj)
    raise TypeError(f"checkpoint must be a mapping of tensors, got {type(obj).__name__}")


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Rename checkpoint keys for ``model``: strip ``module.`` (DDP); add ``backbone.`` for an
    encoder-only file loaded into a segmentor; strip ``backbone.`` (dropping ``decode_head.*``)
    for a segmentor file loaded into an encoder."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    is_segmentor = hasattr(model, "backbone")
    has_prefix = any(k.startswith("backbone.") for k in state)
    if is_segmentor and not has_prefix:
        state = {"backbone." + k: v for k, v in state.items()}
    elif not is_segmentor and has_prefix:
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True,
                    map_location="cpu", verbose: bool = False, sha256: Optional[str] = None):
    """Load a released LRFormer checkpoint (path or state dict) into ``model``.

    Accepts the mmseg files (``state_dict`` wrapper, ``backbone.``/``decode_head.`` prefixes) and the
    encoder-only ImageNet files.  An encoder-only file loaded into a segmentor loads the encoder
    strictly and reports the head as missing (it is trained from scratch).  Raises
    :class:`CheckpointMismatch` (one line: the counts and first keys; the full lists as attributes) otherwise.
    ``checkpoint`` may be a path, a URL (downloaded once into torch's hub cache) or a state dict;
    ``sha256`` checks the file.  Returns ``(missing, unexpected)``.
    """
    where = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        where = fetch_checkpoint(checkpoint, sha256)
        checkpoint = read_checkpoint(where, map_location)
    try:
        raw = _unwrap(checkpoint)
    except TypeError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if not all(isinstance(v, torch.Tensor) for v in raw.values()):
        bad = next(k for k, v in raw.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{where}: entry {bad!r} is a {type(raw[bad]).__name__}, not a tensor "
                              f"(not a model state dict)")
    encoder_only_file = hasattr(model, "backbone") and not any(
        k.startswith(("backbone.", "decode_head.", "module.backbone.")) for k in raw)
    state = adapt_state_dict(raw, model)
    own = model.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    head_missing = [k for k in missing if k.startswith("decode_head.")] if encoder_only_file else []
    real_missing = [k for k in missing if k not in head_missing]
    if shape_errors or (strict and (real_missing or unexpected)):
        raise CheckpointMismatch(real_missing if strict else [], unexpected if strict else [], shape_errors)
    model.load_state_dict(state, strict=False)
    if verbose or head_missing:
        msg = f"loaded {len(state)} tensors"
        if head_missing:
            msg += f"; encoder-only checkpoint: {len(head_missing)} decode_head keys left at their init"
        if missing and not strict:
            msg += f"; missing {len(real_missing)}"
        if unexpected and not strict:
            msg += f"; ignored {len(unexpected)} unexpected"
        print(msg)
    return missing, unexpected


def save_weights(model: nn.Module, path: Union[str, os.PathLike]) -> str:
    """Write ``model``'s state dict (the released parameter names) to ``path``: a ``.safetensors`` file
    (safetensors, extra ``[hub]``) or, for any other name, a ``.pth`` as ``{"state_dict": ...}``; both load
    with :func:`load_checkpoint` / ``pretrained=``.  Returns the path."""
    path = os.fspath(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        st = _need("safetensors.torch", "hub", f"writing {path}")
        st.save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    return path
