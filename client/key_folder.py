"""One model's private folder in the client's key cache: its client.zip (checked against its SHA-256) and
the keys concrete generates from it, once.

A model compiled with `ciphertext_format="tfhe-rs"` has a second private key, the TFHE-rs radix key that
encrypts its rows and decrypts its results, and its Concrete keyset is made from that key's LWE part.
concrete-ml 1.9 keeps the radix key in memory only and makes a new one at every key generation, and
concrete's key cache does not give back a keyset made from an initial key: a second process, or a second
call, would encrypt with a radix key the server's evaluation key was not made from, and decrypt garbage.
So this folder makes the two together, once, and keeps both: `tfhe-rs-secret-key` and `tfhe-rs-keyset`.

Private keys live only under the client's cache directory (default `~/.cache/fhe-bento`, or
`FHE_BENTO_CLIENT_CACHE`), one folder per model `client_sha256`. The folders the client creates there are
mode 0700 and every file in a model's folder 0600, whatever the umask.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fhe_bento.client.answers import FHEServiceError

if TYPE_CHECKING:
    import numpy as np


def default_cache_dir() -> Path:
    return Path(os.environ.get("FHE_BENTO_CLIENT_CACHE", Path.home() / ".cache" / "fhe-bento"))


def _private_dir(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700 (mkdir(parents=True) would give the parents
    the umask's mode), and make `path` 0700 if it already exists."""
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
            folder.chmod(0o700)  # mkdir's mode is masked by the umask
    path.chmod(0o700)


def _write_private(target: Path, write: Callable[[Path], object]) -> None:
    """`target` as `write` writes a file, mode 0600, whole or not at all (written beside it, then renamed)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a process that stopped mid-write
    write(tmp)
    tmp.chmod(0o600)
    tmp.replace(target)


def _make_private(root: Path) -> None:
    """Mode 0700 for `root` and every folder under it, 0600 for every file: concrete writes its keys with
    the process umask. Symbolic links are left alone, so that nothing outside `root` changes."""
    root.chmod(0o700)
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, 0o700), (files, 0o600)):
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    os.chmod(path, mode)


class KeyFolder:
    """`<cache_dir>/<client_sha256>` of the model `name`: its client.zip, and its keys under `keys/`.
    `fhe` is concrete's client on that folder (encryption and decryption)."""

    def __init__(
        self,
        cache_dir: Path,
        name: str,
        client_sha256: str,
        get_client_zip: Callable[[], tuple[bytes, str]],
    ) -> None:
        from concrete.ml.deployment import FHEModelClient

        self.name = name
        self.path = cache_dir / client_sha256
        self.keys = self.path / "keys"
        # Both folders exist, private, before concrete writes a key: its files are unreachable to others
        # from the start, not only once `generate_keys` has fixed their modes.
        _private_dir(self.path)
        _private_dir(self.keys)
        self._ensure_client_zip(client_sha256, get_client_zip)
        self.fhe = FHEModelClient(str(self.path), key_dir=str(self.keys))
        self.radix_key = self.path / "tfhe-rs-secret-key"
        self.tfhe_rs_keyset = self.path / "tfhe-rs-keyset"
        self.tfhe_rs = self.fhe.model.ciphertext_format == "tfhe-rs"  # a str enum in concrete-ml
        # A lock of its own: RemoteModel.ensure_key holds the model's key lock while keys are generated.
        self._keygen_lock = threading.Lock()
        self._keys_private = False

    def _ensure_client_zip(self, expected: str, get_client_zip: Callable[[], tuple[bytes, str]]) -> None:
        """Keep the cached client.zip if it hashes to `expected`; else download it (the server's hash
        header, when there is one, must agree too)."""
        target = self.path / "client.zip"
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            return
        data, header = get_client_zip()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected or (header and header != expected):
            raise FHEServiceError(
                0, "client_zip_mismatch", f"client.zip hashes to {actual}, expected {expected}"
            )
        _write_private(target, lambda path: path.write_bytes(data))

    def generate_keys(self) -> None:
        """Generate (or load from the key folder) the private and evaluation keys once, then make every
        file concrete wrote in the model's folder private."""
        with self._keygen_lock:
            if not self._keys_private:
                if self.tfhe_rs:
                    self._tfhe_rs_keys()
                else:
                    self.fhe.generate_private_and_evaluation_keys(force=False)
                _make_private(self.path)
                self._keys_private = True

    def _tfhe_rs_keys(self) -> None:
        """The radix key and the keyset made from it: both from this folder, or both made now. (concrete's
        key cache cannot give the keyset back: it files a keyset made from an initial key under another
        name than the one it looks up.)"""
        if self.radix_key.is_file():
            self.fhe.client.keys.load(self.tfhe_rs_keyset)
            radix_key = self.radix_key.read_bytes()
        else:
            import concrete_ml_extensions as fhext
            from concrete.fhe import tfhers

            radix_key, _, lwe_key = fhext.keygen_radix()
            tfhers.new_bridge(self.fhe.client).keygen_with_initial_keys({0: lwe_key}, force=True)
            _write_private(self.tfhe_rs_keyset, self.fhe.client.keys.save)  # concrete writes the file itself
            # Last: a keyset whose radix key was never written is made again.
            _write_private(self.radix_key, lambda path: path.write_bytes(radix_key))
            shutil.rmtree(self.keys)  # the key cache's copy of the keyset, never read back
            _private_dir(self.keys)
        self.fhe._tfhers_sk = radix_key  # what concrete-ml's client encrypts and decrypts rows with

    def evaluation_key(self) -> bytes:
        """The serialized evaluation key, generated on first use and kept in the key cache folder. (Not
        concrete-ml's get_serialized_evaluation_keys: for a TFHE-rs model it would make a new radix key.)"""
        self.generate_keys()
        return bytes(self.fhe.client.evaluation_keys.serialize())

    def encrypt(self, x: np.ndarray) -> bytes:
        """One row, quantized and encrypted: Concrete's serialized value, or a TFHE-rs model's radix array
        (concrete-ml's client returns it as a 1-tuple). A model without an evaluation key gets its private
        key here."""
        self.generate_keys()
        encrypted = self.fhe.quantize_encrypt_serialize(x)
        return encrypted[0] if isinstance(encrypted, tuple) else encrypted

    def load_private_key(self) -> None:
        """The private key that encrypted, for decryption: loaded from this folder (when another process
        encrypted), never made afresh."""
        held = self.radix_key.is_file() if self.tfhe_rs else any(self.keys.iterdir())
        if not self._keys_private and not held:
            # Fresh keys here would decrypt to garbage: the answer needs the key its rows were encrypted with.
            raise FHEServiceError(
                0,
                "no_private_key",
                f"no private key of {self.name} in {self.path}: decrypt "
                "with the key cache that encrypted (FHE_BENTO_CLIENT_CACHE)",
            )
        self.generate_keys()
