"""Pluggable probes, one module each, registered under the ``encoder_probe.probes`` entry point group."""
