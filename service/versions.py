"""Model versions served side by side: which versions of each model name this server serves, which one is
each name's default, and which are retired.

A request names a version as BentoML tags one, `name:version`, wherever it names a model (the path's
`{name}`, SageMaker's `model=` attribute); a bare `name` gets the name's default version. The served
versions are the configured ones (`FHE_BENTO_MODELS=xgb:v1,xgb:v2`); the default and the retired ones are
state that every replica shares, so they live in the key store (`file://` or `s3://`), one document per
model name (`VersionState`), never only in a process:
- until a default is set, it is the name's last configured version;
- a retired version answers 410 `version_retired`, naming the default, to every request that names it:
  its clients make keys for the default and carry on (the Python client does it by itself);
- each worker reads the documents again every `FHE_BENTO_VERSIONS_REFRESH_SECONDS` (2 s) on a thread of
  its own, so a change made by another replica (or `fhe-bento versions` there) holds here within that
  time; a change made here holds here at once.
A key belongs to the version it was made for: keys are scoped by the client specs' SHA-256, so a version
whose client specs did not change keeps its keys, and one whose did never sees another's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import KeyStore
from fhe_bento.models.repository import ModelSpec, served_spec
from fhe_bento.protocol.names import CURRENT_VERSION_HEADER

log = logging.getLogger("bentoml.fhe_bento.service")


class VersionState(BaseModel):
    """The shared state of one model name's versions (a key-store document)."""

    default: str | None = None  # None: the last configured version
    retired: list[str] = []
    revision: int = 0  # counts the changes: a client can tell that it saw the latest


def split_tag(text: str) -> tuple[str, str | None]:
    """`name:version` -> (name, version); a bare `name` -> (name, None)."""
    name, sep, version = text.rpartition(":")
    return (name, version) if sep and name and version else (text, None)


def _document(name: str) -> str:
    return f"versions/{name}"


class VersionBook:
    def __init__(self, specs: dict[str, ModelSpec], store: KeyStore, refresh_seconds: float) -> None:
        self.specs = specs
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.configured: dict[str, list[str]] = {}  # name -> versions, in configuration order
        for spec in specs.values():
            self.configured.setdefault(spec.name, []).append(spec.version)
        self._states: dict[str, VersionState] = {}
        # One reader or writer of the documents at a time in this worker: a refresh that read before a change
        # here cannot overwrite it with the state it read.
        self._lock = threading.RLock()
        self.refresh()
        if refresh_seconds > 0:
            threading.Thread(target=self._refreshing, name="fhe-bento-versions", daemon=True).start()

    # --- reading ------------------------------------------------------------------------------------

    def refresh(self, names: Iterable[str] | None = None) -> None:
        """Read the state documents again (all names, or `names`)."""
        for name in list(names or self.configured):
            with self._lock:
                data = self.store.read_document(_document(name))
                try:
                    state = VersionState.model_validate_json(data) if data else VersionState()
                except ValidationError:
                    log.error("the versions document of %r is not valid: ignored", name)
                    state = VersionState()
                self._states[name] = state  # a whole replace: readers see the old state or the new one

    def _refreshing(self) -> None:
        while True:
            time.sleep(self.refresh_seconds)
            try:
                self.refresh()
            except Exception:  # a store that does not answer: keep the last state, try again
                log.exception("could not read the model versions from the key store")

    def state(self, name: str) -> VersionState:
        return self._states.get(name, VersionState())

    def default_version(self, name: str) -> str:
        return self.state(name).default or self.configured[name][-1]

    def resolve(self, text: str) -> ModelSpec:
        """The served version that `text` (`name` or `name:version`) names: 404 `unknown_model` for a name
        or version not served, 410 `version_retired` for a retired one."""
        # a served name holding a colon of its own is the whole text
        name, version = (text, None) if text in self.configured else split_tag(text)
        if name not in self.configured:
            raise FHEBentoError("unknown_model", f"no model named {name[:128]!r} is served")
        default = self.default_version(name)
        version = version or default
        if version in self.state(name).retired:
            raise FHEBentoError(
                "version_retired",
                f"version {version!r} of model {name!r} is retired; the current version is {default!r}",
                headers={CURRENT_VERSION_HEADER: default},
            )
        return served_spec(self.specs, f"{name}:{version}")

    def describe(self, name: str) -> dict[str, object]:
        """The default version's facts, and every served version with its client's SHA-256."""
        default = self.default_version(name)
        retired = self.state(name).retired
        return {
            **self.specs[f"{name}:{default}"].public(),
            "default_version": default,
            "versions": {
                version: {
                    "client_sha256": self.specs[f"{name}:{version}"].meta.client_sha256,
                    "default": version == default,
                    "retired": version in retired,
                }
                for version in self.configured[name]
            },
        }

    # --- changing (admin) ---------------------------------------------------------------------------

    def set_default(self, name: str, version: str) -> VersionState:
        """Make `version` the default of `name`; setting it again changes nothing. Returns the state, its
        default filled in."""
        return self._shown(name, self._change(name, version, default=True))

    def retire(self, name: str, version: str) -> VersionState:
        """Retire `version` of `name` (never the default: set another one first); again changes nothing.
        Returns the state, its default filled in."""
        return self._shown(name, self._change(name, version, default=False))

    def _shown(self, name: str, state: VersionState) -> VersionState:
        return state.model_copy(update={"default": state.default or self.default_version(name)})

    def _change(self, name: str, version: str, default: bool) -> VersionState:
        if f"{name}:{version}" not in self.specs:
            raise FHEBentoError("unknown_model", f"no model {name[:128]!r} with version {version[:64]!r}")
        with self._lock:
            self.refresh([name])  # from the store's latest, not this worker's copy
            state = self.state(name)
            if default:
                if state.default == version:
                    return state
                changed = state.model_copy(
                    update={
                        "default": version,
                        "retired": [v for v in state.retired if v != version],
                        "revision": state.revision + 1,
                    }
                )
            else:
                if version in state.retired:
                    return state
                if version == self.default_version(name):
                    raise FHEBentoError(
                        "version_conflict",
                        f"version {version!r} is the default of {name!r}: set another default first",
                    )
                changed = state.model_copy(
                    update={"retired": [*state.retired, version], "revision": state.revision + 1}
                )
            self.store.write_document(_document(name), changed.model_dump_json().encode())
            self._states[name] = changed
        log.info(
            "model %s versions: default=%s retired=%s (revision %d)",
            name,
            changed.default,
            changed.retired,
            changed.revision,
        )
        return changed
