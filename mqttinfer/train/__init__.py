"""Offline knowledge pipeline: datasets, teacher, filter activations, students, ONNX bundle.

This package is the only place in mqttinfer where ``torch`` may be imported, and even here
only inside the modules that need it: importing ``mqttinfer.train`` or
``mqttinfer.train.cli`` never loads torch (the main CLI imports the latter at start-up).

Stages (each a ``mqttinfer train`` command, all of them chained by ``train all``):

1. ``teacher``      train a pre-activation WRN / MobileNetV2 teacher (``teacher.pt``)
2. ``activations``  per validation image, the spatial mean of every final-conv channel
                    (``activations.npy``, N×C float32, readable without torch)
3. ``partition``    filter activation network + normalized cut or Louvain communities
                    (``partition.json``; the maths lives in :mod:`mqttinfer.partition`)
4. ``students``     one student per partition, trained jointly with KD + activation
                    transfer, plus a plain and a partition-dropout FC head (``students.pt``)
5. ``export``       single-file ONNX students, head ``.npz``/``.onnx``, ``bundle.json``
"""

from __future__ import annotations

import os as _os

# torch's OpenMP threads spin while waiting by default. On a shared machine (a 2-core build box
# running other jobs) spinning threads fight over the cores and a training step can get ten
# times slower; passive waiting costs a little when idle and saves a lot under load. This has
# to be set before torch is first imported, which is why it lives in the package __init__.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
