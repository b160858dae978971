"""idlm-serve cluster layer: Ray Serve OpenAI ingress, engine replicas, metrics export.
The only package that imports ray."""
