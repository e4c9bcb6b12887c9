"""Records, loaders for the public datasets, and the procedural shapes world."""

from mmdiff.data.records import Record

__all__ = ["Record"]
