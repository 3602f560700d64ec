"""The planner: device inventory, student catalog, grouping, assignment, plans, simulation.

Pure computation (numpy, scipy, networkx, yaml): no MQTT, no torch, no clock. See
docs/planner.md for the formats, the algorithms and where they deviate from RoCoIn.
"""

from __future__ import annotations
