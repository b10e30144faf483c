"""Data layer: the TrafficGrid type, readers, importers and lazy windows."""
from simmstnet.data.grid import SERVICES, TrafficGrid

__all__ = ["TrafficGrid", "SERVICES"]
