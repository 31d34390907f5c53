"""A Proxmox VE API double for tests: a real HTTPS server on loopback, checked against
Proxmox's published API schema (the LXC subset, `apidata-lxc-subset.json`, copied here
from shared/pve so the tests never depend on a folder beside the clone).
"""

from pve.double import PveDouble, Task
from pve.schema import Schema, SchemaError

__all__ = ["PveDouble", "Schema", "SchemaError", "Task"]
