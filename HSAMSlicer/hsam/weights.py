"""Model manifest, weights download and cache, and the registry of installed models.

Layout under :func:`hsam.paths.hsam_home` (``$HSAM_HOME`` or ``~/.hsam``):

* ``models/<id>/model.safetensors + model.json`` — installed segmentation models (our format, see
  :mod:`hsam.model.checkpoint`): verified against the card's SHA-256 when installed and again on every load.
* ``downloads/<file>`` — verified raw files from the manifest (SAM base weights, official checkpoints).
* ``partial/`` — downloads in progress. Nothing here is ever read as a finished file; a completed download is
  checked (size, SHA-256) and only then moved into ``downloads/`` with ``os.replace``.

Only the standard library is used for downloads (``urllib``); torch is imported only when a model is loaded.
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookiejar
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hsam import __version__
from hsam.drive import HtmlAnswer, direct_url, read_html_answer
from hsam.errors import HSAMError
from hsam.paths import hsam_home, resources_dir

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM

MANIFEST_ENV = "HSAM_MANIFEST"
"""Environment variable naming another manifest JSON (a mirror, or a test server)."""
MANIFEST_FILENAME = "models.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MODEL_FILES = ("model.safetensors", "model.json")
CHUNK = 1 << 20

Progress = Callable[[int, "int | None"], None]
"""``progress(bytes_done, bytes_total_or_None)``."""


# ----------------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest entry: where to get it and how to check it."""

    name: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    where: str | None = None  # how to obtain it by hand when there is no url
    check: str | None = None  # "hsam-official": no published SHA-256; structure-checked, hash recorded at first download


@dataclass(frozen=True)
class ManifestEntry:
    """A model (kind ``"hsam"``) or base weights (kind ``"base"``) listed in ``Resources/models.json``."""

    id: str
    title: str
    kind: str
    backbone: str
    priority: int = 0
    install: str = "download"  # "download" | "import-official" | "pip"
    license: str = ""
    license_text: str = ""  # terms a user must see and accept before the download (empty: none to accept)
    homepage: str = ""
    requires: tuple[str, ...] = ()
    files: tuple[ManifestFile, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def downloadable(self) -> bool:
        """Whether ``hsam models download <id>`` can get every file (a URL and a SHA-256 or a structure check)."""
        return bool(self.files) and all(f.url and (f.sha256 or f.check) for f in self.files)

    @property
    def verified_download(self) -> bool:
        """Whether every file has a URL and a published SHA-256: the download can be repeated to the same bytes, so it
        may happen without asking (first use) and the installed copy may be deleted and fetched again."""
        return bool(self.files) and all(f.url and f.sha256 for f in self.files)


def manifest_path() -> Path:
    """``$HSAM_MANIFEST`` if set, else the shipped ``Resources/models.json``."""
    override = os.environ.get(MANIFEST_ENV)
    return Path(override) if override else resources_dir() / MANIFEST_FILENAME


def load_manifest(path: str | os.PathLike[str] | None = None) -> dict[str, ManifestEntry]:
    """Read the manifest into ``{id: ManifestEntry}`` (insertion order kept)."""
    source = Path(path) if path else manifest_path()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HSAMError(f"cannot read the model manifest {source}: {error}") from None
    try:
        entries: dict[str, ManifestEntry] = {}
        known = {"id", "title", "kind", "backbone", "priority", "install", "license", "license_text", "homepage",
                 "requires", "files"}
        for item in data.get("models", []):
            files = tuple(ManifestFile(**{k: f.get(k) for k in ("name", "url", "size", "sha256", "where", "check")})
                          for f in item.get("files", []))
            entries[item["id"]] = ManifestEntry(
                id=item["id"],
                title=item.get("title", item["id"]),
                kind=item.get("kind", "hsam"),
                backbone=item.get("backbone", ""),
                priority=int(item.get("priority", 0)),
                install=item.get("install", "download"),
                license=item.get("license", ""),
                license_text=item.get("license_text", ""),
                homepage=item.get("homepage", ""),
                requires=tuple(item.get("requires", ())),
                files=files,
                extra={k: v for k, v in item.items() if k not in known},
            )
    except (KeyError, TypeError, AttributeError, ValueError) as error:  # a damaged or hostile mirror manifest
        raise HSAMError(f"the model manifest {source} is malformed ({type(error).__name__}: {str(error)[:80]})") from None
    for entry in entries.values():
        for f in entry.files:  # a file without a published hash is only accepted where its structure can be checked
            if f.check is not None and (f.check != "hsam-official" or entry.install != "import-official"):
                raise HSAMError(f"the model manifest {source}: {entry.id}/{f.name} has check {f.check!r}; only "
                                "'hsam-official' on an import-official entry is known")
    for entry in entries.values():  # ids and file names become paths in the cache: no separators, no dot files
        for name in (entry.id, *(f.name for f in entry.files)):
            if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
                raise HSAMError(f"the model manifest {source} names {name!r}: not a plain file name; fix the manifest")
    return entries


# -------------------------------------------------------------------------------------------------------------- paths


def models_dir() -> Path:
    """``HSAM_HOME/models``: one folder per installed model."""
    return hsam_home() / "models"


def bundled_models_dir() -> Path:
    """``hsam/bundled_models``: models shipped inside the package (the H-SAM-Lite demo), available offline after
    ``pip install`` (package data) and in the Slicer extension (its CMake copies ``hsam/**/*.safetensors``) without
    any download. Read-only: an installed model with the same id takes precedence."""
    return Path(__file__).resolve().parent / "bundled_models"


def _model_folders() -> list[Path]:
    """Installed model folders, then bundled ones whose id is not installed."""
    folders = sorted(models_dir().iterdir()) if models_dir().is_dir() else []
    installed = {path.name for path in folders}
    bundled = bundled_models_dir()
    if bundled.is_dir():
        folders += [path for path in sorted(bundled.iterdir()) if path.is_dir() and path.name not in installed]
    return folders


def downloads_dir() -> Path:
    """``HSAM_HOME/downloads``: verified raw files (base weights, official checkpoints)."""
    return hsam_home() / "downloads"


def partial_dir() -> Path:
    """``HSAM_HOME/partial``: downloads in progress (resumable); never read as finished files."""
    return hsam_home() / "partial"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- download


def _offline_message(name: str, url: str, reason: str, destination: Path) -> str:
    return (
        f"could not download {name} from {url} ({reason}); if this computer is offline, download that URL elsewhere "
        f"and put the file at {destination} (or run: hsam models import PATH)"
    )


MAX_PAGE = 1 << 20  # an HTML answer is read up to this size to find out what it says
_CONFIRM_HOPS = 3


def _is_html(headers: Any) -> bool:
    return str(headers.get("Content-Type") or "").lower().startswith("text/html")


def _page_message(name: str, url: str, answer: "HtmlAnswer", destination: Path) -> str:
    manual = f"open {url} in a browser, save the file as {destination} and run the same command again"
    if answer.kind == "quota":
        return (f"Google Drive refused the download of {name}: its download quota is exceeded (too many downloads "
                f"of this file recently); try again in a few hours, or {manual}")
    return f"{url} answered with a web page instead of {name} (\"{answer.summary[:80]}\"); {manual}"


def _open_file(
    opener: urllib.request.OpenerDirector, url: str, shown_url: str, headers: dict[str, str], timeout: float,
    name: str, final: Path,
) -> Any:
    """The response carrying the file itself: HTML answers are read, confirmation pages (Google Drive's large-file
    "Download anyway") followed, quota and other pages turned into one HSAMError with the manual route.
    HTTP 416 is re-raised as ``urllib.error.HTTPError`` for the caller's resume logic."""
    for _ in range(_CONFIRM_HOPS):
        try:
            response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416:
                raise
            if _is_html(error.headers):  # Drive answers quota and permission problems with a page and a 4xx code
                answer = read_html_answer(error.read(MAX_PAGE).decode("utf-8", "replace"), url)
                if answer.kind == "quota":
                    raise HSAMError(_page_message(name, shown_url, answer, final)) from None
            raise HSAMError(_offline_message(name, shown_url, f"HTTP {error.code} {error.reason}", final)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise HSAMError(_offline_message(name, shown_url, str(reason), final)) from None
        if not _is_html(response.headers):
            return response
        with response:
            try:
                page = response.read(MAX_PAGE).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as error:
                raise HSAMError(_offline_message(name, shown_url, f"{type(error).__name__} reading the answer", final)) from None
            answer = read_html_answer(page, response.geturl())
        if answer.kind != "confirm":
            raise HSAMError(_page_message(name, shown_url, answer, final))
        url = answer.next_url
    raise HSAMError(_page_message(name, shown_url, HtmlAnswer("other", summary="confirmation pages without end"), final))


def download_file(
    url: str,
    name: str,
    sha256: str | None,
    *,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    destination: Path | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``downloads/<name>`` (or ``destination``), verified against ``sha256``; returns the path.

    ``url`` may be a plain HTTP(S) URL or a Google Drive link (:mod:`hsam.drive`: its confirmation page is
    followed; a quota or other web page gives one HSAMError saying how to get the file by hand). When no SHA-256 is
    published (``sha256`` None), ``verify(path)`` must check the file's structure instead (raising HSAMError).

    A finished file that already verifies is reused. The bytes go to ``partial/<name>.part`` first; an interrupted
    download is resumed with an HTTP Range request on the next call (a server that ignores Range gives a clean
    restart). Only a file whose size and SHA-256 (or structure) match is moved into place; a mismatch deletes it.
    """
    if sha256 is None and verify is None:
        raise ValueError("download_file needs a sha256 or a verify function")
    final = destination or downloads_dir() / name
    if final.is_file():
        if sha256 is None:
            verify(final)  # type: ignore[misc]
            return final
        if sha256_file(final) == sha256.lower():
            return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial_dir().mkdir(parents=True, exist_ok=True)
    part = partial_dir() / f"{name}.part"
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    headers = {"User-Agent": f"hsam/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        response = _open_file(opener, direct_url(url), url, headers, timeout, name, final)
    except urllib.error.HTTPError:  # 416: our partial file is as long as or longer than the remote one: start over
        if not have:
            raise HSAMError(_offline_message(name, url, "HTTP 416 Range Not Satisfiable", final)) from None
        part.unlink(missing_ok=True)
        return download_file(url, name, sha256, size=size, progress=progress, timeout=timeout, destination=destination,
                             verify=verify)
    with response:
        resumed = have > 0 and response.status == 206
        done = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else size
        try:
            with open(part, "ab" if resumed else "wb") as handle:
                if progress:
                    progress(done, total)
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    handle.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except (OSError, http.client.HTTPException, socket.timeout) as error:
            raise HSAMError(
                f"download of {name} was interrupted after {done} bytes ({type(error).__name__}); "
                "run the same command again to resume"
            ) from None
    if total is not None and done < total:
        raise HSAMError(f"download of {name} stopped after {done} of {total} bytes; run the same command again to resume")
    if size is not None and done != size:
        part.unlink(missing_ok=True)
        raise HSAMError(f"downloaded {name} has {done} bytes, expected {size}; the file was discarded, try again later")
    if sha256 is None:
        try:
            verify(part)  # type: ignore[misc]
        except HSAMError as error:
            part.unlink(missing_ok=True)
            raise HSAMError(f"downloaded {name} is not the expected file ({error}); the file was discarded") from None
    else:
        actual = sha256_file(part)
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise HSAMError(
                f"downloaded {name} failed its SHA-256 check (got {actual[:12]}..., expected {sha256[:12]}...); "
                "the file was discarded; check the URL or mirror"
            )
    os.replace(part, final)
    return final


def base_file(model_id: str) -> Path | None:
    """The verified local path of a base-weights entry's first file (``downloads/<name>``), or None if absent."""
    entry = load_manifest().get(model_id)
    if entry is None or not entry.files:
        return None
    path = downloads_dir() / entry.files[0].name
    return path if path.is_file() else None


def fetch(model_id: str, progress: Progress | None = None) -> Path:
    """Download every file of a manifest entry; returns the installed model folder or the downloaded base file.

    Entries of kind ``hsam`` whose files are ``model.safetensors`` + ``model.json`` are installed as a model.
    Entries whose files have no URL raise HSAMError saying where to get them and what to run.
    """
    manifest = load_manifest()
    if model_id not in manifest:
        raise HSAMError(f"unknown model {model_id!r}; known: {', '.join(manifest)} (see: hsam models list)")
    entry = manifest[model_id]
    missing = [f for f in entry.files if not f.url or not (f.sha256 or f.check)]
    if missing:
        f = missing[0]
        how = {
            "import-official": f"then run: hsam models import-official {f.name}",
            "pip": "nothing to import: hsam reads it from the installed package",
        }.get(entry.install, "then run: hsam models import PATH")
        needs = f" (it also needs: hsam models download {' '.join(entry.requires)})" if entry.requires else ""
        raise HSAMError(f"{model_id} cannot be downloaded automatically: get {f.name} from {f.where or entry.homepage}, {how}{needs}")
    if entry.install == "import-official":
        return _fetch_official(entry, progress)
    if entry.kind == "hsam" and {f.name for f in entry.files} == set(MODEL_FILES):
        staging = Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=_ensure(partial_dir())))
        try:
            for f in entry.files:
                download_file(f.url, f"{model_id}-{f.name}", f.sha256, size=f.size, progress=progress,  # type: ignore[arg-type]
                              destination=staging / f.name)
            return _install_folder(staging, model_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    paths = [download_file(f.url, f.name, f.sha256, size=f.size, progress=progress) for f in entry.files]  # type: ignore[arg-type]
    return paths[0]


TRUSTED_FILE = "trusted-sha256.json"
"""In ``downloads/``: ``{file name: SHA-256}`` recorded at the first download of files without a published hash."""


def recorded_sha256(name: str) -> str | None:
    """The SHA-256 recorded when ``name`` (a manifest file without a published hash) was first downloaded here."""
    try:
        value = json.loads((downloads_dir() / TRUSTED_FILE).read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _record_sha256(name: str, digest: str) -> None:
    from hsam import atomic

    path = downloads_dir() / TRUSTED_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known[name] = digest
    atomic.write_text(path, json.dumps(known, indent=1, sort_keys=True) + "\n")


def _official_config(entry: ManifestEntry) -> Any:
    """The network an ``import-official`` entry's checkpoint must fit (backbone, input size, classes, LoRA rank)."""
    from hsam.model.config import ModelConfig

    classes = entry.extra.get("classes") or []
    return ModelConfig(backbone=entry.backbone, img_size=int(entry.extra.get("img_size", 512)),
                       num_classes=max(1, len(classes) - 1) if classes else 8,
                       lora_rank=int(entry.extra.get("lora_rank", 5)), cmattn="constant", keep_cmattn_tensors=True)


def _fetch_official(entry: ManifestEntry, progress: Progress | None) -> Path:
    """Download the base weights an official checkpoint needs, then the checkpoint, then convert and install it.

    A checkpoint without a published SHA-256 (the authors' Google Drive file) is checked for its exact structure
    (keys and shapes, read with ``weights_only=True``); its SHA-256 is recorded at the first download (trust on
    first use: a later download must match it) and written into the model card's provenance.
    """
    from hsam.model.official import check_official_file

    for base in entry.requires:
        fetch(base, progress)
    f = entry.files[0]
    config = _official_config(entry)
    path = download_file(f.url, f.name, f.sha256, size=f.size, progress=progress,  # type: ignore[arg-type]
                         verify=None if f.sha256 else (lambda candidate: check_official_file(candidate, config)))
    digest = sha256_file(path)
    trust = "published in the manifest"
    if not f.sha256:
        recorded = recorded_sha256(f.name)
        if recorded is None:
            _record_sha256(f.name, digest)
            trust = "recorded at the first download on this computer (no published hash; structure checked)"
        elif recorded != digest:
            path.unlink()
            raise HSAMError(
                f"{f.name} differs from the copy first downloaded on this computer (SHA-256 {digest[:12]}... != "
                f"recorded {recorded[:12]}...); the file was discarded; if its authors replaced it on purpose, remove "
                f"its line from {downloads_dir() / TRUSTED_FILE} and run the same command again"
            )
        else:
            trust = "matches the hash recorded at the first download on this computer (structure checked)"
    return import_official(path, None, entry.id, provenance={"url": f.url, "hsam_sha256_check": trust})


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class InstalledModel:
    """An installed model folder and what its card says (read as JSON, no torch import)."""

    id: str
    path: Path
    title: str
    backbone: str
    img_size: int
    priority: int
    demo: bool
    card: dict[str, Any]


def _read_card(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_BACKBONE_RANK = {"vit_h": 4, "vit_l": 3, "vit_b": 2, "tiny_vit": 1}


def available_models() -> list[InstalledModel]:
    """Installed models, most accurate first: manifest priority, then backbone size; demo models last."""
    manifest = load_manifest()
    if models_dir().is_dir():
        _tidy_models_dir(models_dir())
    found = []
    for path in _model_folders():
        if path.name.startswith("."):
            continue  # an install in progress or one that was killed (see _tidy_models_dir), never a model
        card = _read_card(path)
        if card is None or not (path / "model.safetensors").is_file():
            continue
        entry = manifest.get(path.name)
        demo = bool(card.get("demo", False))
        priority = entry.priority if entry else int(card.get("priority", 0) or 0)
        found.append(
            InstalledModel(
                id=path.name,
                path=path,
                title=str(card.get("title") or (entry.title if entry else path.name)),
                backbone=str(card.get("backbone", "")),
                img_size=int(card.get("img_size", 0) or 0),
                priority=priority - (1000 if demo else 0),
                demo=demo,
                card=card,
            )
        )
    found.sort(key=lambda m: (m.priority, _BACKBONE_RANK.get(m.backbone, 0), m.id), reverse=True)
    return found


def default_model_id() -> str:
    """The most accurate installed model's id; HSAMError (with what to do) when none is installed."""
    models = available_models()
    if not models:
        raise HSAMError(
            "no segmentation model is installed; see `hsam models list`, then `hsam models download ID` "
            "or `hsam models import-official H-SAM.pth` (or pass --model PATH)"
        )
    return models[0].id


def verify_model_folder(folder: Path) -> None:
    """Check that ``folder`` holds model.json + model.safetensors and that the tensors match the card's SHA-256."""
    tensors = folder / "model.safetensors"
    card = _read_card(folder)
    if card is None or not tensors.is_file():
        raise HSAMError(f"{folder} is not a model folder (needs model.json and model.safetensors)")
    expected = str(card.get("sha256") or "").lower()
    if not expected:
        raise HSAMError(f"model card {folder / 'model.json'} has no sha256; re-export the model with hsam")
    actual = sha256_file(tensors)
    if actual != expected:
        raise HSAMError(
            f"{tensors} does not match its card (SHA-256 {actual[:12]}... != {expected[:12]}...); "
            "the file is corrupt or was changed: export or download it again"
        )


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _tidy_models_dir(folder: Path) -> None:
    """Repair what an install killed mid-way (SIGKILL, power loss) left in ``models/``.

    ``.staging-<host>-<pid>-<id>-*`` is a copy in progress, ``.old-<host>-<pid>-<id>-*/<id>`` the copy it replaces.
    For installs of this host whose process is gone: a replaced copy whose successor never arrived (killed between
    the two renames) is moved back, and the leftovers are deleted. Running installs and other hosts are left alone.
    """
    host = _host_tag()
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith((f".staging-{host}-", f".old-{host}-"))]
    except OSError:
        return
    for path in leftovers:
        try:
            os.kill(int(path.name.split("-")[2]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        if path.name.startswith(".old-") and path.is_dir():
            for inner in path.iterdir():
                if not (folder / inner.name).exists():
                    os.replace(inner, folder / inner.name)
        shutil.rmtree(path, ignore_errors=True)


def _install_folder(source: Path, model_id: str) -> Path:
    """Verify a model folder and copy it into ``models/<id>`` atomically (replacing an older copy)."""
    verify_model_folder(source)
    target = models_dir() / model_id
    _ensure(models_dir())
    _tidy_models_dir(models_dir())
    tag = f"{_host_tag()}-{os.getpid()}-{model_id}-"  # lets a later run tell a dead install from a running one
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{tag}", dir=models_dir()))
    try:
        for name in MODEL_FILES:
            shutil.copy2(source / name, staging / name)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{tag}", dir=models_dir()))
            os.replace(target, old / model_id)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _valid_id(model_id: str) -> str:
    if not model_id or any(c in model_id for c in "/\\:") or model_id.startswith("."):
        raise HSAMError(f"invalid model id {model_id!r}: use letters, digits, '-', '_' and '.'")
    return model_id


def import_model(source: str | os.PathLike[str], model_id: str | None = None) -> Path:
    """Install a saved model (a folder with model.json + model.safetensors, or either file in it) into the cache."""
    path = Path(source)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise HSAMError(f"model not found: {source}")
    card = _read_card(path)
    if card is None:
        raise HSAMError(f"{path} has no readable model.json; give a folder written by hsam (save_model / hsam finetune)")
    return _install_folder(path, _valid_id(model_id or str(card.get("name") or path.name)))


def import_official(
    hsam_checkpoint: str | os.PathLike[str],
    sam_checkpoint: str | os.PathLike[str] | None = None,
    model_id: str = "hsam-vitb-synapse",
    provenance: dict[str, str] | None = None,
) -> Path:
    """Convert an official H-SAM ``.pth`` (+ SAM base ``.pth``) into our format and install it as ``model_id``.

    The SAM base file defaults to the downloaded ``sam-vit-b``; it must match a SHA-256 in the manifest. Both files
    are read with ``torch.load(weights_only=True)`` by :func:`hsam.model.official.import_official`. ``provenance``
    is added to the card's ``source`` record (where the checkpoint came from, how its hash was checked).
    """
    from hsam.model.checkpoint import save_model
    from hsam.model.official import import_official as convert

    manifest = load_manifest()
    entry = manifest.get(model_id)
    hsam_path = Path(hsam_checkpoint)
    if not hsam_path.is_file():
        raise HSAMError(f"H-SAM checkpoint not found: {hsam_path}")
    if sam_checkpoint is None:
        base_id = (entry.requires[0] if entry and entry.requires else "sam-vit-b")
        found = base_file(base_id)
        if found is None:
            raise HSAMError(f"the SAM base weights are missing: run `hsam models download {base_id}` or pass --sam PATH")
        sam_path = found
    else:
        sam_path = Path(sam_checkpoint)
        if not sam_path.is_file():
            raise HSAMError(f"SAM checkpoint not found: {sam_path}")
    known = {f.sha256: e.id for e in manifest.values() if e.kind == "base" for f in e.files if f.sha256}
    digest = sha256_file(sam_path)
    if digest not in known:
        raise HSAMError(
            f"{sam_path.name} is not an official SAM base file (SHA-256 {digest[:12]}... is not in the manifest); "
            "download it with `hsam models download sam-vit-b`"
        )
    try:
        model, card = convert(str(hsam_path), str(sam_path), model_id)
    except HSAMError:
        raise
    except (KeyError, RuntimeError, ValueError) as error:
        raise HSAMError(f"{hsam_path.name} is not a compatible H-SAM checkpoint for {model_id}: {str(error)[:160]}") from None
    source = card.extra.setdefault("source", {})
    source.update({"sam_sha256": digest, **(provenance or {})})
    if entry is not None and entry.extra.get("orientation"):
        card.orientation = str(entry.extra["orientation"])
    _ensure(partial_dir())
    staging = Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=partial_dir()))
    try:
        save_model(model, card, staging)
        return _install_folder(staging, model_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_model(model_id: str) -> Path:
    """Delete an installed model folder or a downloaded base file; returns what was removed."""
    folder = models_dir() / _valid_id(model_id)
    if folder.is_dir():
        shutil.rmtree(folder)
        return folder
    entry = load_manifest().get(model_id)
    if entry is not None and entry.kind == "base":
        removed = [downloads_dir() / f.name for f in entry.files if (downloads_dir() / f.name).is_file()]
        for path in removed:
            path.unlink()
        if removed:
            return removed[0]
    raise HSAMError(f"{model_id} is not installed (see: hsam models list)")


def needs_download(model_id: str) -> bool:
    """True for a manifest model that is not installed yet and can be downloaded (paths and installed ids: False)."""
    if "/" in model_id or "\\" in model_id or (models_dir() / model_id / "model.json").is_file():
        return False
    if (bundled_models_dir() / model_id / "model.json").is_file():
        return False
    entry = load_manifest().get(model_id)
    return entry is not None and entry.kind == "hsam" and entry.verified_download


def resolve_model(id_or_path: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """``(model id, folder)`` for an installed id, a model folder or a model file; None means the default model."""
    if id_or_path is None:
        model_id = default_model_id()
        installed = models_dir() / model_id
        return model_id, installed if installed.is_dir() else bundled_models_dir() / model_id
    text = str(id_or_path)
    if models_dir().is_dir():
        _tidy_models_dir(models_dir())
    installed = models_dir() / text
    if "/" not in text and "\\" not in text and (installed / "model.json").is_file():
        return text, installed
    bundled = bundled_models_dir() / text
    if "/" not in text and "\\" not in text and not text.startswith(".") and (bundled / "model.json").is_file():
        return text, bundled
    path = Path(text).expanduser()
    if path.exists():
        folder = path.parent if path.is_file() else path
        return (str((_read_card(folder) or {}).get("name") or folder.name)), folder
    manifest = load_manifest()
    if text in manifest:
        raise HSAMError(f"model {text} is not installed; run `hsam models download {text}` (see: hsam models list)")
    raise HSAMError(f"no model {text!r}: not an installed id and not a path (see: hsam models list)")


def load_named_model(id_or_path: str | os.PathLike[str] | None = None, device: str = "cpu") -> tuple["HSAM", "ModelCard"]:
    """Load an installed model by id, or a saved model by path (the default model when None).

    :func:`hsam.model.checkpoint.load_model` checks the tensors' SHA-256 against the card on every load.
    """
    from hsam.model.checkpoint import load_model

    _, folder = resolve_model(id_or_path)
    try:
        return load_model(folder, device=device)
    except HSAMError:
        raise
    except (KeyError, RuntimeError, ValueError, OSError) as error:
        raise HSAMError(f"could not load the model in {folder}: {str(error)[:200]}") from None
