"""Linewatch edge agent: capture, offline int8 inference, durable buffer, sync and OTA.

This package runs on the edge box. It must never import TensorFlow, ``cloud`` or
``training``; it owns the wire contract (:mod:`edge.protocol`) the other parts import.
"""

__version__ = "0.1.0"
