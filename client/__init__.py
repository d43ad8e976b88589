"""The fhe-bento client: key generation, encryption, transport and decryption. Private keys stay here."""

from client.api import FHEClient, RemoteModel
from client.http_transport import FHEServiceError

__all__ = ["FHEClient", "FHEServiceError", "RemoteModel"]
