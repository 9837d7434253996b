"""Published weights by name: download once into a cache, check, load strictly.

    model = fractal_models.from_pretrained("fractalmar_in64")          # downloads 1.6 GB on first use
    path = fractal_models.download_weights("fractalmar_in64")            # just the file
    fractalgen download fractalmar_in64        # or: all

Sources (``name_or_url``):

* a published name (``PRETRAINED``): the public code's own download links (LTH14/fractalgen
  ``util/download.py``, Dropbox, fetched with the same user-agent it sends);
* an ``http(s)://`` or ``file://`` URL;
* a Hugging Face repo id, ``hf://owner/repo[/path/in/repo.pth]`` or bare ``owner/repo[/file]`` when no such
  local path exists (file default ``checkpoint-last.pth``, revision ``main``; ``$HF_ENDPOINT`` honoured);
* a local file path (used in place, not copied).

Cache: ``$FRACTAL_HOME`` (default ``$XDG_CACHE_HOME/fractal_models``, i.e. ``~/.cache/fractal_models``);
published names land in ``<cache>/<name>/checkpoint-last.pth``, like the public code's
``pretrained_models/<name>/``. A download streams into ``<file>.part`` with a progress bar, resumes an
interrupted ``.part`` with an HTTP Range request (and retries a cut connection that way), is renamed into
place only when complete, and its size and SHA-256 are recorded in ``<file>.meta.json``; every later use
checks the file against that record (the public code publishes no hashes, so the first download is the
reference: trust on first use). Concurrent processes (``torchrun``) take a file lock, so one downloads and
the others wait. Every failure is one :class:`DownloadError` line naming the URL and the cache path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fractal_kernels._io import atomic_write
from fractal_models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint


class DownloadError(RuntimeError):
    """Weights could not be fetched (offline, refused, interrupted) or the cached file fails its check."""


@dataclass(frozen=True)
class PretrainedWeights:
    """A published checkpoint: the config it belongs to, where the public code downloads it from, and the
    approximate size its download script announces (MiB, for the progress bar before the server answers)."""

    config: str
    url: str
    approx_mib: Optional[int] = None
    sha256: Optional[str] = None  # known digest, if any (checked on download); the public code has none
    headers: Optional[Dict[str, str]] = None


# The public code's download script sends this user-agent (Dropbox then serves the file itself, not a page).
_DROPBOX_HEADERS = {"User-Agent": "Wget/1.16 (linux-gnu)"}


def _dropbox(file_id: str, rlkey: str, st: str, mib: int, config: str) -> PretrainedWeights:
    return PretrainedWeights(config, f"https://www.dropbox.com/scl/fi/{file_id}/checkpoint-last.pth?rlkey={rlkey}"
                                     f"&st={st}&dl=0", mib, headers=_DROPBOX_HEADERS)


# LTH14/fractalgen util/download.py: name -> link (and its tqdm total in MiB)
PRETRAINED: Dict[str, PretrainedWeights] = {
    "fractalar_in64": _dropbox("n25tbij7aqkwo1ypqhz72", "2czevgex3ocg2ae8zde3xpb3f", "mj0subup", 1688,
                               "fractalar_in64"),
    "fractalmar_in64": _dropbox("lh7fmv48pusujd6m4kcdn", "huihey61ok32h28o3tbbq6ek9", "fxtoawba", 1650,
                                "fractalmar_in64"),
    "fractalmar_base_in256": _dropbox("zrdm7853ih4tcv98wmzhe", "htq9yuzovet7d6ioa64s1xxd0", "4c4d93vs", 712,
                                      "fractalmar_base_in256"),
    "fractalmar_large_in256": _dropbox("y1k05xx7ry8521ckxkqgt", "wolq4krdq7z7eyjnaw5ndhq6k", "vjeu5uzo", 1669,
                                       "fractalmar_large_in256"),
    "fractalmar_huge_in256": _dropbox("t2rru8xr6wm23yvxskpww", "dn9ss9zw4zsnckf6bat9hss6h", "y7w921zo", 3243,
                                      "fractalmar_huge_in256"),
}
"""The published weights by config name: where :func:`from_pretrained` / :func:`download_weights` fetch each
(the public code's own links) and its size; the first download's SHA-256 is recorded in the cache."""

CHUNK = 1 << 20
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


def cache_dir(override: Optional[str] = None) -> str:
    """The weights cache: ``override``, else ``$FRACTAL_HOME``, else ``$XDG_CACHE_HOME/fractal_models``."""
    if override:
        return os.path.abspath(os.path.expanduser(override))
    if os.environ.get("FRACTAL_HOME"):
        return os.path.abspath(os.path.expanduser(os.environ["FRACTAL_HOME"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fractal_models")


@dataclass(frozen=True)
class Source:
    """Where weights come from (``url`` None: a local file used in place) and where they are cached."""

    name: str
    url: Optional[str]
    path: str
    config: Optional[str] = None
    sha256: Optional[str] = None
    approx_mib: Optional[int] = None
    headers: Optional[Dict[str, str]] = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "file"


def _hf_url(spec: str) -> tuple:
    parts = spec.split("/", 2)
    repo = "/".join(parts[:2])
    filename = parts[2] if len(parts) > 2 and parts[2] else "checkpoint-last.pth"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/main/{urllib.parse.quote(filename)}", repo, filename


def resolve_source(name_or_url: str, cache: Optional[str] = None) -> Source:
    """Map a published name, URL, Hugging Face repo id or local path to a :class:`Source` (see module docstring)."""
    if not isinstance(name_or_url, str) or not name_or_url.strip():
        raise ValueError(f"name_or_url: expected a published name ({', '.join(PRETRAINED)}), a URL, a Hugging Face "
                         f"repo id or a file path, got {name_or_url!r}")
    spec = name_or_url.strip()
    root = cache_dir(cache)
    if spec in PRETRAINED:
        w = PRETRAINED[spec]
        return Source(spec, w.url, os.path.join(root, spec, "checkpoint-last.pth"), w.config, w.sha256, w.approx_mib,
                      w.headers)
    scheme = urllib.parse.urlsplit(spec).scheme.lower()
    if scheme in ("http", "https", "file"):
        parsed = urllib.parse.urlsplit(spec)
        base = _safe(os.path.basename(parsed.path) or "checkpoint.pth")
        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
        return Source(spec, spec, os.path.join(root, "url", f"{digest}-{base}"))
    if spec.startswith("hf://"):
        spec_hf = spec[len("hf://"):]
        if not _HF_ID.match(spec_hf):
            raise ValueError(f"name_or_url: {spec!r} is not hf://owner/repo[/file]")
    elif os.path.exists(spec):
        return Source(spec, None, os.path.abspath(spec))
    elif _HF_ID.match(spec):
        spec_hf = spec
    else:
        raise ValueError(f"name_or_url: {spec!r} is not a published name ({', '.join(PRETRAINED)}), a URL, a "
                         f"Hugging Face repo id (owner/repo) or an existing file")
    url, repo, filename = _hf_url(spec_hf)
    return Source(spec, url, os.path.join(root, "hf", _safe(repo.replace("/", "--")), _safe(filename)))


# ------------------------------------------------------------------------------------------------ checking
def _meta_path(path: str) -> str:
    return path + ".meta.json"


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_cached(src: Source) -> None:
    """Check a cached file against the size and SHA-256 recorded when it was downloaded (and the known digest,
    if the source has one); raises :class:`DownloadError` saying how to repair it."""
    meta_file = _meta_path(src.path)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    size = os.path.getsize(src.path)
    fix = f"delete it (or run: fractalgen download {src.name} --force) to download it again"
    if meta is None:
        raise DownloadError(f"{src.path}: no download record ({meta_file}); it may be a partial copy from elsewhere; "
                            + fix)
    if size != meta.get("size"):
        raise DownloadError(f"{src.path}: {size} bytes, but {meta.get('size')} were downloaded from "
                            f"{meta.get('url')}; the cached file is damaged; " + fix)
    digest = _sha256_file(src.path)
    want = src.sha256 or meta.get("sha256")
    if digest != want:
        raise DownloadError(f"{src.path}: SHA-256 {digest[:16]}... differs from {want[:16]}... recorded at download "
                            f"from {meta.get('url')}; the cached file is corrupt; " + fix)


class _Lock:
    """An exclusive lock file beside the download (POSIX ``flock``; a no-op where that is missing)."""

    def __init__(self, path: str):
        self.path = path + ".lock"
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------- downloading
def _fail(src: Source, why: str) -> DownloadError:
    return DownloadError(f"could not download {src.name!r} from {src.url} ({why}); cache: {src.path} "
                         f"(offline? put the file there by hand, or set FRACTAL_HOME)")


def _http_reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{type(e.reason).__name__}: {e.reason}" if not isinstance(e.reason, str) else e.reason
    return f"{type(e).__name__}: {e}"


def _fetch_once(src: Source, part: str, progress: bool, timeout: float) -> None:
    """One HTTP request appending to ``part`` (resuming from its size); raises on a cut or refused transfer."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = dict(src.headers or {})
    headers.setdefault("User-Agent", "fractal-models")
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(src.url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the part may be complete, else start over
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            os.unlink(part)
        raise
    with resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:  # the server ignored the range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if not have and ctype.startswith("text/html"):
            raise DownloadError("the server sent an HTML page, not a checkpoint (the link may have moved)")
        from tqdm.auto import tqdm
        bar = tqdm(total=total or (src.approx_mib << 20 if src.approx_mib else None), initial=have, unit="B",
                   unit_scale=True, unit_divisor=1024, desc=f"downloading {src.name}"[:60], disable=not progress,
                   leave=False)
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise ConnectionError(f"connection closed after {got} of {total} bytes")


def download_weights(name_or_url: str, *, cache: Optional[str] = None, progress: bool = True, force: bool = False,
                     retries: int = 3, timeout: float = 60.0) -> str:
    """The local path of ``name_or_url``'s checkpoint, downloading it into the cache first if needed (see the
    module docstring); the cached file is checked against its download record on every call.

    ``force`` downloads again; ``retries`` resumes a cut connection that many times before giving up (the
    ``.part`` file stays, so the next call resumes too). Raises :class:`DownloadError` (one line)."""
    src = name_or_url if isinstance(name_or_url, Source) else resolve_source(name_or_url, cache)
    if src.url is None:
        if not os.path.isfile(src.path):
            raise DownloadError(f"{src.path}: not a file")
        return src.path
    os.makedirs(os.path.dirname(src.path), exist_ok=True)
    with _Lock(src.path):
        if os.path.exists(src.path) and not force:
            verify_cached(src)
            return src.path
        part = src.path + ".part"
        if force and os.path.exists(part):
            os.unlink(part)
        attempt = 0
        while True:
            try:
                _fetch_once(src, part, progress, timeout)
                break
            except DownloadError as e:
                raise _fail(src, str(e)) from None
            except urllib.error.HTTPError as e:  # refused: retrying will not help
                raise _fail(src, _http_reason(e)) from None
            except Exception as e:  # noqa: BLE001 - offline, timeouts, a cut connection (IncompleteRead is no OSError)
                have = os.path.getsize(part) if os.path.exists(part) else 0
                if not have or attempt >= retries:
                    more = f"; {have} bytes kept in {part}, the next call resumes" if have else ""
                    raise _fail(src, _http_reason(e) + more) from None
                attempt += 1
                time.sleep(min(0.1 * 2.0 ** attempt, 5.0))
        digest = _sha256_file(part)
        if src.sha256 and digest != src.sha256:
            os.unlink(part)
            raise _fail(src, f"SHA-256 {digest[:16]}... is not the published {src.sha256[:16]}...; the partial "
                             f"file was removed")
        size = os.path.getsize(part)
        os.replace(part, src.path)
        atomic_write(_meta_path(src.path), json.dumps(
            {"url": src.url, "size": size, "sha256": digest, "name": src.name,
             "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
        return src.path


def from_pretrained(name_or_url: str, *, config: Optional[str] = None, device: str = "cpu",
                    cache: Optional[str] = None, progress: bool = True, **overrides):
    """A model with published (or any) weights: resolve ``name_or_url`` (published name, URL, Hugging Face repo
    id or path), download it into the cache if needed (:func:`download_weights`), build ``config`` (default: the
    published name's config, else the config the checkpoint's parameter names and shapes identify) and load the
    weights strictly with ``weights_only=True``. The model is returned in eval mode on ``device``.

    Raises :class:`DownloadError` (fetching/cache) or :class:`CheckpointError` (the file is not a checkpoint of
    that config), each one line."""
    from fractal_models.checkpoint import identify_config
    from fractal_models.configs import build_model
    src = resolve_source(name_or_url, cache)
    path = download_weights(src, progress=progress)
    ckpt = read_checkpoint(path)
    name = config or src.config or identify_config(ckpt["model"])
    if name is None:
        raise CheckpointError(f"checkpoint {path!r}: its weights match no published config; pass config=")
    saved = ckpt.get("args")
    if getattr(saved, "class_num", None) and "class_num" not in overrides:
        overrides["class_num"] = saved.class_num
    model = build_model(name, **overrides)
    load_checkpoint(path, model, ckpt=ckpt)
    return model.to(device).eval()
