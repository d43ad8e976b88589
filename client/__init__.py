"""The fhe-bento client: key generation, encryption, transport and decryption. Private keys stay here."""

from fhe_bento.client.answers import FHEServiceError
from fhe_bento.client.api import FHEClient, RemoteModel

__all__ = ["FHEClient", "FHEServiceError", "RemoteModel"]
