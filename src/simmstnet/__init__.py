"""simmstnet: sim2real multi-task spatiotemporal forecasting of cellular network traffic."""
from simmstnet.data.grid import SERVICES, TrafficGrid
from simmstnet.errors import UserError

__version__ = "0.1.0"
__all__ = ["TrafficGrid", "SERVICES", "UserError", "__version__"]
