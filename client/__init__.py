"""The fhe-bento client: key generation, encryption, transport and decryption. Private keys stay here."""

from fhe_bento.client.api import FHEClient, RemoteModel
from fhe_bento.client.http_transport import FHEServiceError

__all__ = ["FHEClient", "FHEServiceError", "RemoteModel"]
