"""``python -m mqttinfer`` runs the CLI (the local cluster starts nodes this way)."""

from mqttinfer.cli import main

main()
