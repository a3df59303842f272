"""`python -m fabric.demo`: the demo's entry point (fabric/demo/steps.py)."""

from fabric.demo.steps import main

main()
