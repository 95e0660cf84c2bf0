"""Linewatch cloud: model registry, signing, rollout, MQTT ingest, fleet state."""
