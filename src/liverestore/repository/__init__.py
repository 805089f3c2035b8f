"""Repository format: chunks, manifests and the catalog, kept apart from the commands using them."""

from liverestore.repository.manifest import DiskManifest
from liverestore.repository.repo import Repository, RestorePoint

__all__ = ["DiskManifest", "Repository", "RestorePoint"]
