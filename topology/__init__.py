"""Topology files and the namespace test lab (`topology.lab`)."""
