"""Checks every ciphertext and evaluation key against what concrete-ml's own client produces for the model,
before any byte of it reaches concrete (whose C++ parsers trust their input).

A model's expected shapes (`checks/capnp_wire.py`) are recorded at import from a throwaway key set and
ciphertext made by the model's client (`fhe-bento import`), and tied at load to the model's keyset in
`client.specs.json` (`check_keyset_params`). A message passes only when its size is exactly the model's,
it is a well-formed Cap'n Proto message, and its shape equals the model's: same segments, same structs
and data sections (so every key's parameters), same pointer kinds, one blob per payload of the exact
size. Only the contents of the payload blobs are free, and concrete reads any bytes there as integers.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fhe_bento.checks import radix_wire
from fhe_bento.checks.capnp_wire import MalformedMessage, Shape, first_difference, read_shape
from fhe_bento.contract.errors import FHEBentoError

if TYPE_CHECKING:  # models.repository imports this module
    from fhe_bento.models.repository import TrainingFacts


def _check(data: bytes | memoryview, size: int, shape: Shape, what: str, model: str) -> None:
    # The strict reader is pure Python and bounded, so it may classify a body of the wrong size too:
    # malformed (400) or a well-formed message of another circuit (422).
    invalid, mismatch = f"invalid_{what}", f"{what}_mismatch"
    noun = "ciphertext" if what == "ciphertext" else "evaluation key"
    try:
        got = read_shape(data)
    except MalformedMessage as exc:
        raise FHEBentoError(invalid, f"the body is not a serialized concrete {noun}: {exc}") from None
    if len(data) != size:
        raise FHEBentoError(
            mismatch,
            f"this {noun} was not made for model {model!r}: it has {len(data)} bytes, "
            f"the model's have {size}",
        )
    # Equal shapes (every valid row) are compared in one C-level `==`; the walk only names a difference.
    if got != shape and (difference := first_difference(got, shape)):
        raise FHEBentoError(mismatch, f"this {noun} was not made for model {model!r} ({difference})")


def check_ciphertext(data: bytes, size: int, shape: Shape, model: str) -> None:
    """Raise 400 invalid_ciphertext / 422 ciphertext_mismatch unless `data` has the model's exact shape."""
    _check(data, size, shape, "ciphertext", model)


def check_radix(data: bytes, layout: radix_wire.RadixLayout, model: str) -> None:
    """The same rule for a TFHE-rs radix ciphertext (`checks/radix_wire.py`): 400 invalid_ciphertext unless
    it is a well-formed radix array, 422 ciphertext_mismatch unless its size and layout are the model's."""
    try:
        got = radix_wire.read_radix(data)
    except radix_wire.MalformedRadix as exc:
        raise FHEBentoError(
            "invalid_ciphertext", f"the body is not a serialized TFHE-rs radix ciphertext: {exc}"
        ) from None
    difference = (
        f"it has {len(data)} bytes, the model's have {layout.bytes}"
        if len(data) != layout.bytes
        else radix_wire.first_difference(got, layout)
    )
    if difference:
        raise FHEBentoError(
            "ciphertext_mismatch", f"this ciphertext was not made for model {model!r}: {difference}"
        )


TRAINING_POSITIONS = ("x", "y", "weights", "bias")  # a training step's inputs, in concrete-ml's order


def check_training_values(values: list[bytes], first: int, facts: TrainingFacts, model: str) -> None:
    """Raise 400 invalid_ciphertext / 422 ciphertext_mismatch unless each of `values`, the training
    step's inputs from position `first` on, has the exact layout of that position: the client's, or for
    weights and bias also the layout a step returns. A batch where weights belong, or a batch of another
    batch size, is refused here."""
    for position, value in enumerate(values, start=first):
        layouts = facts.accepts(position)
        if any(len(value) == layout.bytes for layout in layouts[1:]):
            layouts = layouts[1:]  # a step's weights: held by the server, the client's are smaller
        try:
            check_ciphertext(value, layouts[0].bytes, layouts[0].shape, model)
        except FHEBentoError as exc:
            raise FHEBentoError(exc.code, f"{TRAINING_POSITIONS[position]}: {exc.message}") from None


def check_key(data: bytes | memoryview, size: int, shape: Shape, model: str) -> None:
    """Raise 400 invalid_key / 422 key_mismatch unless `data` has the model's exact shape."""
    _check(data, size, shape, "key", model)


# --- the model's keyset, as its evaluation keys carry it -------------------------------------------
# Data-section layouts of concrete-protocol.capnp (concrete-python 2.10), from the schema's field ordinals
# by Cap'n Proto's layout rules: name -> (struct format, byte offset).
_KEY_INFO = {"id": ("I", 0), "inputId": ("I", 4), "outputId": ("I", 8), "compression": ("H", 12)}
_PARAMS = {
    "lweBootstrapKeys": {
        "levelCount": ("I", 0),
        "baseLog": ("I", 4),
        "glweDimension": ("I", 8),
        "polynomialSize": ("I", 12),
        "variance": ("d", 16),
        "integerPrecision": ("I", 24),
        "keyType": ("H", 28),
        "inputLweDimension": ("I", 32),
    },
    "lweKeyswitchKeys": {
        "levelCount": ("I", 0),
        "baseLog": ("I", 4),
        "variance": ("d", 8),
        "integerPrecision": ("I", 16),
        "keyType": ("H", 20),
        "inputLweDimension": ("I", 24),
        "outputLweDimension": ("I", 28),
    },
    "packingKeyswitchKeys": {
        "levelCount": ("I", 0),
        "baseLog": ("I", 4),
        "glweDimension": ("I", 8),
        "polynomialSize": ("I", 12),
        "inputLweDimension": ("I", 16),
        "innerLweDimension": ("I", 20),
        "variance": ("d", 24),
        "integerPrecision": ("I", 32),
        "keyType": ("H", 36),
    },
}
_ENUMS = {"compression": ("none", "seed", "paillier"), "keyType": ("binary", "ternary")}
_MODULI = ("native", "powerOfTwo", "integer")  # the union of struct Modulus, by discriminant


def _unwrap(shape: Shape) -> Shape:
    return shape[1] if shape and shape[0] == "F" else shape


def _fields(data_hex: str, layout: dict[str, tuple[str, int]]) -> dict:
    data = bytes.fromhex(data_hex)
    values = {}
    for name, (fmt, offset) in layout.items():
        value = struct.unpack_from("<" + fmt, data.ljust(offset + 8, b"\0"), offset)[0]
        values[name] = _ENUMS[name][value] if name in _ENUMS and value < len(_ENUMS[name]) else value
    return values


def keyset_params(key_shape: Shape) -> dict[str, list[dict]]:
    """The id, compression and parameters of every key in an evaluation key's shape, by key kind."""
    root = _unwrap(key_shape[1])
    kinds = {}
    for kind, pointer in zip(_PARAMS, root[2], strict=False):
        keys = []
        for key in _unwrap(pointer)[3] if pointer else []:
            info = _unwrap(key[2][0])
            params = _unwrap(info[2][0])
            modulus = _unwrap(params[2][0])
            keys.append(
                {
                    **_fields(info[1], _KEY_INFO),
                    "params": _fields(params[1], _PARAMS[kind]),
                    "modulus": _MODULI[struct.unpack_from("<H", bytes.fromhex(modulus[1]))[0]],
                }
            )
        kinds[kind] = keys
    return kinds


def check_keyset_params(key_shape: Shape, client_zip: Path) -> None:
    """Raise ValueError unless every key of the recorded shape has the ids, compression and parameters of
    the model's keyset in client.specs.json: the shape a key must match is the model's own."""
    with zipfile.ZipFile(client_zip) as archive:
        keyset = json.loads(archive.read("client.specs.json"))["keyset"]
    recorded = keyset_params(key_shape)
    for kind, keys in recorded.items():
        specs = keyset.get(kind, [])
        if len(keys) != len(specs):
            raise ValueError(f"{kind}: {len(keys)} keys recorded, the keyset has {len(specs)}")
        for key, spec in zip(keys, specs, strict=False):
            expected = {name: spec[name] for name in _KEY_INFO}
            got = {name: key[name] for name in _KEY_INFO}
            for name in _PARAMS[kind]:
                expected[name], got[name] = spec["params"][name], key["params"][name]
            expected["modulus"], got["modulus"] = (
                next(iter(spec["params"]["modulus"]["modulus"])),
                key["modulus"],
            )
            for name, value in expected.items():
                same = (
                    math.isclose(got[name], value, rel_tol=1e-12)
                    if name == "variance"
                    else got[name] == value
                )
                if not same:
                    raise ValueError(
                        f"{kind}[{key['id']}].{name} is {got[name]!r}, the keyset says {value!r}"
                    )
